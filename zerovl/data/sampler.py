"""Deterministic, resumable, distributed batch sampler.

Every epoch is a seeded order of units — samples, or packs of samples — given by an
:class:`~zerovl.data.plan.EpochPlan` (by default a permutation seeded with ``seed + epoch``). Ranks
take interleaved positions of it (rank r gets positions r, r+W, r+2W, ...), so after any number of
steps the units consumed by *all* ranks together are exactly a prefix of the order. The position is
therefore one number — ``consumed`` units of the epoch — that does not depend on the world size: a run
resumed on a different number of ranks continues with the rest of the same epoch, nothing skipped or
repeated. The remainder is padded by wrapping so every rank gets the same number of micro-batches
(ranks must take the same number of steps or collectives hang).

With ``balance_steps`` (``data.balance``) the units of each optimizer step — ``world x micro-batch x
accumulation`` consecutive positions — are instead dealt out by cost (text + image tokens): heaviest
first, each to the least-loaded rank that still has room, so every rank carries about the same load
per step and none waits for a heavy one. A step still consumes exactly its window of the order, so
``consumed`` stays exact at every step boundary.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator, Sequence

from torch.utils.data import Sampler

from zerovl.data.plan import EpochPlan, Unit


class InterleavedPosition:
    """The position arithmetic every sampler here shares: ``consumed`` units of the epoch taken by all
    ranks together, ranks interleaved, the rest padded by wrapping so every rank gets the same number
    of micro-batches. Subclasses provide ``num_samples`` (units in the current epoch), ``batch_size``
    and ``world_size``."""

    num_samples: int
    batch_size: int
    world_size: int
    epoch = consumed = phase = 0

    @property
    def per_rank(self) -> int:
        """Units each rank gets from the rest of this epoch."""
        return math.ceil(max(0, self.num_samples - self.consumed) / self.world_size)

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Micro-batches each rank gets from the rest of this epoch."""
        return math.ceil(self.per_rank / self.batch_size)

    def full_epoch_batches(self) -> int:
        return math.ceil(math.ceil(self.num_samples / self.world_size) / self.batch_size)

    def set_position(self, epoch: int, consumed: int = 0, phase: int = 0) -> None:
        """``phase``: micro-steps of the optimizer step already taken before this point (an epoch that
        ends mid-step), so balance windows keep matching optimizer steps."""
        self.epoch, self.consumed, self.phase = epoch, consumed, phase


class ResumableBatchSampler(InterleavedPosition, Sampler[list]):
    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0, plan: EpochPlan | None = None, balance_steps: int = 0):
        if num_samples < 1:
            raise ValueError("empty dataset")
        self.plan = plan or EpochPlan([num_samples], shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.balance_steps = balance_steps
        self.epoch = 0
        self.consumed = 0  # units of this epoch already taken by all ranks together
        self.phase = 0  # micro-steps of the current optimizer step already taken (balance windows)

    @property
    def num_samples(self) -> int:
        """Units (samples or packs) in the current epoch."""
        return len(self.plan.units(self.epoch))

    def epoch_order(self) -> list[Unit]:
        return self.plan.units(self.epoch)

    def _rest(self) -> list[Unit]:
        rest = self.epoch_order()[self.consumed:]
        total = self.per_rank * self.world_size
        while rest and len(rest) < total:
            rest += rest[: total - len(rest)]
        return rest

    def __iter__(self) -> Iterator[list[Unit]]:
        rest = self._rest()
        if self.balance_steps:
            yield from balanced_batches(rest, self.plan.cost, self.world_size, self.batch_size,
                                        self.balance_steps, self.rank, self.phase)
            return
        mine = rest[self.rank :: self.world_size]
        for b in range(len(self)):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]


def deal_by_cost(units: Sequence[Unit], costs: Sequence[int], world_size: int) -> list[list[Unit]]:
    """Split ``units`` (a multiple of world_size) into equal-count groups of near-equal total cost:
    heaviest first, each to the least-loaded group with room (longest-processing-time with capacity)."""
    capacity = len(units) // world_size
    order = sorted(range(len(units)), key=lambda k: -costs[k])
    heap = [(0, r) for r in range(world_size)]
    groups: list[list[Unit]] = [[] for _ in range(world_size)]
    for k in order:
        load, r = heapq.heappop(heap)
        groups[r].append(units[k])
        if len(groups[r]) < capacity:
            heapq.heappush(heap, (load + costs[k], r))
    return groups


def balanced_batches(units: Sequence[Unit], cost: Callable[[Unit], int], world_size: int, batch_size: int,
                     window_steps: int, rank: int, phase: int = 0) -> Iterator[list[Unit]]:
    """This rank's micro-batches when each window of ``window_steps`` micro-steps (one optimizer step)
    is balanced: the window is dealt out over ranks by :func:`deal_by_cost`, then each rank's share,
    heaviest first, is cut into micro-batches — so micro-step k holds each rank's k-th heaviest units
    and ranks stay in step within the optimizer step too. ``phase`` shortens the first window."""
    step_units = world_size * batch_size
    start, steps = 0, max(1, window_steps - phase)
    while start < len(units):
        window = units[start : start + steps * step_units]
        mine = deal_by_cost(window, [cost(u) for u in window], world_size)[rank]
        for b in range(0, len(mine), batch_size):
            yield mine[b : b + batch_size]
        start += len(window)
        steps = window_steps
