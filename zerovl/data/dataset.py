"""Map-style dataset: text is encoded once up front (so over-long samples are known before the
first step), images are loaded lazily in DataLoader workers."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from zerovl.data.images import load_image
from zerovl.data.samples import Sample
from zerovl.data.template import ChatTemplate, Encoded, TooLong
from zerovl.errors import DataError

log = logging.getLogger(__name__)

# (list of PIL images) -> {"pixel_values": Tensor[N, C, H, W], ...}; supplied by the model builder
ImageProcessor = Callable[[list], dict[str, torch.Tensor]]


class ChatDataset(Dataset):
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
        self.template = template
        self.image_processor = image_processor
        self.max_pixels = max_pixels
        self.skip_bad_samples = skip_bad_samples
        self.dropped: Counter = Counter()
        self.samples: list[Sample] = []
        self.encoded: list[Encoded] = []
        for sample in samples:
            if sample.images and image_processor is None:
                raise DataError(f"{sample.source}: sample has images but the model has no vision tower")
            try:
                enc = template.encode(sample, max_length)
            except TooLong as e:
                if too_long == "error" and e.reason == "image_tokens_cut":
                    raise DataError(
                        f"{sample.source}: data.max_length={max_length} would cut its image tokens; "
                        "raise data.max_length, lower data.max_pixels, or set data.too_long=drop"
                    ) from None
                self.dropped[e.reason] += 1
                continue
            except DataError:
                if not skip_bad_samples:
                    raise
                self.dropped["bad_sample"] += 1
                continue
            self.samples.append(sample)
            self.encoded.append(enc)
        if not self.samples:
            raise DataError(f"{name}: no usable samples left (dropped: {dict(self.dropped)})")
        if self.dropped:
            log.warning("%s: dropped %s samples before training: %s", name, sum(self.dropped.values()),
                        dict(self.dropped))

    def __len__(self) -> int:
        return len(self.samples)

    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.encoded]

    def load_images(self, sample: Sample) -> dict[str, torch.Tensor]:
        images = [load_image(p, self.max_pixels, sample.source) for p in sample.images]
        return self.image_processor(images) if images else {}

    def __getitem__(self, index: int) -> dict[str, Any]:
        # A bad image either stops the run (default) or is replaced by the next good sample, so every
        # rank still gets a full batch and runs the same modules.
        for attempt in range(len(self)):
            j = (index + attempt) % len(self)
            sample, enc = self.samples[j], self.encoded[j]
            try:
                vision = self.load_images(sample)
            except DataError as e:
                if not self.skip_bad_samples:
                    raise
                log.warning("skipping sample: %s", e)
                continue
            return {
                "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
                "labels": torch.tensor(enc.labels, dtype=torch.long),
                "num_skipped": attempt,
                **vision,
            }
        raise DataError("every sample failed to load its images; see the warnings above")


def build_dataset(path: str, data, template: ChatTemplate, image_processor: ImageProcessor | None,
                  name: str) -> ChatDataset:
    """Read ``path`` in the configured format and encode it (``data`` is the DataSettings)."""
    from zerovl.data.samples import read_messages_jsonl

    skipped: Counter = Counter()
    samples = read_messages_jsonl(path, data.image_root, data.skip_bad_samples, skipped)
    dataset = ChatDataset(samples, template, image_processor, data.max_length, data.max_pixels,
                          data.too_long, data.skip_bad_samples, name=name)
    dataset.dropped.update(skipped)
    return dataset
