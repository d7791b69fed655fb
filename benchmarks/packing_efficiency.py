"""Share of non-padding tokens per micro-batch, plain padding vs packing (`data.packing`), on a
dataset with skewed lengths: chats whose length follows a log-normal (many short, a long tail), a
third of them with an image. Batches come from the real sampler, dataset and collate; the figure is
sum(attention_mask) / numel(input_ids) over one epoch.

    .venv/bin/python benchmarks/packing_efficiency.py [--samples 4000] [--max-length 512] [--batch 8] [--rows 4] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import AutoTokenizer

from zerovl.config import DataSettings
from zerovl.data.collate import pad_collate
from zerovl.data.dataset import ChatDataset
from zerovl.data.demo_scenes import COLOURS, SHAPES, build_tokenizer, vocabulary_words
from zerovl.data.plan import EpochPlan
from zerovl.data.readers import ReadReport, read_dataset
from zerovl.data.sampler import ResumableBatchSampler
from zerovl.data.template import ChatTemplate

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


class NoPixels:
    """Image tokens count, pixels do not: no vision processing, so the benchmark measures layout only."""

    def __call__(self, images):
        return {}


def skewed_dataset(path: Path, samples: int, max_length: int, seed: int = 0) -> Path:
    Image.new("RGB", (8, 8)).save(path.parent / "x.png")
    rng = random.Random(seed)
    words = [*COLOURS, *SHAPES, "what", "is", "the", "shape", "left", "right", "of"]
    with open(path, "w") as f:
        for _ in range(samples):
            length = int(min(max_length * 0.9, 8 + rng.lognormvariate(3.3, 0.9)))
            question = " ".join(rng.choice(words) for _ in range(max(1, length // 2)))
            answer = " ".join(rng.choice(words) for _ in range(max(1, length - length // 2)))
            image = rng.random() < 1 / 3
            f.write(json.dumps({"messages": [{"role": "user", "content": ("<image> " if image else "") + question},
                                             {"role": "assistant", "content": answer}],
                                "images": ["x.png"] if image else []}) + "\n")
    return path


def fill(dataset: ChatDataset, plan: EpochPlan, batch_size: int, pad_id: int) -> tuple[float, int, int]:
    sampler = ResumableBatchSampler(len(dataset), batch_size, plan=plan)
    real = total = batches = 0
    collate = partial(pad_collate, pad_token_id=pad_id)
    for indices in sampler:
        batch = collate([dataset[i] for i in indices])
        real += int(batch["attention_mask"].sum())
        total += batch["input_ids"].numel()
        batches += 1
    return real / total, batches, real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="samples per micro-batch without packing")
    parser.add_argument("--rows", type=int, default=4, help="packed rows per micro-batch")
    parser.add_argument("--out", default="/tmp/zerovl-packing-bench")
    parser.add_argument("--smoke", action="store_true", help=_common.SMOKE_HELP)
    args = parser.parse_args()
    if args.smoke:
        args.samples = 300
        if args.out == parser.get_default("out"):
            args.out = _common.smoke_dir("packing")
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(out / "tokenizer", vocabulary_words()))
    template = ChatTemplate(tokenizer, "<image>", tokens_per_image=64)
    path = skewed_dataset(out / "skewed.jsonl", args.samples, args.max_length)
    data = DataSettings(train=str(path), max_length=args.max_length)
    samples = read_dataset(data.train_datasets()[0], ReadReport())
    dataset = ChatDataset(samples, template, NoPixels(), args.max_length, 10**6)
    lengths = np.asarray(dataset.lengths())
    print(f"{len(dataset)} samples, tokens per sample: median {np.median(lengths):.0f}, p95 "
          f"{np.percentile(lengths, 95):.0f}, max {lengths.max()} (max_length {args.max_length})")
    plain = EpochPlan([len(dataset)], seed=0)
    packed = EpochPlan([len(dataset)], seed=0, lengths=lengths, max_length=args.max_length, packing=True)
    shares = {}
    for name, plan, batch in (("padding", plain, args.batch), ("packing", packed, args.rows)):
        share, batches, real = fill(dataset, plan, batch, tokenizer.pad_token_id)
        shares[name] = share
        print(f"{name:<8} {batch:>2} rows per micro-batch  {batches:>5} micro-batches  {real:>8,} real tokens  "
              f"non-padding share {share:6.1%}")
    rows = packed.units(0)
    print(f"packing  row fill if every row were padded to max_length: "
          f"{lengths.sum() / (len(rows) * args.max_length):.1%} ({len(rows)} rows)")
    print(f"non-padding share packing / padding: {shares['packing'] / shares['padding']:.2f}x")
    if args.smoke:
        print(_common.SMOKE_NOTE)

if __name__ == "__main__":
    main()
