"""Load images safely and bound their size before the vision tower's own processor sees them."""

from __future__ import annotations

import math

from PIL import Image, UnidentifiedImageError

from zerovl.errors import DataError


def fit_max_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Largest (w, h) with the same aspect ratio and w*h <= max_pixels; never upscales."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    while w * h > max_pixels:  # floor rounding can still overshoot by a pixel row
        if w >= h:
            w -= 1
        else:
            h -= 1
    return w, h


def load_image(path: str, max_pixels: int, source: str = "?") -> Image.Image:
    """Open as RGB and downscale to at most ``max_pixels`` pixels, keeping aspect ratio.

    Any failure is a DataError naming the sample (``file:line``) and the image path.
    """
    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{source}: image {path} not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{source}: image {path} cannot be read ({e.__class__.__name__})") from None
    size = fit_max_pixels(image.width, image.height, max_pixels)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image
