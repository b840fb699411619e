"""A PNG encoder for RGB uint8 arrays that deflates horizontal strips in parallel.

Pillow's PNG writer picks a filter per row by trying all five and deflates on one thread: about
45 ms for a 512x512 image at level 1 on a small VM, on the critical path of every single job.
Here every row uses the Sub filter (one vectorised subtraction), the rows are cut into strips
and each strip is deflated on its own thread (zlib releases the GIL), ending in a sync flush
so the pieces join into one valid zlib stream (the way pigz does it); the Adler-32 checksum is
computed over the whole filtered data. Any PNG decoder reads the result; the pixels are exact.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUB_FILTER = 1
MIN_STRIP_ROWS = 64
THREADS = max(1, min(8, os.cpu_count() or 1))
_pool = ThreadPoolExecutor(THREADS, thread_name_prefix="sdq-png")


def sub_filtered(pixels: np.ndarray) -> bytes:
    """Each scanline prefixed with filter type 1 (Sub): every byte minus the byte one pixel left."""
    height, width, channels = pixels.shape
    rows = pixels.reshape(height, width * channels)
    out = np.empty((height, width * channels + 1), np.uint8)
    out[:, 0] = SUB_FILTER
    out[:, 1 : channels + 1] = rows[:, :channels]
    np.subtract(rows[:, channels:], rows[:, :-channels], out=out[:, channels + 1 :])
    return out.tobytes()


def _deflate(data: bytes, level: int, last: bool) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray, level: int) -> bytes:
    """PNG file bytes of an HxWx3 uint8 array at zlib ``level`` (0-9)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 array, got {pixels.dtype} {pixels.shape}")
    height, width, _ = pixels.shape
    raw = sub_filtered(np.ascontiguousarray(pixels))
    strips = max(1, min(THREADS, height // MIN_STRIP_ROWS))
    row_bytes = width * 3 + 1
    step = -(-height // strips) * row_bytes
    parts = [raw[start : start + step] for start in range(0, len(raw), step)]
    last = len(parts) - 1
    deflated = _pool.map(lambda index: _deflate(parts[index], level, index == last), range(len(parts)))
    header = b"\x78\x01"  # zlib: deflate, 32 KiB window, no preset dictionary
    stream = header + b"".join(deflated) + struct.pack(">I", zlib.adler32(raw))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")
