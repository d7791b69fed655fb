"""Build the DeepSpeed config: a preset, JSON file or inline mapping, completed from ``train``.

DeepSpeed's own keys pass through unchanged. zerovl fills only what the ``train`` section already
says (micro batch, accumulation, clipping, precision, optimizer hyper-parameters); a value given in
both places must agree, and ``train_batch = micro x accumulation x world`` is checked once here.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from zerovl.config import Config
from zerovl.errors import ConfigError

_STAGE3_COMMON = {
    "overlap_comm": True,
    "contiguous_gradients": True,
    "stage3_gather_16bit_weights_on_model_save": True,
}
PRESETS: dict[str, dict[str, Any]] = {
    "zero0": {"zero_optimization": {"stage": 0}},
    "zero1": {"zero_optimization": {"stage": 1}},
    "zero2": {"zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}},
    "zero3": {"zero_optimization": {"stage": 3, **_STAGE3_COMMON}},
    "zero2_offload": {
        "zero_optimization": {
            "stage": 2, "overlap_comm": True, "contiguous_gradients": True,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
        }
    },
    "zero3_offload": {
        "zero_optimization": {
            "stage": 3, **_STAGE3_COMMON,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu", "pin_memory": True},
        }
    },
}


def base_config(source: str | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(config dict, human-readable origin) for a preset name, a JSON path or an inline mapping."""
    if isinstance(source, dict):
        return copy.deepcopy(source), "deepspeed (inline)"
    if source in PRESETS:
        return copy.deepcopy(PRESETS[source]), f"deepspeed preset {source}"
    if not os.path.isfile(source):
        raise ConfigError(f"deepspeed: JSON file {source} not found")
    try:
        with open(source) as f:
            return json.load(f), source
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed: {source} is not valid JSON (line {e.lineno}: {e.msg})") from None


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def _given(value: Any) -> bool:
    return value is not None and value != "auto"  # "auto" is HF Trainer's placeholder for "fill me"


def _reconcile(cfg: Config, field: str, ds: dict, path: tuple[str, ...], origin: str, convert=lambda v: v):
    """train.<field> <-> ds[path...]: agree if both given, adopt DeepSpeed's if only it gives one."""
    node = ds
    for key in path[:-1]:
        node = node.setdefault(key, {})
    explicit = field in cfg.train.model_fields_set
    ours = getattr(cfg.train, field)
    theirs = node.get(path[-1])
    if _given(theirs):
        theirs = convert(theirs)
        if explicit and theirs != ours:
            raise ConfigError(
                f"train.{field}={ours!r} conflicts with {origin} {'.'.join(path)}={theirs!r}; "
                "set it in one place or make them agree"
            )
        setattr(cfg.train, field, theirs)
    else:
        node[path[-1]] = list(ours) if isinstance(ours, tuple) else ours


def _reconcile_precision(cfg: Config, ds: dict, origin: str) -> None:
    enabled = [p for p in ("bf16", "fp16") if ds.get(p, {}).get("enabled") in (True, "true")]
    if len(enabled) > 1:
        raise ConfigError(f"{origin}: bf16 and fp16 are both enabled; enable one")
    theirs = enabled[0] if enabled else None
    explicit = "precision" in cfg.train.model_fields_set
    if theirs is not None and explicit and theirs != cfg.train.precision:
        raise ConfigError(
            f"train.precision={cfg.train.precision} conflicts with {origin} {theirs}.enabled=true; "
            "set it in one place or make them agree"
        )
    if theirs is not None:
        cfg.train.precision = theirs
    for p in ("bf16", "fp16"):
        ds.setdefault(p, {})["enabled"] = p == cfg.train.precision


def build_ds_config(cfg: Config, world_size: int, on_cpu: bool) -> dict[str, Any]:
    """The final DeepSpeed config dict; may update ``cfg.train`` with values DeepSpeed's config gave."""
    ds, origin = base_config(cfg.deepspeed)
    if "scheduler" in ds:
        raise ConfigError(
            f"{origin}: remove the 'scheduler' block; zerovl computes the LR from train.schedule, "
            "train.warmup_steps and train.min_lr so resumes and every optimizer agree"
        )
    _reconcile(cfg, "micro_batch_size", ds, ("train_micro_batch_size_per_gpu",), origin, int)
    _reconcile(cfg, "gradient_accumulation_steps", ds, ("gradient_accumulation_steps",), origin, int)
    _reconcile(cfg, "grad_clip", ds, ("gradient_clipping",), origin, float)
    _reconcile_precision(cfg, ds, origin)

    optimizer = ds.setdefault("optimizer", {"type": "AdamW"})
    optimizer.setdefault("params", {})
    _reconcile(cfg, "lr", ds, ("optimizer", "params", "lr"), origin, float)
    _reconcile(cfg, "weight_decay", ds, ("optimizer", "params", "weight_decay"), origin, float)
    _reconcile(cfg, "betas", ds, ("optimizer", "params", "betas"), origin, lambda v: tuple(float(x) for x in v))
    _reconcile(cfg, "eps", ds, ("optimizer", "params", "eps"), origin, float)
    if on_cpu and not offloads_optimizer(ds) and optimizer["type"].lower() in ("adam", "adamw"):
        # DeepSpeed's "FusedAdam" on the CPU accelerator is a C++ op compiled at start-up; torch's
        # AdamW is the same maths without the build. On GPU, FusedAdam stays.
        optimizer["params"].setdefault("torch_adam", True)

    micro, accum = cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps
    expected = micro * accum * world_size
    given = ds.get("train_batch_size")
    if _given(given) and int(given) != expected:
        raise ConfigError(
            f"{origin} train_batch_size={given} but train.micro_batch_size ({micro}) x "
            f"train.gradient_accumulation_steps ({accum}) x world size ({world_size}) = {expected}; "
            "remove train_batch_size or make them agree"
        )
    ds["train_batch_size"] = expected
    if cfg.train.precision == "fp16" and on_cpu:
        raise ConfigError("train.precision=fp16 is not supported by DeepSpeed on CPU; use bf16 or fp32")
    ds.setdefault("steps_per_print", 10**9)  # zerovl logs its own metrics
    ds.setdefault("wall_clock_breakdown", False)
    return ds
