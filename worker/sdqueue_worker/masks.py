"""Decode an untrusted inpainting mask: white repaints, black keeps, grey blends.

A mask must be exactly the size of its input image (after EXIF orientation), so that the two
line up before both are fitted to the job's size the same way. Only grayscale masks are taken:
mode ``1`` or ``L``, or an RGB image whose three channels are equal. A colour image or one with
an alpha channel is refused: which of its channels means "repaint" would be a guess.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from sdqueue.errors import InputImageError
from sdqueue_worker.images import _open

GRAY_MODES = ("1", "L")


def _to_gray(mask: Image.Image) -> Image.Image:
    if mask.mode in GRAY_MODES:
        return mask.convert("L")
    if mask.mode == "RGB":
        pixels = np.asarray(mask)
        if (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all():
            return Image.fromarray(pixels[..., 0], "L")
        raise InputImageError(
            "mask_url: the mask has colours; send a grayscale mask (white repaints, black keeps)"
        )
    raise InputImageError(
        f"mask_url: mask mode {mask.mode} is not accepted; send a grayscale mask "
        "(mode L or 1, or RGB with equal channels; no alpha): white repaints, black keeps"
    )


def decode_mask(data: bytes, max_pixels: int, image_size: tuple[int, int]) -> Image.Image:
    """Open an untrusted mask as mode ``L``, or raise InputImageError naming the problem."""
    try:
        mask = _open(data, max_pixels)
    except InputImageError as exc:
        raise InputImageError(str(exc).replace("input image:", "mask_url:", 1)) from None
    try:
        mask.load()
        mask = ImageOps.exif_transpose(mask) or mask
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputImageError(f"mask_url: truncated or corrupt ({exc}); upload it again") from None
    if mask.size != image_size:
        raise InputImageError(
            f"mask_url: the mask is {mask.size[0]}x{mask.size[1]} but the image is "
            f"{image_size[0]}x{image_size[1]}; send a mask of the image's size"
        )
    return _to_gray(mask)
