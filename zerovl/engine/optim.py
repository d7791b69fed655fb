"""Optimizer parameter groups: one LR per model part, and no weight decay on biases and norms."""

from __future__ import annotations

from typing import Any

from torch import nn


def no_decay(name: str, param) -> bool:
    # biases, LayerNorm/RMSNorm weights and other 1-D tensors are not regularised (GPT-2/LLaVA practice)
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def param_groups(parts: dict[str, list[tuple[str, nn.Parameter]]], part_lrs: dict[str, float],
                 weight_decay: float) -> list[dict[str, Any]]:
    """Groups named ``<part>.decay`` / ``<part>.no_decay`` holding only trainable parameters.
    Each group keeps its ``base_lr``, which the schedule scales every step."""
    groups = []
    for part, named in parts.items():
        decay, plain = [], []
        for name, p in named:
            if p.requires_grad:
                (plain if no_decay(name, p) else decay).append(p)
        lr = part_lrs[part]
        for suffix, params, wd in (("decay", decay, weight_decay), ("no_decay", plain, 0.0)):
            if params:
                groups.append({"params": params, "weight_decay": wd, "lr": lr, "base_lr": lr,
                               "name": f"{part}.{suffix}"})
    return groups
