"""Command line: parse arguments, call a recipe. No logic lives here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from zerovl.errors import ConfigError, ZeroVLError

CONFIG_ERROR_GRACE_S = 5.0
# how gloo / NCCL report a peer process that has exited, seen from a collective still waiting for it
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "NCCL communicator was aborted")


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The ``deepspeed`` launcher inserts ``--local_rank=N`` anywhere; honour it via LOCAL_RANK."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="[zerovl %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*before it has started.*")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


DESCRIPTION = """\
zerovl trains and fine-tunes vision-language models -- a vision encoder, a connector and a causal
LLM (LLaVA, BLIP-2 / MiniGPT4Qwen style) or a native Qwen2-VL / Qwen2.5-VL -- on DeepSpeed ZeRO,
from one YAML config. The same command runs 2 CPU processes on a laptop or ZeRO-3 on GPU nodes;
nothing is downloaded: models and tokenizers are read from local directories."""

# One example per command, shown by `zerovl --help`; tests check every command has one.
EXAMPLES = {
    "train": "zerovl train configs/llava.yaml model.vision.path=/m/clip model.llm.path=/m/qwen train.max_steps=5\n"
             "           torchrun --nproc_per_node 8 -m zerovl train CONFIG deepspeed=zero3  (several ranks)",
    "demo": "zerovl demo  (synthetic scenes, a tiny VLM trained on 2 CPU ranks, accuracy in ~10 min)",
    "chat": "zerovl chat --run runs/demo --image runs/demo/data/images/val_00000.png \"how many shapes are there ?\"",
    "eval": "zerovl eval runs/demo --task vqa --data vqav2_questions.json --annotations vqav2_annotations.json\n"
            "           torchrun --nproc_per_node 8 -m zerovl eval RUN --task caption --data captions_val2017.json",
    "serve": "zerovl serve runs/demo --max-batch 16 --api-key KEY  (OpenAI-compatible API on 127.0.0.1:8000/v1)",
    "webui": "zerovl webui runs/demo  (a browser chat with image upload, and the run's curves, on 127.0.0.1:7860)",
    "model": "zerovl model summary configs/demo.yaml  (parts, parameters, trainable, dtype)",
    "export": "zerovl export runs/demo exported/demo  (HF safetensors directories)",
    "plan": "zerovl plan configs/llava.yaml --gpus 8 --gpu-mem 80GB  (memory per GPU for each ZeRO option)",
    "bench": "zerovl bench configs/demo.yaml --stages zero0,zero2,zero3 --steps 5  (measured, with the plan)",
    "report": "zerovl report runs/demo  (loss, lr, throughput and memory as PNG)",
    "data": "zerovl data check configs/demo.yaml   |   zerovl data prepare CONFIG --workers 8",
}

EPILOG = ("commands, one example each:\n" + "\n".join(f"  {name:<8} {ex}" for name, ex in EXAMPLES.items()) + """

After the config, dotted key=value overrides any key (train.lr=1e-4 deepspeed=zero3); option names
from HF Trainer, ms-swift and LLaMA-Factory (learning_rate, per_device_train_batch_size, freeze_vit,
lora_rank, ...) are accepted as aliases, listed in the README. A bad key or value stops with one
line and exit code 2. `zerovl COMMAND --help` shows a command's options.""")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zerovl", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train from a YAML config (run under torchrun/deepspeed for >1 rank)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.max_steps=5 deepspeed=zero3")

    p = sub.add_parser("demo", help="generate scenes, train a tiny VLM on 2 CPU ranks, report accuracy")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*")

    p = sub.add_parser("chat", help="ask a trained run (or an export) about images")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory (newest complete checkpoint) or one of its checkpoints")
    source.add_argument("--model", help="a directory written by `zerovl export`")
    p.add_argument("--image", action="append", default=[], help="image path (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("question", nargs="?", help="omit for an interactive session")

    p = sub.add_parser("eval", help="score a run, checkpoint or export on VQA, captioning, multiple choice, "
                       "image-text retrieval or loss (run under torchrun for several ranks)")
    p.add_argument("source", help="run directory, one of its checkpoints, or a `zerovl export` directory")
    p.add_argument("--task", required=True, choices=("vqa", "caption", "mcq", "loss", "open", "retrieval"))
    p.add_argument("--data", required=True, help="questions / captions / TSV / JSONL file; retrieval: COCO captions, "
                   "Karpathy-split JSON or image,caption CSV")
    p.add_argument("--split", help="retrieval: the split of a Karpathy dataset_*.json (default test)")
    p.add_argument("--rerank-k", type=int, help="retrieval: ITC candidates per query re-ranked by ITM (default 128; "
                   "0 = ITC only)")
    p.add_argument("--annotations", help="vqa: the VQAv2 annotations JSON beside --data")
    p.add_argument("--image-root", help="image paths are relative to this (default: the data file's folder)")
    p.add_argument("--out", help="where metrics.json and predictions.jsonl go (default: SOURCE/eval/TASK)")
    p.add_argument("--name", help="label in the outputs (default: the task)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-samples", type=int)
    p.add_argument("--max-new-tokens", type=int, help="default: vqa/mcq 16, caption 32, open 128")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--metric", help="vqa: vqa (soft accuracy, default) or exact (GQA-style)")
    p.add_argument("--prompt", help="vqa: suffix after the question; caption/open: the prompt")
    p.add_argument("--circular", action="store_true", help="mcq: every rotation of the options must be right")
    p.add_argument("--zero", choices=("auto", "0", "3"), default="auto",
                   help="3: shard the model over the ranks (auto: as the run was trained)")

    p = sub.add_parser("serve", help="an OpenAI-compatible API (/v1/chat/completions) over a run, checkpoint "
                       "or export")
    p.add_argument("source", help="run directory, one of its checkpoints, or a `zerovl export` directory")
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $ZEROVL_API_KEY, else none)")
    p.add_argument("--model-name", help="the id /v1/models lists (default: SOURCE's folder name)")
    p.add_argument("--max-batch", type=int, default=16, help="requests generated together")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    p.add_argument("--image-root", help="allow local image paths, only under this folder")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    p.add_argument("--max-images", type=int, default=4, help="images per request")
    p.add_argument("--max-image-pixels", type=int, default=25_000_000)
    p.add_argument("--max-body-mb", type=float, default=32.0)
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=1024, help="the most a request may ask for")

    p = sub.add_parser("webui", help="a Gradio chat in the browser (image upload, streamed replies) and the "
                       "run's training curves")
    p.add_argument("source", help="run directory, one of its checkpoints, or a `zerovl export` directory")
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only (the page has no login)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-batch", type=int, default=8, help="browser turns generated together")

    p = sub.add_parser("model", help="inspect the model a config describes")
    model_sub = p.add_subparsers(dest="model_command", required=True)
    q = model_sub.add_parser("summary", help="parts, parameters, trainable parameters and dtype, no weights loaded")
    q.add_argument("config")
    q.add_argument("overrides", nargs="*")

    p = sub.add_parser("export", help="consolidate a checkpoint into HF safetensors directories")
    p.add_argument("checkpoint", help="RUN_DIR (newest complete checkpoint) or RUN_DIR/checkpoints/step_N")
    p.add_argument("out_dir")
    p.add_argument("--adapter", action="store_true", help="write the LLM's LoRA as a peft adapter, unmerged")

    class _Intermixed(argparse.ArgumentParser):
        """Lets key=value overrides follow options: `zerovl plan CFG --gpus 8 train.x=1` (plain argparse
        gives the positionals' turn to CONFIG alone and rejects the later ones)."""

        def parse_known_args(self, args=None, namespace=None):
            if getattr(self, "_intermixing", False):  # parse_known_intermixed_args calls back in here
                return super().parse_known_args(args, namespace)
            self._intermixing = True
            try:
                return self.parse_known_intermixed_args(args, namespace)
            finally:
                self._intermixing = False

    p = sub.add_parser("plan", help="memory per GPU and per node under each ZeRO option, from config files only")
    p.__class__ = _Intermixed
    p.add_argument("config")
    p.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem", required=True, help="memory per GPU, e.g. 80GB (GB = GiB)")
    p.add_argument("--cpu-mem", default=None, help="host RAM per node, e.g. 512GB; checked when given")
    p.add_argument("--margin", type=float, default=0.1, help="fraction of GPU memory kept free (default 0.1)")
    p.add_argument("--images-per-sample", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.micro_batch_size=8")

    p = sub.add_parser("bench", help="train a few steps under each ZeRO option and compare speed and memory")
    p.__class__ = _Intermixed
    p.add_argument("config")
    p.add_argument("--stages", default="zero0,zero1,zero2,zero3", help="comma-separated presets or plan options")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (torchrun --nproc_per_node)")
    p.add_argument("--out", default=None, help="output directory (default <train.output_dir>/bench-<time>)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed per stage")
    p.add_argument("overrides", nargs="*")

    p = sub.add_parser("report", help="plot loss, lr, throughput and memory of a run to PNG files")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="directory for the PNG files (default: the run directory)")
    p = sub.add_parser("data", help="check the training data, or pre-tokenize it into data.cache_dir")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("check", help="counts, broken records, missing images, lengths; exit 1 when the "
                            "share of broken records exceeds --max-error-rate")
    q.add_argument("config")
    q.add_argument("overrides", nargs="*")
    q.add_argument("--max-error-rate", type=float, default=0.0, help="allowed share of broken records (0.01 = 1%%)")
    q.add_argument("--out", default=None, help="report and histogram directory (default <train.output_dir>/data_check)")
    q.add_argument("--no-images", action="store_true", help="skip opening every image (faster)")
    q = data_sub.add_parser("prepare", help="tokenize the training data into data.cache_dir (parallel, resumable); "
                            "compute frozen image features into data.feature_cache")
    q.add_argument("config")
    q.add_argument("overrides", nargs="*")
    q.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    q.add_argument("--shard-size", type=int, default=10_000, help="samples per cache shard")
    q.add_argument("--overwrite", action="store_true", help="replace a cache made from other settings")
    return parser


def _cmd_train(args) -> int:
    from zerovl.config import load_config
    from zerovl.recipes.train import train

    train(load_config(args.config, args.overrides))
    return 0


def _cmd_demo(args) -> int:
    from zerovl.recipes.demo import DEMO_CONFIG, run_demo

    run_demo(args.output_dir, args.nproc, args.overrides, args.config or DEMO_CONFIG)
    return 0


def _cmd_chat(args) -> int:
    from zerovl.recipes.chat import Chatbot

    bot = Chatbot.from_run(args.run) if args.run else Chatbot.from_export(args.model)
    if args.question:
        print(bot.answer(args.question, args.image, args.max_new_tokens))
        return 0
    history: list[dict[str, str]] = []
    print("zerovl chat — empty line to quit")
    while question := input("you> ").strip():
        reply = bot.answer(question, args.image, args.max_new_tokens, history)
        print(f"model> {reply}")
        first = not history and args.image
        history += [{"role": "user", "content": "<image>" * len(args.image) + question if first else question},
                    {"role": "assistant", "content": reply}]
    return 0


def _cmd_eval(args) -> int:
    from zerovl.config import EvalTaskSettings
    from zerovl.recipes.evaluate import eval_command

    fields = ("task", "data", "annotations", "image_root", "name", "metric", "prompt", "circular", "split",
              "rerank_k")
    settings = EvalTaskSettings(**{k: getattr(args, k) for k in fields if getattr(args, k) is not None})
    eval_command(args.source, settings, args.out, args.batch_size, args.max_new_tokens, args.num_beams,
                 args.max_samples, args.zero)
    return 0


def _cmd_serve(args) -> int:
    from zerovl.serving.app import ServeSettings, serve
    from zerovl.serving.media import MediaPolicy
    from zerovl.serving.protocol import Limits

    limits = Limits(max_images=args.max_images, max_tokens=args.max_tokens,
                    default_max_tokens=min(256, args.max_tokens), max_prompt_tokens=args.max_prompt_tokens)
    media = MediaPolicy(image_root=Path(args.image_root) if args.image_root else None,
                        allow_remote=args.allow_remote_images, max_image_pixels=args.max_image_pixels)
    settings = ServeSettings(api_key=args.api_key or os.environ.get("ZEROVL_API_KEY") or None,
                             model_name=args.model_name, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                             limits=limits, media=media)
    serve(args.source, args.host, args.port, args.max_batch, args.batch_wait_ms, settings)
    return 0


def _cmd_webui(args) -> int:
    from zerovl.serving.webui import launch

    launch(args.source, args.host, args.port, args.max_batch)
    return 0


def _cmd_model(args) -> int:
    from zerovl.config import load_config
    from zerovl.recipes.summary import model_summary

    print(model_summary(load_config(args.config, args.overrides)))
    return 0


def _cmd_export(args) -> int:
    from zerovl.recipes.export import export

    export(args.checkpoint, args.out_dir, adapter=args.adapter)
    print(f"exported to {args.out_dir}")
    return 0


def _cmd_plan(args) -> int:
    from zerovl.config import load_config
    from zerovl.engine.planner import Hardware, parse_size
    from zerovl.recipes.plan import run_plan

    hardware = Hardware(gpus_per_node=args.gpus, nodes=args.nodes, gpu_mem=parse_size(args.gpu_mem),
                        cpu_mem=parse_size(args.cpu_mem) if args.cpu_mem else None)
    run_plan(load_config(args.config, args.overrides), hardware, args.margin, args.images_per_sample,
             source=args.config, json_path=args.json)
    return 0


def _cmd_bench(args) -> int:
    from zerovl.recipes.bench import run_bench

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    run_bench(args.config, stages, args.steps, args.nproc, args.out, args.overrides, args.timeout)
    return 0


def _cmd_report(args) -> int:
    from zerovl.recipes.report import report

    for path in report(args.run_dir, args.out):
        print(f"wrote {path}")
    return 0


def _cmd_data(args) -> int:
    from zerovl.config import load_config
    from zerovl.recipes.data import check_data, run_prepare

    cfg = load_config(args.config, args.overrides)
    if args.data_command == "prepare":
        print(run_prepare(cfg, args.workers, args.shard_size, args.overwrite))
        return 0
    report = check_data(cfg, args.out, args.max_error_rate, check_images=not args.no_images)
    print(report.render())
    return 0 if report.passed else 1


COMMANDS = {"train": _cmd_train, "demo": _cmd_demo, "chat": _cmd_chat, "eval": _cmd_eval, "serve": _cmd_serve,
            "webui": _cmd_webui, "export": _cmd_export, "model": _cmd_model,
            "plan": _cmd_plan, "bench": _cmd_bench, "report": _cmd_report, "data": _cmd_data}


def main(argv: list[str] | None = None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return COMMANDS[args.command](args)
    except ZeroVLError as e:
        rank = int(os.environ.get("RANK", "0"))
        multi_rank = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if multi_rank and rank != 0 and isinstance(e, ConfigError):
            # config errors are usually identical on every rank: let rank 0 say it once. Exiting at
            # once would let torchrun kill rank 0 before it prints; if rank 0 has no such error, this
            # rank is still alive after the grace period and says it itself.
            time.sleep(CONFIG_ERROR_GRACE_S)
        prefix = f"[rank {rank}] " if multi_rank else ""
        print(f"zerovl: error: {prefix}{_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except RuntimeError as e:  # a DataError raised inside a DataLoader worker arrives wrapped
        if "DataError" in str(e) or "ConfigError" in str(e):
            print(f"zerovl: error: {_one_line(e)}", file=sys.stderr)
            return 1
        if any(sign in str(e) for sign in PEER_GONE):  # another rank stopped first and said why itself
            rank = os.environ.get("RANK", "0")
            print(f"zerovl: error: [rank {rank}] lost contact with another rank, which stopped first; its own "
                  "error line says why", file=sys.stderr)
            return 1
        raise


def entry() -> None:
    """Console-script entry: run ``main`` and exit with its code.

    After a multi-rank run every file is closed and the process group destroyed, so interpreter
    teardown is skipped: it is where gloo's "terminate called without an active exception" abort
    still hits a few percent of exits (pytorch #190489), turning a finished run into exit -6.
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _one_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1:  # wrapped worker traceback: the last line holds "zerovl.errors.X: message"
        last = lines[-1]
        return last.split(": ", 1)[1] if "Error: " in last else last
    return lines[0] if lines else e.__class__.__name__
