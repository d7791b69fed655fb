"""Images that must not crash a run: decompression bombs, very large JPEGs (decoded at reduced scale),
unreadable files — each one DataError line naming the image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from zerovl.data.images import fit_max_pixels, image_problem, image_size, load_image, load_image_bytes
from zerovl.errors import DataError


def _photo(path, size=(2400, 1600)):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[1] // 40, size[0] // 40, 3), dtype=np.uint8)
    Image.fromarray(base).resize(size, Image.Resampling.BILINEAR).save(path, quality=90)
    return path


def test_decompression_bomb_is_one_line_naming_the_image(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 90k pixels > 2x the limit: PIL's error path
    with pytest.raises(DataError, match=r"sample:3: image .*bomb.png exceeds PIL's decompression-bomb limit of 2,000 pixels") as err:
        load_image(str(path), 10_000, "sample:3")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="decompression-bomb limit"):
        image_size(str(path))
    with pytest.raises(DataError, match="decompression-bomb limit"):
        load_image_bytes(path.read_bytes(), 10_000, "shard:k", "k.png")
    assert image_problem(str(path)) == "corrupt_image"


def test_large_jpeg_decodes_in_draft_mode_to_the_same_size(tmp_path, monkeypatch):
    path = _photo(tmp_path / "big.jpg")
    cap = 60_000
    drafted = []
    from PIL import JpegImagePlugin

    real_draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, *a: drafted.append(real_draft(self, *a)) or drafted[-1])
    small = load_image(str(path), cap)
    assert drafted and drafted[0] is not None, "a JPEG 64x over max_pixels should decode at reduced scale"
    assert small.size == fit_max_pixels(2400, 1600, cap)
    # the same picture as a full decode resized to the same size (draft uses DCT scaling)
    with Image.open(path) as im:
        full = im.convert("RGB").resize(small.size, Image.Resampling.BICUBIC)
    diff = np.abs(np.asarray(full, dtype=np.int16) - np.asarray(small, dtype=np.int16)).mean()
    assert diff < 6, diff


def test_png_is_not_drafted_and_small_images_untouched(tmp_path):
    path = tmp_path / "p.png"
    Image.new("P", (50, 40)).save(path)  # palette-mode PNG, as some real datasets ship
    image = load_image(str(path), 10_000)
    assert image.mode == "RGB" and image.size == (50, 40)


def test_truncated_and_missing_images(tmp_path):
    path = _photo(tmp_path / "t.jpg", (400, 300))
    data = path.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=r"s:1: image .*cut.jpg cannot be read"):
        load_image(str(tmp_path / "cut.jpg"), 1 << 30, "s:1")
    with pytest.raises(DataError, match=r"s:2: image .*gone.jpg not found"):
        load_image(str(tmp_path / "gone.jpg"), 1 << 30, "s:2")
