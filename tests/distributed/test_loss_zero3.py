"""The chunked LM loss under ZeRO-3 on 2 CPU ranks (gloo): every parameter partitioned, ranks with
different numbers of supervised tokens (one with none), tied and untied embeddings. The gradients
DeepSpeed reduces equal transformers' plain-path gradients (relative 1e-5 of each tensor's largest
element) and nothing hangs. The work is in loss_zero3_probe.py."""

import json

import pytest

from tests.distributed.helpers import REPO, check, run

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("tie", ["untied", "tied"])
def test_chunked_loss_under_zero3_matches_the_plain_gradients(tmp_path, tie):
    out = tmp_path / "report.json"
    check(run([str(out), tie], timeout=300, script=str(REPO / "tests" / "distributed" / "loss_zero3_probe.py")))
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2 and all(r["partitioned"] for r in ranks)  # the head really was partitioned
    assert ranks[1]["steps"][0]["loss"] == 0.0  # rank 1 had no supervised token in the first micro-batch
    for rank in ranks:
        for step in rank["steps"]:
            assert step["loss"] == pytest.approx(step["reference_loss"], rel=1e-6)
            assert step["max_error"] <= 1e-5, step["errors"]
            assert step["external_params"] == 0
