"""``zerovl export``: turn a (ZeRO-sharded) checkpoint into files anyone can load.

    OUT/llm/               standard HF causal-LM directory (config, tokenizer, safetensors), LoRA merged
    OUT/llm_adapter/       with --adapter: the LoRA adapter for PeftModel.from_pretrained (llm/ = base)
    OUT/vision/            the vision tower as an HF directory, with its image processor
    OUT/connector.safetensors
    OUT/zerovl_model.json  the model config pointing at the above; `zerovl chat --model OUT` loads it
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from zerovl.engine.restore import CONNECTOR_FILE, EXPORT_MANIFEST, load_trained

log = logging.getLogger("zerovl.export")


def _unwrap_lora(module, merge: bool):
    from peft import PeftModel

    if isinstance(module, PeftModel):
        return module.merge_and_unload() if merge else module
    return module


def export(run_or_ckpt: str | Path, out_dir: str | Path, adapter: bool = False) -> dict[str, Any]:
    from safetensors.torch import save_file

    cfg, built, ckpt = load_trained(run_or_ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    settings["llm"] = {"path": "llm", "mode": "full"}
    settings["tokenizer"] = "llm"

    if model.vision is not None:
        encoder = _unwrap_lora(model.vision.encoder, merge=True)
        encoder.save_pretrained(out / "vision", safe_serialization=True)
        built.image_processor.processor.save_pretrained(out / "vision")
        settings["vision"] = {**settings["vision"], "path": "vision", "config": None, "image_processor": None,
                              "mode": "full"}
        save_file({k: v.contiguous() for k, v in model.connector.state_dict().items()},
                  str(out / CONNECTOR_FILE))
    manifest = {"model": settings, "source_checkpoint": str(ckpt),
                "tokens_per_image": built.tokens_per_image, "format": 1}
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    log.info("exported %s to %s", ckpt, out)
    return manifest
