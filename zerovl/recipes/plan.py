"""``zerovl plan``: per-GPU and host memory of a config under every ZeRO option, before launching.

Reads only config files (the model is built on the meta device), resolves the DeepSpeed config the
way ``zerovl train`` would for the given world size (so batch/precision conflicts surface here
too), runs the memory model in :mod:`zerovl.engine.planner` and prints a table plus a
recommendation: the fastest option that fits with the margin, and the largest micro batch for it.
For a retrieval model (``model.retrieval``) the sequence is the caption, ``model.retrieval.max_text_length``
tokens, and a sample is one image-caption pair.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from zerovl.config import Config
from zerovl.engine import planner
from zerovl.engine.ds_config import build_ds_config
from zerovl.engine.planner import Estimate, Hardware, Plan


def plan_config(cfg: Config, hardware: Hardware, margin: float = 0.1, images_per_sample: int = 1) -> Plan:
    """The plan for ``cfg`` on ``hardware``; precision, micro batch and optimizer as training would resolve them."""
    resolved = cfg.model_copy(deep=True)  # build_ds_config adopts values from DeepSpeed's config into train
    ds = build_ds_config(resolved, hardware.total_gpus, on_cpu=False)
    shape = planner.count_model(resolved.model)
    retrieval = resolved.model.retrieval
    seq_len = retrieval.max_text_length if retrieval is not None else resolved.data.max_length
    result = planner.plan(
        shape, hardware, resolved.train.precision, resolved.train.micro_batch_size, seq_len,
        images_per_sample, planner.optimizer_state_bytes(ds.get("optimizer", {}).get("type")), margin,
        chunk_tokens=resolved.train.loss_chunk_tokens,
    )
    return result


# ---- output -----------------------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def recommendation(result: Plan, accumulation: int | None = None) -> str:
    rec = result.recommended
    budget = result.estimates[0].budget
    hw = result.hardware
    where = f"{fmt_bytes(budget)} per GPU ({fmt_bytes(hw.gpu_mem)} less the {result.margin:.0%} margin)"
    if rec is None:
        shape = result.shape
        hints = []
        if shape.retrieval is not None:
            if shape.vision_trainable and not shape.vision.checkpointing:
                hints.append("model.vision.gradient_checkpointing=true")
            hints += ["model.vision.mode=frozen", "more GPUs (--gpus/--nodes)",
                      "a shorter model.retrieval.max_text_length"]
        else:
            if not shape.llm.checkpointing:
                hints.append("model.llm.gradient_checkpointing=true")
            hints += ["model.llm.mode=lora", "more GPUs (--gpus/--nodes)", "a shorter data.max_length"]
        return f"nothing fits in {where}, not even micro batch 1; try {', '.join(hints)}"
    if rec.fits:
        return (f"{rec.option.override} train.micro_batch_size={result.micro_batch} — the fastest option that "
                f"fits in {where}: {fmt_bytes(rec.gpu_total)} per GPU. Largest micro batch that fits: "
                f"{rec.max_micro_batch}.")
    micro = min(rec.max_micro_batch, result.micro_batch)
    keep = ""
    if accumulation is not None:
        new_accum = math.ceil(result.micro_batch * accumulation / micro)
        keep = f" train.gradient_accumulation_steps={new_accum} (about the same global batch)"
    return (f"micro batch {result.micro_batch} fits no option; {rec.option.override} "
            f"train.micro_batch_size={micro}{keep} is the fastest that fits in {where}.")


def format_plan(result: Plan, source: str = "", accumulation: int | None = None) -> str:
    hw, shape = result.hardware, result.shape
    p = planner.PRECISION_BYTES[result.precision]
    lines = [f"zerovl plan{' — ' + source if source else ''}",
             f"hardware: {hw.total_gpus} GPU(s) ({hw.nodes} node(s) x {hw.gpus_per_node}), "
             f"{fmt_bytes(hw.gpu_mem)} per GPU, host RAM "
             f"{fmt_bytes(hw.cpu_mem) + ' per node' if hw.cpu_mem else 'not checked (--cpu-mem)'}; "
             f"margin {result.margin:.0%}"]
    if shape.retrieval is not None:
        r = shape.retrieval
        lines.append(f"{result.precision}, micro batch {result.micro_batch} image-caption pairs, captions of "
                     f"{result.seq_len} tokens (T), {shape.vision_tokens} vision tokens and {r.queries} queries (Q) "
                     f"per image; vision tower {'trains' if shape.vision_trainable else 'frozen'}, gradient "
                     f"checkpointing {'on' if shape.vision.checkpointing else 'off'}")
        lines.append(f"Q-Former ({shape.llm.layers} layers, {r.cross_layers} cross-attending, hidden "
                     f"{shape.llm.hidden}) passes per pair: {r.passes}")
    else:
        images = (f", {shape.tokens_per_image} image tokens per image, {result.images_per_sample} image(s) per "
                  "sample" if shape.tokens_per_image else "")
        ckpt = f"llm {'on' if shape.llm.checkpointing else 'off'}"
        if shape.vision is not None:
            ckpt += f", vision {'on' if shape.vision.checkpointing else 'off'}"
        lines.append(f"{result.precision}, micro batch {result.micro_batch}, sequence {result.seq_len} tokens"
                     f"{images}; gradient checkpointing: {ckpt}")
    lines.append("")
    rows = [[name, fmt_count(c.trainable), fmt_count(c.frozen)] for name, c in shape.parts.items()]
    rows.append(["total", fmt_count(shape.trainable), fmt_count(shape.frozen)])
    lines.append(_table(["parameters", "trainable", "frozen"], rows))
    lines.append("")
    lines.append(f"bytes per parameter: {result.precision} params {p}, {result.precision} grads {p} (trainable), "
                 "fp32 master + fp32 grads 8 (trainable; not for ZeRO-0 in fp32), optimizer moments as "
                 "the optimizer needs (Adam 8)")
    act = planner.activation_breakdown(shape, result.seq_len, result.precision, result.images_per_sample,
                                       result.chunk_tokens, hw.total_gpus)
    parts = ", ".join(f"{k.replace('_', ' ')} {fmt_bytes(v)}" for k, v in act.items() if v)
    lines.append(f"activations per sample: {fmt_bytes(sum(act.values()))} ({parts})")
    work = planner.loss_workspace(shape, result.micro_batch * result.seq_len, result.precision, result.chunk_tokens)
    if any(work.values()):
        parts = ", ".join(f"{k.replace('_', ' ')} {fmt_bytes(v)}" for k, v in work.items() if v)
        lines.append(f"plus per micro-batch, the LM loss computed in chunks of {result.chunk_tokens} tokens: "
                     f"{fmt_bytes(sum(work.values()))} ({parts})")
    lines.append("")
    headers = ["option", "params train", "params frozen", "grads", "fp32 copies", "moments", "ZeRO-3 live",
               "buffers", "activations", "GPU total", "host RAM/node", "fits", "max micro batch"]
    rows = []
    for e in result.estimates:
        g = e.gpu
        rows.append([e.option.name, *(fmt_bytes(g[k]) for k in ("params_trainable", "params_frozen", "grads",
                                                                 "fp32_copies", "moments", "gathered", "buffers",
                                                                 "activations")),
                     fmt_bytes(e.gpu_total), fmt_bytes(e.cpu_total), "yes" if e.fits else "no",
                     str(e.max_micro_batch)])
    lines.append(_table(headers, rows))
    load = next((e.cpu_load for e in result.estimates if e.option.stage < 3), 0)
    lines.append(f"host RAM includes the start-up peak: with ZeRO-0/1/2 each of the {hw.gpus_per_node} local ranks "
                 f"builds the whole model ({fmt_bytes(load)} for the node) before DeepSpeed takes it; ZeRO-3 builds "
                 "it inside deepspeed.zero.Init, one module at a time. Offloaded optimizer states and parameters "
                 "are counted per node.")
    for note in result.notes:
        lines.append(f"note: {note}")
    lines.append("")
    lines.append(f"recommendation: {recommendation(result, accumulation)}")
    faster = _faster_with_smaller_batch(result)
    if faster is not None:
        keep = ""
        if accumulation is not None:
            keep = (f" train.gradient_accumulation_steps="
                    f"{math.ceil(result.micro_batch * accumulation / faster.max_micro_batch)}")
        lines.append(f"alternative: {faster.option.override} train.micro_batch_size={faster.max_micro_batch}{keep} "
                     "— a faster option, with a smaller micro batch")
    return "\n".join(lines)


def _faster_with_smaller_batch(result: Plan) -> Estimate | None:
    """The fastest option ahead of the recommendation that fits only a smaller micro batch."""
    if result.recommended is None or not result.recommended.fits:
        return None
    for e in result.estimates:
        if e is result.recommended:
            return None
        if e.max_micro_batch >= 1:
            return e
    return None


def plan_dict(result: Plan) -> dict[str, Any]:
    """JSON-ready view of a plan (bytes as integers)."""
    def est(e: Estimate) -> dict[str, Any]:
        return {"option": e.option.name, "deepspeed": e.option.deepspeed, "gpu": e.gpu, "cpu": e.cpu,
                "gpu_total": e.gpu_total, "cpu_total": e.cpu_total, "cpu_load": e.cpu_load,
                "activation_per_sample": e.activation_per_sample, "fits": e.fits,
                "max_micro_batch": e.max_micro_batch}

    return {"hardware": asdict(result.hardware), "precision": result.precision, "micro_batch": result.micro_batch,
            "seq_len": result.seq_len, "margin": result.margin,
            "parameters": {k: asdict(v) for k, v in result.shape.parts.items()},
            "estimates": [est(e) for e in result.estimates],
            "recommended": result.recommended.option.name if result.recommended else None,
            "notes": result.notes}


def run_plan(cfg: Config, hardware: Hardware, margin: float = 0.1, images_per_sample: int = 1,
             source: str = "", json_path: str | None = None) -> Plan:
    """The ``zerovl plan`` command: compute, print the table, optionally write JSON."""
    result = plan_config(cfg, hardware, margin, images_per_sample)
    print(format_plan(result, source, cfg.train.gradient_accumulation_steps))
    if json_path:
        Path(json_path).write_text(json.dumps(plan_dict(result), indent=2) + "\n")
    return result
