"""Turning a request's ``image_url`` into image bytes without opening a hole in the host.

- ``data:image/...;base64,...`` URLs are decoded in memory.
- Local paths (plain or ``file://``) are read only when ``--image-root`` is set, and only when the
  resolved path (symlinks followed) lies inside it.
- http(s) URLs are refused unless ``--allow-remote-images``; then fetched with a timeout and a size cap.
- The header is read before any decoding and images over the pixel limit are refused, so a
  decompression bomb never reaches the decoder.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError


class ImageRefused(ValueError):
    """The image cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class MediaPolicy:
    image_root: Path | None = None
    allow_remote: bool = False
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    fetch_timeout_s: float = 10.0


def image_bytes(url: str, policy: MediaPolicy) -> bytes:
    """The bytes of one ``image_url``, checked against the policy and the pixel limit."""
    if url.startswith("data:"):
        data = _data_url(url)
    elif url.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise ImageRefused("remote image URLs are refused: send the image as a data: URL, or start the "
                               "server with --allow-remote-images")
        data = _fetch(url, policy)
    else:
        data = _local(url, policy)
    if len(data) > policy.max_image_bytes:
        raise ImageRefused(f"image is {len(data):,} bytes; the limit is {policy.max_image_bytes:,}")
    check_pixels(data, policy.max_image_pixels)
    return data


def check_pixels(data: bytes, max_pixels: int) -> None:
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            width, height = im.size
    except Image.DecompressionBombError:  # PIL's own header check, past twice its warning size
        raise ImageRefused(f"image has over {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels (a decompression bomb); "
                           f"the limit is {max_pixels:,}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageRefused("image cannot be decoded (not PNG, JPEG, WebP, GIF or BMP data)") from None
    if width * height > max_pixels:
        raise ImageRefused(f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}")


def _data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageRefused("a data URL must look like data:image/png;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRefused("the data URL's base64 payload is malformed") from None


def _local(url: str, policy: MediaPolicy) -> bytes:
    if policy.image_root is None:
        raise ImageRefused("local image paths are refused: send the image as a data: URL, or start the server "
                           "with --image-root DIR")
    if "://" in url and not url.startswith("file://"):
        raise ImageRefused(f"unsupported image URL scheme {url.split('://')[0]!r}: use data:, a path or file://")
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
    root = Path(os.path.realpath(policy.image_root))
    resolved = Path(os.path.realpath(root / path))  # an absolute path replaces root; realpath follows links
    if not resolved.is_relative_to(root):
        raise ImageRefused("image path is outside --image-root")
    if not resolved.is_file():
        raise ImageRefused("image path does not exist under --image-root")
    return resolved.read_bytes()


def _fetch(url: str, policy: MediaPolicy) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "zerovl-serve"})
    try:
        with urllib.request.urlopen(request, timeout=policy.fetch_timeout_s) as response:  # noqa: S310 (opted in)
            data = response.read(policy.max_image_bytes + 1)
    except (OSError, ValueError) as e:
        raise ImageRefused(f"could not fetch the image URL ({e.__class__.__name__})") from None
    return data
