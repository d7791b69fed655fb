"""Command line: parse arguments, call a recipe. No logic lives here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from zerovl.errors import ConfigError, ZeroVLError


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zerovl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("export", help="consolidate a checkpoint into HF safetensors directories")
    p.add_argument("checkpoint", help="RUN_DIR (newest complete checkpoint) or RUN_DIR/checkpoints/step_N")
    p.add_argument("out_dir")
    p.add_argument("--adapter", action="store_true", help="write the LLM's LoRA as a peft adapter, unmerged")
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


def _cmd_export(args) -> int:
    from zerovl.recipes.export import export

    export(args.checkpoint, args.out_dir, adapter=args.adapter)
    print(f"exported to {args.out_dir}")
    return 0


COMMANDS = {"train": _cmd_train, "demo": _cmd_demo, "chat": _cmd_chat, "export": _cmd_export}


def main(argv: list[str] | None = None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return COMMANDS[args.command](args)
    except ZeroVLError as e:
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or not isinstance(e, ConfigError):  # config errors are identical on every rank
            prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            print(f"zerovl: error: {prefix}{_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except RuntimeError as e:  # a DataError raised inside a DataLoader worker arrives wrapped
        if "DataError" in str(e) or "ConfigError" in str(e):
            print(f"zerovl: error: {_one_line(e)}", file=sys.stderr)
            return 1
        raise


def _one_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1:  # wrapped worker traceback: the last line holds "zerovl.errors.X: message"
        last = lines[-1]
        return last.split(": ", 1)[1] if "Error: " in last else last
    return lines[0] if lines else e.__class__.__name__
