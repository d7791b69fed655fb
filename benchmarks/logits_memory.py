"""Peak activation memory and step time of one forward + backward at 8,192 tokens with Qwen2.5's real
152,064-token vocabulary: transformers' plain path (``model(labels=...)``, full logits) against
zerovl's LM loss computed in chunks through the output projection (``zerovl/models/loss.py``), on a
small Qwen2 shaped by the real Qwen2.5-7B-Instruct ``config.json`` (its vocabulary, head dim, GQA
ratio, MLP ratio, RoPE and norm settings; hidden 256 and 2 layers so it runs anywhere).

    .venv/bin/python benchmarks/logits_memory.py [--tokens 8192] [--rounds 3] [--steps 2] [--dtype bf16]
        [--supervised 1.0] [--chunk 1024] [--smoke]

What is measured, per contender, each time in a fresh process (the order alternates every round):

* peak activation memory: on CUDA, ``torch.cuda.max_memory_allocated()`` during the step minus what was
  allocated before it; on CPU, the process's peak resident set during the step (``VmHWM``, reset through
  ``/proc/self/clear_refs``) minus its resident set before it, with glibc told to hand every block
  above 64 KiB back to the OS on free (``MALLOC_MMAP_THRESHOLD_``) so the resident set follows the live
  tensors. Weights, their gradients (allocated by a warm-up step and kept) and the batch are in the
  baseline, so the figure is what the step itself adds: activations, logits, loss and transients.
* saved for backward: the bytes of the tensors autograd keeps (``saved_tensors_hooks``), what the
  planner's activation model counts;
* step time: the median of ``--steps`` timed forward + backward steps after one warm-up step.

The figures are the medians over rounds; the ratio line compares them. ``--supervised 0.25`` masks the
first 75 % of the tokens like an SFT prompt (the plain path still computes their logits).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

REAL_CONFIG = _common.REPO.parent / "shared" / "realworld" / "model-configs" / "qwen2.5-7b-instruct.config.json"
# the same file's values, for machines without ../shared (the benchmark says which it used)
QWEN25_7B = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
             "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
             "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
             "tie_word_embeddings": False, "hidden_act": "silu"}
CONTENDERS = ("plain", "zerovl")
GIB = 2**30


def shaped_config(args) -> tuple[dict, str]:
    """The real config with width and depth shrunk and everything else kept (head dim 128, GQA 7:1 ->
    2 query heads : 1 KV head at this width, the MLP's 5.3x ratio)."""
    if REAL_CONFIG.is_file():
        real, source = json.loads(REAL_CONFIG.read_text()), REAL_CONFIG.name
    else:
        real, source = dict(QWEN25_7B), "built-in copy of qwen2.5-7b-instruct's config.json"
    head_dim = real["hidden_size"] // real["num_attention_heads"]
    heads = max(1, args.hidden // head_dim)
    ratio = real["num_attention_heads"] // real["num_key_value_heads"]
    shaped = {k: real[k] for k in ("model_type", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                                   "rope_theta", "tie_word_embeddings", "hidden_act") if k in real}
    shaped.update(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
                  num_key_value_heads=max(1, heads // ratio), head_dim=head_dim,
                  intermediate_size=64 * round(args.hidden * real["intermediate_size"] / real["hidden_size"] / 64),
                  max_position_embeddings=max(real.get("max_position_embeddings", 0), args.tokens))
    if args.vocab:
        shaped["vocab_size"] = args.vocab
    return shaped, source


# ---- one measurement, in its own process --------------------------------------------------------

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


class Peak:
    """Peak bytes a block of code adds: CUDA allocator counters, or the resident set on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.base


def worker(args) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from zerovl.models import loss as lm_loss
    from zerovl.models.vlm import ComposedVLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shaped, _ = shaped_config(args)
    vocab, dtype = shaped["vocab_size"], {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if device.type == "cpu" and args.worker == "plain":  # the plain path peaks at ~12.2 B per token x vocab entry
        need = args.tokens * vocab * 13
        if need > _available_bytes() - 2 * GIB:
            raise SystemExit(f"not enough free memory for the plain path: it needs about {need / GIB:.1f} GiB, "
                             f"{_available_bytes() / GIB:.1f} GiB are available; use fewer --tokens")
    if device.type == "cpu":  # never push the shared machine into the OOM killer: fail inside this process
        cap = _status_kib("VmSize") * 1024 + _available_bytes() - GIB
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    torch.manual_seed(0)
    spec = dict(shaped)
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec), dtype=dtype)
    llm = llm.to(device).train()
    ids = torch.randint(0, vocab, (1, args.tokens), device=device)
    labels = ids.clone()
    labels[:, : int(args.tokens * (1 - args.supervised))] = -100
    if args.worker == "plain":
        def forward():
            return llm(input_ids=ids, labels=labels, use_cache=False).loss
        path = "transformers: model(labels=...)"
    else:
        model = ComposedVLM(llm, image_token_id=-1, loss_chunk_tokens=args.chunk)
        mask = torch.ones_like(ids)

        def forward():
            return model(ids, mask, labels=labels)
        fused = device.type == "cuda" and lm_loss._liger() is not None
        path = "zerovl: Liger fused linear cross-entropy" if fused else f"zerovl: chunks of {args.chunk} tokens"

    saved: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in llm.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the warm-up: allocates the grads
        first = forward()
    first.backward()
    loss = first.item()
    del first
    times, peaks = [], []
    for _ in range(args.steps):
        with Peak(device) as peak:
            start = time.perf_counter()
            out = forward()
            out.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            del out
        peaks.append(peak.peak)
    return {"name": args.worker, "path": path, "device": str(device), "loss": loss, "seconds": statistics.median(times),
            "peak_bytes": max(peaks), "saved_bytes": sum(saved.values())}


# ---- the comparison -----------------------------------------------------------------------------

def measure(name: str, args) -> dict:
    argv = [sys.executable, __file__, "--worker", name, "--tokens", str(args.tokens), "--steps", str(args.steps),
            "--dtype", args.dtype, "--supervised", str(args.supervised), "--chunk", str(args.chunk),
            "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": f"{_common.REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=_common.REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise _common.fail(f"{name}: {tail[0]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens in the one row of the batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per measurement, after one warm-up")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--supervised", type=float, default=1.0, help="share of tokens with labels (the last ones)")
    p.add_argument("--chunk", type=int, default=1024, help="zerovl's loss_chunk_tokens")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=0, help="override the real vocabulary (smoke runs only)")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help=_common.SMOKE_HELP)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    if args.smoke:
        args.tokens, args.rounds, args.steps, args.vocab, args.chunk, args.hidden = 256, 1, 1, 8192, 64, 64
    shaped, source = shaped_config(args)
    print(f"model: Qwen2 shaped by {source}: vocab {shaped['vocab_size']:,}, hidden {shaped['hidden_size']}, "
          f"{shaped['num_hidden_layers']} layers, {shaped['num_attention_heads']} query / "
          f"{shaped['num_key_value_heads']} KV heads of {shaped['head_dim']}, MLP {shaped['intermediate_size']}; "
          f"{args.tokens:,} tokens in one row, {args.supervised:.0%} supervised, {args.dtype}", flush=True)
    runs: dict[str, list[dict]] = {n: [] for n in CONTENDERS}
    for round_ in range(args.rounds):
        for name in CONTENDERS if round_ % 2 == 0 else CONTENDERS[::-1]:
            r = measure(name, args)
            runs[name].append(r)
            print(f"[round {round_}] {name:<6} peak {r['peak_bytes'] / GIB:7.3f} GiB  saved {r['saved_bytes'] / GIB:7.3f} GiB"
                  f"  step {r['seconds']:7.2f} s  loss {r['loss']:.6f}  ({r['path']}, {r['device']})", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("peak_bytes", "saved_bytes", "seconds")}
           for n, rs in runs.items()}
    plain, ours = med["plain"], med["zerovl"]
    loss_diff = abs(runs["zerovl"][0]["loss"] - runs["plain"][0]["loss"]) / abs(runs["plain"][0]["loss"])
    print(f"{'median of ' + str(args.rounds) + ' round(s)':<28}{'plain':>12}{'zerovl':>12}{'zerovl / plain':>16}")
    for label, key, unit, scale in (("peak activation memory", "peak_bytes", "GiB", GIB),
                                    ("saved for backward", "saved_bytes", "GiB", GIB),
                                    ("step time (fwd + bwd)", "seconds", "s", 1)):
        print(f"{label:<28}{plain[key] / scale:>9.3f} {unit:<3}{ours[key] / scale:>8.3f} {unit:<3}"
              f"{ours[key] / plain[key]:>15.3f}")
    print(f"loss: plain {runs['plain'][0]['loss']:.6f}, zerovl {runs['zerovl'][0]['loss']:.6f} "
          f"(relative difference {loss_diff:.1e})")
    print(f"peak memory plain / zerovl: {plain['peak_bytes'] / ours['peak_bytes']:.1f}x, "
          f"step time zerovl / plain: {ours['seconds'] / plain['seconds']:.3f}")
    if args.smoke:
        print(_common.SMOKE_NOTE)


if __name__ == "__main__":
    main()
