"""An endless, resumable stream of micro-batches across epochs.

The stream records exactly how many samples of the current epoch all ranks have consumed, so a
checkpoint holds ``(epoch, consumed)`` and a resumed run — on the same or another world size —
continues with the very next samples. DataLoader prefetching never leaks into that position.
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
        self.consumed = 0
        self._iter: Iterator | None = None
        self._left = 0  # micro-batches left in the current epoch on this rank

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.full_epoch_batches()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._iter = None

    def _start(self) -> None:
        self.sampler.set_position(self.epoch, self.consumed)
        self._left = len(self.sampler)
        loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=self.collate,
                            num_workers=self.num_workers, prefetch_factor=4 if self.num_workers else None)
        self._iter = iter(loader)

    def next(self) -> dict[str, Any]:
        if self._iter is None:
            self._start()
        if self._left == 0:  # epoch finished: the next one starts from its first sample
            self.epoch, self.consumed = self.epoch + 1, 0
            self._start()
        batch = next(self._iter)
        self._left -= 1
        self.consumed = min(self.sampler.num_samples, self.consumed + self.sampler.samples_per_step)
        return batch
