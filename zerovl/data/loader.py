"""An endless, resumable stream of micro-batches across epochs.

The stream knows exactly which micro-batch of which epoch the trainer consumed last, so a checkpoint
can record ``(epoch, batch_in_epoch)`` and a resumed run continues with the very next batch —
DataLoader prefetching never leaks into that position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset

from zerovl.data.sampler import ResumableBatchSampler


class BatchStream:
    def __init__(self, dataset: Dataset, sampler: ResumableBatchSampler, collate: Callable,
                 num_workers: int = 0):
        self.dataset = dataset
        self.sampler = sampler
        self.collate = collate
        self.num_workers = num_workers
        self.epoch = 0
        self.batch_in_epoch = 0
        self._iter: Iterator | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sampler)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self._iter = None

    def _start_epoch(self) -> None:
        self.sampler.set_position(self.epoch, self.batch_in_epoch)
        loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=self.collate,
                            num_workers=self.num_workers, persistent_workers=False,
                            prefetch_factor=4 if self.num_workers else None)
        self._iter = iter(loader)

    def next(self) -> dict[str, Any]:
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch, self._iter = self.epoch + 1, 0, None
        if self._iter is None:
            self._start_epoch()
        batch = next(self._iter)
        self.batch_in_epoch += 1
        return batch
