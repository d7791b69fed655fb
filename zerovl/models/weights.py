"""Read a subset of tensors (one sub-module) from a local HF checkpoint directory without loading
the rest — e.g. BLIP-2's vision tower and Q-Former without its 7B language model."""

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
