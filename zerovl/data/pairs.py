"""Image-caption pairs for retrieval models: every caption of every image is one training pair.

The files are read by the ordinary readers (COCO captions, Karpathy-split JSON, CSV, captions
JSON/JSONL), so every layout they accept works here; a sample's image path is its identity, and all
captions of one image share its ``image_id`` — which the contrastive loss uses so captions of the same
image are never each other's negatives. Captions are tokenized once, padded to a fixed length (all
ranks gather each other's texts for hard negatives, so every rank's batch has the same shape).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from zerovl.data.images import load_image
from zerovl.data.samples import Sample
from zerovl.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Pairs:
    """Distinct images, every caption, and which image each caption describes."""

    images: list[str]
    captions: list[str]
    image_of: list[int]  # caption index -> image index
    sources: list[str]  # caption index -> file:line

    def captions_of(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.images]
        for t, i in enumerate(self.image_of):
            out[i].append(t)
        return out


def pairs_from_samples(samples: list[Sample], name: str) -> Pairs:
    """One pair per sample with exactly one image and a caption (the last assistant reply)."""
    index: dict[str, int] = {}
    pairs = Pairs([], [], [], [])
    for sample in samples:
        replies = [m["content"] for m in sample.messages if m["role"] == "assistant"]
        if len(sample.images) != 1 or not replies or not str(replies[-1]).strip():
            raise DataError(f"{sample.source}: a retrieval pair needs exactly one image and a caption "
                            f"(has {len(sample.images)} image(s)); fix or drop the record")
        image = sample.images[0]
        if image not in index:
            index[image] = len(pairs.images)
            pairs.images.append(image)
        pairs.captions.append(str(replies[-1]).strip())
        pairs.image_of.append(index[image])
        pairs.sources.append(sample.source)
    if not pairs.captions:
        raise DataError(f"{name}: no image-caption pair")
    return pairs


def read_pairs(spec, skip_bad: bool, name: str) -> Pairs:
    from zerovl.data.readers import ReadReport, read_dataset

    report = ReadReport(skip_bad=skip_bad, key=name)
    return pairs_from_samples(read_dataset(spec, report), name)


def tokenize_captions(tokenizer, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, max_length] ids and mask, padded to the fixed length (LAVIS: padding='max_length')."""
    enc = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


class PairDataset(Dataset):
    """Item = one caption with its image's pixels and the image's index (``image_ids``)."""

    def __init__(self, pairs: Pairs, tokenizer, image_processor, max_text_length: int, max_pixels: int,
                 skip_bad_samples: bool = False, name: str = "data.train"):
        self.pairs = pairs
        self.input_ids, self.attention_mask = tokenize_captions(tokenizer, pairs.captions, max_text_length)
        self.image_processor = image_processor
        self.max_pixels = max_pixels
        self.skip_bad_samples = skip_bad_samples
        self.name = name
        self.samples: list[Sample] = []  # the chat datasets' attribute, empty: pairs have no chat
        log.info("%s: %d captions of %d images", name, len(pairs.captions), len(pairs.images))

    def __len__(self) -> int:
        return len(self.pairs.captions)

    def _item(self, t: int) -> dict[str, Any]:
        image = load_image(self.pairs.images[self.pairs.image_of[t]], self.max_pixels, self.pairs.sources[t])
        return {"pixel_values": self.image_processor([image])["pixel_values"], "input_ids": self.input_ids[t],
                "attention_mask": self.attention_mask[t], "image_ids": torch.tensor([self.pairs.image_of[t]])}

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self)):  # a bad image stops the run, or the next good pair stands in
            j = (index + attempt) % len(self)
            try:
                return {**self._item(j), "num_skipped": attempt}
            except DataError as e:
                if not self.skip_bad_samples:
                    raise
                log.warning("skipping pair: %s", e)
        raise DataError(f"{self.name}: every pair failed to load its image; see the warnings above")


def pair_collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = {"pixel_values": torch.cat([it["pixel_values"] for it in items]),
             "input_ids": torch.stack([it["input_ids"] for it in items]),
             "attention_mask": torch.stack([it["attention_mask"] for it in items]),
             "image_ids": torch.cat([it["image_ids"] for it in items])}
    batch["num_skipped"] = torch.tensor(sum(int(it.get("num_skipped", 0)) for it in items))
    batch["num_samples"] = torch.tensor(len(items))
    return batch


def build_pair_data(data, tokenizer, image_processor, max_text_length: int, micro_batch_size: int,
                    accumulation_steps: int, rank: int, world_size: int, seed: int):
    """The retrieval counterpart of ``pipeline.build_train_data``: every dataset's pairs, one resumable stream."""
    from zerovl.data.loader import BatchStream
    from zerovl.data.pipeline import TrainData
    from zerovl.data.sampler import ResumableBatchSampler

    specs = data.train_datasets()
    parts = [read_pairs(spec, data.skip_bad_samples, "data.train" if len(specs) == 1 else f"data.train {spec.label}")
             for spec in specs]
    pairs = parts[0] if len(parts) == 1 else merge(parts)
    dataset = PairDataset(pairs, tokenizer, image_processor, max_text_length, data.max_pixels, data.skip_bad_samples)
    sampler = ResumableBatchSampler(len(dataset), micro_batch_size, rank, world_size, data.shuffle, seed)
    stream = BatchStream(dataset, sampler, pair_collate, data.num_workers, micro_batches_per_step=accumulation_steps)
    return TrainData(dataset, sampler, stream)


def merge(parts: list[Pairs]) -> Pairs:
    """Several datasets as one set of pairs (an image listed in two keeps one identity)."""
    out = Pairs([], [], [], [])
    index: dict[str, int] = {}
    for part in parts:
        for t, caption in enumerate(part.captions):
            image = part.images[part.image_of[t]]
            if image not in index:
                index[image] = len(out.images)
                out.images.append(image)
            out.captions.append(caption)
            out.image_of.append(index[image])
            out.sources.append(part.sources[t])
    return out
