"""Graceful stop on SIGTERM / SIGINT: finish the current optimizer step, save, exit 0.

Schedulers (SLURM, Kubernetes) send SIGTERM before killing a job; Ctrl-C sends SIGINT. The signal
only sets a flag; the training loop checks it at step boundaries, and all ranks agree (all-reduce)
so that every rank stops at the same step and takes part in the final collective save.
"""

from __future__ import annotations

import signal

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def install(self) -> GracefulStop:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def requested(self, device: torch.device) -> bool:
        """True on every rank if any rank received a stop signal (one small all-reduce)."""
        import deepspeed.comm as dist

        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
