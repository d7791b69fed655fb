"""Save and restore training checkpoints so that no work is ever lost.

Layout under ``<output_dir>/checkpoints``::

    step_00000100/            DeepSpeed's files (model + optimizer shards, one per rank)
        zerovl_state.json     step, epoch, data position, schedule, config, versions (rank 0)
        zerovl_rank<r>.pt     RNG states of rank r (every rank)
        COMPLETE              written last, after every rank finished writing
    latest                    name of the newest COMPLETE checkpoint, replaced atomically
    best.json                 with train.keep_best: the checkpoint where the metric was best, its value
                              (kept out of the keep_last rotation)

Every rank calls :func:`save` (DeepSpeed's save is collective: a rank-0-only save hangs). A checkpoint
without ``COMPLETE`` — a crash or kill mid-save — is never resumed from; the previous one is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zerovl.engine.distributed import DistInfo, barrier, configure_accelerator
from zerovl.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

STATE_FILE = "zerovl_state.json"
DONE_FILE = "COMPLETE"
LATEST_FILE = "latest"
BEST_FILE = "best.json"
_TAG = re.compile(r"^step_(\d+)$")


def ensure_writable(output_dir: str | Path, rank: int = 0) -> None:
    """Create the run directory and prove this rank can write there, before any model is built: an
    unwritable ``train.output_dir`` must stop every rank at once with one line, not an hour later at the
    first checkpoint (or on rank 0 only, leaving the others waiting)."""
    path = Path(output_dir)
    probe = path / f".zerovl_write_test_{rank}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or e.__class__.__name__
        raise ConfigError(f"train.output_dir {path}: cannot write there ({reason}); "
                          "choose a writable directory") from None


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


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save(engine, output_dir: str | Path, step: int, state: dict[str, Any], dist: DistInfo,
         keep_last: int, trainable_only: bool = False) -> Path:
    """Collective save of step ``step``; returns the checkpoint directory.

    ``trainable_only`` leaves frozen parameters out (they are reloaded from their source — a
    ``from_pretrained`` directory or the seeded random init — when resuming), so a projector-only run
    of a 7B model writes megabytes, not gigabytes."""
    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    ckpt = root / tag
    if dist.is_main and ckpt.exists() and not is_complete(ckpt):
        shutil.rmtree(ckpt)  # leftovers of an interrupted save of this very step
    barrier()
    state = {**state, "trainable_only": trainable_only}
    engine.save_checkpoint(str(root), tag=tag, client_state={"zerovl": state}, save_latest=False,
                           exclude_frozen_parameters=trainable_only)
    torch.save(rng_state(), ckpt / f"zerovl_rank{dist.rank}.pt")
    barrier()  # every rank's shard is on disk before the checkpoint counts
    if dist.is_main:
        _atomic_write(ckpt / STATE_FILE, json.dumps(state, indent=1))
        _atomic_write(ckpt / DONE_FILE, tag + "\n")
        _atomic_write(root / LATEST_FILE, tag)
        kept_best = Best.tag_in(root)
        for old in complete_checkpoints(root)[:-keep_last]:
            if old.name != kept_best:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return ckpt


class Best:
    """``train.keep_best``: the best value of one evaluation figure so far and the step it was reached at,
    kept in ``checkpoints/best.json`` so a resumed run goes on comparing against it."""

    def __init__(self, root: Path, key: str | None, value: float | None = None, step: int | None = None):
        self.root, self.key, self.value, self.step = root, key, value, step

    @classmethod
    def load(cls, output_dir: str | Path, key: str | None) -> Best:
        root = checkpoint_root(output_dir)
        path = root / BEST_FILE
        saved = json.loads(path.read_text()) if key and path.is_file() else {}
        if saved.get("key") != key:  # another figure was tracked before: start afresh
            saved = {}
        return cls(root, key, saved.get("value"), saved.get("step"))

    @staticmethod
    def tag_in(root: Path) -> str | None:
        path = root / BEST_FILE
        return json.loads(path.read_text()).get("tag") if path.is_file() else None

    def improved_by(self, result: dict[str, Any]) -> bool:
        if self.key is None:
            return False
        name = self.key if self.key == "loss" else f"val/{self.key}"
        if name not in result:
            raise ConfigError(f"train.keep_best={self.key}: the evaluation gave no such figure (it gave "
                              f"{', '.join(k for k in result if k.startswith('val/') or k == 'loss')})")
        value = float(result[name])
        lower = any(word in self.key.lower() for word in ("loss", "perplexity"))
        if self.value is not None and (value >= self.value if lower else value <= self.value):
            return False
        self.value = value
        return True

    def mark(self, step: int, is_main: bool) -> None:
        """Record the checkpoint of ``step`` as the best (it exists: the caller saved it)."""
        self.step = step
        if is_main:
            _atomic_write(self.root / BEST_FILE, json.dumps({"key": self.key, "value": self.value, "step": step,
                                                             "tag": tag_for(step)}, indent=1))
            log.info("best %s so far: %.6g at step %d (%s kept out of the rotation)", self.key, self.value, step,
                     tag_for(step))


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


# Changing these between save and resume only changes how training continues, never what the
# checkpoint holds; anything else under `model` changes parameters and is refused.
_MODEL_KEYS_SAFE_TO_CHANGE = ("lr", "gradient_checkpointing")


def check_compatible(saved: dict[str, Any], current: dict[str, Any], ckpt: Path) -> list[str]:
    """Raise CheckpointError for architecture changes; return the benign changed keys (warned about)."""
    from zerovl.config import diff_configs

    changed = diff_configs(saved, current)
    fatal = [k for k in changed if k.startswith("model.") and k.rsplit(".", 1)[-1] not in _MODEL_KEYS_SAFE_TO_CHANGE]
    if fatal:
        shown = ", ".join(f"{k} ({flatten_get(saved, k)!r} -> {flatten_get(current, k)!r})" for k in fatal[:3])
        more = f" and {len(fatal) - 3} more" if len(fatal) > 3 else ""
        raise CheckpointError(
            f"{ckpt} was trained with a different model: {shown}{more}; resume with the original model "
            "settings, or start a new run (train.resume=none / another train.output_dir)")
    return [k for k in changed if not k.startswith("train.resume")]


def flatten_get(tree: dict[str, Any], dotted: str) -> Any:
    from zerovl.config import flatten

    return flatten(tree).get(dotted)


def load(engine, ckpt: Path, dist: DistInfo) -> dict[str, Any]:
    """Restore model, optimizer and RNG; returns the zerovl state dict.

    Same world size and ZeRO stage: DeepSpeed's own loader (bit-exact). Otherwise the checkpoint is
    converted to DeepSpeed's universal layout and restored parameter by parameter (see load_portable).
    """
    state = read_state(ckpt)
    stage = engine.zero_optimization_stage()
    saved_stage, saved_world = state.get("zero_stage", stage), state.get("world_size", dist.world_size)
    if (saved_stage, saved_world) == (stage, dist.world_size):
        # a trainable-only checkpoint lacks the frozen weights, which the freshly built model already holds
        path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_lr_scheduler_states=False,
                                         load_module_strict=not state.get("trainable_only", False))
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {ckpt}")
        rng_file = ckpt / f"zerovl_rank{dist.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return state
    if saved_stage == 0 or stage == 0:
        raise CheckpointError(
            f"{ckpt}: ZeRO-{saved_stage} on {saved_world} rank(s) cannot be resumed as ZeRO-{stage} on "
            f"{dist.world_size}; changing stage or world size needs ZeRO-1/2/3 on both sides")
    if dist.is_main:
        log.info("resuming ZeRO-%d x%d checkpoint as ZeRO-%d x%d through a universal checkpoint; RNG streams "
                 "start fresh", saved_stage, saved_world, stage, dist.world_size)
    load_portable(engine, ckpt, dist, state["step"])
    return state


def to_universal(ckpt: Path) -> Path:
    """Convert a ZeRO checkpoint (once) to DeepSpeed's universal layout: a folder per parameter with
    its full fp32 value and Adam moments, independent of stage and world size."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = ckpt / "universal"
    if is_complete(out):
        return out
    tmp = ckpt / "universal.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ds_to_universal(argparse.Namespace(
        input_folder=str(ckpt), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    _atomic_write(out / DONE_FILE, "universal\n")
    return out


def _saved_adam_step(folder: Path) -> float | None:
    """Adam's step count: per parameter (ZeRO-1/2 converter) or in the common optimizer state (ZeRO-3)."""
    for step_file in folder.glob("*/step.pt"):
        return float(torch.load(step_file, weights_only=False))
    common = folder / "optimizer_state.pt"
    if common.is_file():
        state = torch.load(common, weights_only=False).get("optimizer_state_dict", {}).get("state", {})
        for entry in state.values():
            if "step" in entry:
                return float(entry["step"])
    return None


def _materialize_optimizer_state(engine) -> None:
    """Adam creates its moments lazily at the first step; create them (zeros) now so that the saved
    moments can be written into them, and let ZeRO-1/2 link its per-parameter views to them."""
    from zerovl.engine.telemetry import base_optimizer

    opt = base_optimizer(engine)
    tensor_step = isinstance(opt, torch.optim.Adam | torch.optim.AdamW)
    params = [p for group in opt.param_groups for p in group["params"]]
    # ZeRO-3 swaps its flat fp32 partitions into the param groups only during step()
    params += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    for p in params:
        state = opt.state[p]
        state.setdefault("step", torch.zeros((), dtype=torch.float32) if tensor_step else 0)
        state.setdefault("exp_avg", torch.zeros_like(p))
        state.setdefault("exp_avg_sq", torch.zeros_like(p))
    zero_optimizer = engine.optimizer
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link fragments
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def load_portable(engine, ckpt: Path, dist: DistInfo, step: int) -> None:
    """Set every trainable parameter's fp32 master, working copy, Adam moments and step through
    DeepSpeed's tensor-fragment API, which works on any ZeRO stage and partitioning."""
    from deepspeed import zero
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from zerovl.engine.telemetry import base_optimizer

    if dist.is_main:
        to_universal(ckpt)
    barrier()
    folder = ckpt / "universal" / "zero"
    stage3 = engine.zero_optimization_stage() == 3

    def read(pdir: Path, key: str, shape: torch.Size) -> torch.Tensor:
        saved = torch.load(pdir / f"{key}.pt", weights_only=False)
        saved = saved["param"] if isinstance(saved, dict) else saved  # ZeRO-1/2 vs ZeRO-3 converters
        return saved.reshape(shape)  # ZeRO-3 sources store flat tensors

    adam_step = _saved_adam_step(folder)
    _materialize_optimizer_state(engine)
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue  # frozen: the freshly built model already holds the same weights
        pdir = folder / name
        if not (pdir / "fp32.pt").is_file():
            raise CheckpointError(f"{ckpt}: no saved state for parameter {name}")
        shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
        value = read(pdir, "fp32", shape)
        safe_set_full_fp32_param(param, value)
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(param, read(pdir, key, shape), key)
        if stage3:  # the partitioned 16-bit copy used by forward
            with zero.GatheredParameters([param], modifier_rank=0):
                if dist.is_main:
                    param.data.copy_(value.to(param.dtype))
        else:
            param.data.copy_(value.to(param.dtype))
    adam_step = float(adam_step if adam_step is not None else step)  # no optimizer step was skipped
    for opt_state in base_optimizer(engine).state.values():
        if "step" in opt_state:  # Adam's bias correction depends on it
            old = opt_state["step"]
            opt_state["step"] = torch.tensor(adam_step, dtype=old.dtype) if torch.is_tensor(old) else int(adam_step)
    engine.global_steps = step
    barrier()


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full model weights from a (possibly ZeRO-sharded) checkpoint, on CPU, in a single process.

    ZeRO-0/1/2 keep the whole 16-bit module in ``mp_rank_00_model_states.pt``; fp32 master weights
    from the optimizer shards (stage >= 1, via DeepSpeed's ``zero_to_fp32``) take precedence where
    present. ZeRO-3 module files hold only placeholders, so ``zero_to_fp32`` is the source there.
    """
    configure_accelerator()  # before deepspeed's import, which otherwise warns on stdout about guessing
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    module_file = ckpt / "mp_rank_00_model_states.pt"
    state: dict[str, torch.Tensor] = {}
    stage = 3
    if module_file.is_file():
        saved = torch.load(module_file, map_location="cpu", weights_only=False)
        state = dict(saved["module"])
        stage = int(saved.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if stage >= 1:
        with contextlib.redirect_stdout(sys.stderr):  # zero_to_fp32 prints progress; stdout is for answers
            state.update(get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name))
    if not state:
        raise CheckpointError(f"{ckpt}: no model weights found")
    return state
