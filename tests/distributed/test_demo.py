"""The demo's model learns: on the demo config and generated scenes, 2 ranks with ZeRO-2, the loss falls."""

import pytest

from tests.distributed.helpers import REPO, check, metrics, run

pytestmark = pytest.mark.distributed


def test_demo_model_loss_falls(tmp_path):
    from zerovl.data.demo_scenes import generate

    data = generate(tmp_path / "data", num_train_images=300, num_val_images=10)
    out = tmp_path / "run"
    check(run(["train", str(REPO / "configs" / "demo.yaml"), f"train.output_dir={out}",
               f"data.train={data['train']}", f"data.val={data['val']}", f"model.tokenizer={data['tokenizer']}",
               "train.max_steps=100", "train.warmup_steps=5", "train.save_every=0", "train.log_every=1",
               "eval.exact_match=false"], timeout=600))
    steps, evals = metrics(out)
    assert len(steps) == 100
    first = sum(r["loss"] for r in steps[:5]) / 5
    last = sum(r["loss"] for r in steps[-5:]) / 5
    assert last < 0.35 * first, (first, last)
    assert evals[-1]["loss"] < 0.5 * first  # held-out loss falls too
