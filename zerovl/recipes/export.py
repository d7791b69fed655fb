"""``zerovl export``: turn a (ZeRO-sharded) checkpoint into files anyone can load.

    OUT/llm/               standard HF causal-LM directory (config, tokenizer, safetensors), LoRA merged
    OUT/llm_adapter/       with --adapter: the LoRA adapter for PeftModel.from_pretrained (llm/ = base)
    OUT/vision/            the vision tower as an HF directory, with its image processor
    OUT/connector.safetensors
    OUT/model/             native VLMs: one image-text-to-text directory; retrieval: a Blip2ForImageTextRetrieval
                           directory (+ OUT/retrieval_extra.safetensors: temperature, ITG head)
    OUT/zerovl_model.json  the model config pointing at the above; `zerovl chat --model OUT` loads it
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from zerovl.engine.restore import CONNECTOR_FILE, EXPORT_MANIFEST, RETRIEVAL_EXTRA_FILE, load_trained
from zerovl.models.pretrained import copy_code_files

log = logging.getLogger("zerovl.export")


def _unwrap_lora(module, merge: bool):
    from peft import PeftModel

    if isinstance(module, PeftModel):
        return module.merge_and_unload() if merge else module
    return module


def export(run_or_ckpt: str | Path, out_dir: str | Path, adapter: bool = False) -> dict[str, Any]:
    cfg, built, ckpt = load_trained(run_or_ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.model.native is not None:
        settings = _export_native(cfg, built, out)
    elif cfg.model.retrieval is not None:
        settings = _export_retrieval(cfg, built, out)
    else:
        settings = _export_composed(cfg, built, out, adapter)
    manifest = {"model": settings, "source_checkpoint": str(ckpt), "format": 1}
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    log.info("exported %s to %s", ckpt, out)
    return manifest


def _export_native(cfg, built, out: Path) -> dict[str, Any]:
    """The native model as one HF image-text-to-text directory, LoRA merged."""
    hf = _unwrap_lora(built.model.hf, merge=True)
    hf.save_pretrained(out / "model", safe_serialization=True)
    built.tokenizer.save_pretrained(out / "model")
    built.image_processor.processor.save_pretrained(out / "model")
    resolution = built.image_processor.resolution  # the limits training used, whatever their source
    return {"native": {"path": "model", "min_pixels": resolution.min_pixels, "max_pixels": resolution.max_pixels},
            "tokenizer": "model", "llm": {"mode": "full"}}


def _export_retrieval(cfg, built, out: Path) -> dict[str, Any]:
    """One Blip2ForImageTextRetrieval directory (LoRA merged; loads with plain transformers) and what the
    HF class has no place for — the learned temperature and the ITG head — in ``retrieval_extra.safetensors``."""
    from safetensors.torch import save_file

    model = built.model
    hf = model.hf
    hf.vision_model = _unwrap_lora(hf.vision_model, merge=True)
    hf.qformer = _unwrap_lora(hf.qformer, merge=True)
    hf.save_pretrained(out / "model", safe_serialization=True)
    built.tokenizer.save_pretrained(out / "model")
    built.image_processor.processor.save_pretrained(out / "model")
    extra = {"temp": model.temp.detach().contiguous()}
    if model.itg_head is not None:
        extra.update({f"itg_head.{k}": v.contiguous() for k, v in model.itg_head.state_dict().items()})
    save_file(extra, str(out / RETRIEVAL_EXTRA_FILE))
    retrieval = {**cfg.model.retrieval.model_dump(mode="json"), "path": "model", "config": None,
                 "image_processor": None}
    return {"retrieval": retrieval, "tokenizer": "model", "vision": {"mode": "full"}, "connector": {"mode": "full"}}


def _export_composed(cfg, built, out: Path, adapter: bool) -> dict[str, Any]:
    from safetensors.torch import save_file

    model = built.model
    settings = cfg.model.model_dump(mode="json")
    llm = model.llm
    if adapter and cfg.model.llm.mode == "lora":
        llm.save_pretrained(out / "llm_adapter")  # adapter_config.json + adapter_model.safetensors
        llm = llm.unload()  # the untouched base weights go to llm/
        adapter_cfg = out / "llm_adapter" / "adapter_config.json"
        meta = json.loads(adapter_cfg.read_text())
        meta["base_model_name_or_path"] = str((out / "llm").resolve())
        adapter_cfg.write_text(json.dumps(meta, indent=2))
    else:
        llm = _unwrap_lora(llm, merge=True)
    llm.save_pretrained(out / "llm", safe_serialization=True)
    built.tokenizer.save_pretrained(out / "llm")
    trusts = cfg.model.llm.path is not None and cfg.model.llm.trust_remote_code
    settings["llm"] = {"path": "llm", "mode": "full", "trust_remote_code": trusts}
    settings["tokenizer"] = "llm"
    settings["tokenizer_trust_remote_code"] = cfg.model.tokenizer_trusts_code
    for source, trusted in ((cfg.model.llm.path, trusts), (cfg.model.tokenizer_path, cfg.model.tokenizer_trusts_code)):
        if trusted:  # the directory's own code travels with it: the export loads as the original did
            copied = copy_code_files(source, out / "llm")
            if copied:
                log.info("copied %s from %s into the export", ", ".join(copied), source)

    if model.vision is not None:
        encoder = _unwrap_lora(model.vision.encoder, merge=True)
        encoder.save_pretrained(out / "vision", safe_serialization=True)
        built.image_processor.processor.save_pretrained(out / "vision")
        vision = {**settings["vision"], "path": "vision", "config": None, "image_processor": None, "mode": "full",
                  "drop_cls": model.vision.drop_cls}
        if vision["feature_layer"] != -1:  # the tower was cut there: read all of its saved layers, pre-norm
            vision["feature_layer"] = encoder.config.num_hidden_layers
        settings["vision"] = vision
        if settings["connector"].get("path"):  # the Q-Former's config travels with the export
            settings["connector"].update(path=None, qformer=model.connector.qformer.config.to_diff_dict(),
                                         num_query_tokens=model.connector.tokens_per_image)
        settings["connector"]["mode"] = "full"
        save_file({k: v.contiguous() for k, v in model.connector.state_dict().items()},
                  str(out / CONNECTOR_FILE))
    return settings
