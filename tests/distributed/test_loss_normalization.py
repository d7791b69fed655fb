"""Token-weighted loss: the same samples give the same step loss and the same gradients however they are
split into micro-batches, accumulation steps and ranks — 1 x 4 x 1, 4 x 1 x 1 and 2 x 1 x 2
(micro x accumulation x world) — on variable-length samples, padded and packed (fp32, relative 1e-6)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny_config, write_config
from tests.distributed.helpers import REPO, check, metrics, run

pytestmark = pytest.mark.distributed

SPLITS = {"1x4x1": (1, 4, 1), "4x1x1": (4, 1, 1), "2x1x2": (2, 1, 2)}


@pytest.fixture(scope="module")
def variable_lengths(scenes, tmp_path_factory):
    """The scenes' samples with replies 1 to 7 times as long, so micro-batches hold very different
    numbers of supervised tokens."""
    records = [json.loads(line) for line in scenes["train"].read_text().splitlines()]
    for i, r in enumerate(records):
        r["images"] = [str(scenes["train"].parent / p) for p in r["images"]]
        reply = r["messages"][-1]
        reply["content"] = " ".join([reply["content"]] * (1 + (i * 5) % 7))
    path = tmp_path_factory.mktemp("varlen") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:48]))
    return path


def _run(tmp_path, scenes, data, split: str, packing: bool, normalization: str = "tokens"):
    micro, accum, world = SPLITS[split]
    out = tmp_path / f"{split}-{normalization}"
    cfg = tiny_config(scenes, out / "run", deepspeed="zero0",
                      data={"train": str(data), "val": None, "shuffle": False, "packing": packing,
                            "max_length": 64},
                      train={"max_steps": 2, "micro_batch_size": micro, "gradient_accumulation_steps": accum,
                             "grad_clip": 0.0, "save_final": False, "warmup_steps": 0,
                             "loss_normalization": normalization})
    config = write_config(cfg, out.with_suffix(".yaml"))
    check(run([str(config), str(out / "grads.pt")], nproc=world, timeout=300,
              script=str(REPO / "tests" / "distributed" / "grad_probe.py")))
    steps, _ = metrics(out / "run")
    return steps, torch.load(out / "grads.pt")


def _relative_difference(grads: dict, ref: dict) -> float:
    num = sum(float((grads[n] - ref[n]).double().norm() ** 2) for n in grads) ** 0.5
    return num / sum(float(ref[n].double().norm() ** 2) for n in grads) ** 0.5


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_same_loss_and_gradients_for_every_split(tmp_path, scenes, variable_lengths, packing):
    results = {split: _run(tmp_path, scenes, variable_lengths, split, packing) for split in SPLITS}
    (ref_steps, ref_grads) = results["1x4x1"]
    assert len(ref_grads) > 10
    for split, (steps, grads) in results.items():
        for a, b in zip(steps, ref_steps):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (split, a["loss"], b["loss"])
        assert grads.keys() == ref_grads.keys()
        assert _relative_difference(grads, ref_grads) < 1e-6, split


def test_per_micro_batch_means_depend_on_the_split(tmp_path, scenes, variable_lengths):
    """The control: loss_normalization=samples (DeepSpeed's equal averaging of micro-batch means) gives
    another loss and gradient for the same samples split 1 x 4 instead of 4 x 1 — what the test above
    would catch."""
    (steps_a, grads_a), (steps_b, grads_b) = (_run(tmp_path, scenes, variable_lengths, split, False, "samples")
                                              for split in ("1x4x1", "4x1x1"))
    assert abs(steps_a[0]["loss"] - steps_b[0]["loss"]) > 1e-4 * abs(steps_b[0]["loss"])
    assert _relative_difference(grads_a, grads_b) > 1e-3
