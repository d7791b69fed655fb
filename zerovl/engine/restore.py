"""Rebuild a trained model in one process — no DeepSpeed engine — from a run directory or an export.

Used by chat, export and evaluation: the run's resolved ``config.yaml`` rebuilds the exact module
tree (LoRA wrappers included), then the consolidated checkpoint weights are loaded on top. Frozen
weights missing from a trainable-only checkpoint come from the model's own source.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from zerovl.config import Config, ModelSettings, load_config
from zerovl.engine import checkpoint
from zerovl.errors import CheckpointError
from zerovl.models.builder import BuiltModel, build_model

log = logging.getLogger(__name__)

EXPORT_MANIFEST = "zerovl_model.json"
CONNECTOR_FILE = "connector.safetensors"
RETRIEVAL_EXTRA_FILE = "retrieval_extra.safetensors"


def split_run_and_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """``RUN_DIR`` (newest complete checkpoint) or ``RUN_DIR/checkpoints/step_N``."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        ckpt = checkpoint.find_resume(path)
        if ckpt is None:
            raise CheckpointError(f"{path} has no complete checkpoint")
        return path, ckpt
    if checkpoint.is_complete(path) and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent, path
    raise CheckpointError(f"{path} is neither a run directory nor a complete checkpoint of one")


def load_trained(run_or_ckpt: str | Path, precision: str = "fp32") -> tuple[Config, BuiltModel, Path]:
    run_dir, ckpt = split_run_and_checkpoint(run_or_ckpt)
    cfg = load_config(run_dir / "config.yaml", environ={})  # as trained: the environment applied then
    torch.manual_seed(cfg.train.seed)  # frozen random-init parts are re-created exactly as in training
    built = build_model(cfg.model, precision, cfg.data.max_pixels)
    state = checkpoint.consolidated_state_dict(ckpt)
    dtype = next(built.model.parameters()).dtype
    missing, unexpected = built.model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    if unexpected or [k for k in missing if k in trainable]:
        raise CheckpointError(f"{ckpt} does not fit the model in {run_dir}/config.yaml "
                              f"(missing {[k for k in missing if k in trainable][:3]}, unexpected {unexpected[:3]})")
    built.model.eval()
    log.info("loaded %s", ckpt)
    return cfg, built, ckpt


def is_export(path: str | Path) -> bool:
    return (Path(path) / EXPORT_MANIFEST).is_file()


def export_settings(export_dir: Path) -> tuple[ModelSettings, dict]:
    """The model settings an export was written with, its paths made absolute, and its manifest."""
    manifest_path = export_dir / EXPORT_MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{export_dir} is not a zerovl export (no {EXPORT_MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    model = manifest["model"]
    # paths are stored relative to the export so the directory can be moved or copied
    for part in ("llm", "vision", "native", "retrieval"):
        if (model.get(part) or {}).get("path"):
            model[part]["path"] = str(export_dir / model[part]["path"])
    model["tokenizer"] = str(export_dir / model["tokenizer"])
    return ModelSettings.model_validate(model), manifest


def load_export(export_dir: str | Path, precision: str = "fp32") -> tuple[ModelSettings, BuiltModel, dict]:
    """Load what ``zerovl export`` wrote: HF directories for the LLM and vision tower, the connector."""
    from safetensors.torch import load_file

    export_dir = Path(export_dir)
    settings, manifest = export_settings(export_dir)
    built = build_model(settings, precision)
    if settings.retrieval is not None:
        extra = load_file(str(export_dir / RETRIEVAL_EXTRA_FILE))
        built.model.load_state_dict(extra, strict=False)  # the rest came with the HF directory
        built.model.eval()
        return settings, built, manifest
    adapter = export_dir / "llm_adapter"
    if adapter.is_dir():
        from peft import PeftModel

        built.model.llm = PeftModel.from_pretrained(built.model.llm, str(adapter)).merge_and_unload()
    if getattr(built.model, "connector", None) is not None:
        built.model.connector.load_state_dict(load_file(str(export_dir / CONNECTOR_FILE)))
    built.model.eval()
    return settings, built, manifest
