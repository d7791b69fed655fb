import json

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from zerovl.data.collate import pad_collate
from zerovl.data.dataset import ChatDataset
from zerovl.data.images import fit_max_pixels, load_image
from zerovl.data.sampler import ResumableBatchSampler
from zerovl.data.samples import read_messages_jsonl
from zerovl.data.template import ChatTemplate
from zerovl.errors import DataError


@pytest.mark.parametrize("w,h,cap", [(1000, 500, 100_000), (640, 480, 640 * 480), (37, 1999, 5000), (3, 4, 10)])
def test_fit_max_pixels_keeps_aspect_and_bound(w, h, cap):
    nw, nh = fit_max_pixels(w, h, cap)
    assert nw * nh <= cap
    assert nw <= w and nh <= h
    if w * h > cap:
        assert abs(nw / nh - w / h) / (w / h) < 0.05 + 1 / min(nw, nh)
        assert nw * nh > 0.9 * cap or min(nw, nh) < 20  # uses most of the budget
    else:
        assert (nw, nh) == (w, h)  # never upscales


def test_load_image_downscales_and_converts(tmp_path):
    Image.new("L", (400, 100), 128).save(tmp_path / "g.png")
    img = load_image(str(tmp_path / "g.png"), max_pixels=10_000)
    assert img.mode == "RGB"
    assert img.width * img.height <= 10_000
    assert img.width == 200 and img.height == 50


def test_missing_and_corrupt_images_name_sample_and_path(tmp_path):
    with pytest.raises(DataError, match=r"d.jsonl:3: image .*nope.png not found"):
        load_image(str(tmp_path / "nope.png"), 100, "d.jsonl:3")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot be read"):
        load_image(str(tmp_path / "bad.png"), 100, "d.jsonl:4")


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_reader_resolves_paths_and_reports_bad_lines(tmp_path):
    ok = {"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}],
          "images": ["img/a.png"]}
    path = _write(tmp_path / "d.jsonl", [ok, ok])
    samples = read_messages_jsonl(path)
    assert samples[1].images == [str(tmp_path / "img/a.png")] and samples[1].source.endswith("d.jsonl:2")
    assert read_messages_jsonl(path, image_root="/data")[0].images == ["/data/img/a.png"]
    bad = dict(ok, images=[])
    path = _write(tmp_path / "e.jsonl", [ok, bad])
    with pytest.raises(DataError, match=r"e.jsonl:2: 1 <image> tag\(s\) in the text but 0 image"):
        read_messages_jsonl(path)
    (tmp_path / "f.jsonl").write_text(json.dumps(ok) + "\n{broken\n")
    with pytest.raises(DataError, match="f.jsonl:2: not valid JSON"):
        read_messages_jsonl(str(tmp_path / "f.jsonl"))
    assert len(read_messages_jsonl(str(tmp_path / "f.jsonl"), skip_bad=True)) == 1


class _Proc:
    def __call__(self, images):
        return {"pixel_values": torch.zeros(len(images), 3, 8, 8)}


def test_dataset_errors_or_skips_missing_images(tmp_path, scenes):
    tok = AutoTokenizer.from_pretrained(scenes["tokenizer"])
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    rec = lambda img: {"messages": [{"role": "user", "content": "<image>how many shapes are there ?"},  # noqa: E731
                                    {"role": "assistant", "content": "one"}], "images": [img]}
    path = _write(tmp_path / "d.jsonl", [rec("ok.png"), rec("missing.png"), rec("ok.png")])
    tpl = ChatTemplate(tok, "<image>", 2)
    strict = ChatDataset(read_messages_jsonl(path), tpl, _Proc(), 64, 10_000)
    assert strict[0]["pixel_values"].shape == (1, 3, 8, 8)
    with pytest.raises(DataError, match=r"d.jsonl:2: image .*missing.png not found"):
        strict[1]
    lenient = ChatDataset(read_messages_jsonl(path), tpl, _Proc(), 64, 10_000, skip_bad_samples=True)
    item = lenient[1]
    assert item["num_skipped"] == 1  # replaced by the next good sample, and counted
    batch = pad_collate([lenient[0], item], tok.pad_token_id)
    assert int(batch["num_skipped"]) == 1 and batch["pixel_values"].shape[0] == 2


def test_overlong_samples_are_dropped_and_counted_or_error(tmp_path, scenes):
    tok = AutoTokenizer.from_pretrained(scenes["tokenizer"])
    rec = {"messages": [{"role": "user", "content": "how many shapes are there ? " * 3 + "<image>"},
                        {"role": "assistant", "content": "one"}], "images": ["x.png"]}
    short = {"messages": [{"role": "user", "content": "how many sides does a square have ?"},
                          {"role": "assistant", "content": "four"}]}
    path = _write(tmp_path / "d.jsonl", [rec, short])
    tpl = ChatTemplate(tok, "<image>", 8)
    ds = ChatDataset(read_messages_jsonl(path), tpl, _Proc(), max_length=20, max_pixels=100)
    assert len(ds) == 1 and ds.dropped["image_tokens_cut"] == 1
    with pytest.raises(DataError, match="d.jsonl:1: data.max_length=20 would cut its image tokens"):
        ChatDataset(read_messages_jsonl(path), tpl, _Proc(), max_length=20, max_pixels=100, too_long="error")


def test_pad_collate_masks_padding():
    items = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
             {"input_ids": torch.tensor([5]), "labels": torch.tensor([5]), "pixel_values": torch.ones(1, 3, 2, 2)}]
    batch = pad_collate(items, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["pixel_values"].shape == (1, 3, 2, 2)


def test_sampler_is_deterministic_disjoint_and_resumable():
    ranks = [ResumableBatchSampler(21, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for s in ranks:
        s.set_position(epoch=1)
    b0, b1 = list(ranks[0]), list(ranks[1])
    assert len(b0) == len(b1) == 3  # ceil(ceil(21/2)/4): same number of steps on every rank
    flat = [i for b in b0 + b1 for i in b]
    assert set(flat) == set(range(21)) and len(flat) == 22  # one wrap-around pad
    again = ResumableBatchSampler(21, 4, rank=0, world_size=2, seed=3)
    again.set_position(epoch=1, consumed=8)  # one micro-batch per rank done
    assert list(again) == b0[1:]
    other_epoch = ResumableBatchSampler(21, 4, rank=0, world_size=2, seed=3)
    other_epoch.set_position(epoch=2)
    assert list(other_epoch) != b0


def test_sampler_position_survives_a_world_size_change():
    """2 ranks consume 2 micro-batches; the rest of the epoch on 3 ranks covers exactly the others."""
    two = [ResumableBatchSampler(50, 3, rank=r, world_size=2, seed=1) for r in range(2)]
    done = [i for s in two for b in list(s)[:2] for i in b]
    three = [ResumableBatchSampler(50, 3, rank=r, world_size=3, seed=1) for r in range(3)]
    for s in three:
        s.set_position(epoch=0, consumed=len(done))
    rest = [i for s in three for b in s for i in b]
    assert len(set(done)) == len(done) == 12
    assert set(done) | set(rest) == set(range(50)) and not set(done) & set(rest)
    assert len(rest) - len(set(rest)) < 3  # only wrap-around padding repeats
