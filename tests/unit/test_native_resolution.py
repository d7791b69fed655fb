"""Qwen2-VL dynamic resolution: the token count the text gets and the grid the processor makes come from
one computation, whatever form the directory's preprocessor_config.json takes (the real files from
../shared/realworld where present, and each form written out)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from zerovl.config import NativeSettings
from zerovl.errors import ConfigError, DataError
from zerovl.models.native import (
    DEFAULT_MAX_PIXELS,
    DynamicResolution,
    directory_pixel_range,
    native_image_processor,
    native_resolution,
    pixel_range,
)

REALWORLD = Path(__file__).resolve().parents[2].parent / "shared" / "realworld"
VCFG = SimpleNamespace(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
# (width, height): tiny, odd, wide, tall, large, near the aspect limit
SIZES = [(1, 1), (37, 301), (1000, 61), (640, 427), (1999, 1333), (4000, 3000), (3000, 16)]

FORMS = {
    "top_level": {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2,
                  "temporal_patch_size": 2, "image_processor_type": "Qwen2VLImageProcessor"},
    "size_pixels": {"size": {"min_pixels": 3136, "max_pixels": 1003520}, "patch_size": 14, "merge_size": 2,
                    "image_processor_type": "Qwen2VLImageProcessor"},
    "size_edges": {"size": {"shortest_edge": 6272, "longest_edge": 200704}, "patch_size": 14, "merge_size": 2,
                   "image_processor_type": "Qwen2VLImageProcessor"},
}
EXPECTED = {"top_level": (3136, 12845056), "size_pixels": (3136, 1003520), "size_edges": (6272, 200704)}


def _dir(tmp_path: Path, name: str, preprocessor: dict | Path | None) -> Path:
    d = tmp_path / name
    d.mkdir()
    if isinstance(preprocessor, Path):
        shutil.copy(preprocessor, d / "preprocessor_config.json")
    elif preprocessor is not None:
        (d / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return d


def _real_forms() -> list[tuple[str, Path, tuple[int, int]]]:
    tok = REALWORLD / "tokenizers"
    return [("qwen2-vl resaved", tok / "qwen2-vl-2b-instruct/preprocessor_config.json", (3136, 1003520)),
            ("qwen2-vl original", tok / "qwen2-vl-2b-instruct/older-copy/preprocessor_config.json", (3136, 12845056)),
            ("qwen2.5-vl", tok / "qwen2.5-vl/preprocessor_config.json", (3136, 12845056))]


@pytest.mark.parametrize("form", sorted(FORMS))
def test_directory_pixel_range_reads_every_form(tmp_path, form):
    assert directory_pixel_range(str(_dir(tmp_path, form, FORMS[form]))) == EXPECTED[form]


def test_no_preprocessor_file_means_defaults(tmp_path):
    d = _dir(tmp_path, "bare", None)
    low, high, origin = pixel_range(NativeSettings(path=str(d)))
    assert (low, high) == (56 * 56, DEFAULT_MAX_PIXELS) and "default" in origin


def test_config_overrides_directory_and_says_where_each_came_from(tmp_path):
    d = _dir(tmp_path, "f", FORMS["size_pixels"])
    low, high, origin = pixel_range(NativeSettings(path=str(d), max_pixels=50176))
    assert (low, high) == (3136, 50176)
    assert "max_pixels=50176 (model.native.max_pixels)" in origin and "preprocessor_config.json" in origin
    with pytest.raises(ConfigError, match="exceeds max_pixels"):
        pixel_range(NativeSettings(path=str(d), min_pixels=2_000_000))


def _check_agreement(directory: Path | None, settings: NativeSettings, data_max_pixels: int = 1 << 40):
    """For every image size: tokens counted from the header == features the processor's grid makes."""
    resolution, _ = native_resolution(settings, VCFG, data_max_pixels)
    processor = native_image_processor(str(directory) if directory else None, VCFG, resolution)
    for w, h in SIZES:
        image = Image.new("RGB", (w, h), (120, 30, 200))
        out = processor([image])
        t, gh, gw = out["image_grid_thw"][0].tolist()
        assert out["pixel_values"].shape[0] == t * gh * gw
        assert t * gh * gw // 4 == resolution.tokens(w, h), (w, h)
        assert resolution.min_pixels <= gh * gw * 196
        if min(gh, gw) > 2:  # smart_resize keeps a 28-px short side even past max_pixels (3000x16)
            assert gh * gw * 196 <= resolution.max_pixels
    return resolution


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("override", [None, 50176])
def test_tokens_and_grid_agree_for_each_form(tmp_path, form, override):
    d = _dir(tmp_path, form, FORMS[form])
    resolution = _check_agreement(d, NativeSettings(path=str(d), max_pixels=override))
    assert resolution.max_pixels == (override or EXPECTED[form][1])


@pytest.mark.parametrize("name,file,expected", _real_forms(), ids=lambda v: v if isinstance(v, str) else "")
def test_real_preprocessor_files(tmp_path, name, file, expected):
    if not file.is_file():
        pytest.skip("../shared/realworld not found")
    d = _dir(tmp_path, "real", file)
    assert directory_pixel_range(str(d)) == expected
    for override in (None, 50176):
        resolution = _check_agreement(d, NativeSettings(path=str(d), max_pixels=override))
        assert resolution.max_pixels == (override or expected[1])
        # the processor written into an export states the limits in force
        processor = native_image_processor(str(d), VCFG, resolution).processor
        assert processor.size["longest_edge"] == resolution.max_pixels


def test_data_max_pixels_bounds_before_smart_resize(tmp_path):
    """data.max_pixels shrinks first (as the loader does), and both sides still agree."""
    resolution = _check_agreement(None, NativeSettings(), data_max_pixels=100_000)
    assert resolution.tokens(4000, 3000) * 4 * 196 <= 100_000 * 1.3


def test_extreme_aspect_ratio_is_a_data_error_naming_the_image(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (1000, 4)).save(path)
    resolution = DynamicResolution(14, 2, 3136, 1003520, 1 << 40)
    with pytest.raises(DataError, match=r"strip.png is 1000x4, beyond Qwen2-VL's 200:1"):
        resolution(str(path))


def test_unreadable_or_missing_image_header_is_a_data_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    resolution = DynamicResolution(14, 2, 3136, 1003520, 1 << 40)
    with pytest.raises(DataError, match="bad.jpg cannot be read"):
        resolution(str(bad))
    with pytest.raises(DataError, match="nope.jpg not found"):
        resolution(str(tmp_path / "nope.jpg"))


def test_shard_member_bytes_are_counted_from_their_header(tmp_path):
    """A webdataset sample's image is bytes in a tar, not a path: its header is read from the bytes."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (640, 427)).save(buf, format="JPEG")
    resolution = DynamicResolution(14, 2, 3136, 1003520, 1 << 40)
    assert resolution("shard.tar:key.jpg", buf.getvalue()) == resolution.tokens(640, 427) > 0
