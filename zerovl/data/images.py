"""Load images safely and bound their size before the vision tower's own processor sees them."""

from __future__ import annotations

import io
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
    return _bounded(image, max_pixels)


def load_image_bytes(data: bytes, max_pixels: int, source: str = "?", name: str = "image") -> Image.Image:
    """Like :func:`load_image` for an image held in memory (a member of a tar shard)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{source}: image {name} cannot be read ({e.__class__.__name__})") from None
    return _bounded(image, max_pixels)


def _bounded(image: Image.Image, max_pixels: int) -> Image.Image:
    size = fit_max_pixels(image.width, image.height, max_pixels)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def image_problem(path: str | None = None, data: bytes | None = None) -> str | None:
    """``None`` when the image decodes, else ``missing_image`` or ``corrupt_image`` (for data checks)."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            im.load()
    except FileNotFoundError:
        return "missing_image"
    except (UnidentifiedImageError, OSError, ValueError):
        return "corrupt_image"
    return None
