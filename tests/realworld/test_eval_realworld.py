"""`zerovl eval` on real files: COCO val2017 captions with their real images and annotations, LLaVA's
qa90 question file, and the real photos (JPEG, WebP) other projects ship. A tiny model scores low: these
check the pipeline (every image read, every reference kept, every metric computed), not the score."""

from __future__ import annotations

import json

import pytest

from tests.distributed.helpers import check, run
from tests.realworld.conftest import DATASETS, coco_captions, coco_images, image_sample, mixed_jsonl
from tests.realworld.test_models_realworld import _shipped
from zerovl.config import EvalTaskSettings
from zerovl.eval.caption import java_available
from zerovl.eval.items import read_open
from zerovl.eval.tasks import task_for


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory, tiny_model):
    """configs/llava.yaml with the CLIP- and Qwen2.5-shaped directories (real tokenizer), 2 steps, 1 rank,
    on real COCO photos with their real captions."""
    root = tmp_path_factory.mktemp("llava_eval")
    captions = coco_captions()
    coco_data = mixed_jsonl(root / "coco.jsonl", [image_sample([p], "\nDescribe the image briefly.", captions[p.name])
                                                  for p in coco_images(4)])
    args = _shipped("llava.yaml", root, **{
        "model.vision.path": str(tiny_model("clip-vit-large-patch14")),
        "model.llm.path": str(tiny_model("qwen2.5-7b-instruct")), "data.train": str(coco_data),
        "data.format": "messages", "data.image_root": None, "data.max_length": 512, "train.max_steps": 2,
        "train.save_final": True})
    check(run(args, nproc=1, timeout=400))
    return root / "run"


@pytest.mark.distributed
def test_caption_task_on_the_real_coco_subset(llava_run, tmp_path):
    coco = DATASETS / "coco-mini"
    out = tmp_path / "caption"
    check(run(["eval", str(llava_run), "--task", "caption", "--data", str(coco / "annotations/captions_val2017.json"),
               "--image-root", str(coco / "val2017"), "--max-samples", "6", "--max-new-tokens", "8",
               "--out", str(out)], nproc=1, timeout=400))
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 == metrics["n"] and not metrics["left_out"]
    annotations = json.loads((coco / "annotations/captions_val2017.json").read_text())
    real = {}
    for a in annotations["annotations"]:
        real.setdefault(str(a["image_id"]), []).append(a["caption"].strip())
    assert all(r["references"] == real[r["id"]] and len(r["references"]) >= 5 for r in rows)
    expected = {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"} | ({"METEOR"} if java_available() else set())
    assert expected <= set(metrics) and all(metrics[k] >= 0 for k in expected)
    assert metrics["tokenizer"] == ("ptb" if java_available() else "python")


@pytest.mark.distributed
def test_open_ended_questions_on_real_photos(llava_run, tmp_path):
    """The shipped photos (JPEG, WebP, of several sizes) through the model's real CLIP preprocessor."""
    photos = sorted((DATASETS / "images").iterdir())
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question_id": i, "image": str(p), "text": "What is shown?"}) + "\n"
                            for i, p in enumerate(photos)))
    out = tmp_path / "open"
    check(run(["eval", str(llava_run), "--task", "open", "--data", str(data), "--max-new-tokens", "4",
               "--batch-size", "2", "--out", str(out)], nproc=1, timeout=400))
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [str(i) for i in range(len(photos))]
    assert all(r["score"] is None and r["references"] == [] for r in rows)  # nothing to score against


def test_llava_qa90_loads_as_an_open_ended_task(realworld, tmp_path):
    """qa90 names COCO 2014 photos that are not shipped: stand-ins under those names (links to a real COCO
    photo) make every question load; without them each is counted as a missing image, none is fatal."""
    path = realworld / "datasets" / "llava" / "qa90_questions.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    photo = sorted((realworld / "datasets" / "coco-mini" / "val2017").glob("*.jpg"))[0]
    for name in {r["image"] for r in lines}:
        (tmp_path / name).symlink_to(photo)
    settings = EvalTaskSettings(task="open", data=str(path), image_root=str(tmp_path))
    data = read_open(settings)
    assert len(data.items) == len(lines) == 90 and not data.problems
    for item, line in zip(data.items, lines):
        assert item.id == str(line["question_id"]) and item.references == []
        assert item.sample.messages[0]["content"] == "<image>" + line["text"]
        assert item.meta["answer_type"] == line["category"]
    scores, metrics = task_for(settings).score(data.items, ["x"] * 90, settings)
    assert all(s is None for s in scores) and metrics["unscored_no_answers"] == 90
    absent = read_open(EvalTaskSettings(task="open", data=str(path), image_root=str(tmp_path / "none")))
    assert not absent.items and absent.problems == {"missing_image": 90}
