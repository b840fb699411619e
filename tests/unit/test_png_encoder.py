"""The parallel-strip PNG encoder: exact pixels through Pillow and zlib, every strip count and level."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sdqueue_worker import png_encoder
from sdqueue_worker.png_encoder import encode_png


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x % 256, y % 256, (x + y) // 2 % 256], axis=-1).astype(np.uint8)


def decoded(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.mode) == ("PNG", "RGB")
    return np.asarray(image)


def idat(data: bytes) -> bytes:
    """The concatenated IDAT payload, each chunk's CRC checked on the way."""
    position, payload = len(png_encoder.SIGNATURE), b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        if kind == b"IDAT":
            payload += body
        position += 12 + length
    return payload


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (63, 5), (64, 64), (130, 7), (512, 512), (777, 333)])
@pytest.mark.parametrize("level", [0, 1, 9])
def test_pixels_come_back_exactly(shape: tuple[int, int], level: int) -> None:
    for pixels in (noise(*shape), gradient(*shape)):
        data = encode_png(pixels, level)
        assert np.array_equal(decoded(data), pixels)
        raw = zlib.decompress(idat(data))  # one zlib stream, its Adler-32 checked by zlib
        assert len(raw) == shape[0] * (shape[1] * 3 + 1)


def test_a_tall_image_is_deflated_in_several_strips(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    deflate = png_encoder._deflate
    monkeypatch.setattr(png_encoder, "THREADS", 4)
    monkeypatch.setattr(
        png_encoder, "_deflate", lambda data, level, last: calls.append(last) or deflate(data, level, last)
    )
    pixels = gradient(512, 96)
    assert np.array_equal(decoded(encode_png(pixels, 1)), pixels)
    assert calls.count(True) == 1 and len(calls) == 4


def test_smooth_images_compress_about_as_well_as_pillow() -> None:
    from tests.helpers import smooth_image

    for seed in range(3):
        pixels = np.asarray(smooth_image(seed, 256))
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        ours = len(encode_png(pixels, 1))
        assert ours <= 1.15 * len(buffer.getvalue()), (seed, ours, len(buffer.getvalue()))


def test_high_levels_go_to_pillows_adaptive_filters() -> None:
    """Levels above FAST_PNG_LEVELS ask for small files: Pillow's per-row filter choice, one thread."""
    from sdqueue_worker.formats import OutputEncoding

    pixels = gradient(128, 128)
    small = OutputEncoding("png", None, False, 9, parallel_png=True).encode(pixels)
    fast = OutputEncoding("png", None, False, 1, parallel_png=True).encode(pixels)
    assert np.array_equal(decoded(small), pixels) and np.array_equal(decoded(fast), pixels)
    assert fast == encode_png(pixels, 1) and small != encode_png(pixels, 9)
    assert len(small) < len(encode_png(pixels, 9))


def test_images_of_a_shared_batch_go_to_pillow_on_one_thread() -> None:
    """Only a job that ran alone gets the parallel encoder: beside a running batch it cost 6 %."""
    from sdqueue.contract import Txt2ImgJob
    from sdqueue_worker.formats import encoding_for

    pixels = gradient(128, 128)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    job = Txt2ImgJob(prompt="p")
    assert encoding_for(job, 1).encode(pixels) == buffer.getvalue()
    assert encoding_for(job, 1, ran_alone=True).encode(pixels) == encode_png(pixels, 1)


def test_a_non_rgb_array_is_refused() -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        encode_png(np.zeros((4, 4, 4), np.uint8), 1)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        encode_png(np.zeros((4, 4, 3), np.float32), 1)
