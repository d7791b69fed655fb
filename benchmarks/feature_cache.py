"""Per-step time of a MiniGPT4Qwen-shaped model with and without the frozen-feature cache (issue 10).

    python benchmarks/feature_cache.py [--steps 40 --rounds 3 --nproc 2] [--layers 4 --width 256] [--smoke]
        [overrides]

The model: a CLIP vision tower shaped by the real ``clip-vit-large-patch14`` config (224 px, 14 px
patches: 257 tokens, quick-GELU, head dim 64, MLP ratio 4; ``--layers``/``--width`` shrink its depth and
width so it runs on CPU), frozen; a BLIP-2 Q-Former (32 queries, cross-attention every other layer, as
BLIP-2), frozen; its linear projection trained (``model.connector.mode: projection``); the demo's Qwen2
with LoRA. Both contenders run ``zerovl.recipes.train.train`` unchanged on the demo scenes, in the same
rank processes, the order alternating every round: ``pixels`` runs the frozen tower and Q-Former every
step; ``feature cache`` sets ``data.feature_cache`` (built by its first round, reused after) and reads
their output instead. Figures are medians of per-step times after ``--warmup`` steps.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

REAL_CONFIG = _common.REPO.parent / "shared" / "realworld" / "model-configs" / "clip-vit-large-patch14.config.json"
CLIP_L14 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,  # that file's values
            "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05}
CONTENDERS = ("pixels", "feature cache")


def vision_config(layers: int, width: int) -> tuple[dict, str]:
    if REAL_CONFIG.is_file():
        real, source = json.loads(REAL_CONFIG.read_text())["vision_config"], REAL_CONFIG.name
    else:
        real, source = dict(CLIP_L14), "built-in copy of clip-vit-large-patch14's vision_config"
    head_dim = real["hidden_size"] // real["num_attention_heads"]
    shaped = {k: real[k] for k in ("model_type", "image_size", "patch_size", "hidden_act", "layer_norm_eps")}
    shaped.update(hidden_size=width, num_hidden_layers=layers, num_attention_heads=max(1, width // head_dim),
                  intermediate_size=width * real["intermediate_size"] // real["hidden_size"])
    return shaped, source


def configure(cfg, args, run_dir: Path, cached: bool):
    from zerovl.config import from_dict

    raw = cfg.model_dump(mode="json")
    vision, _ = vision_config(args.layers, args.width)
    raw["model"]["vision"] = {"config": vision, "mode": "frozen", "image_processor": None}
    raw["model"]["connector"] = {"type": "qformer", "mode": "projection", "num_query_tokens": 32,
                                 "qformer": {"hidden_size": args.width, "num_hidden_layers": 2,
                                             "num_attention_heads": max(1, args.width // 64),
                                             "intermediate_size": 4 * args.width, "cross_attention_frequency": 2}}
    raw["model"]["llm"]["mode"] = "lora"
    raw["model"]["llm"]["lora"] = {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    raw["data"]["max_length"] = 256
    raw["data"]["feature_cache"] = str(run_dir.parent / "features") if cached else None
    return from_dict(raw)


def ranks(args) -> None:
    from zerovl.engine.distributed import init_distributed, shutdown
    from zerovl.recipes import train as recipe

    dist = init_distributed()
    recipe.shutdown = lambda: None  # train() ends the process group; keep it for the next round
    work = Path(args.work)
    times: dict[str, list[float]] = {n: [] for n in CONTENDERS}
    losses: dict[str, list[float | None]] = {n: [] for n in CONTENDERS}
    for round_ in range(args.rounds):
        for name in CONTENDERS if round_ % 2 == 0 else CONTENDERS[::-1]:
            run_dir = work / "runs" / f"{name.replace(' ', '_')}_{round_}"
            cfg = configure(_common.demo_config(work, run_dir, args.steps, args.overrides), args, run_dir,
                            name == "feature cache")
            stamps, loss = _common.zerovl_train(cfg, dist.is_main)
            if dist.is_main:
                times[name].append(_common.per_step(stamps, args.warmup))
                losses[name].append(loss)
                print(f"[round {round_}] {name}: {times[name][-1] * 1000:.1f} ms/step, step-1 loss {loss}", flush=True)
    if dist.is_main:
        _common.write_result(work, {**_common.summary(times, "feature cache", "pixels"), "first_losses": losses,
                                    "args": vars(args)})
    shutdown()


def main() -> None:
    def extra(p):
        p.add_argument("--layers", type=int, default=4, help="vision encoder layers (CLIP ViT-L/14 has 24)")
        p.add_argument("--width", type=int, default=256, help="vision and Q-Former width (CLIP ViT-L/14: 1024)")

    args = _common.arguments(__doc__.splitlines()[0], extra=extra)
    if args.smoke:
        args.layers, args.width = 1, 64
    if not _common.is_rank():
        result = _common.relaunch(__file__, args)
        vision, source = vision_config(args.layers, args.width)
        print(f"vision tower: {source} with {args.layers} layers, width {args.width} ({vision['num_attention_heads']} "
              f"heads, {(vision['image_size'] // vision['patch_size']) ** 2 + 1} tokens); Q-Former 2 layers, 32 queries; "
              f"LLM: the demo's Qwen2 + LoRA; {args.nproc} ranks, {args.rounds} rounds of {args.steps} steps")
        times = result["seconds_per_step"]
        print(f"{'ms/step':<14}" + "".join(f"{n:>16}" for n in CONTENDERS) + f"{'cache / pixels':>16}")
        for i, ratio in enumerate(result["ratios"]):
            print(f"{f'round {i}':<14}" + "".join(f"{times[n][i] * 1000:>16.1f}" for n in CONTENDERS) + f"{ratio:>16.3f}")
        print(f"{'median':<14}" + "".join(f"{statistics.median(times[n]) * 1000:>16.1f}" for n in CONTENDERS)
              + f"{result['ratio_of_medians']:>16.3f}")
        first = result["first_losses"]
        same = "identical" if first["pixels"][0] == first["feature cache"][0] else "DIFFERENT"
        print(f"step-1 loss: pixels {first['pixels'][0]}, feature cache {first['feature cache'][0]} ({same})")
        print(f"feature cache / pixels (ratio of medians): {result['ratio_of_medians']:.3f} "
              f"({1 / result['ratio_of_medians']:.2f}x faster per step)")
        if args.smoke:
            print(_common.SMOKE_NOTE)
        return
    ranks(args)


if __name__ == "__main__":
    main()
