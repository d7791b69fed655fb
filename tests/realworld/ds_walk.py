"""Train on every DeepSpeed file of a folder inside ONE torchrun launch, 2 steps each, and record the outcome.

Run as ``torchrun --nproc_per_node 2 tests/realworld/ds_walk.py SPEC.json`` (see test_deepspeed_files.py).
SPEC holds ``files`` (paths), ``config`` (a zerovl config mapping without ``deepspeed``), ``runs`` (a scratch
folder) and ``out`` (the JSON written by rank 0). One launch instead of one per file keeps ~30 files inside a
few minutes on 2 cores: the process group is kept across runs by replacing the recipe's ``shutdown`` with
a no-op until the end. A ConfigError is raised on every rank before any collective, so a refused file never
leaves a rank waiting; a barrier after each file keeps the ranks in step regardless.

Outcome per file: ``trains`` (with the resolved batch, precision, schedule and ZeRO stage), ``error`` (a
zerovl error: the one line the CLI would print) or ``crash`` (anything else, with its traceback tail).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from tests.distributed.helpers import exit_without_teardown


class _Notes(logging.Handler):
    """Collects what ds_config logs about a file (translations, replaced DeepSpeed defaults)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname.lower()}: {record.getMessage()}")


def _setup_logging(notes: _Notes) -> None:
    import warnings

    logging.basicConfig(level=logging.WARNING, format="[walk rank %(process)d] %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ds_log = logging.getLogger("zerovl.engine.ds_config")
    ds_log.setLevel(logging.INFO)
    ds_log.addHandler(notes)
    ds_log.propagate = False
    warnings.filterwarnings("ignore")


def _one(path: str, spec: dict, notes: _Notes) -> dict:
    from zerovl.config import from_dict
    from zerovl.engine.ds_config import base_config, zero_stage
    from zerovl.errors import ZeroVLError
    from zerovl.recipes import train as recipe

    raw = copy.deepcopy(spec["config"])
    raw["deepspeed"] = path
    raw["train"]["output_dir"] = str(Path(spec["runs"]) / Path(path).stem)
    notes.lines.clear()
    started = time.perf_counter()
    try:
        cfg = from_dict(raw)
        result = recipe.train(cfg)
    except ZeroVLError as e:
        return {"outcome": "error", "message": str(e), "notes": list(notes.lines)}
    except Exception as e:  # noqa: BLE001 - the test reports it as a failure with its traceback
        return {"outcome": "crash", "message": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:],
                "notes": list(notes.lines)}
    t = cfg.train
    stage = zero_stage(base_config(path)[0])
    metrics = Path(t.output_dir) / "metrics.jsonl"  # rank 0 writes it; rank 1's record is not reported
    losses = ([r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if r.get("split") == "train"]
              if metrics.is_file() else [])
    return {"outcome": "trains", "steps": result["step"], "seconds": round(time.perf_counter() - started, 1),
            "losses": losses,
            "micro_batch_size": t.micro_batch_size, "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "precision": t.precision, "lr": t.lr, "schedule": t.schedule, "warmup_steps": t.warmup_steps,
            "min_lr": t.min_lr, "zero_stage": stage, "notes": list(notes.lines)}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    notes = _Notes()
    _setup_logging(notes)
    from zerovl.engine import distributed
    from zerovl.recipes import train as recipe

    distributed.init_distributed()  # up front: a file refused before train() still meets the barrier
    recipe.shutdown = lambda: None  # keep the process group for the next file; destroyed once below
    results = {}
    for path in spec["files"]:
        results[Path(path).name] = _one(path, spec, notes)
        distributed.barrier()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["out"]).write_text(json.dumps(results, indent=1))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_without_teardown()
