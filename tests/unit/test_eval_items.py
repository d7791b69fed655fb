"""Evaluation inputs without a model: every task's file layouts become items, bad records are counted or
rejected with one line, batches cover every item exactly once, and the config's eval keys validate."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from zerovl.config import ConfigError, EvalTaskSettings, from_dict
from zerovl.errors import DataError
from zerovl.eval.items import CAPTION_PROMPT, VQA_SUFFIX, read_caption, read_mcq, read_vqa
from zerovl.eval.tasks import task_for
from zerovl.recipes.evaluate import flat_metrics, plan_batches


@pytest.fixture
def images(tmp_path):
    """Images of several sizes and modes, as a real VQA folder holds them."""
    specs = {"a.png": ("RGB", (32, 32)), "b.jpg": ("L", (640, 17)), "c.png": ("RGBA", (3, 900)),
             "d.png": ("P", (48, 48)), "e.jpg": ("CMYK", (100, 60))}
    for name, (mode, size) in specs.items():
        Image.new(mode, size).save(tmp_path / name)
    return tmp_path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_vqav2_layout_pairs_questions_with_ten_answers(tmp_path):
    for name in ("COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 1, "question": "What colour is the bus?", "question_id": 10},
        {"image_id": 2, "question": "How many dogs?", "question_id": 20}]}
    answers = {"annotations": [
        {"question_id": 10, "answer_type": "other", "answers": [{"answer": "red", "answer_id": i} for i in range(10)]},
        {"question_id": 20, "answer_type": "number", "answers": [{"answer": "2"}] * 7 + [{"answer": "3"}] * 3}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(answers))
    data = read_vqa(EvalTaskSettings(task="vqa", data=str(tmp_path / "q.json"), annotations=str(tmp_path / "a.json")))
    assert [it.id for it in data.items] == ["10", "20"]
    first = data.items[0]
    assert first.references == ["red"] * 10 and first.meta["answer_type"] == "other"
    assert first.sample.images == [str(tmp_path / "COCO_val2014_000000000001.jpg")]
    assert first.sample.messages[-1]["content"] == f"<image>What colour is the bus?\n{VQA_SUFFIX}"


def test_vqa_jsonl_with_every_image_size_and_mode_loads(images):
    rows = [{"id": i, "image": name, "question": f"q{i}", "answers": ["yes"]}
            for i, name in enumerate(sorted(p.name for p in images.iterdir()))]
    data = read_vqa(EvalTaskSettings(task="vqa", data=_jsonl(images / "v.jsonl", rows), prompt=""))
    assert len(data.items) == 5 and not data.problems
    from zerovl.data.images import load_image

    for item in data.items:
        im = load_image(item.sample.images[0], 64 * 64, item.sample.source)
        assert im.mode == "RGB" and im.width * im.height <= 64 * 64


def test_questions_without_answers_and_missing_images_are_counted_not_fatal(images):
    rows = [{"id": 1, "image": "a.png", "question": "q"},
            {"id": 2, "image": "nowhere.png", "question": "q", "answers": ["x"]},
            {"id": 3, "image": "a.png", "question": "q", "answers": ["x"]}]
    settings = EvalTaskSettings(task="vqa", data=_jsonl(images / "v.jsonl", rows))
    data = read_vqa(settings)
    assert [it.id for it in data.items] == ["1", "3"] and data.problems == {"missing_image": 1}
    scores, metrics = task_for(settings).score(data.items, ["x", "x"], settings)
    assert scores == [None, 1.0] and metrics["unscored_no_answers"] == 1 and metrics["n"] == 1


def test_duplicate_ids_stop_with_the_file_and_line(images):
    rows = [{"id": 7, "image": "a.png", "question": "q", "answers": ["x"]}] * 2
    with pytest.raises(DataError, match=r"v\.jsonl:2: id '7' already used at .*v\.jsonl:1"):
        read_vqa(EvalTaskSettings(task="vqa", data=_jsonl(images / "v.jsonl", rows)))


def test_a_broken_line_names_file_and_line(tmp_path):
    (tmp_path / "v.jsonl").write_text('{"question": "q", "answers": ["a"]}\n{oops\n')
    with pytest.raises(DataError, match=r"v\.jsonl:2: not valid JSON"):
        read_vqa(EvalTaskSettings(task="vqa", data=str(tmp_path / "v.jsonl")))


def test_training_records_become_prompt_and_reference(scenes):
    data = read_vqa(EvalTaskSettings(task="vqa", data=str(scenes["val"]), prompt=""))
    lines = [json.loads(line) for line in scenes["val"].read_text().splitlines()]
    assert len(data.items) == len(lines)
    first, record = data.items[0], lines[0]
    assert first.references == [record["messages"][-1]["content"]]
    assert first.sample.messages == record["messages"][:-1]  # no suffix: the conversation as trained
    assert first.meta["answer_type"] == record["type"]


def test_caption_coco_layout_and_jsonl(images):
    coco = {"images": [{"id": 5, "file_name": "a.png"}, {"id": 6, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 5, "caption": " A cat. "}, {"image_id": 5, "caption": "a kitten"},
                            {"image_id": 6, "caption": "a road"}]}
    (images / "captions.json").write_text(json.dumps(coco))
    data = read_caption(EvalTaskSettings(task="caption", data=str(images / "captions.json")))
    assert [(it.id, it.references) for it in data.items] == [("5", ["A cat.", "a kitten"]), ("6", ["a road"])]
    assert data.items[0].sample.messages[0]["content"] == "<image>" + CAPTION_PROMPT
    rows = [{"image": "a.png", "references": ["x", "y"]}, {"image": "c.png", "captions": ["z"]}]
    data = read_caption(EvalTaskSettings(task="caption", data=_jsonl(images / "c.jsonl", rows), prompt="Describe."))
    assert [it.references for it in data.items] == [["x", "y"], ["z"]]
    assert data.items[1].sample.messages[0]["content"] == "<image>Describe."


def _b64(size=(20, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, "blue").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mmbench_tsv(path, rows):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    lines = ["\t".join(header)] + ["\t".join(str(r.get(k, "")) for k in header) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_mmbench_tsv_with_base64_images_and_circular_rotations(tmp_path):
    rows = [{"index": 0, "question": "What colour?", "hint": "nan", "A": "red", "B": "blue", "C": "green",
             "D": "", "answer": "B", "category": "colour", "image": _b64()},
            {"index": 1, "question": "Which?", "hint": "Look closely", "A": "x", "B": "y", "answer": "A",
             "category": "misc", "image": _b64((5, 300))}]
    path = _mmbench_tsv(tmp_path / "mmbench.tsv", rows)
    plain = read_mcq(EvalTaskSettings(task="mcq", data=path))
    assert [it.id for it in plain.items] == ["0", "1"]
    first = plain.items[0]
    assert first.meta["options"] == {"A": "red", "B": "blue", "C": "green"}  # the empty D is no option
    assert first.references == ["B"] and "Hint" not in first.sample.messages[0]["content"]
    assert "Hint: Look closely" in plain.items[1].sample.messages[0]["content"]
    from zerovl.data.images import load_image_bytes

    held = first.sample.meta["image_bytes"][0]
    assert load_image_bytes(held, 10_000).size == (20, 10)
    circular = read_mcq(EvalTaskSettings(task="mcq", data=path, circular=True))
    assert [it.id for it in circular.items] == ["0", "0@1", "0@2", "1", "1@1"]
    for item in circular.items:  # the right answer's text moves with the rotation
        assert item.meta["options"][item.meta["answer"]] == {"0": "blue", "1": "x"}[item.meta["group"]]


def test_mcq_answer_outside_the_options_is_counted(tmp_path):
    rows = [{"index": 0, "question": "q", "A": "a", "B": "b", "answer": "E", "image": _b64()}]
    data = read_mcq(EvalTaskSettings(task="mcq", data=_mmbench_tsv(tmp_path / "m.tsv", rows)))
    assert not data.items and data.problems == {"answer_not_an_option": 1}


def test_mcq_jsonl_circular_scoring_needs_every_rotation(images):
    rows = [{"id": "q1", "image": "a.png", "question": "which", "options": ["cat", "dog"], "answer": "A"}]
    settings = EvalTaskSettings(task="mcq", data=_jsonl(images / "m.jsonl", rows), circular=True)
    data = read_mcq(settings)
    assert [it.meta["answer"] for it in data.items] == ["A", "B"]
    _, right = task_for(settings).score(data.items, ["A", "B"], settings)
    _, half = task_for(settings).score(data.items, ["A", "A"], settings)
    assert right["accuracy"] == 1.0 and half["accuracy"] == 0.0 and half["n"] == 1


def test_batches_cover_every_item_once_and_ranks_get_as_many():
    lengths = [5, 50, 7, 48, 9, 30, 31, 2, 60, 11, 12]
    for world in (1, 2, 3):
        plans = [plan_batches(lengths, 3, rank, world, equal=True) for rank in range(world)]
        assert len({len(p) for p in plans}) == 1  # ZeRO-3: the same number of generate calls
        firsts = [i for plan in plans for batch in plan for i in batch]
        assert set(firsts) == set(range(len(lengths)))
        unpadded = [plan_batches(lengths, 3, rank, world, equal=False) for rank in range(world)]
        flat = sorted(i for plan in unpadded for batch in plan for i in batch)
        assert flat == list(range(len(lengths)))  # without padding: exactly once
    (batch, *_), = [plan_batches(lengths, 3, 0, 1, equal=False)]
    assert batch == [8, 1, 3]  # the longest prompts together, first


def test_flat_metrics_keeps_numbers_only():
    assert flat_metrics({"accuracy": 0.5, "by_type": {"yes/no": 1.0}, "tokenizer": "ptb", "left_out": {}}) == {
        "accuracy": 0.5, "by_type/yes/no": 1.0}


def _cfg(**over):
    raw = {"model": {"llm": {"path": "/m"}}, "data": {"train": "/t.jsonl"}, **over}
    return from_dict(raw)


def test_keep_best_must_name_an_eval_task():
    tasks = {"tasks": [{"task": "vqa", "data": "/v.jsonl"}, {"task": "caption", "data": "/c.json", "name": "coco"}]}
    cfg = _cfg(eval=tasks, train={"eval_every": 10, "keep_best": "coco/CIDEr"})
    assert cfg.train.keep_best == "coco/CIDEr" and cfg.eval.tasks[1].label == "coco"
    with pytest.raises(ConfigError, match=r"keep_best 'cider/CIDEr' names no eval task: use one of vqa/<metric>, "
                                          r"coco/<metric>, loss"):
        _cfg(eval=tasks, train={"eval_every": 10, "keep_best": "cider/CIDEr"})
    with pytest.raises(ConfigError, match="needs train.eval_every"):
        _cfg(eval=tasks, train={"keep_best": "loss"})
    with pytest.raises(ConfigError, match="both named 'vqa'"):
        _cfg(eval={"tasks": [{"task": "vqa", "data": "/a"}, {"task": "vqa", "data": "/b"}]})
    with pytest.raises(ConfigError, match=r"unknown key eval\.tasks.*tsk|task"):
        _cfg(eval={"tasks": [{"tsk": "vqa", "data": "/a"}]})


def test_unknown_metric_and_task_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown metric 'bleu' for vqa; use vqa or exact"):
        task_for(EvalTaskSettings(task="vqa", data="/x", metric="bleu"))
    with pytest.raises(Exception, match="task"):
        EvalTaskSettings(task="segmentation", data="/x")
