"""From ``data`` settings to the training stream: datasets (raw or cached), mixture, packing, balance.

``build_train_data`` is what the training recipe calls; it returns the dataset, its sampler and the
resumable :class:`~zerovl.data.loader.BatchStream`. Map-style formats are read and encoded once (or
memory-mapped from ``data.cache_dir``); a webdataset source is streamed from its shards instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch.utils.data import Dataset

from zerovl.config import DataSettings
from zerovl.data.dataset import ChatDataset, ImageProcessor, TokenizedDataset
from zerovl.data.loader import BatchStream
from zerovl.data.plan import EpochPlan
from zerovl.data.readers import ReadReport, dataset_keys, read_dataset
from zerovl.data.sampler import ResumableBatchSampler
from zerovl.data.shards import expand_shards
from zerovl.data.streaming import ShardSampler, WebDatasetStream
from zerovl.data.template import ChatTemplate

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    dataset: Dataset
    sampler: ResumableBatchSampler | ShardSampler
    stream: BatchStream


def build_train_set(data: DataSettings, template: ChatTemplate, image_processor: ImageProcessor | None,
                    tokenizer_dir: str | None = None, name: str = "data.train") -> TokenizedDataset:
    """Every map-style training dataset, encoded (or opened from the cache), as one indexed set."""
    specs = data.train_datasets()
    if data.cache_dir is not None:
        from zerovl.data.cache import open_cache

        members = open_cache(data, template, tokenizer_dir, image_processor, name)
    else:
        members = []
        for spec, key in zip(specs, dataset_keys(data)):
            report = ReadReport(skip_bad=data.skip_bad_samples, key=key)
            samples = read_dataset(spec, report)
            label = name if len(specs) == 1 else f"{name} {spec.label}"
            member = ChatDataset(samples, template, image_processor, data.max_length, data.max_pixels,
                                 data.too_long, data.skip_bad_samples, name=label)
            member.dropped.update(report.counts)
            member.samples = []  # training needs only tokens, image paths and sources
            members.append(member)
    if len(members) == 1:
        return members[0]
    return TokenizedDataset.concat(members, [s.label for s in specs], [s.weight for s in specs], name)


def build_train_data(data: DataSettings, template: ChatTemplate, image_processor: ImageProcessor | None,
                     collate: Callable, micro_batch_size: int, accumulation_steps: int = 1, rank: int = 0,
                     world_size: int = 1, seed: int = 0, tokenizer_dir: str | None = None) -> TrainData:
    specs = data.train_datasets()
    if specs[0].format == "webdataset":
        sampler = ShardSampler.scan(expand_shards(specs[0].path), micro_batch_size, rank, world_size,
                                    data.shuffle, seed)
        dataset: Dataset = WebDatasetStream(sampler, specs[0], template, image_processor, data.max_length,
                                            data.max_pixels, data.too_long, data.skip_bad_samples)
    else:
        dataset = build_train_set(data, template, image_processor, tokenizer_dir)
        plan = EpochPlan([r.stop - r.start for r in dataset.ranges], [r.weight for r in dataset.ranges],
                         data.shuffle, seed, dataset.costs(), data.max_length, data.packing)
        sampler = ResumableBatchSampler(len(dataset), micro_batch_size, rank, world_size, data.shuffle, seed,
                                        plan=plan, balance_steps=accumulation_steps if data.balance else 0)
        if rank == 0:
            describe(dataset, plan)
    stream = BatchStream(dataset, sampler, collate, data.num_workers, micro_batches_per_step=accumulation_steps)
    return TrainData(dataset, sampler, stream)


def describe(dataset: TokenizedDataset, plan: EpochPlan) -> None:
    """Log the mixture's share per dataset and the packing fill, once."""
    if len(dataset.ranges) > 1:
        shares = ", ".join(f"{r.name}: {r.stop - r.start} samples, weight {r.weight:g} -> {c} per epoch"
                           for r, c in zip(dataset.ranges, plan.counts))
        log.info("data mixture: %s", shares)
    if plan.packing:
        units = plan.units(0)
        tokens = sum(plan.cost(u) for u in units)
        log.info("packing: %d samples into %d rows of <= %d tokens (%.1f%% of row capacity used)",
                 sum(len(u) for u in units), len(units), plan.max_length,
                 100.0 * tokens / (len(units) * plan.max_length))
