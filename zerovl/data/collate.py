"""Batch items into the model's contract: a plain dict of tensors."""

from __future__ import annotations

from typing import Any

import torch

from zerovl.data.template import IGNORE_INDEX

# keys that travel with the batch for bookkeeping only; the trainer pops them before forward
META_KEYS = ("num_skipped",)


def pad_collate(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ids/labels to the longest item; concatenate all images in sample order, which is
    the order their image tokens appear in the flattened batch."""
    longest = max(len(it["input_ids"]) for it in items)
    batch_size = len(items)
    input_ids = torch.full((batch_size, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[i, :n] = it["input_ids"]
        labels[i, :n] = it["labels"]
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    vision_keys = sorted({k for it in items for k in it} - set(batch) - set(META_KEYS))
    for key in vision_keys:
        parts = [it[key] for it in items if key in it]
        batch[key] = torch.cat(parts, dim=0)
    batch["num_skipped"] = torch.tensor(sum(int(it.get("num_skipped", 0)) for it in items))
    return batch
