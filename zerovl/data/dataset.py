"""Map-style datasets: text is encoded once up front (so over-long samples are known before the first
step) into a :class:`TokenTable`; images are loaded lazily in DataLoader workers.

An index is one sample, or a tuple of samples packed into one row (``data.packing``): their ids are
concatenated, position ids restart at 0 for each, and the first label of each is ignored so no sample
learns from the one before it.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from zerovl.data.images import load_image, load_image_bytes
from zerovl.data.samples import Sample
from zerovl.data.template import IGNORE_INDEX, ChatTemplate, Encoded, TooLong
from zerovl.data.tokens import TokenPart, TokenTable
from zerovl.errors import DataError

log = logging.getLogger(__name__)

# (list of PIL images) -> {"pixel_values": Tensor[N, C, H, W], ...}; supplied by the model builder
ImageProcessor = Callable[[list], dict[str, torch.Tensor]]


@dataclass
class DatasetRange:
    """Where one member of a mixture sits in the concatenated training set."""

    name: str
    start: int
    stop: int
    weight: float = 1.0


def encode_samples(samples: Sequence[Sample], template: ChatTemplate, max_length: int, too_long: str = "drop",
                   skip_bad_samples: bool = False, has_vision: bool = True,
                   dropped: Counter | None = None) -> tuple[list[Sample], list[Encoded]]:
    """Encode every sample; over-long ones are dropped (counted by reason) or, when ``too_long=error``
    and an image would be cut, raise. Returns the kept samples and their encodings."""
    dropped = dropped if dropped is not None else Counter()
    kept: list[Sample] = []
    encoded: list[Encoded] = []
    for sample in samples:
        if sample.images and not has_vision:
            raise DataError(f"{sample.source}: sample has images but the model has no vision tower")
        try:
            enc = template.encode(sample, max_length)
        except TooLong as e:
            if too_long == "error" and e.reason == "image_tokens_cut":
                raise DataError(
                    f"{sample.source}: data.max_length={max_length} would cut its image tokens; "
                    "raise data.max_length, lower data.max_pixels, or set data.too_long=drop"
                ) from None
            dropped[e.reason] += 1
            continue
        except DataError:
            if not skip_bad_samples:
                raise
            dropped["bad_sample"] += 1
            continue
        kept.append(sample)
        encoded.append(enc)
    return kept, encoded


class TokenizedDataset(Dataset):
    """Pre-encoded samples: ids/labels from a TokenTable, image paths and ``file:line`` per sample."""

    # the frozen-feature cache (zerovl.data.features.FeatureCache): when set, items carry
    # ``image_features`` read from it instead of ``pixel_values``
    features = None

    def __init__(self, tokens: TokenTable, image_paths: Sequence[Sequence[str]], sources: Sequence[str],
                 image_processor: ImageProcessor | None, max_pixels: int, skip_bad_samples: bool = False,
                 ranges: list[DatasetRange] | None = None, dropped: Counter | None = None, name: str = "train"):
        if len(tokens) != len(image_paths) or len(tokens) != len(sources):
            raise ValueError("tokens, image_paths and sources must describe the same samples")
        self.tokens = tokens
        self.image_paths = image_paths
        self.sources = sources
        self.image_processor = image_processor
        self.max_pixels = max_pixels
        self.skip_bad_samples = skip_bad_samples
        self.ranges = ranges or [DatasetRange(name, 0, len(tokens))]
        self.dropped: Counter = dropped if dropped is not None else Counter()
        if not len(tokens):
            raise DataError(f"{name}: no usable samples left (dropped: {dict(self.dropped)})")

    def __len__(self) -> int:
        return len(self.tokens)

    def lengths(self) -> list[int]:
        return self.tokens.lengths.tolist()

    def costs(self) -> list[int]:
        """Work per sample for rank balancing: text tokens + image tokens (the sequence length)."""
        return (self.tokens.text_tokens + self.tokens.image_tokens).tolist()

    def _vision(self, paths: Sequence[str], source: str) -> dict[str, torch.Tensor]:
        if self.features is not None:
            return {"image_features": self.features.get(list(paths), source)} if paths else {}
        images = [load_image(p, self.max_pixels, source) for p in paths]
        return self.image_processor(images) if images else {}

    def load_images(self, sample: Sample) -> dict[str, torch.Tensor]:
        held = sample.meta.get("image_bytes")  # tar-shard samples carry their images
        if held is None:
            return self._vision(sample.images, sample.source)
        images = [load_image_bytes(data, self.max_pixels, sample.source, name)
                  for data, name in zip(held, sample.images)]
        return self.image_processor(images) if images else {}

    def _item(self, index: int) -> dict[str, Any]:
        vision = self._vision(self.image_paths[index], self.sources[index])
        return {"input_ids": torch.from_numpy(self.tokens.ids(index)),
                "labels": torch.from_numpy(self.tokens.labels(index)), **vision}

    def _single(self, index: int) -> dict[str, Any]:
        # A bad image either stops the run (default) or is replaced by the next good sample, so every
        # rank still gets a full batch and runs the same modules.
        for attempt in range(len(self)):
            j = (index + attempt) % len(self)
            try:
                item = self._item(j)
            except DataError as e:
                if not self.skip_bad_samples:
                    raise
                log.warning("skipping sample: %s", e)
                continue
            return {**item, "num_skipped": attempt}
        raise DataError("every sample failed to load its images; see the warnings above")

    def _pack(self, indices: Sequence[int]) -> dict[str, Any]:
        items, skipped = [], 0
        for j in indices:
            try:
                items.append(self._item(j))
            except DataError as e:
                if not self.skip_bad_samples:
                    raise
                log.warning("skipping sample: %s", e)
                skipped += 1
        if not items:  # a bad sample is left out of its pack; a pack of nothing borrows one good sample
            item = self._single(indices[0])
            skipped += item.pop("num_skipped")
            items = [item]
        return {**pack_items(items), "num_skipped": skipped, "num_samples": len(items)}

    def __getitem__(self, index: int | tuple[int, ...]) -> dict[str, Any]:
        if isinstance(index, (tuple, list)):
            return self._pack(index)
        if not -len(self) <= index < len(self):  # `for item in dataset` (HF's LengthGroupedSampler) stops here
            raise IndexError(f"sample {index} of {len(self)}")
        return self._single(index)  # wraps a negative index as a list does

    @classmethod
    def concat(cls, datasets: Sequence[TokenizedDataset], names: Sequence[str], weights: Sequence[float],
               name: str = "data.train") -> TokenizedDataset:
        """One training set from a mixture's members, remembering where each one sits."""
        ranges, start = [], 0
        for ds, label, weight in zip(datasets, names, weights):
            ranges.append(DatasetRange(label, start, start + len(ds), weight))
            start += len(ds)
        dropped: Counter = Counter()
        for ds in datasets:
            dropped.update(ds.dropped)
        first = datasets[0]
        return cls(TokenTable.concat([d.tokens for d in datasets]), _ConcatList([d.image_paths for d in datasets]),
                   _ConcatList([d.sources for d in datasets]), first.image_processor, first.max_pixels,
                   first.skip_bad_samples, ranges, dropped, name)


class _ConcatList(Sequence):
    """Read-only view of several sequences as one, without copying them."""

    def __init__(self, parts: Sequence[Sequence]):
        self.parts = list(parts)
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + len(part))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        k = bisect.bisect_right(self.starts, index) - 1
        return self.parts[k][index - self.starts[k]]


def pack_items(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate samples into one row: position ids restart per sample, and the first label of each
    sample is ignored (it would otherwise be predicted from the previous sample's last token).
    Images stay in sample order, the order of their image tokens in the row."""
    labels = []
    for it in items:
        lab = it["labels"].clone()
        lab[0] = IGNORE_INDEX
        labels.append(lab)
    packed: dict[str, Any] = {
        "input_ids": torch.cat([it["input_ids"] for it in items]),
        "labels": torch.cat(labels),
        "position_ids": torch.cat([torch.arange(len(it["input_ids"])) for it in items]),
    }
    for key in sorted({k for it in items for k in it} - set(packed)):
        packed[key] = torch.cat([it[key] for it in items if key in it], dim=0)
    return packed


class ChatDataset(TokenizedDataset):
    """A dataset encoded from Samples in memory; keeps the Samples (evaluation generates from them)."""

    def _item(self, index: int) -> dict[str, Any]:
        if not self.samples:  # dropped to save memory (training sets built by the pipeline)
            return super()._item(index)
        return {"input_ids": torch.from_numpy(self.tokens.ids(index)),
                "labels": torch.from_numpy(self.tokens.labels(index)), **self.load_images(self.samples[index])}

    def __init__(
        self,
        samples: list[Sample],
        template: ChatTemplate,
        image_processor: ImageProcessor | None,
        max_length: int,
        max_pixels: int,
        too_long: str = "drop",
        skip_bad_samples: bool = False,
        name: str = "train",
    ):
        dropped: Counter = Counter()
        self.samples, encoded = encode_samples(samples, template, max_length, too_long, skip_bad_samples,
                                               image_processor is not None, dropped)
        self.template = template
        tokens = TokenTable([TokenPart.from_encoded(encoded)])
        super().__init__(tokens, [s.images for s in self.samples], [s.source for s in self.samples],
                         image_processor, max_pixels, skip_bad_samples, dropped=dropped, name=name)
        if self.dropped:
            log.warning("%s: dropped %s samples before training: %s", name, sum(self.dropped.values()),
                        dict(self.dropped))


def build_dataset(path: str, data, template: ChatTemplate, image_processor: ImageProcessor | None,
                  name: str) -> ChatDataset:
    """Read ``path`` in the configured format (``data`` is the DataSettings) and encode it."""
    from zerovl.data.readers import ReadReport, read_dataset

    report = ReadReport(skip_bad=data.skip_bad_samples, key=name)
    samples = read_dataset(data.val_dataset(path), report)
    dataset = ChatDataset(samples, template, image_processor, data.max_length, data.max_pixels,
                          data.too_long, data.skip_bad_samples, name=name)
    dataset.dropped.update(report.counts)
    return dataset
