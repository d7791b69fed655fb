"""One epoch of skewed-length multimodal data: zerovl's defaults for it against HF Trainer + DeepSpeed.

    python benchmarks/skewed_vs_hf_trainer.py [--samples 1000 --rounds 3 --nproc 2] [--smoke] [overrides]

The data mixes what LLaVA-style instruction sets hold, every sample with one image: half short VQA
answers (1-4 words, as in the VQAv2/GQA part of LLaVA-1.5's mix), the other half split as
LLaVA-Instruct-150K is (58k multi-turn conversations : 23k detailed descriptions : 77k complex
reasoning answers), with log-normal answer lengths per kind (``KINDS``: a parametric model of those
kinds' shapes, not fitted to the LLaVA files, which cannot be downloaded here). Words come from the
demo vocabulary; the model is the demo's (SigLIP embeddings, MLP connector, Qwen2 4 x 128) with
positions for 512 tokens.

Contenders, each for one epoch of the same samples at the same model and DeepSpeed config:
- ``hf_random``: transformers.Trainer, its own data path (random sampler, rows padded to the
  longest of the micro-batch), per-device batch ``--batch``;
- ``hf_group_by_length``: the same with Trainer's LengthGroupedSampler (``group_by_length``);
- ``hf_batch_rebalance``: the same with Trainer's BatchRebalanceSampler (transformers 5: cost-balanced
  variable-size micro-batches, the same samples per optimizer step);
- ``zerovl``: its recipe with ``data.packing``, ``data.balance`` and the token-weighted, chunked loss
  (its defaults), packed rows of ``data.max_length`` tokens, as many rows per micro-batch as make the
  mean samples per optimizer step closest to Trainer's ``--batch`` x world.

Every (round, contender) is a fresh ``torchrun`` so each rank's peak RSS (getrusage) is its own; the
order rotates every round. Wall time runs from the start of the training loop to the end of the
epoch's last step (setup left out on both sides); tokens/s counts real, non-padding tokens.
"launch s" is the whole torchrun launch to exit (start-up, data encoding, Trainer's length pass).
Figures are medians over rounds and ratios against the better Trainer setting. Goal: zerovl at
least 1.5x faster.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

# Trainer contender -> its train_sampling_strategy (transformers 5; group_by_length=True before)
HF_STRATEGIES = {"hf_random": "random", "hf_group_by_length": "group_by_length",
                 "hf_batch_rebalance": "batch_rebalance"}
CONTENDERS = (*HF_STRATEGIES, "zerovl")
# kind: (share, turns (lo, hi), answer words as (log-normal median, sigma, lo, hi), question words (lo, hi))
KINDS = {
    "short_qa": (0.50, (1, 1), (2.0, 0.5, 1, 4), (5, 12)),
    "conversation": (0.50 * 58 / 158, (2, 5), (30.0, 0.5, 5, 90), (6, 14)),
    "detail": (0.50 * 23 / 158, (1, 1), (110.0, 0.3, 50, 250), (6, 10)),
    "complex": (0.50 * 77 / 158, (1, 1), (90.0, 0.35, 30, 220), (8, 16)),
}
MAX_LENGTH = 512


def extra_arguments(p) -> None:
    p.add_argument("--samples", type=int, default=1000, help="samples in the epoch")
    p.add_argument("--batch", type=int, default=8, help="Trainer's per-device batch (samples)")
    p.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)  # set by launch() for the ranks
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)


def skewed_records(images: list[str], count: int, seed: int = 0) -> list[dict]:
    """``count`` messages records drawn from ``KINDS``, each with one of ``images``."""
    from zerovl.data.demo_scenes import vocabulary_words

    rng = random.Random(seed)
    words = [w for w in vocabulary_words() if w not in ("system", "user", "assistant")]
    names = list(KINDS)
    shares = [KINDS[k][0] for k in names]

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    records = []
    for _ in range(count):
        kind = rng.choices(names, shares)[0]
        _, (t_lo, t_hi), (median, sigma, a_lo, a_hi), (q_lo, q_hi) = KINDS[kind]
        messages = []
        for turn in range(rng.randint(t_lo, t_hi)):
            answer_words = int(min(a_hi, max(a_lo, rng.lognormvariate(math.log(median), sigma))))
            messages += [{"role": "user", "content": text(q_lo, q_hi) + (" <image>" if turn == 0 else "")},
                         {"role": "assistant", "content": text(answer_words, answer_words)}]
        records.append({"messages": messages, "images": [rng.choice(images)], "type": kind})
    return records


def write_data(work: Path, samples: int, images: int) -> Path:
    from zerovl.data.demo_scenes import generate

    data = work / "data"
    path = data / f"skewed_{samples}.jsonl"
    if not path.is_file():
        generate(data, num_train_images=images, num_val_images=1)
        records = skewed_records([f"images/train_{i:05d}.png" for i in range(images)], samples)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def config(work: Path, data: Path, run_dir: Path, overrides: list[str], packed: bool, rows: int):
    """The demo model on the skewed data for one epoch; zerovl's data defaults for skewed lengths when
    ``packed``; no eval, no checkpoints."""
    from zerovl.config import TrainSettings, load_config

    # configs/demo.yaml pins the older loss path; zerovl's defaults are what this benchmark measures
    defaults = {k: TrainSettings.model_fields[k].default for k in ("loss_normalization", "loss_chunk_tokens")}
    zerovl_data = ["data.packing=true", "data.balance=true", *(f"train.{k}={v}" for k, v in defaults.items()),
                   f"train.micro_batch_size={rows}"] if packed else []
    return load_config(_common.DEMO_CONFIG, [
        f"data.train={data}", "data.val=null", f"model.tokenizer={work / 'data' / 'tokenizer'}",
        f"data.max_length={MAX_LENGTH}", f"model.llm.config.max_position_embeddings={MAX_LENGTH}",
        "data.packing=false", f"train.output_dir={run_dir}", "train.max_steps=null", "train.epochs=1",
        "train.save_every=0", "train.save_final=false", "train.eval_every=0", "train.resume=none", "train.log_every=1",
        "train.warmup_steps=0", "eval.exact_match=false", *zerovl_data, *overrides])


def rows_for(cfg, target_samples_per_step: float, world: int) -> int:
    """Packed rows per micro-batch whose mean samples per optimizer step is closest to the target."""
    from zerovl.data.pipeline import build_train_set
    from zerovl.data.plan import EpochPlan
    from zerovl.models.builder import build_model

    built = build_model(cfg.model, cfg.train.precision)
    dataset = build_train_set(cfg.data, built.template(cfg.data.system_prompt), built.image_processor,
                              cfg.model.tokenizer)
    plan = EpochPlan([len(dataset)], seed=cfg.train.seed, lengths=dataset.costs(), max_length=cfg.data.max_length,
                     packing=True)
    per_row = len(dataset) / len(plan.units(0))
    return max(1, round(target_samples_per_step / (per_row * world)))


def run_hf(cfg, strategy: str, batch: int) -> dict:
    """transformers.Trainer + DeepSpeed with its own sampler and padding collate for one epoch."""
    import torch
    from transformers import Trainer, TrainerCallback

    from zerovl.data.collate import META_KEYS, pad_collate
    from zerovl.data.pipeline import build_train_set
    from zerovl.engine.distributed import all_reduce_sum, init_distributed
    from zerovl.engine.ds_config import build_ds_config
    from zerovl.models.builder import build_model
    from zerovl.recipes.train import set_seed

    dist = init_distributed()
    set_seed(cfg.train.seed)
    cfg = cfg.model_copy(deep=True)
    cfg.train.micro_batch_size = batch
    built = build_model(cfg.model, cfg.train.precision)
    template = built.template(cfg.data.system_prompt)
    dataset = build_train_set(cfg.data, template, built.image_processor, cfg.model.tokenizer)
    pad = partial(pad_collate, pad_token_id=built.tokenizer.pad_token_id)
    counted = {"samples": 0, "tokens": 0, "padded": 0}

    def collate(items):
        out = {k: v for k, v in pad(items).items() if k not in META_KEYS}
        counted["samples"] += len(items)
        counted["tokens"] += int(out["attention_mask"].sum())
        counted["padded"] += out["input_ids"].numel()
        return out

    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["start"] = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            clock["end"], clock["steps"] = time.time(), state.global_step

    args = _common.trainer_arguments(cfg, build_ds_config(cfg, dist.world_size, dist.on_cpu), dist.on_cpu,
                                     Path(cfg.train.output_dir), num_train_epochs=1,
                                     train_sampling_strategy=strategy)
    trainer = Trainer(model=_common.trainer_model(built.model), args=args, train_dataset=dataset, data_collator=collate,
                      callbacks=[Clock()])
    trainer.train()
    totals = all_reduce_sum([counted["samples"], counted["tokens"], counted["padded"]], dist.device)
    del trainer
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"seconds": clock["end"] - clock["start"], "steps": clock["steps"], "samples": int(totals[0]),
            "tokens": int(totals[1]), "padded_tokens": int(totals[2])}


def run_zerovl(cfg, is_main: bool) -> dict:
    """zerovl's recipe for one epoch; figures from its metrics.jsonl, on rank 0, which writes that file
    (another rank could read it before rank 0's last lines are there)."""
    from zerovl.engine.metrics import read_metrics
    from zerovl.recipes import train as recipe

    recipe.shutdown = lambda: None  # the peak-memory gather below still needs the process group
    recipe.train(cfg)
    if not is_main:
        return {}
    records = read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl")
    start = next(r["time"] for r in records if r.get("event") == "model_loaded")
    steps = [r for r in records if r.get("split") == "train"]
    return {"seconds": steps[-1]["time"] - start, "steps": len(steps),
            "samples": round(sum(r["samples_per_s"] * r["time_total"] for r in steps)),
            "tokens": round(sum(r["tokens_per_s"] * r["time_total"] for r in steps)),
            "padded_tokens": None}


def on_rank(args, data: Path) -> None:
    """One contender, one epoch, on this rank; rank 0 writes its figures and every rank's peak RSS."""
    from zerovl.engine.distributed import all_gather_floats, init_distributed, shutdown

    dist = init_distributed()
    work = Path(args.work)
    run_dir = work / "runs" / f"{args.contender}_{args.round}"
    if args.contender == "zerovl":
        rows = json.loads((work / "rows.json").read_text())["rows"]
        figures = run_zerovl(config(work, data, run_dir, args.overrides, packed=True, rows=rows), dist.is_main)
        figures["rows_per_micro_batch"] = rows
    else:
        figures = run_hf(config(work, data, run_dir, args.overrides, packed=False, rows=args.batch),
                         HF_STRATEGIES[args.contender], args.batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    figures["peak_rss_bytes"] = [int(x[0]) for x in all_gather_floats([float(peak)], dist.device)]
    if dist.is_main:
        (work / f"result_{args.contender}_{args.round}.json").write_text(json.dumps(figures, indent=2) + "\n")
    shutdown()


def launch(args, contender: str, round_: int) -> dict:
    from zerovl.engine.launch import run_ranks, torchrun

    work = Path(args.work).absolute()
    result = work / f"result_{contender}_{round_}.json"
    result.unlink(missing_ok=True)
    cmd = torchrun(args.nproc, __file__, *sys.argv[1:], "--work", str(work), "--contender", contender,
                   "--round", str(round_))
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": f"{_common.REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.time()
    ran = run_ranks(cmd, work / f"ranks_{contender}_{round_}.log", echo=False, env=env)
    if not result.is_file():
        raise _common.fail(f"{contender} (round {round_}) failed: {ran.error or f'exit {ran.exit_code}'} "
                           f"(full log: {ran.log_path})")
    return {**json.loads(result.read_text()), "launch_s": time.time() - started}


def report(results: dict[str, list[dict]], smoke: bool) -> None:
    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(f"{'contender':>20} {'epoch s':>9} {'launch s':>9} {'steps':>6} {'samples/step':>13} {'tokens/s':>9} "
          f"{'real/padded':>12} {'peak RSS/rank':>14}")
    for name in CONTENDERS:
        rs = results[name]
        padded = rs[0]["padded_tokens"]
        fill = f"{rs[0]['tokens'] / padded:.2f}" if padded else "packed"
        print(f"{name:>20} {med(name, 'seconds'):9.1f} {med(name, 'launch_s'):9.1f} {rs[0]['steps']:6d} {rs[0]['samples'] / rs[0]['steps']:13.1f} "
              f"{statistics.median(r['tokens'] / r['seconds'] for r in rs):9.0f} {fill:>12} "
              f"{statistics.median(max(r['peak_rss_bytes']) for r in rs) / 2**20:11.0f} MiB")
    print("per-round epoch seconds: " + "; ".join(
        f"{n} " + ", ".join(f"{r['seconds']:.1f}" for r in results[n]) for n in CONTENDERS))
    best = min(HF_STRATEGIES, key=lambda n: med(n, "seconds"))
    speedup = med(best, "seconds") / med("zerovl", "seconds")
    memory = (statistics.median(max(r["peak_rss_bytes"]) for r in results["zerovl"])
              / statistics.median(max(r["peak_rss_bytes"]) for r in results[best]))
    launch_ratio = med(best, "launch_s") / med("zerovl", "launch_s")
    print(f"zerovl vs the better Trainer setting ({best}): {speedup:.2f}x faster per epoch "
          f"(ratio of medians), {launch_ratio:.2f}x launch to exit, peak RSS per rank {memory:.2f}x; goal >= 1.5x")
    if smoke:
        print(_common.SMOKE_NOTE)


def main() -> None:
    args = _common.arguments(__doc__.splitlines()[0], extra_arguments)
    if args.smoke:
        args.samples, args.batch = 48, 4
    work = Path(args.work).absolute()
    data = work / "data" / f"skewed_{args.samples}.jsonl"
    if _common.is_rank():
        on_rank(args, data)
        return
    write_data(work, args.samples, images=min(args.samples, 200))
    world = args.nproc
    rows = rows_for(config(work, data, work / "runs" / "plan", args.overrides, packed=True, rows=1),
                    args.batch * world, world)
    (work / "rows.json").write_text(json.dumps({"rows": rows}) + "\n")
    results: dict[str, list[dict]] = {n: [] for n in CONTENDERS}
    for round_ in range(args.rounds):
        shift = round_ % len(CONTENDERS)
        order = CONTENDERS[shift:] + CONTENDERS[:shift]
        for name in order:
            figures = launch(args, name, round_)
            results[name].append(figures)
            print(f"[round {round_}] {name}: {figures['seconds']:.1f} s, {figures['steps']} steps, "
                  f"{figures['samples']} samples, peak RSS {max(figures['peak_rss_bytes']) / 2**20:.0f} MiB",
                  flush=True)
    (work / "result.json").write_text(json.dumps({"results": results, "args": vars(args)}, indent=2) + "\n")
    report(results, args.smoke)


if __name__ == "__main__":
    main()
