"""Output image formats: PNG (default), WebP (lossy or lossless) and JPEG, each with its content type.

PNG keeps the worker's fast compress level (``SDQ_PNG_COMPRESS_LEVEL``, 1 by default). A job that
ran alone on the GPU, at levels 0-3, goes through ``sdqueue_worker.png_encoder`` (strips deflated
in parallel: 2-2.5x faster, files about 10 % larger on photographs), since its encode is on the
critical path of its latency; images of a shared batch, and levels 4-9, get Pillow's encoder on
one thread: with a batch running on the GPU, eight parallel encodes slowed the saturated worker
by 6 % on an H200 (4.125 vs 4.393 images/s, same run). Lossy formats take the
job's ``output_quality`` (default ``DEFAULT_QUALITY``); WebP uses ``method=4``, Pillow's default
speed/size trade-off, and JPEG 4:2:0 chroma subsampling below quality 90 (4:4:4 from 90 up, so
high-quality JPEGs keep thin coloured edges).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from sdqueue.contract import AnyJob
from sdqueue_worker.png_encoder import encode_png

DEFAULT_QUALITY = 90
FAST_PNG_LEVELS = range(4)
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}


@dataclass(frozen=True)
class OutputEncoding:
    """How a job's images are written: format, quality, lossless flag, content type, extension."""

    format: str
    quality: int | None
    lossless: bool
    png_compress_level: int
    parallel_png: bool = False
    """PNG through the parallel-strip encoder (levels 0-3 only): for a job that ran alone."""

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the encoding."""
        return {
            "format": self.format,
            "quality": self.quality,
            "lossless": self.lossless,
            "content_type": self.content_type,
        }

    def encode(self, pixels: np.ndarray) -> bytes:
        """uint8 HxWx3 array to file bytes in this encoding."""
        if self.format == "png" and self.parallel_png and self.png_compress_level in FAST_PNG_LEVELS:
            return encode_png(pixels, self.png_compress_level)
        buffer = io.BytesIO()
        image = Image.fromarray(pixels, "RGB")
        if self.format == "png":
            image.save(buffer, format="PNG", compress_level=self.png_compress_level)
        elif self.format == "webp":
            if self.lossless:
                image.save(buffer, format="WEBP", lossless=True, quality=100, method=4)
            else:
                image.save(buffer, format="WEBP", quality=self.quality, method=4)
        else:
            quality = self.quality or DEFAULT_QUALITY
            image.save(buffer, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
        return buffer.getvalue()


def encoding_for(job: AnyJob, png_compress_level: int, ran_alone: bool = False) -> OutputEncoding:
    """The encoding a job asked for, with the defaults filled in (so the manifest says what ran);
    ``ran_alone``: its batch held only its own images (PNG may then use the parallel encoder)."""
    lossy = job.output_format == "jpeg" or (job.output_format == "webp" and not job.output_lossless)
    quality = (job.output_quality or DEFAULT_QUALITY) if lossy else None
    return OutputEncoding(job.output_format, quality, job.output_lossless, png_compress_level, ran_alone)
