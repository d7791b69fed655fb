"""Bad input in a 2-rank run: one clear line, a non-zero exit, and every rank stops (no hang) — or, with
data.skip_bad_samples, the sample is skipped and counted while training goes on."""

from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_config, write_config
from tests.distributed.helpers import metrics, run

pytestmark = pytest.mark.distributed


def _error_lines(output: str) -> list[str]:
    """zerovl's one-line errors (a progress bar may share the terminal line they start on)."""
    return [line.split("zerovl: error: ", 1)[1] for line in output.splitlines() if "zerovl: error: " in line]


@pytest.fixture(scope="module")
def one_bad_image(scenes, tmp_path_factory):
    """The scenes' training set with one image replaced by a truncated file; only the rank that draws
    that sample meets it, when its loader decodes the pixels mid-run."""
    folder = tmp_path_factory.mktemp("bad")
    records = [json.loads(line) for line in scenes["train"].read_text().splitlines()]
    for r in records:
        r["images"] = [str(scenes["train"].parent / p) for p in r["images"]]
    broken = folder / "broken.png"
    data = open(records[5]["images"][0], "rb").read()
    broken.write_bytes(data[: len(data) // 2])
    records[5]["images"] = [str(broken)]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:24]))
    return path


def test_corrupt_image_stops_every_rank_with_one_line(tmp_path, scenes, one_bad_image):
    cfg = write_config(tiny_config(scenes, tmp_path / "run", data={"train": str(one_bad_image), "val": None,
                                                                     "shuffle": False},
                                   train={"max_steps": 6}), tmp_path / "cfg.yaml")
    proc = run(["train", str(cfg)], timeout=240)  # a hang fails the test inside run()
    assert proc.returncode != 0
    errors = _error_lines(proc.stdout)
    assert errors and "broken.png cannot be read" in errors[0], proc.stdout[-3000:]
    assert errors[0].startswith("[rank 1] ") or errors[0].startswith("[rank 0] ")


def test_corrupt_image_is_skipped_and_counted_when_allowed(tmp_path, scenes, one_bad_image):
    cfg = write_config(tiny_config(scenes, tmp_path / "run", data={"train": str(one_bad_image), "val": None,
                                                                     "shuffle": False, "skip_bad_samples": True},
                                   train={"max_steps": 6}), tmp_path / "cfg.yaml")
    proc = run(["train", str(cfg)], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "broken.png cannot be read" in proc.stdout  # the warning names what was skipped
    steps, _ = metrics(tmp_path / "run")
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert sum(r["skipped_samples"] for r in steps) >= 1


def test_unwritable_output_dir_stops_every_rank_with_one_line(tmp_path, scenes):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cfg = write_config(tiny_config(scenes, blocker / "run"), tmp_path / "cfg.yaml")
    proc = run(["train", str(cfg)], timeout=180)
    assert proc.returncode != 0
    errors = _error_lines(proc.stdout)
    assert errors and f"train.output_dir {blocker / 'run'}: cannot write there" in errors[0], proc.stdout[-3000:]
