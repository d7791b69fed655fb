"""Image-text retrieval: the scoring (top-k in chunks, ranks, recall, chance, LAVIS's report) against
brute force, and the pair data (Karpathy splits, LAVIS's karpathy test file, image,caption CSVs, pairs,
the pair dataset and its collate)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import zerovl.eval.retrieval as score
from zerovl.config import DatasetSpec
from zerovl.data.detect import detect_format
from zerovl.data.pairs import (
    PairDataset,
    Pairs,
    pair_collate,
    pairs_from_samples,
    read_pairs,
    tokenize_captions,
)
from zerovl.data.samples import Sample
from zerovl.errors import DataError

LAVIS_KEYS = {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean"}


# -- scoring -------------------------------------------------------------------------------------------
def full_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """[I, T] by plain matmul: for each image and text the best query token's dot product."""
    return (image_feats @ text_feats.t()).amax(dim=1)  # [I, Q, D] @ [D, T] -> [I, Q, T] -> [I, T]


def random_feats(num_images: int, num_texts: int, q: int = 3, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_images, q, d, generator=g), torch.randn(num_texts, d, generator=g)


@pytest.mark.parametrize("chunk", [1, 7, 50, score.CHUNK_ELEMENTS])
@pytest.mark.parametrize("k", [1, 5, 11, 40])
def test_topk_equals_brute_force_top_k(monkeypatch, chunk, k):
    monkeypatch.setattr(score, "CHUNK_ELEMENTS", chunk)
    image_feats, text_feats = random_feats(7, 11)
    full = full_similarity(image_feats, text_feats)

    v, i = score.topk_image_to_text(image_feats, text_feats, k)
    ref_v, ref_i = full.topk(min(k, 11), dim=1)
    assert v.shape == (7, min(k, 11)) and i.dtype == torch.long
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(v, ref_v)

    v, i = score.topk_text_to_image(text_feats, image_feats, k)
    ref_v, ref_i = full.t().topk(min(k, 7), dim=1)
    assert v.shape == (11, min(k, 7)) and i.dtype == torch.long
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(v, ref_v)


def test_small_chunk_really_splits_the_queries(monkeypatch):
    calls = []
    real = score.max_query_similarity

    def spy(image_feats, text_feats):
        calls.append((image_feats.shape[0], text_feats.shape[0]))
        return real(image_feats, text_feats)

    monkeypatch.setattr(score, "max_query_similarity", spy)
    monkeypatch.setattr(score, "CHUNK_ELEMENTS", 3 * 11 * 2)  # two images (Q=3 x T=11 each) per chunk
    image_feats, text_feats = random_feats(7, 11)
    score.topk_image_to_text(image_feats, text_feats, 4)
    assert calls == [(2, 11), (2, 11), (2, 11), (1, 11)]

    calls.clear()
    monkeypatch.setattr(score, "CHUNK_ELEMENTS", 3 * 7 * 4)  # four texts (Q=3 x I=7 each) per chunk
    score.topk_text_to_image(text_feats, image_feats, 4)
    assert calls == [(7, 4), (7, 4), (7, 3)]


def test_topk_of_no_queries_is_empty():
    image_feats, text_feats = random_feats(0, 5)
    v, i = score.topk_image_to_text(image_feats, text_feats, 3)
    assert v.shape == (0, 3) and i.shape == (0, 3) and i.dtype == torch.long


def test_ranks_best_placed_positive_and_missing_positive():
    candidates = torch.tensor([[3, 1, 0, 4], [2, 0, 1, 3], [5, 6, 7, 8]])
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7],   # sorted: 1, 4, 0, 3
                           [0.3, 0.2, 0.1, 0.0],   # sorted: 2, 0, 1, 3
                           [0.0, 0.4, 0.2, 0.3]])  # sorted: 6, 8, 7, 5
    # image 0 has captions 0 and 3: the better placed (0, at position 2) counts; image 1's caption 9 is not
    # among its candidates: it ranks below all 4; image 2's caption 5 is last
    assert score.ranks(candidates, scores, [{0, 3}, {9}, {5}]) == [2, 4, 3]
    assert score.ranks(candidates, scores, [{1}, {2, 3}, {6, 8}]) == [0, 0, 0]


def test_recall_on_hand_made_ranks():
    out = score.recall([0, 1, 4, 5, 9, 10, 20, 0])
    assert out == {"r1": 25.0, "r5": 50.0, "r10": 75.0, "mean": 50.0}
    assert score.recall([0, 2], ks=(1, 3)) == {"r1": 50.0, "r3": 100.0, "mean": 75.0}
    assert score.recall([]) == {"r1": 0.0, "r5": 0.0, "r10": 0.0, "mean": 0.0}


def test_chance_equals_exact_enumeration():
    captions_per_image = [2, 1, 2]
    owner = [i for i, c in enumerate(captions_per_image) for _ in range(c)]  # text -> image
    num_texts, num_images = len(owner), len(captions_per_image)
    ks = (1, 2, 3, 4, 10)
    # image -> text: every ordering of the 5 texts equally likely; rank = first of the image's captions
    i2t = {k: Fraction(0) for k in ks}
    perms = list(itertools.permutations(range(num_texts)))
    for image in range(num_images):
        for perm in perms:
            rank = min(pos for pos, t in enumerate(perm) if owner[t] == image)
            for k in ks:
                i2t[k] += Fraction(int(rank < k), len(perms) * num_images)
    # text -> image: every ordering of the 3 images equally likely; rank = position of the text's image
    t2i = {k: Fraction(0) for k in ks}
    image_perms = list(itertools.permutations(range(num_images)))
    for t in range(num_texts):
        for perm in image_perms:
            rank = perm.index(owner[t])
            for k in ks:
                t2i[k] += Fraction(int(rank < k), len(image_perms) * num_texts)

    got = score.chance(captions_per_image, num_images, ks=ks)
    assert set(got) == {"i2t", "t2i"}
    for k in ks:
        assert got["i2t"][f"r{k}"] == pytest.approx(100 * float(i2t[k]), abs=1e-9)
        assert got["t2i"][f"r{k}"] == pytest.approx(100 * float(t2i[k]), abs=1e-9)
    assert got["i2t"]["r1"] == pytest.approx(100 / 3)  # (2/5 + 1/5 + 2/5) / 3
    assert got["i2t"]["r4"] == pytest.approx(100 * (1 + 4 / 5 + 1) / 3)  # only the lone caption can be last


def test_metrics_keys_and_values_are_lavis():
    out = score.metrics([0, 3, 7, 12], [0, 0, 1, 6, 11])
    assert set(out) == LAVIS_KEYS
    assert (out["txt_r1"], out["txt_r5"], out["txt_r10"]) == (25.0, 50.0, 75.0)
    assert (out["img_r1"], out["img_r5"], out["img_r10"]) == (40.0, 60.0, 80.0)
    assert out["txt_r_mean"] == pytest.approx(50.0)
    assert out["img_r_mean"] == pytest.approx(60.0)
    assert out["r_mean"] == pytest.approx(55.0)


def lavis_report_metrics(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: list[int],
                         img2txt: list[list[int]]) -> tuple[list[int], list[int], dict[str, float]]:
    """LAVIS's ``RetrievalTask._report_metrics`` on full score matrices (its ranks, then its report)."""
    i2t_ranks = np.zeros(scores_i2t.shape[0])
    for index, row in enumerate(scores_i2t):
        inds = np.argsort(row)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            rank = min(rank, tmp)
        i2t_ranks[index] = rank
    tr = [100.0 * len(np.where(i2t_ranks < k)[0]) / len(i2t_ranks) for k in (1, 5, 10)]
    t2i_ranks = np.zeros(scores_t2i.shape[0])
    for index, row in enumerate(scores_t2i):
        inds = np.argsort(row)[::-1]
        t2i_ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(t2i_ranks < k)[0]) / len(t2i_ranks) for k in (1, 5, 10)]
    tr_mean, ir_mean = sum(tr) / 3, sum(ir) / 3
    report = {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "txt_r_mean": tr_mean,
              "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2], "img_r_mean": ir_mean,
              "r_mean": (tr_mean + ir_mean) / 2}
    return [int(r) for r in i2t_ranks], [int(r) for r in t2i_ranks], report


def retrieval_setup(captions_per_image: list[int], seed: int, pull: float = 1.5):
    txt2img = [i for i, c in enumerate(captions_per_image) for _ in range(c)]
    img2txt = [[t for t, i in enumerate(txt2img) if i == image] for image in range(len(captions_per_image))]
    image_feats, text_feats = random_feats(len(captions_per_image), len(txt2img), q=4, d=6, seed=seed)
    # make the task non-trivial but not random: pull each caption towards a query token of its image
    text_feats = text_feats + pull * image_feats[torch.tensor(txt2img), 0]
    return txt2img, img2txt, image_feats, text_feats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_from_top_k_covering_everything_match_lavis(monkeypatch, seed):
    monkeypatch.setattr(score, "CHUNK_ELEMENTS", 40)
    captions_per_image = [5, 5, 4, 5, 6, 5, 3, 5]
    txt2img, img2txt, image_feats, text_feats = retrieval_setup(captions_per_image, seed)
    num_images, num_texts = len(img2txt), len(txt2img)
    full = full_similarity(image_feats, text_feats)

    i2t_v, i2t_i = score.topk_image_to_text(image_feats, text_feats, num_texts)
    t2i_v, t2i_i = score.topk_text_to_image(text_feats, image_feats, num_images)
    i2t = score.ranks(i2t_i, i2t_v, [set(c) for c in img2txt])
    t2i = score.ranks(t2i_i, t2i_v, [{i} for i in txt2img])

    ref_i2t, ref_t2i, ref = lavis_report_metrics(full.numpy(), full.t().numpy(), txt2img, img2txt)
    assert i2t == ref_i2t
    assert t2i == ref_t2i
    assert 0 < sum(r == 0 for r in i2t) < num_images  # neither all right nor all wrong: the ranks are tested
    got = score.metrics(i2t, t2i)
    assert set(got) == set(ref)
    for key in ref:
        assert got[key] == pytest.approx(ref[key]), key


@pytest.mark.parametrize("seed", [0, 3])
def test_re_ranked_top_k_recall_matches_lavis_minus_100_matrix(seed):
    """LAVIS scores the ITC top k by ITM (+ ITC) and leaves every other pair at -100; zerovl ranks the
    re-scored top k only. Recall@1/5/10 agree whenever k >= 10."""
    captions_per_image = [1, 2, 3, 2, 1, 2, 3, 1, 2, 2, 1, 3, 2, 1, 2]
    txt2img, img2txt, image_feats, text_feats = retrieval_setup(captions_per_image, seed, pull=0.5)
    num_images, num_texts = len(img2txt), len(txt2img)
    k = 10
    g = torch.Generator().manual_seed(100 + seed)
    i2t_v, i2t_i = score.topk_image_to_text(image_feats, text_feats, k)
    t2i_v, t2i_i = score.topk_text_to_image(text_feats, image_feats, k)
    i2t_final = i2t_v + torch.randn(i2t_v.shape, generator=g)  # a stand-in for ITM + ITC
    t2i_final = t2i_v + torch.randn(t2i_v.shape, generator=g)

    lavis_i2t = np.full((num_images, num_texts), -100.0)
    lavis_t2i = np.full((num_texts, num_images), -100.0)
    for row in range(num_images):
        lavis_i2t[row, i2t_i[row].numpy()] = i2t_final[row].numpy()
    for row in range(num_texts):
        lavis_t2i[row, t2i_i[row].numpy()] = t2i_final[row].numpy()
    ref_i2t, ref_t2i, ref = lavis_report_metrics(lavis_i2t, lavis_t2i, txt2img, img2txt)

    i2t = score.ranks(i2t_i, i2t_final, [set(c) for c in img2txt])
    t2i = score.ranks(t2i_i, t2i_final, [{i} for i in txt2img])
    assert [min(r, k) for r in ref_i2t] == i2t  # beyond the top k: LAVIS's position among the -100s, ours k
    assert [min(r, k) for r in ref_t2i] == t2i
    assert any(r == k for r in i2t) and any(r == k for r in t2i)  # positives outside the top k: exercised
    assert any(r < k for r in t2i)
    got = score.metrics(i2t, t2i)
    for key in ref:
        assert got[key] == pytest.approx(ref[key]), key


# -- data ----------------------------------------------------------------------------------------------
def png(path, color=(200, 30, 30)) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)
    return str(path)


def read(path, fmt="auto", split=None) -> Pairs:
    return read_pairs(DatasetSpec(path=str(path), format=fmt, split=split), skip_bad=False, name="x")


KARPATHY = [  # (filepath, filename, split, sentences)
    ("train2014", "t0.png", "train", ["a red square", "a square that is red"]),
    ("val2014", "r0.png", "restval", ["a blue circle"]),
    ("val2014", "v0.png", "val", ["two dots", "a pair of dots"]),
    ("val2014", "s0.png", "test", ["one", "two", "three"]),
    ("val2014", "s1.png", "test", ["four", "five"]),
]


@pytest.fixture()
def karpathy(tmp_path):
    images = []
    for n, (filepath, filename, split, sentences) in enumerate(KARPATHY):
        png(tmp_path / filepath / filename, (40 * n, 10, 10))
        images.append({"filepath": filepath, "filename": filename, "imgid": n, "cocoid": 1000 + n, "split": split,
                       "sentences": [{"raw": s, "tokens": s.split(), "imgid": n, "sentid": 10 * n + j}
                                     for j, s in enumerate(sentences)]})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}, separators=(",", ":")))  # one line
    return path


def expected(tmp_path, splits: set[str]) -> tuple[list[str], list[str], list[int]]:
    rows = [r for r in KARPATHY if r[2] in splits]
    images = [str(tmp_path / fp / fn) for fp, fn, _, _ in rows]
    captions = [s for *_, sentences in rows for s in sentences]
    image_of = [i for i, (*_, sentences) in enumerate(rows) for _ in sentences]
    return images, captions, image_of


@pytest.mark.parametrize("fmt", ["karpathy", "auto"])
def test_karpathy_test_split_has_only_test_images_with_all_sentences(karpathy, fmt):
    pairs = read(karpathy, fmt, "test")
    assert (pairs.images, pairs.captions, pairs.image_of) == expected(karpathy.parent, {"test"})
    assert all(os.path.isfile(p) for p in pairs.images)
    assert pairs.captions_of() == [[0, 1, 2], [3, 4]]


def test_karpathy_train_split_includes_restval(karpathy):
    pairs = read(karpathy, "karpathy", "train")
    assert (pairs.images, pairs.captions, pairs.image_of) == expected(karpathy.parent, {"train", "restval"})
    pairs = read(karpathy, "karpathy", "val")
    assert (pairs.images, pairs.captions, pairs.image_of) == expected(karpathy.parent, {"val"})


def test_karpathy_without_split_reads_every_image(karpathy):
    pairs = read(karpathy, "karpathy")
    assert len(pairs.images) == len(KARPATHY)
    assert len(pairs.captions) == sum(len(r[3]) for r in KARPATHY)


def test_karpathy_unknown_split_is_one_line_naming_it_and_the_splits(karpathy):
    with pytest.raises(DataError) as e:
        read(karpathy, "karpathy", "dev")
    message = str(e.value)
    assert "\n" not in message
    assert "'dev'" in message
    assert "restval, test, train, val" in message
    assert str(karpathy) in message


def test_karpathy_is_detected(karpathy):
    assert detect_format(str(karpathy)).format == "karpathy"


def test_lavis_coco_karpathy_test_json_reads_into_one_image_with_five_captions(tmp_path):
    image = png(tmp_path / "val2014" / "COCO_val2014_000000391895.png")
    captions = ["A man with a red helmet on a small moped on a dirt road.", "Man riding a motor bike on a dirt road.",
                "A man riding on the back of a motorcycle.", "A dirt path with a young person on a motor bike.",
                "A man in a red shirt and a red hat is on a motorcycle on a hill side."]
    path = tmp_path / "coco_karpathy_test.json"
    path.write_text(json.dumps([{"image": "val2014/COCO_val2014_000000391895.png", "caption": captions}]))
    assert detect_format(str(path)).format == "captions"
    pairs = read(path)
    assert pairs.images == [image]
    assert pairs.captions == captions
    assert pairs.image_of == [0] * 5


@pytest.mark.parametrize("fmt", ["auto", "csv"])
def test_csv_with_image_caption_columns_reads_into_pairs(tmp_path, fmt):
    a, b = png(tmp_path / "imgs" / "a.png"), png(tmp_path / "imgs" / "b.png", (0, 0, 255))
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([["imgs/a.png", "a red block"], ["imgs/b.png", "a blue block"], ["imgs/a.png", "red, square"]])
    pairs = read(path, fmt)
    assert pairs.images == [a, b]
    assert pairs.captions == ["a red block", "a blue block", "red, square"]
    assert pairs.image_of == [0, 1, 0]
    assert pairs.sources[1].endswith("pairs.csv:3")


def caption_sample(images: list[str], reply: str, source: str) -> Sample:
    return Sample([{"role": "user", "content": "<image>" * len(images) + "\ndescribe"},
                   {"role": "assistant", "content": reply}], images, source)


def test_pairs_from_samples_groups_captions_by_image_path():
    samples = [caption_sample(["/d/a.png"], " a cat ", "f.json:1"), caption_sample(["/d/b.png"], "a dog", "f.json:2"),
               caption_sample(["/d/a.png"], "a feline", "f.json:3"), caption_sample(["/d/c.png"], "a cow", "f.json:4"),
               caption_sample(["/d/b.png"], "a hound", "f.json:5")]
    pairs = pairs_from_samples(samples, "x")
    assert pairs.images == ["/d/a.png", "/d/b.png", "/d/c.png"]
    assert pairs.captions == ["a cat", "a dog", "a feline", "a cow", "a hound"]
    assert pairs.image_of == [0, 1, 0, 2, 1]
    assert pairs.sources == [f"f.json:{n}" for n in range(1, 6)]
    assert pairs.captions_of() == [[0, 2], [1, 4], [3]]


@pytest.mark.parametrize("images", [["/d/a.png", "/d/b.png"], []])
def test_pairs_from_samples_rejects_a_sample_without_exactly_one_image(images):
    samples = [caption_sample(["/d/a.png"], "a cat", "f.json:1"), caption_sample(images, "two cats", "f.json:2")]
    with pytest.raises(DataError, match=rf"^f\.json:2: .*exactly one image.*has {len(images)} image"):
        pairs_from_samples(samples, "x")


def test_pairs_from_samples_of_nothing_names_the_dataset():
    with pytest.raises(DataError, match="^data.val: no image-caption pair"):
        pairs_from_samples([], "data.val")


WORDS = ["a", "red", "blue", "square", "circle", "and", "the", "small", "big", "on", "left"]


@pytest.fixture()
def tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from zerovl.data.demo_scenes import build_wordpiece_tokenizer

    return AutoTokenizer.from_pretrained(str(build_wordpiece_tokenizer(tmp_path / "tokenizer", WORDS)))


def test_tokenize_captions_pads_and_truncates_to_the_fixed_length(tokenizer):
    ids, mask = tokenize_captions(tokenizer, ["a red square", "a big blue circle on the left and a small red square"],
                                  8)
    assert ids.shape == mask.shape == (2, 8)
    vocab = tokenizer.get_vocab()
    assert ids[0].tolist() == [vocab["[CLS]"], vocab["a"], vocab["red"], vocab["square"], vocab["[SEP]"]] + \
        [vocab["[PAD]"]] * 3
    assert mask[0].tolist() == [1] * 5 + [0] * 3
    assert mask[1].tolist() == [1] * 8 and ids[1, -1].item() == vocab["[SEP]"]  # truncated, still closed


def test_pair_dataset_and_collate(tmp_path, tokenizer):
    from transformers import BlipImageProcessorPil

    from zerovl.models.vision import ImageProcessor

    a, b = png(tmp_path / "a.png"), png(tmp_path / "b.png", (0, 0, 255))
    pairs = pairs_from_samples([caption_sample([a], "a red square", "f:1"), caption_sample([b], "a blue circle", "f:2"),
                                caption_sample([a], "the big red square on the left", "f:3")], "x")
    processor = ImageProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}))
    dataset = PairDataset(pairs, tokenizer, processor, max_text_length=12, max_pixels=64 * 64)
    assert len(dataset) == 3
    assert dataset[2]["image_ids"].tolist() == [0] and dataset[1]["image_ids"].tolist() == [1]
    batch = pair_collate([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 12)
    assert batch["attention_mask"].sum(1).tolist() == [5, 5, 9]  # [CLS] words [SEP], then padding
    pad = tokenizer.pad_token_id
    assert batch["input_ids"][0, 5:].tolist() == [pad] * 7
    assert batch["image_ids"].tolist() == [0, 1, 0]
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][2])  # the same image's pixels
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    assert batch["num_samples"].item() == 3 and batch["num_skipped"].item() == 0


def test_pair_dataset_missing_image_fails_or_is_skipped(tmp_path, tokenizer):
    from transformers import BlipImageProcessorPil

    from zerovl.models.vision import ImageProcessor

    a = png(tmp_path / "a.png")
    pairs = pairs_from_samples([caption_sample([str(tmp_path / "gone.png")], "a red square", "f:1"),
                                caption_sample([a], "a blue circle", "f:2")], "x")
    processor = ImageProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}))
    with pytest.raises(DataError, match="gone.png"):
        PairDataset(pairs, tokenizer, processor, 8, 64 * 64)[0]
    item = PairDataset(pairs, tokenizer, processor, 8, 64 * 64, skip_bad_samples=True)[0]
    assert item["num_skipped"] == 1 and item["image_ids"].tolist() == [1]


def test_generated_retrieval_pairs_read_as_pairs(tmp_path):
    from zerovl.data.demo_scenes import generate_pairs

    paths = generate_pairs(tmp_path, num_train_images=3, num_val_images=2, image_size=16)
    pairs = read(paths["val"])
    assert len(pairs.images) == 2 and all(os.path.isfile(p) for p in pairs.images)
    assert pairs.image_of == [0, 0, 1, 1]  # two captions per image
    assert math.prod(len(c) for c in pairs.captions_of()) == 4
