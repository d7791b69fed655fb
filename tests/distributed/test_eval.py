"""`zerovl eval` and `eval.tasks` on real DeepSpeed ranks: a run trained under ZeRO-3 on 2 ranks scores its
benchmarks during training (keep_best keeps the best checkpoint out of the rotation), and evaluating it
afterwards gives the same predictions and metrics on 1 rank and on 2 ranks with the model sharded."""

from __future__ import annotations

import base64
import json
import math

import pytest

from tests.conftest import tiny_config, write_config
from tests.distributed.helpers import check, metrics, run

pytestmark = pytest.mark.distributed


def _mcq_file(scenes, path):
    """A multiple-choice TSV in MMBench's layout, images inline as base64, from the scene val set."""
    records = [json.loads(line) for line in scenes["val"].read_text().splitlines()]
    rows = ["index\tquestion\thint\tA\tB\tC\tanswer\tcategory\timage"]
    for i, r in enumerate(x for x in records if x["type"] == "colour"):
        image = base64.b64encode((scenes["val"].parent / r["images"][0]).read_bytes()).decode()
        question = r["messages"][0]["content"].replace("<image>", "").strip()
        rows.append(f"{i}\t{question}\tnan\tred\tblue\tgreen\tA\tcolour\t{image}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _caption_file(scenes, path):
    """A JSONL of (image, references) from the scene val set: each answer, phrased two ways, is a reference."""
    rows = []
    for r in (json.loads(line) for line in scenes["val"].read_text().splitlines()):
        answer = r["messages"][1]["content"]
        rows.append(json.dumps({"image": str(scenes["val"].parent / r["images"][0]),
                                "references": [answer, f"a picture of {answer}"]}))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(scenes, tmp_path_factory):
    """4 steps on 2 ranks under ZeRO-3, evaluating vqa (exact) and loss every 2 steps, keeping the best."""
    root = tmp_path_factory.mktemp("eval_run")
    tasks = [{"task": "vqa", "data": str(scenes["val"]), "metric": "exact", "prompt": "", "max_new_tokens": 4},
             {"task": "loss", "data": str(scenes["val"]), "name": "heldout"}]
    cfg = tiny_config(scenes, root / "run", deepspeed="zero3", eval={"batch_size": 4, "tasks": tasks},
                      train={"max_steps": 4, "eval_every": 2, "save_every": 1, "keep_last": 1,
                             "keep_best": "vqa/accuracy"})
    check(run(["train", str(write_config(cfg, root / "cfg.yaml"))], timeout=600))
    return {"run": root / "run", "root": root, "mcq": _mcq_file(scenes, root / "mcq.tsv"),
            "caption": _caption_file(scenes, root / "captions.jsonl")}


def test_eval_tasks_during_training_log_and_keep_the_best(trained, scenes):
    run_dir = trained["run"]
    _, evals = metrics(run_dir)
    assert [e["step"] for e in evals] == [2, 4]
    questions = len(scenes["val"].read_text().splitlines())
    for e in evals:
        assert e["val/vqa/n"] == questions and 0.0 <= e["val/vqa/accuracy"] <= 1.0
        assert {"val/vqa/by_type/colour", "val/heldout/loss", "val/heldout/perplexity"} <= set(e)
        assert math.isclose(e["val/heldout/perplexity"], math.exp(e["val/heldout/loss"]), rel_tol=1e-9)
    rows = (run_dir / "eval" / "step_2" / "vqa" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == questions and len({json.loads(r)["id"] for r in rows}) == questions
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    accuracies = {e["step"]: e["val/vqa/accuracy"] for e in evals}
    expected = 2 if accuracies[2] >= accuracies[4] else 4  # ties keep the earlier checkpoint
    assert best["step"] == expected and best["value"] == accuracies[expected]
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == sorted({f"step_{expected:08d}", "step_00000004"}), kept  # keep_last=1 plus the best


def _eval(trained, out, task, data, nproc, *extra):
    proc = run(["eval", str(trained["run"]), "--task", task, "--data", str(data), "--out", str(out),
                "--batch-size", "5", *extra], nproc=nproc, timeout=300)
    check(proc)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return proc.stdout, rows, json.loads((out / "metrics.json").read_text())


_TASK_ARGS = {"vqa": ["--metric", "exact", "--prompt", "", "--max-samples", "33"], "mcq": ["--circular"],
              "caption": ["--max-samples", "33", "--max-new-tokens", "6"],
              "open": ["--max-samples", "33", "--max-new-tokens", "4"]}


@pytest.mark.parametrize("task", list(_TASK_ARGS))
def test_one_rank_and_two_sharded_ranks_agree(trained, scenes, task):
    """33 questions in batches of 5 on 2 ranks: the last batches are padded, yet every id is predicted once."""
    data = trained.get(task, scenes["val"])
    out1, rows1, m1 = _eval(trained, trained["root"] / f"{task}_w1", task, data, 1, *_TASK_ARGS[task])
    out2, rows2, m2 = _eval(trained, trained["root"] / f"{task}_w2", task, data, 2, "--zero", "3", *_TASK_ARGS[task])
    assert "ZeRO-3" in out2 and "2 rank(s)" in out2 and "1 rank(s)" in out1
    assert rows1 == rows2 and m1 == m2
    ids = [r["id"] for r in rows1]
    assert len(ids) == len(set(ids))
    if task == "mcq":  # every colour question in its 3 rotations, scored as one
        questions = len(trained["mcq"].read_text().splitlines()) - 1
        assert len(ids) == 3 * questions and m1["n"] == questions
        assert all(r["references"][0] in "ABC" for r in rows1)
    else:
        assert len(ids) == 33 == m1["n"]
    if task == "caption":  # the full metric set, on PTB tokens when Java is there
        assert {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"} <= set(m1), m1
        assert all(len(r["references"]) == 2 for r in rows1)


def test_loss_task_is_the_same_on_one_and_two_ranks(trained, scenes):
    _, _, m1 = _eval(trained, trained["root"] / "loss_w1", "loss", scenes["val"], 1)
    _, _, m2 = _eval(trained, trained["root"] / "loss_w2", "loss", scenes["val"], 2, "--zero", "3")
    assert m1["tokens"] == m2["tokens"] > 0 and m1["n"] == m2["n"]
    assert math.isclose(m1["loss"], m2["loss"], rel_tol=1e-6)
    _, evals = metrics(trained["run"])
    assert math.isclose(m1["loss"], evals[-1]["val/heldout/loss"], rel_tol=1e-6)  # as training measured it


def test_an_export_scores_like_its_run(trained, scenes):
    export = trained["root"] / "export"
    check(run(["export", str(trained["run"]), str(export)], nproc=1))
    args = ["--task", "vqa", "--data", str(scenes["val"]), "--metric", "exact", "--prompt", "", "--max-samples", "9"]
    check(run(["eval", str(export), *args, "--out", str(trained["root"] / "from_export")], nproc=1))
    check(run(["eval", str(trained["run"]), *args, "--out", str(trained["root"] / "from_run")], nproc=1))
    read = lambda d: (trained["root"] / d / "predictions.jsonl").read_text()  # noqa: E731
    assert read("from_export") == read("from_run") and len(read("from_run").splitlines()) == 9


def test_bad_eval_input_is_one_line(trained, tmp_path, scenes):
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": 1, "question": "q", "answers": ["a"]}\n' * 2)
    proc = run(["eval", str(trained["run"]), "--task", "vqa", "--data", str(dup)], nproc=1)
    assert proc.returncode != 0 and "dup.jsonl:2: id '1' already used at" in proc.stdout, proc.stdout[-2000:]
    proc = run(["eval", str(trained["run"]), "--task", "vqa", "--metric", "bleu", "--data", str(dup)], nproc=1)
    assert proc.returncode != 0 and "unknown metric 'bleu' for vqa" in proc.stdout, proc.stdout[-2000:]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    good = json.loads(scenes["val"].read_text().splitlines()[0])["images"][0]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"id": i, "image": str(image), "question": "q", "answers": ["red"]}) + "\n"
                             for i, image in enumerate([scenes["val"].parent / good, broken, tmp_path / "gone.png",
                                                        scenes["val"].parent / good])))
    _, rows, m = _eval(trained, tmp_path / "mixed_out", "vqa", mixed, 1, "--prompt", "")
    assert [r["id"] for r in rows] == ["0", "3"] and m["n"] == 2
    assert m["left_out"] == {"missing_image": 1, "unreadable_image": 1}
