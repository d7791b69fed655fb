"""Peers' option names (HF Trainer, ms-swift, LLaMA-Factory) map onto zerovl keys; conflicts, overrides,
MAX_PIXELS from the environment and nearest-key hints for abbreviations."""

import logging
import re

import pytest

from tests.conftest import REPO, tiny_config, write_config
from zerovl.config import load_config
from zerovl.config_aliases import ALIASES, alias_table
from zerovl.errors import ConfigError


@pytest.fixture
def base(tmp_path, scenes):
    return tiny_config(scenes, tmp_path / "run")


def _load(base, tmp_path, overrides=(), environ=None, **top):
    cfg = {**base, **top}
    return load_config(write_config(cfg, tmp_path / "c.yaml"), list(overrides), environ=environ or {})


def test_a_trainer_style_config_loads(base, tmp_path, caplog):
    base["train"] = {"output_dir": base["train"]["output_dir"]}  # every train key comes from an alias
    del base["model"]["vision"]["mode"], base["model"]["llm"]["mode"], base["data"]["max_length"]
    with caplog.at_level(logging.INFO, logger="zerovl.config"):
        cfg = _load(base, tmp_path, per_device_train_batch_size=4, learning_rate=2e-5, num_train_epochs=3,
                    gradient_accumulation_steps=8, max_grad_norm=0.5, warmup_steps=10, weight_decay=0.1,
                    bf16=True, fp16=False, save_steps=100, logging_steps=5, seed=7, max_steps=-1,
                    lr_scheduler_type="constant_with_warmup", freeze_vit=True, lora_rank=16, lora_alpha=32,
                    lora_target="q_proj,v_proj", cutoff_len=512, per_device_eval_batch_size=3)
    t = cfg.train
    assert (t.micro_batch_size, t.lr, t.epochs, t.gradient_accumulation_steps) == (4, 2e-5, 3, 8)
    assert (t.grad_clip, t.warmup_steps, t.weight_decay, t.precision) == (0.5, 10, 0.1, "bf16")
    assert (t.save_every, t.log_every, t.seed, t.max_steps, t.schedule) == (100, 5, 7, None, "constant")
    assert cfg.model.vision.mode == "frozen"
    assert cfg.model.llm.mode == "lora"  # implied by lora_rank
    assert (cfg.model.llm.lora.r, cfg.model.llm.lora.alpha) == (16, 32)
    assert cfg.model.llm.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.max_length == 512 and cfg.eval.batch_size == 3
    assert "learning_rate -> train.lr" in caplog.messages
    assert sum("learning_rate -> train.lr" in m for m in caplog.messages) == 1  # once


def test_aliases_inside_sections_and_implied_values_yield(base, tmp_path):
    base["train"]["per_device_train_batch_size"] = 5
    base["train"].pop("micro_batch_size")
    base["model"]["llm"]["lora_rank"] = 4  # the config's own mode: full wins over the implied lora
    cfg = _load(base, tmp_path, bf16=False)
    assert cfg.train.micro_batch_size == 5
    assert cfg.model.llm.mode == "full" and cfg.model.llm.lora.r == 4
    assert cfg.train.precision == "fp32"  # the config's value; bf16: false would imply fp32 anyway


def test_alias_and_key_with_different_values_name_both(base, tmp_path):
    with pytest.raises(ConfigError) as err:
        _load(base, tmp_path, learning_rate=5e-4)  # train.lr is 1e-3
    message = str(err.value)
    assert "learning_rate (0.0005)" in message and "train.lr" in message and "\n" not in message
    assert _load(base, tmp_path, learning_rate=1e-3).train.lr == 1e-3  # the same value twice is fine
    del base["data"]["max_length"]
    with pytest.raises(ConfigError, match=r"max_length \(512\) and cutoff_len \(256\) both mean data.max_length"):
        _load(base, tmp_path, cutoff_len=256, max_length=512)


def test_overrides_accept_aliases_and_win_however_spelled(base, tmp_path):
    assert _load(base, tmp_path, ["learning_rate=1e-4"]).train.lr == 1e-4  # file says train.lr
    assert _load(base, tmp_path, ["train.learning_rate=2e-4"]).train.lr == 2e-4
    assert _load(base, tmp_path, ["train.lr=3e-4"], learning_rate=1e-3).train.lr == 3e-4  # file says alias
    assert _load(base, tmp_path, ["per_device_train_batch_size=6"]).train.micro_batch_size == 6


def test_alias_errors_say_how_the_key_was_given(base, tmp_path):
    base["train"].pop("lr")
    with pytest.raises(ConfigError, match=r"train.lr: Input should be greater than 0.*\(given as learning_rate\)"):
        _load(base, tmp_path, learning_rate=-1)
    with pytest.raises(ConfigError, match="lr_scheduler_type .*'polynomial' has no zerovl schedule"):
        _load(base, tmp_path, lr_scheduler_type="polynomial")
    with pytest.raises(ConfigError, match="finetuning_type .*'freeze' has no zerovl equivalent"):
        _load(base, tmp_path, finetuning_type="freeze")


def test_freeze_vit_is_ignored_without_a_vision_tower(base, tmp_path, caplog):
    del base["model"]["vision"], base["model"]["connector"]
    with caplog.at_level(logging.INFO, logger="zerovl.config"):
        cfg = _load(base, tmp_path, freeze_vit=True)
    assert cfg.model.vision is None
    assert any("freeze_vit: ignored" in m for m in caplog.messages)


def _native(tmp_path, scenes, **native):
    cfg = {"model": {"native": {"config": {"model_type": "qwen2_vl"}, **native}, "tokenizer": str(scenes["tokenizer"])},
           "data": {"train": str(scenes["train"])}}
    return write_config(cfg, tmp_path / "native.yaml")


def test_max_pixels_from_the_environment_only_where_the_config_is_silent(tmp_path, scenes, caplog):
    env = {"MAX_PIXELS": "50176", "MIN_PIXELS": "3136"}
    cfg = load_config(_native(tmp_path, scenes), environ=env)
    assert (cfg.model.native.max_pixels, cfg.model.native.min_pixels) == (50176, 3136)
    with caplog.at_level(logging.INFO, logger="zerovl.config"):
        cfg = load_config(_native(tmp_path, scenes, max_pixels=100352), environ=env)
        assert cfg.model.native.max_pixels == 100352
        cfg = load_config(_native(tmp_path, scenes), ["model.native.max_pixels=200704"], environ=env)
        assert cfg.model.native.max_pixels == 200704  # an override is the config too
    assert any("from the config wins over MAX_PIXELS=50176" in m for m in caplog.messages)
    with pytest.raises(ConfigError, match="MAX_PIXELS environment variable: 'lots' is not a whole number"):
        load_config(_native(tmp_path, scenes), environ={"MAX_PIXELS": "lots"})


def test_max_pixels_is_unused_for_composed_models(base, tmp_path):
    cfg = _load(base, tmp_path, environ={"MAX_PIXELS": "lots"})  # not even parsed: no model.native
    assert cfg.model.native is None


@pytest.mark.parametrize("key, hint", [
    ("train.grad_accum", "train.gradient_accumulation_steps"),
    ("train.grad_accum_steps", "train.gradient_accumulation_steps"),
    ("train.bs", "train.micro_batch_size"),
    ("eval.bs", "eval.batch_size"),
    ("train.max_length", "data.max_length"),
    ("train.warmup", "train.warmup_steps"),
    ("model.llm.lora.rank", "model.llm.lora.r"),
    ("train.max_stpes", "train.max_steps"),  # plain spelling distance still works
])
def test_unknown_keys_suggest_the_zerovl_key(base, tmp_path, key, hint):
    with pytest.raises(ConfigError) as err:
        _load(base, tmp_path, [f"{key}=1"])
    assert f"unknown key {key} (did you mean {hint}?)" in str(err.value)


def test_readme_lists_every_alias():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- aliases:begin.*?-->\n(.*?)\n<!-- aliases:end -->", readme, re.S)
    assert block is not None, "README.md lost its alias table markers"
    assert block.group(1) == alias_table(), "README's alias table is stale: paste config_aliases.alias_table()"
    assert len({a.name for a in ALIASES}) == len(ALIASES)
