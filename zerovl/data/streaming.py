"""Stream WebDataset tar shards into micro-batches, resumable by shard and offset.

The epoch's stream is the shards in a seeded order (``seed + epoch``; samples inside a shard keep
their order — shuffle when writing shards), concatenated. Positions in it are interleaved over ranks
exactly like :class:`~zerovl.data.sampler.ResumableBatchSampler`, so ``consumed`` is one
world-size-independent number, and it maps to (shard, offset) through the per-shard sample counts
read from the tar headers at start-up. A resumed run opens the recorded shard and seeks to the offset;
nothing before it is read. Every rank walks the same shards but reads only its own samples' bytes.

Samples are tokenized on the fly in the DataLoader workers (worker w builds micro-batches w, w+n, ...).
A sample that cannot be used (too long, or a bad record or image with ``data.skip_bad_samples``) is
replaced by a copy of a usable one from the same micro-batch and counted in ``num_skipped``, so the
positions of all later samples stay where they were.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from zerovl.config import DatasetSpec
from zerovl.data.images import load_image_bytes
from zerovl.data.readers import sample_from_shard_record
from zerovl.data.sampler import InterleavedPosition
from zerovl.data.shards import count_samples, read_shard
from zerovl.data.template import ChatTemplate, TooLong
from zerovl.errors import DataError

log = logging.getLogger(__name__)


class ShardSampler(InterleavedPosition):
    """Positions of a streamed shard list; the same interface as ResumableBatchSampler."""

    def __init__(self, shards: list[str], counts: list[int], batch_size: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, seed: int = 0):
        if sum(counts) < 1:
            raise DataError(f"{len(shards)} shard(s) starting with {shards[0]} hold no samples")
        self.shards, self.counts = shards, counts
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.num_samples = sum(counts)
        self.epoch = self.consumed = self.phase = 0

    @classmethod
    def scan(cls, shards: list[str], *args: Any, **kwargs: Any) -> ShardSampler:
        counts = [count_samples(s) for s in shards]
        log.info("webdataset: %d samples in %d shards", sum(counts), len(shards))
        return cls(shards, counts, *args, **kwargs)

    # -- where a position lives -----------------------------------------------------------------
    def shard_order(self, epoch: int | None = None) -> list[int]:
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return list(range(len(self.shards)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def _starts(self, epoch: int | None = None) -> np.ndarray:
        return np.cumsum([0] + [self.counts[s] for s in self.shard_order(epoch)])

    def locate(self, position: int, epoch: int | None = None) -> tuple[int, int]:
        """(index in the epoch's shard order, sample offset inside that shard) of a stream position."""
        starts = self._starts(epoch)
        k = min(int(np.searchsorted(starts, position, side="right")) - 1, len(self.shards) - 1)
        return k, position - int(starts[k])

    def position_state(self, epoch: int, consumed: int) -> dict[str, Any]:
        """Where a resumed run reopens the stream: shard (index in the epoch's order), offset, file."""
        k, offset = self.locate(consumed, epoch)
        return {"shard": k, "offset": offset, "shard_path": self.shards[self.shard_order(epoch)[k]]}

    def restore(self, state: dict[str, Any]) -> None:
        """Resume at the recorded (shard, offset); refuse when the shards changed since."""
        k, offset = int(state["shard"]), int(state["offset"])
        order = self.shard_order()
        recorded = state.get("shard_path")
        if k >= len(order) or (recorded and self.shards[order[k]] != recorded) or offset > self.counts[order[k]]:
            raise DataError(f"webdataset shards changed since the checkpoint (it stopped in {recorded} at sample "
                            f"{offset}); restore the shard list or start a new run (train.resume=none)")
        self.consumed = int(self._starts()[k]) + offset

    # -- which positions this rank reads ----------------------------------------------------------
    def batch_positions(self) -> list[list[int]]:
        """Stream positions of this rank's micro-batches for the rest of the epoch (wrapping at the end)."""
        rest = self.num_samples - self.consumed
        mine = [self.consumed + (k % rest) for k in range(self.rank, self.per_rank * self.world_size, self.world_size)]
        return [mine[b * self.batch_size : (b + 1) * self.batch_size] for b in range(len(self))]


class WebDatasetStream(IterableDataset):
    """Yields this rank's micro-batches (lists of items) from the sampler's position on."""

    def __init__(self, sampler: ShardSampler, spec: DatasetSpec, template: ChatTemplate, image_processor,
                 max_length: int, max_pixels: int, too_long: str = "drop", skip_bad_samples: bool = False):
        self.sampler = sampler
        self.spec = spec
        self.template = template
        self.image_processor = image_processor
        self.max_length = max_length
        self.max_pixels = max_pixels
        self.too_long = too_long
        self.skip_bad_samples = skip_bad_samples

    def __len__(self) -> int:
        return self.sampler.num_samples

    def _records(self, positions: list[int]) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """(position, source, record) for increasing ``positions``; shards holding none are not opened."""
        by_shard: dict[int, list[int]] = {}
        for p in positions:
            k, offset = self.sampler.locate(p)
            by_shard.setdefault(k, []).append(offset)
        order = self.sampler.shard_order()
        starts = self.sampler._starts()
        for k in sorted(by_shard):
            path = self.sampler.shards[order[k]]
            wanted = set(by_shard[k])
            found = 0
            for offset, key, record in read_shard(path, wanted.__contains__, min(wanted)):
                found += 1
                yield int(starts[k]) + offset, f"{path}:{key}", record
            if found != len(wanted):
                raise DataError(f"shard {path} holds fewer samples than counted at start-up; was it rewritten?")

    def _item(self, source: str, record: dict[str, bytes]) -> dict[str, Any] | None:
        """The encoded item, or None when it cannot be used and may be skipped."""
        try:
            sample = sample_from_shard_record(record, source, self.spec)
            enc = self.template.encode(sample, self.max_length)
            images = [load_image_bytes(data, self.max_pixels, source, name)
                      for data, name in zip(sample.meta["image_bytes"], sample.images)]
        except TooLong as e:
            if self.too_long == "error" and e.reason == "image_tokens_cut":
                raise DataError(f"{source}: data.max_length={self.max_length} would cut its image tokens; raise "
                                "data.max_length, lower data.max_pixels, or set data.too_long=drop") from None
            return None
        except DataError as e:
            if not self.skip_bad_samples:
                raise
            log.warning("skipping sample: %s", e)
            return None
        if images and self.image_processor is None:
            raise DataError(f"{source}: sample has images but the model has no vision tower")
        vision = self.image_processor(images) if images else {}
        return {"input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
                "labels": torch.tensor(enc.labels, dtype=torch.long), **vision}

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self.sampler.batch_positions()[worker::workers]
        rest_start = self.sampler.consumed
        flat = [p for b in batches for p in b]
        # positions that wrapped around the epoch's end come last and restart the walk
        split = next((i for i in range(1, len(flat)) if flat[i] < flat[i - 1]), len(flat))
        walks = [self._records(flat[:split]), self._records(sorted(flat[split:]))]
        walk = 0
        pending: dict[int, tuple[str, dict[str, bytes]]] = {}
        for positions in batches:
            items, skipped = [], 0
            for p in positions:
                while p not in pending:
                    if walk == len(walks):
                        raise DataError(f"stream position {p} was never read; were the shards rewritten?")
                    try:
                        pos, source, record = next(walks[walk])
                    except StopIteration:
                        walk += 1
                        continue
                    pending[pos] = (source, record)
                source, record = pending.pop(p)
                item = self._item(source, record)
                if item is None:
                    skipped += 1
                else:
                    items.append(item)
            if not items:
                raise DataError(f"no usable sample in a micro-batch starting at stream position {positions[0]} "
                                f"(epoch starting at {rest_start}); see the warnings above")
            items += [items[i % len(items)] for i in range(skipped)]
            items[0] = {**items[0], "num_skipped": skipped}
            yield items
