"""Deterministic, resumable, distributed batch sampler.

Every epoch is a seeded permutation (seed + epoch) of the dataset. Ranks take interleaved positions
of it (rank r gets positions r, r+W, r+2W, ...), so after any number of steps the samples consumed by
*all* ranks together are exactly a prefix of the permutation. The position is therefore one number —
``consumed`` samples of the epoch — that does not depend on the world size: a run resumed on a
different number of ranks continues with the rest of the same epoch, nothing skipped or repeated.
The remainder is padded by wrapping so every rank gets the same number of micro-batches (ranks must
take the same number of steps or collectives hang).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0):
        if num_samples < 1:
            raise ValueError("empty dataset")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.consumed = 0  # samples of this epoch already taken by all ranks together

    @property
    def per_rank(self) -> int:
        """Samples each rank gets from the rest of this epoch."""
        return math.ceil(max(0, self.num_samples - self.consumed) / self.world_size)

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Micro-batches each rank gets from the rest of this epoch."""
        return math.ceil(self.per_rank / self.batch_size)

    def full_epoch_batches(self) -> int:
        return math.ceil(math.ceil(self.num_samples / self.world_size) / self.batch_size)

    def set_position(self, epoch: int, consumed: int = 0) -> None:
        self.epoch, self.consumed = epoch, consumed

    def epoch_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def rank_indices(self) -> list[int]:
        rest = self.epoch_order()[self.consumed:]
        total = self.per_rank * self.world_size
        while rest and len(rest) < total:
            rest += rest[: total - len(rest)]
        return rest[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.rank_indices()
        for b in range(len(self)):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]
