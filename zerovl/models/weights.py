"""Getting weights into modules: a subset of tensors (one sub-module) from a local HF checkpoint
directory without loading the rest — e.g. BLIP-2's vision tower and Q-Former without its 7B language
model — and loading or casting that also works on ZeRO-3-partitioned parameters."""

from __future__ import annotations

import json
import os

import torch

from zerovl.errors import ConfigError


def load_prefixed_state_dict(path: str, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors whose name starts with ``prefix``, with the prefix removed."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({file for name, file in weight_map.items() if name.startswith(prefix)})
    elif os.path.isfile(single):
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{path}: no model.safetensors(.index.json); re-save it with save_pretrained")
    state = {}
    for file in files:
        with safe_open(os.path.join(path, file), framework="pt") as f:
            for name in f.keys():
                if name.startswith(prefix):
                    state[name[len(prefix):]] = f.get_tensor(name)
    if not state:
        raise ConfigError(f"{path}: no weights named {prefix}* found")
    return state


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, partial: bool = False) -> None:
    """``load_state_dict`` that also works when ZeRO-3 has partitioned the module's parameters
    (gathered, written on rank 0, re-partitioned), and names the source when keys do not fit."""
    import contextlib

    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    gather = contextlib.nullcontext()
    if params:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    with gather:
        missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if unexpected or (missing and not partial):
        raise ConfigError(f"{source}: weights do not fit {module.__class__.__name__} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def to_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(dtype)``, except under ZeRO-3 where deepspeed.zero.Init already created the
    partitioned parameters in the training dtype (and .to() would touch only placeholders)."""
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        return module
    return module.to(dtype)
