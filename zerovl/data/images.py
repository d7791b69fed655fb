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


def _opened(path_or_file, name: str, source: str | None):
    """Image.open with every way it fails (missing, unreadable, decompression bomb) as one DataError line."""
    source = f"{source}: " if source else ""
    try:
        return Image.open(path_or_file)
    except FileNotFoundError:
        raise DataError(f"{source}image {name} not found") from None
    except Image.DecompressionBombError:
        limit = f" of {2 * Image.MAX_IMAGE_PIXELS:,} pixels" if Image.MAX_IMAGE_PIXELS else ""
        raise DataError(f"{source}image {name} exceeds PIL's decompression-bomb limit{limit}; shrink it offline "
                        "or set data.skip_bad_samples=true to skip it") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{source}image {name} cannot be read ({e.__class__.__name__})") from None


def image_size(path: str, source: str | None = None, data: bytes | None = None) -> tuple[int, int]:
    """(width, height) from the file header (or from ``data``, an in-memory file), without decoding pixels."""
    with _opened(io.BytesIO(data) if data is not None else path, path, source) as im:
        return im.width, im.height


def _decode(opened: Image.Image, max_pixels: int, name: str, source: str) -> Image.Image:
    """RGB at exactly ``fit_max_pixels`` of the original size. A JPEG much larger than that is decoded at a
    reduced scale (draft mode: 1/2, 1/4 or 1/8, never below the target), so a 50-megapixel photo never
    exists in full in memory; the final resize lands on the same size as without draft mode."""
    with opened as im:
        target = fit_max_pixels(im.width, im.height, max_pixels)
        try:
            if target != im.size and im.format == "JPEG":
                im.draft("RGB", target)
            im.load()
            image = im.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{source}: image {name} cannot be read ({e.__class__.__name__})") from None
    if image.size != target:
        image = image.resize(target, Image.Resampling.BICUBIC)
    return image


def load_image(path: str, max_pixels: int, source: str = "?") -> Image.Image:
    """Open as RGB and downscale to at most ``max_pixels`` pixels, keeping aspect ratio.

    Any failure is a DataError naming the sample (``file:line``) and the image path.
    """
    return _decode(_opened(path, path, source), max_pixels, path, source)


def load_image_bytes(data: bytes, max_pixels: int, source: str = "?", name: str = "image") -> Image.Image:
    """Like :func:`load_image` for an image held in memory (a member of a tar shard)."""
    return _decode(_opened(io.BytesIO(data), name, source), max_pixels, name, source)


def image_problem(path: str | None = None, data: bytes | None = None) -> str | None:
    """``None`` when the image decodes, else ``missing_image`` or ``corrupt_image`` (for data checks)."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            im.load()
    except FileNotFoundError:
        return "missing_image"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return "corrupt_image"
    return None
