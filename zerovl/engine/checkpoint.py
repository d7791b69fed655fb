"""Save and restore training checkpoints so that no work is ever lost.

Layout under ``<output_dir>/checkpoints``::

    step_00000100/            DeepSpeed's files (model + optimizer shards, one per rank)
        zerovl_state.json     step, epoch, data position, schedule, config, versions (rank 0)
        zerovl_rank<r>.pt     RNG states of rank r (every rank)
        COMPLETE              written last, after every rank finished writing
    latest                    name of the newest COMPLETE checkpoint, replaced atomically

Every rank calls :func:`save` (DeepSpeed's save is collective: a rank-0-only save hangs). A checkpoint
without ``COMPLETE`` — a crash or kill mid-save — is never resumed from; the previous one is.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zerovl.engine.distributed import DistInfo, barrier
from zerovl.errors import CheckpointError

log = logging.getLogger(__name__)

STATE_FILE = "zerovl_state.json"
DONE_FILE = "COMPLETE"
LATEST_FILE = "latest"
_TAG = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(ckpt: Path) -> bool:
    return (ckpt / DONE_FILE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """COMPLETE checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _TAG.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def save(engine, output_dir: str | Path, step: int, state: dict[str, Any], dist: DistInfo,
         keep_last: int) -> Path:
    """Collective save of step ``step``; returns the checkpoint directory."""
    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    ckpt = root / tag
    if dist.is_main and ckpt.exists() and not is_complete(ckpt):
        shutil.rmtree(ckpt)  # leftovers of an interrupted save of this very step
    barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"zerovl": state}, save_latest=False)
    torch.save(rng_state(), ckpt / f"zerovl_rank{dist.rank}.pt")
    barrier()  # every rank's shard is on disk before the checkpoint counts
    if dist.is_main:
        _atomic_write(ckpt / STATE_FILE, json.dumps(state, indent=1))
        _atomic_write(ckpt / DONE_FILE, tag + "\n")
        _atomic_write(root / LATEST_FILE, tag)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return ckpt


def find_resume(output_dir: str | Path) -> Path | None:
    """The newest COMPLETE checkpoint of a run directory (``latest`` first), or None."""
    root = checkpoint_root(output_dir)
    latest = root / LATEST_FILE
    if latest.is_file():
        ckpt = root / latest.read_text().strip()
        if is_complete(ckpt):
            return ckpt
        log.warning("checkpoint %s named by 'latest' is incomplete; looking for an older one", ckpt)
    done = complete_checkpoints(root)
    return done[-1] if done else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    if resume == "none":
        return None
    if resume == "auto":
        return find_resume(output_dir)
    ckpt = Path(resume)
    if not ckpt.is_dir():
        raise CheckpointError(f"train.resume: {ckpt} is not a directory")
    if not is_complete(ckpt):
        found = find_resume(ckpt)  # a run directory was given
        if found is None:
            raise CheckpointError(f"train.resume: {ckpt} holds no COMPLETE checkpoint")
        ckpt = found
    return ckpt


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_FILE).read_text())


def load(engine, ckpt: Path, dist: DistInfo) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG; returns the zerovl state dict."""
    path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt}")
    state = read_state(ckpt)
    rng_file = ckpt / f"zerovl_rank{dist.rank}.pt"
    if state.get("world_size") == dist.world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("world size changed (%s -> %s): RNG streams start fresh", state.get("world_size"),
                    dist.world_size)
    return state


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full model weights from a (possibly ZeRO-sharded) checkpoint, on CPU, in a single process.

    ZeRO-0/1/2 keep the whole 16-bit module in ``mp_rank_00_model_states.pt``; fp32 master weights
    from the optimizer shards (stage >= 1, via DeepSpeed's ``zero_to_fp32``) take precedence where
    present. ZeRO-3 module files hold only placeholders, so ``zero_to_fp32`` is the source there.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    module_file = ckpt / "mp_rank_00_model_states.pt"
    state: dict[str, torch.Tensor] = {}
    stage = 3
    if module_file.is_file():
        saved = torch.load(module_file, map_location="cpu", weights_only=False)
        state = dict(saved["module"])
        stage = int(saved.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if stage >= 1:
        state.update(get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name))
    if not state:
        raise CheckpointError(f"{ckpt}: no model weights found")
    return state
