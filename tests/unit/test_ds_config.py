import json

import pytest

from tests.conftest import tiny_config
from zerovl.config import from_dict
from zerovl.engine.ds_config import PRESETS, build_ds_config, zero_stage
from zerovl.errors import ConfigError


def make(scenes, tmp_path, deepspeed="zero2", **train):
    return from_dict(tiny_config(scenes, tmp_path, train=train, deepspeed=deepspeed))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_filled_from_train(scenes, tmp_path, preset):
    cfg = make(scenes, tmp_path, preset, micro_batch_size=3, gradient_accumulation_steps=2, grad_clip=0.5,
               precision="bf16", lr=2e-4, weight_decay=0.1)
    ds = build_ds_config(cfg, world_size=4, on_cpu=True)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.1
    offload = "offload" in preset
    # offloaded optimizer -> DeepSpeed's CPU Adam; otherwise torch AdamW on CPU (no JIT build)
    assert ds["optimizer"]["params"].get("torch_adam", False) is (not offload)
    assert zero_stage(ds) == int(preset[4])
    assert PRESETS[preset] == PRESETS[preset] and "train_batch_size" not in PRESETS[preset]  # not mutated


def test_value_given_in_both_places_must_agree(scenes, tmp_path):
    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}
    cfg = make(scenes, tmp_path, ds, micro_batch_size=4)
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=4 conflicts with deepspeed \(inline\) "
                                          r"train_micro_batch_size_per_gpu=8"):
        build_ds_config(cfg, 1, True)
    agreeing = make(scenes, tmp_path, ds, micro_batch_size=8)
    assert build_ds_config(agreeing, 1, True)["train_micro_batch_size_per_gpu"] == 8


def test_deepspeed_only_value_is_adopted(scenes, tmp_path):
    raw = tiny_config(scenes, tmp_path, deepspeed={"zero_optimization": {"stage": 1},
                                                   "gradient_accumulation_steps": 4, "bf16": {"enabled": True}})
    del raw["train"]["precision"]
    cfg = from_dict(raw)
    ds = build_ds_config(cfg, 2, True)
    assert cfg.train.gradient_accumulation_steps == 4 and cfg.train.precision == "bf16"
    assert ds["train_batch_size"] == 2 * 4 * 2


def test_batch_size_arithmetic_is_checked_once(scenes, tmp_path):
    cfg = make(scenes, tmp_path, {"train_batch_size": 64}, micro_batch_size=2, gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match=r"train_batch_size=64 but train.micro_batch_size \(2\) x "
                                          r"train.gradient_accumulation_steps \(2\) x world size \(2\) = 8"):
        build_ds_config(cfg, 2, True)


def test_precision_conflict_and_fp16_on_cpu(scenes, tmp_path):
    cfg = make(scenes, tmp_path, {"fp16": {"enabled": True}}, precision="bf16")
    with pytest.raises(ConfigError, match="train.precision=bf16 conflicts with deepspeed"):
        build_ds_config(cfg, 1, True)
    cfg = make(scenes, tmp_path, "zero2", precision="fp16")
    with pytest.raises(ConfigError, match="fp16 is not supported by DeepSpeed on CPU"):
        build_ds_config(cfg, 1, True)
    assert build_ds_config(make(scenes, tmp_path, "zero2", precision="fp16"), 1, False)["fp16"]["enabled"]


def test_scheduler_block_is_rejected_with_reason(scenes, tmp_path):
    cfg = make(scenes, tmp_path, {"scheduler": {"type": "WarmupLR"}})
    with pytest.raises(ConfigError, match="remove the 'scheduler' block"):
        build_ds_config(cfg, 1, True)


def test_json_file_source(scenes, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_clipping": 2.0}))
    raw = tiny_config(scenes, tmp_path, deepspeed=str(path))
    cfg = from_dict(raw)
    ds = build_ds_config(cfg, 1, False)
    assert zero_stage(ds) == 3 and cfg.train.grad_clip == 2.0
    assert "torch_adam" not in ds["optimizer"]["params"]  # GPU keeps DeepSpeed's fused Adam
    path.write_text("{bad json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        build_ds_config(from_dict(raw), 1, True)
