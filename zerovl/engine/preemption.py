"""Graceful stop on SIGTERM / SIGINT: finish the current optimizer step, save, exit 0.

Schedulers (SLURM, Kubernetes) send SIGTERM before killing a job; Ctrl-C sends SIGINT. The signal
only sets a flag; the training loop checks it at step boundaries, and all ranks agree (all-reduce)
so that every rank stops at the same step and takes part in the final collective save.
"""

from __future__ import annotations

import signal

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

    @property
    def flag(self) -> float:
        """1.0 once a signal arrived; the loop sums it over ranks with its per-step all-reduce, so all
        ranks see any rank's signal at the same step without an extra collective."""
        return 1.0 if self.received else 0.0
