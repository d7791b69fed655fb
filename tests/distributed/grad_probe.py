"""``torchrun ... grad_probe.py CONFIG OUT [key=value ...]``: ``zerovl train`` that also saves, on rank 0,
every parameter's gradient at the first optimizer step — after DeepSpeed's all-reduce and before clipping
and the update — so tests can compare gradients across batch splits and world sizes (ZeRO-0: each rank
holds the whole averaged gradient)."""

from __future__ import annotations

import sys

import deepspeed
import torch

from tests.distributed.helpers import exit_without_teardown
from zerovl.config import load_config
from zerovl.recipes.train import train


def _probing(initialize, out: str):
    def wrapped(*args, **kwargs):
        engine, optimizer, loader, scheduler = initialize(*args, **kwargs)
        step, saved = engine.step, []

        def probed_step(*a, **k):
            if not saved and engine.is_gradient_accumulation_boundary():
                saved.append(True)
                if torch.distributed.get_rank() == 0:
                    torch.save({n: p.grad.detach().clone() for n, p in engine.module.named_parameters()
                                if p.grad is not None}, out)
            return step(*a, **k)

        engine.step = probed_step
        return engine, optimizer, loader, scheduler

    return wrapped


if __name__ == "__main__":
    config, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    deepspeed.initialize = _probing(deepspeed.initialize, out)
    train(load_config(config, overrides))
    exit_without_teardown()
