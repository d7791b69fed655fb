"""What one epoch is made of, in which order — a pure function of (seed, epoch).

An epoch is a list of *units*: a sample index, or a tuple of sample indices packed into one row. Three
things decide it:

- **mixture weights**: an epoch holds as many samples as all datasets together, shared among them in
  proportion to their weights. Each dataset is drawn from its own endless stream of seeded
  permutations, so a down-weighted dataset shows different samples each epoch and an up-weighted one
  repeats only after all of its samples were seen.
- **shuffle**: the epoch's samples are permuted with ``seed + epoch``.
- **packing**: samples are packed into rows of at most ``max_length`` tokens by best-fit decreasing,
  then the packs are shuffled.

Because every rank computes the same plan, the sampler's position (``consumed`` units) stays one
world-size-independent number.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

Unit = int | tuple[int, ...]


def mixture_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Samples per dataset per epoch: ``sum(sizes)`` shared by weight (largest-remainder rounding)."""
    total = sum(sizes)
    shares = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * total
    counts = np.floor(shares).astype(np.int64)
    for k in np.argsort(-(shares - counts), kind="stable")[: total - int(counts.sum())]:
        counts[k] += 1
    return counts.tolist()


def _draw(size: int, count: int, epoch: int, dataset: int, seed: int, shuffle: bool) -> np.ndarray:
    """Items ``[epoch * count, (epoch + 1) * count)`` of dataset ``dataset``'s endless stream of
    permutations (plain ``0..size-1`` repeated without shuffle)."""
    first, last = epoch * count, (epoch + 1) * count
    cycles = range(first // size, (last - 1) // size + 1) if count else range(0)
    parts = []
    for cycle in cycles:
        order = (np.random.default_rng([seed, dataset, cycle]).permutation(size) if shuffle
                 else np.arange(size))
        lo, hi = max(first - cycle * size, 0), min(last - cycle * size, size)
        parts.append(order[lo:hi])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def pack_best_fit(indices: Sequence[int], lengths: np.ndarray, capacity: int) -> list[tuple[int, ...]]:
    """Best-fit decreasing: longest samples first, each into the open row whose free space fits it
    most tightly. Rows are nearly full, so padding nearly vanishes. Ties keep the given order."""
    indices = np.asarray(indices, dtype=np.int64)
    order = indices[np.argsort(-lengths[indices], kind="stable")]
    rows: list[list[int]] = []
    open_rows: dict[int, list[int]] = {}  # free space -> rows with exactly that much free
    free_sizes: list[int] = []  # sorted keys of open_rows
    for index in order.tolist():
        need = int(lengths[index])
        k = bisect.bisect_left(free_sizes, need)
        if k < len(free_sizes):
            free = free_sizes[k]
            row = open_rows[free].pop()
            if not open_rows[free]:
                del open_rows[free]
                free_sizes.pop(k)
        else:
            free, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        left = free - need
        if left > 0:
            if left not in open_rows:
                open_rows[left] = []
                bisect.insort(free_sizes, left)
            open_rows[left].append(row)
    return [tuple(r) for r in rows]


class EpochPlan:
    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None = None, shuffle: bool = True,
                 seed: int = 0, lengths: Sequence[int] | None = None, max_length: int | None = None,
                 packing: bool = False):
        if packing and (lengths is None or max_length is None):
            raise ValueError("packing needs sample lengths and max_length")
        self.sizes = list(sizes)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.sizes)
        self.shuffle = shuffle
        self.seed = seed
        self.lengths = np.asarray(lengths, dtype=np.int64) if lengths is not None else None
        self.max_length = max_length
        self.packing = packing
        self.offsets = np.cumsum([0] + self.sizes)[:-1]
        self.counts = mixture_counts(self.sizes, self.weights)
        self._cached: tuple[int, list[Unit]] | None = None

    @property
    def is_mixture(self) -> bool:
        return len(self.sizes) > 1 and self.counts != self.sizes

    def samples(self, epoch: int) -> np.ndarray:
        """Global sample indices of this epoch, in order (before packing)."""
        total = sum(self.sizes)
        if not self.is_mixture:
            if not self.shuffle:
                return np.arange(total)
            g = torch.Generator().manual_seed(self.seed + epoch)  # the order single-dataset runs always had
            return torch.randperm(total, generator=g).numpy()
        drawn = np.concatenate([_draw(size, count, epoch, k, self.seed, self.shuffle) + offset
                                for k, (size, count, offset) in enumerate(zip(self.sizes, self.counts, self.offsets))])
        if self.shuffle:
            drawn = drawn[np.random.default_rng([self.seed, epoch]).permutation(len(drawn))]
        return drawn

    def units(self, epoch: int) -> list[Unit]:
        """The epoch's units in order (computed once per epoch)."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._plan(epoch))
        return self._cached[1]

    def _plan(self, epoch: int) -> list[Unit]:
        samples = self.samples(epoch)
        if not self.packing:
            return samples.tolist()
        packs = pack_best_fit(samples, self.lengths, self.max_length)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(packs))
            return [packs[k] for k in order]
        return sorted(packs, key=min)

    def cost(self, unit: Unit) -> int:
        """Tokens (text + image) of a unit; every sample costs 1 when lengths are unknown."""
        if self.lengths is None:
            return len(unit) if isinstance(unit, tuple) else 1
        if isinstance(unit, tuple):
            return int(self.lengths[list(unit)].sum())
        return int(self.lengths[unit])
