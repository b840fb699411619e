"""Decode untrusted input images safely (outputs are encoded in sdqueue_worker.formats).

Only PNG, JPEG and WebP are opened (no FITS, TIFF, GIF, SVG...). The pixel count is checked
from the header before any pixel is decoded, so a decompression bomb (a small file with huge
dimensions) is refused without allocating it; a progressive JPEG with more scans than
SDQ_MAX_JPEG_SCANS (each scan re-decodes the image: 60,000 scans took 28 s) is refused before
decoding. Modes are normalised to 8-bit RGB: CMYK,
16-bit, grayscale, RGBA/LA (composited on white), palette, and EXIF orientation are handled.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from sdqueue.errors import InputImageError
from sdqueue.uploads import open_image


def _open(data: bytes, max_pixels: int) -> Image.Image:
    Image.MAX_IMAGE_PIXELS = max_pixels
    image: Image.Image = open_image(data, max_pixels)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def jpeg_scans(data: bytes) -> int:
    """How many scans (SOS markers) a JPEG has. Entropy-coded data stuffs every 0xFF byte as
    0xFF00, so each ``FF DA`` in the file is a real marker."""
    return data.count(b"\xff\xda")


def decode_input_image(data: bytes, max_pixels: int, max_scans: int = 64) -> Image.Image:
    """Open, verify, orient and convert an untrusted image to RGB, or raise InputImageError.

    Decoding time is bounded before any pixel is decoded: the pixel count from the header, and
    for JPEGs the number of scans (a progressive JPEG decodes the whole image again per scan).
    """
    image = _open(data, max_pixels)
    if image.format == "JPEG" and (scans := jpeg_scans(data)) > max_scans:
        raise InputImageError(
            f"input image: a JPEG with {scans} scans (the limit is {max_scans}; encoders write about 10); "
            "re-encode it as a baseline JPEG or PNG"
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return _to_rgb(image)
    except InputImageError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputImageError(f"input image: truncated or corrupt ({exc}); upload it again") from None


def fit_to(image: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop to the target aspect ratio, then resize: no distortion, no letterbox."""
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
