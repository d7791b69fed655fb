"""An endless, resumable stream of micro-batches across epochs.

The stream records exactly how many units (samples or packs) of the current epoch all ranks have
consumed, so a checkpoint holds ``(epoch, consumed)`` — plus ``(shard, offset)`` for streamed tar
shards — and a resumed run, on the same or another world size, continues with the very next
samples. DataLoader prefetching never leaks into that position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, IterableDataset

from zerovl.data.sampler import ResumableBatchSampler


class BatchStream:
    def __init__(self, dataset: Dataset, sampler: ResumableBatchSampler, collate: Callable,
                 num_workers: int = 0, micro_batches_per_step: int = 1):
        self.dataset = dataset
        self.sampler = sampler
        self.collate = collate
        self.num_workers = num_workers
        self.micro_batches_per_step = micro_batches_per_step
        self.epoch = 0
        self.consumed = 0
        self._iter: Iterator | None = None
        self._left = 0  # micro-batches left in the current epoch on this rank
        self._in_step = 0  # micro-batches of the current optimizer step taken so far

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.full_epoch_batches()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "consumed": self.consumed}
        if hasattr(self.sampler, "position_state"):  # streamed shards: where to reopen
            state.update(self.sampler.position_state(self.epoch, self.consumed))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checkpoints are taken at optimizer-step boundaries, so the step phase restarts at 0."""
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        if "shard" in state and hasattr(self.sampler, "restore"):
            self.sampler.set_position(self.epoch, self.consumed)
            self.sampler.restore(state)
            self.consumed = self.sampler.consumed
        self._in_step = 0
        self._iter = None

    def _start(self) -> None:
        self.sampler.set_position(self.epoch, self.consumed, self._in_step)
        self._left = len(self.sampler)
        prefetch = 4 if self.num_workers else None
        if isinstance(self.dataset, IterableDataset):  # it yields whole micro-batches itself
            loader = DataLoader(self.dataset, batch_size=None, collate_fn=self.collate,
                                num_workers=self.num_workers, prefetch_factor=prefetch)
        else:
            loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=self.collate,
                                num_workers=self.num_workers, prefetch_factor=prefetch)
        self._iter = iter(loader)

    def next(self) -> dict[str, Any]:
        if self._iter is None:
            self._start()
        if self._left == 0:  # epoch finished: the next one starts from its first sample
            self.epoch, self.consumed = self.epoch + 1, 0
            self._start()
        batch = next(self._iter)
        self._left -= 1
        self._in_step = (self._in_step + 1) % self.micro_batches_per_step
        self.consumed = min(self.sampler.num_samples, self.consumed + self.sampler.samples_per_step)
        return batch
