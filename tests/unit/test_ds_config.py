import json
import logging

import pytest

from tests.conftest import tiny_config
from zerovl.config import from_dict
from zerovl.engine.ds_config import PRESETS, build_ds_config, zero_stage
from zerovl.errors import ConfigError


def make(scenes, tmp_path, deepspeed="zero2", **train):
    return from_dict(tiny_config(scenes, tmp_path, train=train, deepspeed=deepspeed))


def unset(scenes, tmp_path, deepspeed, drop=("lr", "micro_batch_size", "precision", "max_steps"), **train):
    """A config whose train section leaves ``drop`` to the DeepSpeed file (tiny_config sets them)."""
    raw = tiny_config(scenes, tmp_path, train=train, deepspeed=deepspeed)
    for key in drop:
        raw["train"].pop(key, None)
    return from_dict(raw)


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
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        build_ds_config(from_dict(raw), 1, True)


# -- scheduler blocks become train.schedule / warmup_steps / min_lr ----------------------------------

def test_warmup_lr_numbers_are_translated_and_the_block_removed(scenes, tmp_path):
    block = {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-4, "warmup_num_steps": 5,
                                            "warmup_type": "linear"}}
    cfg = unset(scenes, tmp_path, {"scheduler": block})
    ds = build_ds_config(cfg, 1, True)
    t = cfg.train
    assert (t.schedule, t.warmup_steps, t.lr, t.min_lr) == ("constant", 5, 3e-4, 0.0)
    assert "scheduler" not in ds and ds["optimizer"]["params"]["lr"] == 3e-4  # zerovl drives the LR


def test_warmup_decay_lr_adopts_total_steps_and_floor(scenes, tmp_path):
    block = {"type": "WarmupDecayLR", "params": {"total_num_steps": 100, "warmup_min_lr": 1e-5,
                                                 "warmup_max_lr": 2e-4, "warmup_num_steps": 0}}
    cfg = unset(scenes, tmp_path, {"scheduler": block})
    build_ds_config(cfg, 1, True)
    t = cfg.train
    assert (t.schedule, t.max_steps, t.warmup_steps, t.lr, t.min_lr) == ("linear", 100, 0, 2e-4, 1e-5)
    raw = tiny_config(scenes, tmp_path, train={"epochs": 2}, deepspeed={"scheduler": block})
    del raw["train"]["max_steps"], raw["train"]["lr"]
    with pytest.raises(ConfigError, match=r"train.epochs=2.0 conflicts with deepspeed \(inline\) "
                                          r"scheduler.params.total_num_steps=100; give train.max_steps"):
        build_ds_config(from_dict(raw), 1, True)


def test_warmup_cosine_lr_ratios_are_relative_to_the_lr(scenes, tmp_path):
    block = {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_min_ratio": 0,
                                                  "warmup_num_steps": 3, "cos_min_ratio": 0.1,
                                                  "warmup_type": "linear"}}
    cfg = unset(scenes, tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 2e-4}}, "scheduler": block})
    build_ds_config(cfg, 1, True)
    assert (cfg.train.schedule, cfg.train.warmup_steps, cfg.train.min_lr) == ("cosine", 3, pytest.approx(2e-5))
    assert cfg.train.max_steps is None  # "auto": train's own length
    cfg = make(scenes, tmp_path, {"scheduler": block}, min_lr=1e-5)  # lr 1e-3 x 0.1 = 1e-4 != 1e-5
    with pytest.raises(ConfigError, match=r"train.min_lr=1e-05 conflicts with .* scheduler.params.cos_min_ratio="
                                          r"0.1 \(x lr 0.001 = 0.0001\)"):
        build_ds_config(cfg, 1, True)


def test_auto_scheduler_params_take_train_values(scenes, tmp_path):
    """DeepKE's block: every value "auto"."""
    block = {"type": "WarmupDecayLR", "params": dict.fromkeys(
        ("total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps"), "auto")}
    cfg = make(scenes, tmp_path, {"scheduler": block}, warmup_steps=2, min_lr=1e-4)
    build_ds_config(cfg, 1, True)
    t = cfg.train
    assert (t.schedule, t.warmup_steps, t.lr, t.min_lr, t.max_steps) == ("linear", 2, 1e-3, 1e-4, 3)


def test_scheduler_conflicts_name_both_keys(scenes, tmp_path):
    warmup = {"type": "WarmupLR", "params": {"warmup_max_lr": 2e-4, "warmup_num_steps": 0}}
    with pytest.raises(ConfigError, match=r"train.schedule=cosine conflicts with deepspeed \(inline\) "
                                          r"scheduler.type=WarmupLR \(constant\)"):
        build_ds_config(make(scenes, tmp_path, {"scheduler": warmup}, schedule="cosine"), 1, True)
    with pytest.raises(ConfigError, match=r"train.lr=0.001 conflicts with deepspeed \(inline\) "
                                          r"scheduler.params.warmup_max_lr=0.0002"):
        build_ds_config(make(scenes, tmp_path, {"scheduler": warmup}), 1, True)
    both = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "scheduler": warmup}
    with pytest.raises(ConfigError, match=r"^deepspeed \(inline\) optimizer.params.lr=0.0001 conflicts with "
                                          r"scheduler.params.warmup_max_lr=0.0002; set it in one place"):
        build_ds_config(unset(scenes, tmp_path, both), 1, True)


def test_absent_scheduler_keys_take_deepspeeds_defaults_unless_train_states_them(scenes, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="zerovl.engine.ds_config"):
        cfg = unset(scenes, tmp_path, {"scheduler": {"type": "WarmupLR"}})
        build_ds_config(cfg, 1, True)
    assert cfg.train.warmup_steps == 1000 and cfg.train.lr == 1e-4  # WarmupLR's max LR is the optimizer's
    assert "warmup_type is unset (DeepSpeed's default is log); zerovl warms up linearly" in caplog.text
    cfg = make(scenes, tmp_path, {"scheduler": {"type": "WarmupLR"}}, warmup_steps=10)
    build_ds_config(cfg, 1, True)
    assert cfg.train.warmup_steps == 10  # a default never conflicts with what train states
    cfg = unset(scenes, tmp_path, {"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 0}}})
    build_ds_config(cfg, 1, True)
    assert cfg.train.min_lr == pytest.approx(1e-4 * cfg.train.lr)  # cos_min_ratio defaults to 1e-4


@pytest.mark.parametrize("params,match", [
    ({"warmup_num_steps": 10, "warmup_type": "log"}, "scheduler.params.warmup_type=log: zerovl's warmup is linear"),
    ({"warmup_num_steps": 10, "warmup_min_lr": 1e-6}, "scheduler.params.warmup_min_lr=1e-06: zerovl warms up "
                                                      "linearly from lr/warmup_steps"),
    ({"warmup_max_lr": 1e-3, "last_batch_iteration": 3}, "scheduler.params.last_batch_iteration is not a WarmupLR"),
])
def test_warmups_zerovl_cannot_honour_are_refused(scenes, tmp_path, params, match):
    cfg = make(scenes, tmp_path, {"scheduler": {"type": "WarmupLR", "params": params}})
    with pytest.raises(ConfigError, match=match):
        build_ds_config(cfg, 1, True)
    if "warmup_type" in params:  # without warmup the shape does not matter
        build_ds_config(make(scenes, tmp_path, {"scheduler": {"type": "WarmupLR", "params": {
            **params, "warmup_num_steps": 0}}}), 1, True)


def test_other_scheduler_types_are_refused(scenes, tmp_path):
    cfg = make(scenes, tmp_path, {"scheduler": {"type": "OneCycle", "params": {}}})
    with pytest.raises(ConfigError, match="scheduler.type=OneCycle: zerovl drives the LR itself and translates only "
                                          "WarmupLR, WarmupDecayLR, WarmupCosineLR"):
        build_ds_config(cfg, 1, True)


# -- "auto" wherever HF Trainer accepts it -----------------------------------------------------------

HF_AUTO = {  # LLaMA-Factory / ms-swift / LLaVA style: everything HF Trainer fills is "auto"
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "fp16": {"enabled": "auto", "loss_scale": 0}, "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": dict.fromkeys(("lr", "betas", "eps", "weight_decay"), "auto")},
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto"},
}


def test_hf_auto_values_are_filled_from_train_and_model_width(scenes, tmp_path):
    cfg = make(scenes, tmp_path, HF_AUTO, micro_batch_size=3, gradient_accumulation_steps=2, grad_clip=0.5,
               precision="bf16", lr=2e-4, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    ds = build_ds_config(cfg, 2, True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        12, 3, 2)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"] | {"torch_adam": True} == {"lr": 2e-4, "betas": [0.8, 0.9], "eps": 1e-6,
                                                                "weight_decay": 0.1, "torch_adam": True}
    zero = ds["zero_optimization"]  # HF's formulas on the LLM width (32 in tiny_config)
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (32 * 32, int(0.9 * 32 * 32), 320)
    assert "auto" not in json.dumps(ds)
    fp32 = make(scenes, tmp_path, HF_AUTO)  # tiny_config: precision fp32
    ds = build_ds_config(fp32, 2, True)
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_width_autos_fall_back_to_deepspeed_defaults_without_a_model_config(scenes, tmp_path):
    raw = tiny_config(scenes, tmp_path, deepspeed=HF_AUTO)
    raw["model"]["llm"] = {"path": str(tmp_path / "no-such-model")}
    ds = build_ds_config(from_dict(raw), 1, True)
    assert not {"reduce_bucket_size", "stage3_prefetch_bucket_size"} & set(ds["zero_optimization"])


def test_auto_where_hf_trainer_fills_nothing_is_refused(scenes, tmp_path):
    cfg = make(scenes, tmp_path, {"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}})
    with pytest.raises(ConfigError, match=r'zero_optimization.allgather_bucket_size="auto": zerovl fills "auto" '
                                          "only where HF Trainer does"):
        build_ds_config(cfg, 1, True)


def test_train_batch_size_fixes_the_missing_factor_as_deepspeed_does(scenes, tmp_path):
    cfg = unset(scenes, tmp_path, {"train_batch_size": 64})  # GAN example: neither micro nor accumulation
    build_ds_config(cfg, 2, True)
    assert (cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps) == (32, 1)
    cfg = unset(scenes, tmp_path, {"train_batch_size": 256, "train_micro_batch_size_per_gpu": 8})
    ds = build_ds_config(cfg, 2, True)
    assert cfg.train.gradient_accumulation_steps == 16 and ds["train_batch_size"] == 256


# -- what DeepSpeed on CPU or zerovl cannot honour stops with one line naming the key ----------------

@pytest.mark.parametrize("ds,match", [
    ({"fp16": {"enabled": True}}, r"fp16.enabled=true: fp16 is not supported by DeepSpeed on CPU"),
    ({"optimizer": {"type": "Lamb", "params": {}}}, r"optimizer.type=Lamb: DeepSpeed builds it from a GPU kernel"),
    ({"optimizer": {"type": "OnebitAdam", "params": {}}}, r"optimizer.type=OnebitAdam is not an optimizer"),
    ({"autotuning": {"enabled": True}}, r"autotuning.enabled=true: DeepSpeed's autotuner ends the run"),
    ({"tensor_parallel": {"autotp_size": 2}}, r"tensor_parallel.autotp_size=2: zerovl gives every rank its own"),
    ({"model": "Qwen/Qwen2.5-7B-Instruct", "learning_rate": 1e-4, "deepspeed": "zero2"},
     r"holds trainer arguments \(deepspeed, learning_rate\), not a DeepSpeed config.*\(it names deepspeed=zero2\)"),
])
def test_unsupported_requests_stop_with_one_line(scenes, tmp_path, ds, match):
    cfg = unset(scenes, tmp_path, ds)
    with pytest.raises(ConfigError, match=match) as info:
        build_ds_config(cfg, 2, True)
    assert "\n" not in str(info.value)


def test_cpu_uses_torch_adam_even_where_the_file_asks_for_fused(scenes, tmp_path):
    """MiniGPT4Qwen's zero0 file: torch_adam false is a GPU choice; on CPU FusedAdam is a C++ build."""
    ds = {"optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": False, "adam_w_mode": True}}}
    assert build_ds_config(unset(scenes, tmp_path, ds), 1, True)["optimizer"]["params"]["torch_adam"] is True
    assert build_ds_config(unset(scenes, tmp_path, ds), 1, False)["optimizer"]["params"]["torch_adam"] is False
