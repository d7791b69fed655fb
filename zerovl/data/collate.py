"""Batch items into the model's contract: a plain dict of tensors."""

from __future__ import annotations

from typing import Any

import torch

from zerovl.data.template import IGNORE_INDEX

# keys that travel with the batch for bookkeeping only; the trainer pops them before forward
META_KEYS = ("num_skipped", "num_samples")
TEXT_KEYS = ("input_ids", "labels", "attention_mask", "position_ids")


def pad_collate(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ids/labels to the longest item; concatenate all images in sample order, which is
    the order their image tokens appear in the flattened batch.

    Packed items (``data.packing``) carry ``position_ids`` restarting at 0 for each sample; the batch
    then has ``position_ids`` too, padding continuing as one more sequence from 0, so the model keeps
    the packed samples apart (block-diagonal causal attention)."""
    longest = max(len(it["input_ids"]) for it in items)
    batch_size = len(items)
    input_ids = torch.full((batch_size, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
    packed = any("position_ids" in it for it in items)
    position_ids = torch.zeros((batch_size, longest), dtype=torch.long) if packed else None
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[i, :n] = it["input_ids"]
        labels[i, :n] = it["labels"]
        attention_mask[i, :n] = 1
        if position_ids is not None:
            position_ids[i, :n] = it["position_ids"] if "position_ids" in it else torch.arange(n)
            position_ids[i, n:] = torch.arange(longest - n)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if position_ids is not None:
        batch["position_ids"] = position_ids
    vision_keys = sorted({k for it in items for k in it} - set(TEXT_KEYS) - set(META_KEYS))
    for key in vision_keys:
        parts = [it[key] for it in items if key in it]
        batch[key] = torch.cat(parts, dim=0)
    batch["num_skipped"] = torch.tensor(sum(int(it.get("num_skipped", 0)) for it in items))
    batch["num_samples"] = torch.tensor(sum(int(it.get("num_samples", 1)) for it in items))  # packed rows hold several
    return batch
