"""``zerovl model summary``: the parts of the model a config describes — parameters, trainable
parameters, mode and dtype — without loading weights or starting a run (modules live on the meta
device, so a 7B config is summarised on a laptop in seconds)."""

from __future__ import annotations

import torch

from zerovl.config import Config
from zerovl.models.builder import DTYPES


def part_counts(cfg: Config) -> dict[str, tuple[int, int]]:
    """{part: (total, trainable)} with the builder's own freezing/LoRA rules applied."""
    if cfg.model.native is None:
        from zerovl.engine.planner import count_model

        shape = count_model(cfg.model)
        return {name: (p.trainable + p.frozen, p.trainable) for name, p in shape.parts.items()}
    from transformers import AutoModelForImageTextToText

    from zerovl.models.builder import apply_native_training_modes, load_tokenizer, named_parts
    from zerovl.models.native import NativeVLM
    from zerovl.models.pretrained import part_config

    config = part_config(cfg.model.native, "model.native", "qwen2_vl")
    tokenizer = load_tokenizer(cfg.model)
    with torch.device("meta"):
        hf = AutoModelForImageTextToText.from_config(config)
        if len(tokenizer) > hf.get_input_embeddings().num_embeddings:
            hf.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model = NativeVLM(hf, tokenizer.convert_tokens_to_ids("<|image_pad|>"))
        apply_native_training_modes(model, cfg.model)
    counts, seen = {}, set()
    for part, named in named_parts(model).items():
        params = [p for _, p in named if id(p) not in seen]
        seen.update(id(p) for p in params)
        counts[part] = (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))
    return counts


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def model_summary(cfg: Config) -> str:
    counts = part_counts(cfg)
    modes = {"vision": cfg.model.vision.mode if cfg.model.vision else ("frozen" if cfg.model.native else "-"),
             "connector": cfg.model.connector.mode, "llm": cfg.model.llm.mode}
    dtype = str(DTYPES[cfg.train.precision]).replace("torch.", "")
    lines = [f"{'part':<10} {'parameters':>12} {'trainable':>12}  {'mode':<10} dtype",
             "-" * 58]
    for part, (total, trainable) in counts.items():
        lines.append(f"{part:<10} {_human(total):>12} {_human(trainable):>12}  {modes.get(part, '-'):<10} {dtype}")
    total = sum(t for t, _ in counts.values())
    trainable = sum(t for _, t in counts.values())
    lines += ["-" * 58, f"{'total':<10} {_human(total):>12} {_human(trainable):>12}  "
              f"({100 * trainable / max(total, 1):.2f}% trainable)"]
    return "\n".join(lines)
