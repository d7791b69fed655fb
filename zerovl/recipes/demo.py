"""``zerovl demo``: generate the synthetic scene data, train the tiny composed VLM on 2 ranks with
DeepSpeed ZeRO-2 (through torchrun), then report held-out exact-match accuracy and wall time.

``configs/demo.yaml`` points at the data ``zerovl demo`` generates (``runs/demo/data``); run before
the demo, it would fail deep inside tokenizer loading, so :func:`require_demo_data` says so first.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from zerovl.config import Config
from zerovl.data.demo_scenes import generate
from zerovl.engine.launch import run_ranks, torchrun
from zerovl.engine.metrics import read_metrics
from zerovl.errors import ConfigError, ZeroVLError

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
DEMO_DATA = ("runs", "demo", "data")  # where `zerovl demo` generates its data (its default --output-dir)
TARGET_ACCURACY = 0.90
ACCURACY, BY_TYPE = "val/demo/accuracy", "val/demo/by_type/"  # what its eval task logs (recipes/evaluate.py)


def _demo_root(path: str) -> Path | None:
    parts = Path(path).parts
    for i in range(len(parts) - len(DEMO_DATA) + 1):
        if parts[i:i + len(DEMO_DATA)] == DEMO_DATA:
            return Path(*parts[:i + len(DEMO_DATA)])
    return None


def require_demo_data(cfg: Config) -> None:
    """Stop with one actionable line when the config's inputs are the demo's generated data and it
    has not been generated yet (``configs/demo.yaml`` before ``zerovl demo``)."""
    data = cfg.data
    inputs = {"model.tokenizer": cfg.model.tokenizer, "data.train": data.train, "data.val": data.val,
              "data.image_root": data.image_root,
              **{f"data.datasets.{i}.path": d.path for i, d in enumerate(data.datasets)}}
    missing = {key: _demo_root(path) for key, path in inputs.items()
               if path and _demo_root(path) is not None and not Path(path).exists()}
    if not missing:
        return
    keys = list(missing)
    named = " and ".join([", ".join(keys[:-1]), keys[-1]] if len(keys) > 1 else keys)
    own = " ".join("data.val=null" if k == "data.val" else f"{k}=..." for k in keys)
    raise ConfigError(f"{named} point{'s' if len(keys) == 1 else ''} at the demo's generated data in "
                      f"{next(iter(missing.values()))}, which does not exist yet: run `zerovl demo` first "
                      f"(it generates it), or pass your own: {own}")


def run_demo(output_dir: str = "runs/demo", nproc: int = 2, overrides: list[str] | None = None,
             config: str | Path = DEMO_CONFIG, train_images: int = 3000, val_images: int = 150) -> dict[str, Any]:
    started = time.time()
    config = Path(config)
    if not config.is_file():
        raise ZeroVLError(f"demo config {config} not found; pass --config configs/demo.yaml from the repo")
    out = Path(output_dir).absolute()
    if out.exists():
        shutil.rmtree(out)  # the demo always starts from scratch
    print(f"[demo] generating synthetic scenes into {out / 'data'}", flush=True)
    data = generate(out / "data", num_train_images=train_images, num_val_images=val_images)
    task = (f"eval.tasks=[{{task: vqa, name: demo, data: '{data['val']}', metric: exact, prompt: '', "
            f"max_new_tokens: 12}}]")
    cmd = torchrun(nproc, "-m", "zerovl", "train", str(config), f"train.output_dir={out}",
                   f"data.train={data['train']}", f"data.val={data['val']}", f"model.tokenizer={data['tokenizer']}",
                   task, *(overrides or []))
    print(f"[demo] training: {' '.join(cmd)}", flush=True)
    launch = run_ranks(cmd, out / "train.log", echo=True,
                       env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if not launch.ok:
        error = ConfigError if launch.rank_exit_code == ConfigError.exit_code else ZeroVLError
        raise error(f"demo training failed: {launch.reason} (full log: {launch.log_path})")
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "val"]
    if not evals or ACCURACY not in evals[-1]:
        raise ZeroVLError(f"demo finished without a val evaluation in {out / 'metrics.jsonl'}")
    final = evals[-1]
    wall = time.time() - started
    accuracy = final[ACCURACY]
    by_type = {k[len(BY_TYPE):]: v for k, v in final.items() if k.startswith(BY_TYPE)}
    verdict = "meets" if accuracy >= TARGET_ACCURACY else "misses"
    shown = ", ".join(f"{k} {v:.1%}" for k, v in by_type.items())
    print(f"[demo] val exact-match accuracy: {accuracy:.1%} on {int(final['val/demo/n'])} held-out "
          f"questions ({shown}); every prediction: {out / 'eval' / ('step_' + str(final['step'])) / 'demo'}")
    print(f"[demo] wall time: {wall:.0f} s ({wall / 60:.1f} min) — {verdict} the "
          f"{TARGET_ACCURACY:.0%} target")
    image = sorted((out / "data" / "images").glob("val_*.png"))[0]
    print(f"[demo] run kept in {out}. Try: zerovl chat --run {out} --image {image} "
          f"\"how many shapes are there ?\"")
    return {"accuracy": accuracy, "wall_s": wall, "run_dir": str(out), "by_type": by_type}
