"""Data at scale on 2 real ranks: a weighted mixture, packed and cost-balanced, read from the prepared
cache — and streamed webdataset shards — both resume exactly where they stopped."""

import csv
import io
import json
import tarfile

import pytest

from tests.conftest import tiny_config, write_config
from tests.distributed.helpers import check, metrics, run

pytestmark = pytest.mark.distributed


def _records(scenes):
    rows = [json.loads(line) for line in scenes["train"].read_text().splitlines()]
    return [r for r in rows if len(r["images"]) == 1 and len(r["messages"]) == 2]


def _captions_csv(scenes, path):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "question", "answer"])
        for r in _records(scenes):
            writer.writerow([str(scenes["train"].parent / r["images"][0]), r["messages"][0]["content"],
                             r["messages"][1]["content"]])
    return path


def _shards(scenes, directory, per_shard=12):
    records = _records(scenes)
    paths = []
    for s in range(0, len(records), per_shard):
        path = directory / f"shard-{s // per_shard:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, r in enumerate(records[s : s + per_shard]):
                members = {"png": (scenes["train"].parent / r["images"][0]).read_bytes(),
                           "json": json.dumps({"messages": r["messages"]}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{s + i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return directory / f"shard-{{000..{len(paths) - 1:03d}}}.tar"


def _resume_matches(tmp_path, data, steps=6, stop=3):
    runs = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cfg = tiny_config({"train": data.get("train", ""), "val": None, "tokenizer": data["tokenizer"]},
                          tmp_path / name / "run", data={k: v for k, v in data.items() if k != "tokenizer"},
                          train={"max_steps": steps, "gradient_accumulation_steps": 2, "save_every": stop})
        cfg["data"].pop("val", None)
        runs[name] = write_config(cfg, tmp_path / name / "cfg.yaml")
    check(run(["train", str(runs["a"])]))
    check(run(["train", str(runs["b"]), f"train.stop_after_steps={stop}"]))
    out = check(run(["train", str(runs["b"])]))
    assert "resumed from" in out
    reference, _ = metrics(tmp_path / "a" / "run")
    resumed, _ = metrics(tmp_path / "b" / "run")
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for ref, got in zip(reference[stop:], resumed[stop:]):
        assert abs(got["loss"] - ref["loss"]) <= 1e-6 * abs(ref["loss"]), (got, ref)
        assert (got["epoch"], got["consumed"]) == (ref["epoch"], ref["consumed"])
    return reference


def test_packed_balanced_mixture_from_cache_resumes_exactly(tmp_path, scenes):
    captions = _captions_csv(scenes, tmp_path / "captions.csv")
    data = {"tokenizer": str(scenes["tokenizer"]), "train": None, "max_length": 64, "packing": True,
            "balance": True, "cache_dir": str(tmp_path / "cache"), "num_workers": 1,
            "datasets": [{"path": str(scenes["train"]), "weight": 2.0},
                         {"path": str(captions), "format": "csv", "prompt_column": "question",
                          "text_column": "answer", "weight": 1.0}]}
    prepare_cfg = tiny_config({"train": "", "val": None, "tokenizer": data["tokenizer"]}, tmp_path / "p",
                              data={k: v for k, v in data.items() if k != "tokenizer"})
    prepare_cfg["data"].pop("val", None)
    config = write_config(prepare_cfg, tmp_path / "prepare.yaml")
    out = check(run(["data", "prepare", str(config), "--workers", "2", "--shard-size", "40"], nproc=1))
    assert "prepared" in out and "samples/s" in out
    reference = _resume_matches(tmp_path, data)
    assert all(r["loss"] > 0 for r in reference)


def test_streamed_webdataset_resumes_by_shard_and_offset(tmp_path, scenes):
    pytest.importorskip("webdataset")
    pattern = _shards(scenes, tmp_path)
    data = {"tokenizer": str(scenes["tokenizer"]), "train": str(pattern), "format": "webdataset",
            "max_length": 64, "num_workers": 1}
    _resume_matches(tmp_path, data)
    state = json.loads(next((tmp_path / "b" / "run" / "checkpoints").glob("step_00000003/zerovl_state.json"))
                       .read_text())
    assert {"shard", "offset", "shard_path"} <= set(state["data"])
