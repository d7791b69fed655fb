"""Learning-rate schedule as a pure function of the optimizer step.

Computing the LR from the global step (instead of a stateful scheduler object) means any DeepSpeed
optimizer — fused, CPU-offloaded, ZeRO-wrapped — gets the same LR, and a resumed run continues the
curve exactly: the only state is the step number, which the checkpoint already holds.
"""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base LR for optimizer step ``step`` (0-based): linear warmup from
    1/warmup to 1, then ``cosine`` or ``linear`` decay to ``min_ratio`` at the last step, or ``constant``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ValueError(f"unknown schedule {schedule!r}")


def set_lr(optimizer, factor: float) -> float:
    """Apply ``factor`` to every param group's base LR (groups carry their own ``base_lr``);
    returns the LR of the first group for logging."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("base_lr", group["lr"]) * factor
    return optimizer.param_groups[0]["lr"]
