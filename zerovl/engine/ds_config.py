"""Build the DeepSpeed config: a preset, JSON file or inline mapping, completed from ``train``.

DeepSpeed's own keys pass through unchanged, so a peer framework's file (ms-swift, LLaMA-Factory,
LLaVA, MiniGPT4Qwen, DeepKE, DeepSpeedExamples) works as ``deepspeed=FILE``. What zerovl does to it:

- **One value, two places.** Micro batch, accumulation, clipping, precision, optimizer
  hyper-parameters and the scheduler block are reconciled with ``train``: a value given in both
  must agree (a ConfigError names both keys), a value only the file gives is adopted into
  ``train``, and ``train_batch = micro x accumulation x world`` is checked once here. Given
  ``train_batch_size`` and one of micro / accumulation, the other follows as DeepSpeed derives it.
- **"auto"** is accepted wherever HF Trainer accepts it and means "fill from train": the batch
  keys, ``gradient_clipping``, ``optimizer.params`` lr / betas / eps / weight_decay, ``fp16`` /
  ``bf16`` ``enabled`` (-> ``train.precision``), every ``scheduler.params`` key, and the ZeRO
  buckets HF derives from the model width ``h`` (read from the model config, as HF does):
  ``reduce_bucket_size = h*h``, ``stage3_prefetch_bucket_size = 0.9*h*h``,
  ``stage3_param_persistence_threshold = 10*h``; when no width is found those keys are dropped so
  DeepSpeed's defaults apply. An "auto" anywhere else stops the run naming the key.
- **Scheduler blocks** are translated, not passed on: zerovl sets the LR itself every step from
  ``train.schedule`` / ``warmup_steps`` / ``min_lr`` (the same curve for every optimizer and after
  a resume). ``WarmupLR`` -> ``constant``, ``WarmupDecayLR`` -> ``linear`` (decaying to
  ``warmup_min_lr``), ``WarmupCosineLR`` -> ``cosine`` (``min_lr = cos_min_ratio x lr``);
  ``warmup_num_steps`` -> ``warmup_steps``, ``warmup_max_lr`` -> ``lr``, ``total_num_steps`` ->
  ``max_steps``. A key the block leaves out takes DeepSpeed's default (1000 warmup steps,
  ``cos_min_ratio`` 1e-4, ...) unless ``train`` or another key of the file states that value.
  What cannot be honoured stops the run with one line: a non-zero warmup start
  (``warmup_min_lr`` / ``warmup_min_ratio``) under warmup — zerovl's warmup rises linearly from
  ``lr/warmup_steps`` — and an explicit ``warmup_type: log``. DeepSpeed's *unstated* default warmup
  type is log; zerovl then warms up linearly and logs a warning saying so.
- **What DeepSpeed on CPU cannot run** stops with one line naming the key: fp16, Lamb, Lion
  without offload. On CPU, Adam/AdamW without offload use torch's implementation (the same maths
  as DeepSpeed's FusedAdam, without a C++ build), even where the file says ``torch_adam: false``.
- **Blocks zerovl cannot honour** are refused rather than silently changed: ``autotuning``
  enabled (DeepSpeed would end the run after its profile steps), ``tensor_parallel.autotp_size``
  > 1 (zerovl gives every rank its own data; AutoTP ranks must share a batch), and a trainer's
  argument file passed where a DeepSpeed config belongs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from zerovl.config import Config, ModelSettings
from zerovl.errors import ConfigError

log = logging.getLogger(__name__)

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

# Keys DeepSpeed never reads but every trainer's argument file has: their presence means the user
# passed e.g. an ms-swift/HF argument file where the DeepSpeed config belongs.
_TRAINER_ARGUMENTS = ("deepspeed", "learning_rate", "per_device_train_batch_size", "num_train_epochs",
                      "model_name_or_path", "output_dir")
# DeepSpeed 0.19.8's config optimizers (any torch.optim class name works too); CPU lacks some kernels.
_DS_OPTIMIZERS = ("adagrad", "adam", "adamw", "lamb", "muadam", "muadamw", "musgd", "lion", "muon")
# scheduler type -> (train.schedule, DeepSpeed's defaults for the params it takes; None = required)
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "WarmupLR": ("constant", {"warmup_min_lr": 0.0, "warmup_max_lr": None, "warmup_num_steps": 1000,
                              "warmup_type": "log"}),
    "WarmupDecayLR": ("linear", {"total_num_steps": None, "warmup_min_lr": 0.0, "warmup_max_lr": 0.001,
                                 "warmup_num_steps": 1000, "warmup_type": "log"}),
    "WarmupCosineLR": ("cosine", {"total_num_steps": None, "warmup_min_ratio": 0.0, "warmup_num_steps": 1000,
                                  "cos_min_ratio": 0.0001, "warmup_type": "log"}),
}
# HF Trainer's "auto" for these follows the model width h (transformers.integrations.deepspeed)
_WIDTH_KEYS: dict[str, Callable[[int], int]] = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
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
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed: {source} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed: {source} must hold a JSON object (DeepSpeed's config keys)")
    return ds, source


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def _given(value: Any) -> bool:
    return value is not None and value != "auto"  # "auto" is HF Trainer's placeholder for "fill me"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _show(value: Any) -> str:
    return value if isinstance(value, str) else repr(list(value) if isinstance(value, tuple) else value)


def _as_int(value: Any) -> int:
    return int(float(value))  # JSON files write counts as 1e3 too


class _Resolver:
    """Reconciles ``train.<field>`` with values of one DeepSpeed dict, remembering which file key each
    adopted value came from, so a later disagreement names the two keys actually at odds."""

    def __init__(self, cfg: Config, ds: dict[str, Any], origin: str):
        self.train, self.ds, self.origin = cfg.train, ds, origin
        self.explicit = set(cfg.train.model_fields_set)  # snapshot: setattr below adds to the live set
        self.source: dict[str, str] = {}

    def stated(self, field: str) -> bool:
        return field in self.explicit or field in self.source

    def adopt(self, field: str, theirs: Any, key: str, shown: str | None = None) -> None:
        """A value the file gives: must agree with one already stated, else becomes train's.
        ``shown`` is how the file's value reads in an error when it is not ``theirs`` verbatim."""
        ours = getattr(self.train, field)
        if not self.stated(field):
            self._set(field, theirs, key)
            self.source[field] = key
        elif not _same(theirs, ours):
            theirs_text = f"{key}={shown if shown is not None else _show(theirs)}"
            if field in self.source:
                mine = f"{self.origin} {self.source[field]}={_show(ours)}"
            else:
                mine, theirs_text = f"train.{field}={_show(ours)}", f"{self.origin} {theirs_text}"
            raise ConfigError(f"{mine} conflicts with {theirs_text}; set it in one place or make them agree")

    def default(self, field: str, value: Any, key: str) -> None:
        """DeepSpeed's default for a key the file leaves out: used only where nothing states the field."""
        if not self.stated(field):
            self._set(field, value, f"{key} (DeepSpeed's default)")
            self.source[field] = f"{key} (DeepSpeed's default)"

    def reconcile(self, field: str, path: tuple[str, ...], convert: Callable[[Any], Any] = lambda v: v) -> None:
        """train.<field> <-> ds[path...]: adopt the file's value if given, else write train's into the file."""
        node = self.ds
        for key in path[:-1]:
            node = node.setdefault(key, {})
        theirs = node.get(path[-1])
        if _given(theirs):
            self.adopt(field, convert(theirs), ".".join(path))
        ours = getattr(self.train, field)
        node[path[-1]] = list(ours) if isinstance(ours, tuple) else ours

    def _set(self, field: str, value: Any, key: str) -> None:
        try:
            setattr(self.train, field, value)
        except ValidationError as e:
            raise ConfigError(f"{self.origin} {key}={value!r}: {e.errors()[0]['msg']} (as train.{field})") from None


def _refuse_foreign(ds: dict[str, Any], origin: str) -> None:
    """Stop on files and blocks whose meaning zerovl would otherwise silently drop or change."""
    trainer_keys = [k for k in _TRAINER_ARGUMENTS if k in ds]
    if trainer_keys:
        named = f" (it names deepspeed={ds['deepspeed']})" if isinstance(ds.get("deepspeed"), str) else ""
        raise ConfigError(f"{origin} holds trainer arguments ({', '.join(trainer_keys)}), not a DeepSpeed config; "
                          f"put those values in train.* and set deepspeed= to a DeepSpeed file or preset{named}")
    if ds.get("autotuning", {}).get("enabled") in (True, "true"):
        raise ConfigError(f"{origin} autotuning.enabled=true: DeepSpeed's autotuner ends the run after its "
                          "profile steps and is driven by `deepspeed --autotuning`; set it to false (zerovl plan "
                          "sizes batches)")
    tp = ds.get("tensor_parallel", {}).get("autotp_size", 1)
    if _given(tp) and int(tp) > 1:
        raise ConfigError(f"{origin} tensor_parallel.autotp_size={tp}: zerovl gives every rank its own batch and "
                          "AutoTP ranks must share one; remove the tensor_parallel block (ZeRO-3 shards instead)")


def _reconcile_precision(r: _Resolver, on_cpu: bool) -> None:
    ds, origin = r.ds, r.origin
    enabled = [p for p in ("bf16", "fp16") if ds.get(p, {}).get("enabled") in (True, "true")]
    if len(enabled) > 1:
        raise ConfigError(f"{origin}: bf16 and fp16 are both enabled; enable one")
    if enabled:
        if on_cpu and enabled[0] == "fp16" and not r.stated("precision"):
            raise ConfigError(f"{origin} fp16.enabled=true: fp16 is not supported by DeepSpeed on CPU; set it to "
                              "false or \"auto\" and train.precision to bf16 or fp32")
        r.adopt("precision", enabled[0], f"{enabled[0]}.enabled", shown="true")
    if r.train.precision == "fp16" and on_cpu:
        raise ConfigError("train.precision=fp16 is not supported by DeepSpeed on CPU; use bf16 or fp32")
    for p in ("bf16", "fp16"):
        ds.setdefault(p, {})["enabled"] = p == r.train.precision


def _derive_batch(r: _Resolver, world_size: int) -> None:
    """DeepSpeed's rule: ``train_batch_size`` plus one of micro batch / accumulation fixes the other
    (with neither, accumulation is 1). The derived value is written into the file's dict."""
    ds, total = r.ds, r.ds.get("train_batch_size")
    if not _given(total):
        return
    keys = {"micro_batch_size": "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps": "gradient_accumulation_steps"}
    known = {f: r.stated(f) or _given(ds.get(k)) for f, k in keys.items()}
    if all(known.values()):
        return
    other = "micro_batch_size" if known["micro_batch_size"] else "gradient_accumulation_steps"
    field = "gradient_accumulation_steps" if other == "micro_batch_size" else "micro_batch_size"
    divisor = world_size * (_as_int(ds[keys[other]]) if _given(ds.get(keys[other])) else getattr(r.train, other))
    if _as_int(total) % divisor == 0 and _as_int(total) >= divisor:
        ds[keys[field]] = _as_int(total) // divisor  # a wrong total is reported by the product check


def _check_optimizer(ds: dict[str, Any], origin: str, on_cpu: bool) -> None:
    import torch

    optimizer = ds["optimizer"]
    kind = str(optimizer.get("type", "AdamW"))
    name = kind.lower()
    if name not in _DS_OPTIMIZERS and getattr(torch.optim, kind, None) is None:
        raise ConfigError(f"{origin} optimizer.type={kind} is not an optimizer DeepSpeed builds from a config "
                          "(Adam, AdamW, Adagrad, Lamb, Lion, Muon or a torch.optim class name); use one of those")
    if on_cpu and (name == "lamb" or (name == "lion" and not offloads_optimizer(ds))):
        raise ConfigError(f"{origin} optimizer.type={kind}: DeepSpeed builds it from a GPU kernel; on CPU use "
                          "Adam, AdamW or Adagrad (or Lion with offload_optimizer)")
    if on_cpu and not offloads_optimizer(ds) and name in ("adam", "adamw"):
        # DeepSpeed's "FusedAdam" on the CPU accelerator is a C++ op compiled at start-up; torch's
        # AdamW is the same maths without the build. On GPU, FusedAdam stays.
        if optimizer["params"].get("torch_adam") is False:
            log.info("%s optimizer.params.torch_adam=false: on CPU zerovl uses torch's %s", origin, kind)
        optimizer["params"]["torch_adam"] = True


def _reconcile_optimizer(r: _Resolver, on_cpu: bool) -> None:
    optimizer = r.ds.setdefault("optimizer", {"type": "AdamW"})
    optimizer.setdefault("params", {})
    _check_optimizer(r.ds, r.origin, on_cpu)
    r.reconcile("lr", ("optimizer", "params", "lr"), float)
    r.reconcile("weight_decay", ("optimizer", "params", "weight_decay"), float)
    r.reconcile("betas", ("optimizer", "params", "betas"), lambda v: tuple(float(x) for x in v))
    r.reconcile("eps", ("optimizer", "params", "eps"), float)


def _take(r: _Resolver, field: str, params: dict, defaults: dict, name: str, convert: Callable,
          shown: Callable[[Any], str] | None = None) -> None:
    """scheduler.params.<name> -> train.<field>: given values are reconciled, an absent key takes
    DeepSpeed's default where nothing states the field, "auto" keeps train's value."""
    key = f"scheduler.params.{name}"
    if name in params:
        if _given(params[name]):
            r.adopt(field, convert(params[name]), key, shown(params[name]) if shown else None)
    elif defaults.get(name) is not None:
        r.default(field, convert(defaults[name]), key)


def _take_total_steps(r: _Resolver, params: dict) -> None:
    total = params.get("total_num_steps")
    if not _given(total):
        return
    if not r.stated("max_steps") and "epochs" in r.explicit:
        raise ConfigError(f"train.epochs={r.train.epochs} conflicts with {r.origin} scheduler.params.total_num_steps="
                          f"{total}; give train.max_steps instead of train.epochs, or make total_num_steps \"auto\"")
    r.adopt("max_steps", _as_int(total), "scheduler.params.total_num_steps")


def _check_warmup_shape(r: _Resolver, kind: str, params: dict) -> None:
    """zerovl's warmup is linear from lr/warmup_steps; refuse what differs, warn on DeepSpeed's unstated log."""
    if r.train.warmup_steps == 0:
        return
    start = "warmup_min_ratio" if kind == "WarmupCosineLR" else "warmup_min_lr"
    if _given(params.get(start)) and float(params[start]) != 0:
        raise ConfigError(f"{r.origin} scheduler.params.{start}={params[start]}: zerovl warms up linearly from "
                          f"lr/warmup_steps, not from {start}; set it to 0 or \"auto\" (or warmup_num_steps to 0)")
    shape = params.get("warmup_type")
    if shape is None:
        log.warning("%s %s: warmup_type is unset (DeepSpeed's default is log); zerovl warms up linearly over %d "
                    "steps — set warmup_type: linear to make that explicit", r.origin, kind, r.train.warmup_steps)
    elif shape not in ("linear", "auto"):
        raise ConfigError(f"{r.origin} scheduler.params.warmup_type={shape}: zerovl's warmup is linear; set "
                          "warmup_type to linear (or warmup_num_steps to 0)")


def _translate_scheduler(r: _Resolver) -> None:
    """A DeepSpeed scheduler block becomes train.schedule / warmup_steps / lr / min_lr / max_steps and is
    removed: zerovl sets the LR from the step itself (see the module docstring for the mapping)."""
    block = r.ds.pop("scheduler", None)
    if block is None:
        return
    kind = block.get("type")
    if kind not in _SCHEDULERS:
        raise ConfigError(f"{r.origin} scheduler.type={kind}: zerovl drives the LR itself and translates only "
                          f"{', '.join(_SCHEDULERS)}; remove the block and set train.schedule, train.warmup_steps "
                          "and train.min_lr")
    schedule, defaults = _SCHEDULERS[kind]
    params = block.get("params") or {}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(f"{r.origin} scheduler.params.{unknown[0]} is not a {kind} parameter "
                          f"(known: {', '.join(defaults)})")
    r.adopt("schedule", schedule, "scheduler.type", shown=f"{kind} ({schedule})")
    _take(r, "lr", params, defaults, "warmup_max_lr", float)
    _take_total_steps(r, params)
    _take(r, "warmup_steps", params, defaults, "warmup_num_steps", _as_int)
    if kind == "WarmupDecayLR":  # decays to warmup_min_lr
        _take(r, "min_lr", params, defaults, "warmup_min_lr", float)
    elif kind == "WarmupCosineLR":  # a ratio of the optimizer LR
        _take(r, "min_lr", params, defaults, "cos_min_ratio", lambda v: float(v) * r.train.lr,
              shown=lambda v: f"{v} (x lr {r.train.lr:g} = {float(v) * r.train.lr:g})")
    _check_warmup_shape(r, kind, params)
    log.info("%s scheduler %s -> train.schedule=%s, warmup_steps=%d, lr=%g, min_lr=%g, max_steps=%s (zerovl sets "
             "the LR each step; the block is not passed to DeepSpeed)", r.origin, kind, r.train.schedule,
             r.train.warmup_steps, r.train.lr, r.train.min_lr, r.train.max_steps)


def model_hidden_size(model: ModelSettings) -> int | None:
    """The LLM's width as HF Trainer reads it (hidden_size, else max(hidden_sizes), also under text_config);
    for a retrieval model (no LLM) its Q-Former's. None when the config cannot be read here (the model
    builder then reports the problem)."""
    from zerovl.models.pretrained import part_config

    if model.retrieval is not None:
        from zerovl.models.retrieval import retrieval_config

        try:
            return int(retrieval_config(model.retrieval).qformer_config.hidden_size)
        except (ConfigError, OSError, ValueError, KeyError, TypeError):
            return None
    native = model.native is not None
    try:
        config = part_config(model.native if native else model.llm, "model.native" if native else "model.llm",
                             "qwen2_vl" if native else None)
    except (ConfigError, OSError, ValueError, KeyError, TypeError):
        return None
    for c in (config, getattr(config, "text_config", None)):
        if getattr(c, "hidden_size", None):
            return int(c.hidden_size)
        if getattr(c, "hidden_sizes", None):
            return int(max(c.hidden_sizes))
    return None


def _fill_width_autos(cfg: Config, ds: dict[str, Any], origin: str) -> None:
    zero = ds.get("zero_optimization", {})
    autos = [k for k in _WIDTH_KEYS if zero.get(k) == "auto"]
    if not autos:
        return
    hidden = model_hidden_size(cfg.model)
    for key in autos:
        if hidden is None:
            del zero[key]
        else:
            zero[key] = _WIDTH_KEYS[key](hidden)
    if hidden is None:
        log.info("%s zero_optimization %s=\"auto\": no model width found, DeepSpeed's defaults apply", origin,
                 "/".join(autos))


def _refuse_leftover_auto(node: Any, origin: str, path: str = "") -> None:
    """An "auto" HF Trainer would not fill either reaches DeepSpeed as a string and fails deep inside it."""
    if isinstance(node, dict):
        for key, value in node.items():
            _refuse_leftover_auto(value, origin, f"{path}.{key}" if path else str(key))
    elif node == "auto":
        raise ConfigError(f"{origin} {path}=\"auto\": zerovl fills \"auto\" only where HF Trainer does (batch, "
                          "clipping, optimizer and scheduler params, precision, ZeRO buckets); give a value")


def build_ds_config(cfg: Config, world_size: int, on_cpu: bool) -> dict[str, Any]:
    """The final DeepSpeed config dict; may update ``cfg.train`` with values DeepSpeed's config gave."""
    ds, origin = base_config(cfg.deepspeed)
    _refuse_foreign(ds, origin)
    r = _Resolver(cfg, ds, origin)
    _reconcile_precision(r, on_cpu)
    _derive_batch(r, world_size)
    r.reconcile("micro_batch_size", ("train_micro_batch_size_per_gpu",), _as_int)
    r.reconcile("gradient_accumulation_steps", ("gradient_accumulation_steps",), _as_int)
    r.reconcile("grad_clip", ("gradient_clipping",), float)
    _reconcile_optimizer(r, on_cpu)
    _translate_scheduler(r)
    ds["optimizer"]["params"]["lr"] = cfg.train.lr  # a scheduler's warmup_max_lr may have set it
    _fill_width_autos(cfg, ds, origin)

    micro, accum = cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps
    expected = micro * accum * world_size
    given = ds.get("train_batch_size")
    if _given(given) and _as_int(given) != expected:
        raise ConfigError(
            f"{origin} train_batch_size={given} but train.micro_batch_size ({micro}) x "
            f"train.gradient_accumulation_steps ({accum}) x world size ({world_size}) = {expected}; "
            "remove train_batch_size or make them agree"
        )
    ds["train_batch_size"] = expected
    _refuse_leftover_auto(ds, origin)
    ds.setdefault("steps_per_print", 10**9)  # zerovl logs its own metrics
    ds.setdefault("wall_clock_breakdown", False)
    return ds
