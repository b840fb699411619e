"""Check an img2img input before it is stored, with the worker's own limits and messages.

Only PNG, JPEG and WebP are accepted; the size is checked before anything else and the pixel
count from the header, before any pixel is decoded (a decompression bomb costs nothing). The worker
checks every input again when it reads it: this is the early refusal, not the only one.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Any

from sdqueue.errors import InputImageError
from sdqueue.locations import ObjectRef

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


@dataclass(frozen=True)
class InputImage:
    """An input image that passed the checks."""

    data: bytes
    format: str
    width: int
    height: int

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def ref(self, bucket: str, prefix: str) -> ObjectRef:
        """Content-addressed: the same bytes always land on the same key."""
        return ObjectRef(bucket, f"{prefix.strip('/')}/{self.sha256}.{EXTENSIONS[self.format]}")


def check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise InputImageError(
            f"input image: {size} bytes is over the {max_bytes}-byte limit; send a smaller file"
        )
    if size == 0:
        raise InputImageError("input image: the file is empty")


def open_image(data: bytes, max_pixels: int, verify: bool = False) -> Any:
    """Open an untrusted PNG/JPEG/WebP from its header (no pixels decoded; with ``verify``, its
    structure checked too) and check its pixel count; raises InputImageError naming what to fix.
    Shared by the client's upload check and the worker's decoder."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
            if verify:
                image.verify()
        except UnidentifiedImageError:
            raise InputImageError(
                "input image: not a PNG, JPEG or WebP file (other formats are not accepted)"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputImageError(
                f"input image: more than {max_pixels} pixels; send a smaller image"
            ) from None
        except (OSError, SyntaxError, ValueError) as exc:  # a broken header, e.g. a JPEG cut short
            raise InputImageError(f"input image: truncated or corrupt ({exc}); upload it again") from None
    width, height = image.size
    if width * height > max_pixels or width < 1 or height < 1:
        raise InputImageError(f"input image: {width}x{height} is over the {max_pixels}-pixel limit")
    return image


def inspect_image(data: bytes, max_bytes: int, max_pixels: int) -> InputImage:
    """Type, size and pixel checks of an untrusted image; raises InputImageError naming what to fix."""
    check_size(len(data), max_bytes)
    image = open_image(data, max_pixels, verify=True)
    width, height = image.size
    return InputImage(data, str(image.format), width, height)
