import subprocess
import sys

import pytest
import yaml

from tests.conftest import tiny_config, write_config
from zerovl.config import apply_overrides, load_config, save_config
from zerovl.errors import ConfigError


@pytest.fixture
def cfg_path(tmp_path, scenes):
    return write_config(tiny_config(scenes, tmp_path / "run"), tmp_path / "c.yaml")


def test_loads_and_applies_dotted_overrides(cfg_path):
    cfg = load_config(cfg_path, ["train.max_steps=7", "deepspeed=zero3", "train.lr=3e-4",
                                 "data.train=other.jsonl", "model.connector.type=qformer"])
    assert cfg.train.max_steps == 7
    assert cfg.deepspeed == "zero3"
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.train.endswith("/other.jsonl") and cfg.data.train.startswith("/")
    assert cfg.model.connector.type == "qformer"


def test_override_can_set_inline_deepspeed_mapping(cfg_path):
    cfg = load_config(cfg_path, ["deepspeed={zero_optimization: {stage: 1}}"])
    assert cfg.deepspeed == {"zero_optimization": {"stage": 1}}


@pytest.mark.parametrize("override, expected", [
    ("train.max_stpes=5", "unknown key train.max_stpes (did you mean train.max_steps?)"),
    ("trian.lr=1", "unknown key trian (did you mean train?)"),
    ("model.vision.feature_layr=-2", "did you mean model.vision.feature_layer?"),
    ("train.max_steps=abc", "train.max_steps: Input should be a valid integer"),
    ("train.lr=-1", "train.lr: Input should be greater than 0"),
    ("train.precision=fp8", "train.precision: Input should be 'bf16', 'fp16' or 'fp32'"),
    ("deepspeed=zero5", "deepspeed: 'zero5' is neither a preset"),
    ("model.connector.type=perceiver", "model.connector.type: Input should be 'linear', 'mlp' or 'qformer'"),
    ("train.min_lr=1", "min_lr (1.0) must not exceed lr"),
])
def test_bad_values_name_the_key(cfg_path, override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_path, [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_override_into_a_preset_name_is_explained():
    raw = {"deepspeed": "zero2"}
    with pytest.raises(ConfigError, match="deepspeed is 'zero2', not a mapping"):
        apply_overrides(raw, ["deepspeed.zero_optimization.stage=3"])


def test_exactly_one_model_source(cfg_path):
    with pytest.raises(ConfigError, match="model.llm: give exactly one of path"):
        load_config(cfg_path, ["model.llm.path=/somewhere"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(cfg_path, tmp_path):
    cfg = load_config(cfg_path, ["train.max_steps=9"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["train"]["max_steps"] == 9


def test_cli_config_error_is_one_line_and_exit_code_2(cfg_path):
    proc = subprocess.run([sys.executable, "-m", "zerovl", "train", str(cfg_path), "train.max_stpes=5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"zerovl: error: {cfg_path}: unknown key train.max_stpes (did you mean train.max_steps?)"]
    assert "Traceback" not in proc.stderr
