"""Packing: several samples per row without cross-contamination — same loss as unpacked, images kept
with their samples, rows nearly full."""

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from zerovl.config import from_dict
from zerovl.data.collate import META_KEYS, pad_collate
from zerovl.data.dataset import ChatDataset
from zerovl.data.plan import EpochPlan, pack_best_fit
from zerovl.data.samples import read_messages_jsonl
from zerovl.data.template import IGNORE_INDEX, ChatTemplate
from zerovl.models.builder import build_model


@pytest.fixture(scope="module")
def tiny(scenes, tmp_path_factory):
    cfg = from_dict(tiny_config(scenes, tmp_path_factory.mktemp("run")))
    torch.manual_seed(0)
    built = build_model(cfg.model, "fp32")
    template = ChatTemplate(built.tokenizer, "<image>", built.tokens_per_image)
    dataset = ChatDataset(read_messages_jsonl(str(scenes["train"]))[:16], template, built.image_processor, 128, 10**6)
    return built, dataset


def drop_meta(batch):
    return {k: v for k, v in batch.items() if k not in META_KEYS}


def test_packed_loss_equals_unpacked_loss(tiny):
    built, ds = tiny
    model, pad = built.model.eval(), built.tokenizer.pad_token_id
    indices = list(range(len(ds)))
    packs = pack_best_fit(indices, np.array(ds.lengths()), 128)
    assert len(packs) < len(indices) / 2 and sorted(i for p in packs for i in p) == indices
    unpacked = drop_meta(pad_collate([ds[i] for i in indices], pad))
    packed = drop_meta(pad_collate([ds[p] for p in packs], pad))
    assert packed["input_ids"].shape[0] == len(packs)
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((unpacked["labels"] != IGNORE_INDEX).sum())
    with torch.no_grad():
        plain, together = model(**unpacked).item(), model(**packed).item()
        packed.pop("position_ids")
        contaminated = model(**packed).item()  # one causal sequence per row: samples see each other
    assert abs(plain - together) < 1e-5
    assert abs(plain - contaminated) > 1e-4  # the check above can fail


def test_images_travel_with_their_samples(tiny):
    built, ds = tiny
    with_images = [i for i in range(len(ds)) if ds.image_paths[i]][:3]
    pack = tuple(reversed(with_images))
    item = ds[pack]
    expected = torch.cat([ds[i]["pixel_values"] for i in pack])
    assert torch.equal(item["pixel_values"], expected)  # image order = order of image tokens in the row
    starts = np.cumsum([0] + [len(ds[i]["input_ids"]) for i in pack])[:-1]
    assert item["position_ids"][starts].tolist() == [0, 0, 0]
    assert all(int(item["labels"][s]) == IGNORE_INDEX for s in starts)  # no learning across samples


def test_collate_pads_packed_rows_as_their_own_sequence():
    items = [{"input_ids": torch.tensor([5, 6, 7, 8]), "labels": torch.tensor([-100, 6, -100, 8]),
              "position_ids": torch.tensor([0, 1, 0, 1])},
             {"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([-100, 6]), "position_ids": torch.tensor([0, 1])}]
    batch = pad_collate(items, pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert "position_ids" not in pad_collate([{k: v for k, v in items[1].items() if k != "position_ids"}], 0)


def test_best_fit_fills_rows_of_skewed_lengths():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(4.0, 0.9, 5000).astype(int) + 8, 8, 1024)
    packs = pack_best_fit(range(len(lengths)), lengths, 1024)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert max(lengths[list(p)].sum() for p in packs) <= 1024
    assert lengths.sum() / (len(packs) * 1024) > 0.95


def test_packing_plan_is_deterministic_per_epoch_and_covers_every_sample():
    lengths = np.random.default_rng(1).integers(5, 60, 300)
    plan = EpochPlan([300], seed=3, lengths=lengths, max_length=128, packing=True)
    again = EpochPlan([300], seed=3, lengths=lengths, max_length=128, packing=True)
    assert plan.units(0) == again.units(0) and plan.units(1) != plan.units(0)
    for epoch in (0, 1):
        assert sorted(i for u in plan.units(epoch) for i in u) == list(range(300))
    assert plan.cost(plan.units(0)[0]) == int(lengths[list(plan.units(0)[0])].sum()) <= 128


def test_iterating_a_dataset_ends_after_its_last_sample(tiny):
    """``for item in dataset`` (what transformers' LengthGroupedSampler does to read lengths) stops at
    IndexError; indices used to wrap round and the loop never ended."""
    _, ds = tiny
    lengths = [len(item["input_ids"]) for item in ds]
    assert lengths == ds.lengths()
    assert torch.equal(ds[-1]["input_ids"], ds[len(ds) - 1]["input_ids"])
    with pytest.raises(IndexError, match=f"sample {len(ds)} of {len(ds)}"):
        ds[len(ds)]
