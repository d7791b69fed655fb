"""``zerovl data check`` and ``zerovl data prepare``: know the training data before the first step.

``check`` reads every dataset of a config the way training would and reports, per dataset: records
read and usable; broken ones (unreadable, ``<image>`` tags that do not match the images, missing or
corrupt images) with ``file:line`` examples; samples over ``max_length`` (cut, or dropped because an
image would be cut); a token-length histogram (PNG, with the ``[plot]`` extra) and the tokens one
epoch will hold under the mixture weights. It fails when the share of broken records exceeds
``--max-error-rate``.

``prepare`` tokenizes the training data into ``data.cache_dir`` (see :mod:`zerovl.data.cache`),
in parallel and resumably. Neither loads model weights: only the tokenizer and the vision config
(for the number of image tokens) are read.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zerovl.config import Config, DatasetSpec, DataSettings
from zerovl.data.cache import PrepareResult, prepare_cache
from zerovl.data.images import image_problem
from zerovl.data.plan import mixture_counts
from zerovl.data.readers import ReadReport, dataset_keys, iter_dataset, resolve_format
from zerovl.data.samples import Sample
from zerovl.data.template import IGNORE_INDEX, ChatTemplate
from zerovl.errors import DataError
from zerovl.models.builder import text_side

log = logging.getLogger("zerovl.data")
MAX_EXAMPLES = 5


# -- the text side of the model, without weights -------------------------------------------------------
def text_template(cfg: Config) -> ChatTemplate:
    """The chat template from configs alone; training checks a cache against the real model's figures,
    so a mismatch cannot slip by."""
    tokenizer, tokens_per_image, image_token, image_text = text_side(cfg.model, cfg.data.max_pixels)
    return ChatTemplate(tokenizer, image_token, tokens_per_image, cfg.data.system_prompt, image_text)


# -- prepare -------------------------------------------------------------------------------------------
def prepare_data(cfg: Config, workers: int = 1, shard_size: int = 10_000, overwrite: bool = False) -> PrepareResult:
    template = text_template(cfg)
    return prepare_cache(cfg.data, template, cfg.model.tokenizer_path, cfg.model.has_vision, workers,
                         shard_size, overwrite)


def run_prepare(cfg: Config, workers: int = 1, shard_size: int = 10_000, overwrite: bool = False) -> str:
    """``zerovl data prepare``: the token cache (``data.cache_dir``) and/or the frozen-feature cache
    (``data.feature_cache``, which loads the model's weights); what was done, one line each."""
    if cfg.data.cache_dir is None and cfg.data.feature_cache is None:
        raise DataError("set data.cache_dir (pre-tokenized shards) and/or data.feature_cache (frozen image "
                        "features) to run data prepare")
    lines = []
    if cfg.data.cache_dir is not None:
        lines.append(describe_prepare(prepare_data(cfg, workers, shard_size, overwrite), cfg.data.cache_dir))
    if cfg.data.feature_cache is not None:
        from zerovl.recipes.features import prepare_features

        done = prepare_features(cfg, overwrite)
        lines.append(f"prepared frozen features of {done['images']} images in "
                     f"{done['shards_written'] + done['shards_reused']} shards ({done['shards_reused']} already "
                     f"complete) in {done['seconds']:.1f} s -> {cfg.data.feature_cache}")
    return "\n".join(lines)


def describe_prepare(result: PrepareResult, cache_dir: str) -> str:
    dropped = f", dropped {dict(result.dropped)}" if result.dropped else ""
    return (f"prepared {result.samples} samples in {result.shards_written + result.shards_reused} shards "
            f"({result.shards_reused} already complete) in {result.seconds:.1f} s = {result.samples_per_s:,.0f} "
            f"samples/s{dropped} -> {cache_dir}")


# -- check ---------------------------------------------------------------------------------------------
@dataclass
class DatasetCheck:
    name: str
    split: str
    format: str
    path: str
    weight: float = 1.0
    records: int = 0
    usable: int = 0
    errors: Counter = field(default_factory=Counter)
    over_max_length: Counter = field(default_factory=Counter)  # truncated | image_tokens_cut | no_supervised_tokens
    examples: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # full (uncut) token lengths of readable samples
    text_tokens: int = 0  # in the kept samples, after cutting to max_length
    image_tokens: int = 0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def kept(self) -> int:
        return self.usable - self.over_max_length["image_tokens_cut"] - self.over_max_length["no_supervised_tokens"]

    def error(self, kind: str, message: str) -> None:
        self.errors[kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(message)


@dataclass
class CheckReport:
    datasets: list[DatasetCheck]
    max_length: int
    max_error_rate: float
    samples_per_epoch: int = 0
    text_tokens_per_epoch: int = 0
    image_tokens_per_epoch: int = 0
    histogram_png: str | None = None
    report_json: str | None = None

    @property
    def records(self) -> int:
        return sum(d.records for d in self.datasets)

    @property
    def errors(self) -> int:
        return sum(d.error_count for d in self.datasets)

    @property
    def error_rate(self) -> float:
        return self.errors / max(self.records, 1)

    @property
    def passed(self) -> bool:
        return self.error_rate <= self.max_error_rate

    def render(self) -> str:
        rows = [f"{'dataset':<28} {'split':<5} {'format':<12} {'records':>8} {'errors':>14} {'>max_len':>9} "
                f"{'mean tok':>9} {'max tok':>8}"]
        for d in self.datasets:
            rate = d.error_count / max(d.records, 1)
            over = sum(d.over_max_length.values())
            mean = f"{np.mean(d.lengths):.1f}" if d.lengths else "-"
            top = f"{max(d.lengths)}" if d.lengths else "-"
            rows.append(f"{d.name[:28]:<28} {d.split:<5} {d.format:<12} {d.records:>8} "
                        f"{f'{d.error_count} ({rate:.1%})':>14} {over:>9} {mean:>9} {top:>8}")
        lines = rows
        for d in self.datasets:
            if d.errors or d.over_max_length:
                kinds = ", ".join(f"{k} {v}" for k, v in sorted(d.errors.items()))
                over = ", ".join(f"{k} {v}" for k, v in sorted(d.over_max_length.items()))
                lines.append(f"{d.name}: errors: {kinds or 'none'}; over max_length={self.max_length}: {over or 'none'}")
                lines += [f"  e.g. {e}" for e in d.examples]
        lines.append(f"tokens per epoch (train, mixture weights applied): "
                     f"{self.text_tokens_per_epoch + self.image_tokens_per_epoch:,} = text "
                     f"{self.text_tokens_per_epoch:,} + image {self.image_tokens_per_epoch:,} over "
                     f"{self.samples_per_epoch:,} samples")
        if self.histogram_png:
            lines.append(f"token-length histogram: {self.histogram_png}")
        if self.report_json:
            lines.append(f"full report: {self.report_json}")
        verdict = "OK" if self.passed else "FAILED"
        lines.append(f"{verdict}: {self.errors} broken of {self.records} records = {self.error_rate:.2%} "
                     f"({'<=' if self.passed else '>'} --max-error-rate {self.max_error_rate:.2%})")
        return "\n".join(lines)


def _image_sources(sample: Sample) -> list[tuple[str, bytes | None]]:
    data = sample.meta.get("image_bytes")
    return list(zip(sample.images, data)) if data is not None else [(p, None) for p in sample.images]


def check_dataset(spec: DatasetSpec, split: str, template: ChatTemplate, data: DataSettings, has_vision: bool,
                  check_images: bool = True, key: str | None = None) -> DatasetCheck:
    """Read one dataset like training would, recording every problem instead of stopping at it."""
    spec = resolve_format(spec, key)  # the table shows what auto chose
    result = DatasetCheck(spec.label, split, spec.format, spec.path, spec.weight)
    report = ReadReport(skip_bad=True, key=key)
    seen: dict[str, str | None] = {}
    for sample in iter_dataset(spec, report):
        result.records += 1
        if check_images:
            problems = []
            for name, blob in _image_sources(sample):
                if name not in seen:
                    seen[name] = image_problem(None if blob is not None else name, blob)
                if seen[name]:
                    problems.append((seen[name], name))
            if problems:
                kind, name = problems[0]
                result.error(kind, f"{sample.source}: image {name} {'not found' if kind == 'missing_image' else 'cannot be read'}")
                continue
        if sample.images and not has_vision:
            result.error("no_vision_tower", f"{sample.source}: sample has images but the model has no vision tower")
            continue
        try:
            enc = template.encode(sample)
        except DataError as e:
            result.error("template", str(e))
            continue
        result.usable += 1
        length = len(enc.input_ids)
        result.lengths.append(length)
        ids, labels = enc.input_ids[: data.max_length], enc.labels[: data.max_length]
        if length > data.max_length:
            if template.image_token_id in enc.input_ids[data.max_length:]:
                reason = "image_tokens_cut"
            elif all(lab == IGNORE_INDEX for lab in labels):
                reason = "no_supervised_tokens"
            else:
                reason = "truncated"
            result.over_max_length[reason] += 1
            if reason == "image_tokens_cut" and data.too_long == "error":
                result.error("too_long", f"{sample.source}: data.max_length={data.max_length} would cut its image tokens")
            if reason != "truncated":
                continue
        images = sum(1 for t in ids if t == template.image_token_id)
        result.image_tokens += images
        result.text_tokens += len(ids) - images
    for kind, count in report.counts.items():
        result.errors[kind] += count
    result.records += report.skipped
    result.examples = (report.examples + result.examples)[:MAX_EXAMPLES]
    return result


def save_histogram(checks: list[DatasetCheck], max_length: int, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("no token-length histogram: matplotlib is missing (pip install 'zerovl[plot]')")
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    top = max([max(c.lengths) for c in checks if c.lengths] + [max_length])
    bins = np.linspace(0, top + 1, 60)
    for c in checks:
        if c.lengths:
            ax.hist(c.lengths, bins=bins, histtype="step", linewidth=1.5, label=f"{c.name} ({c.split})")
    ax.axvline(max_length, color="black", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per sample (text + image)")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def check_pair_dataset(spec: DatasetSpec, split: str, tokenizer, max_text_length: int, check_images: bool = True,
                       key: str | None = None) -> DatasetCheck:
    """A retrieval model's image-caption file: every pair needs one readable image and a caption; captions
    longer than ``model.retrieval.max_text_length`` tokens are counted as truncated."""
    spec = resolve_format(spec, key)
    result = DatasetCheck(spec.label, split, spec.format, spec.path, spec.weight)
    report = ReadReport(skip_bad=True, key=key)
    seen: dict[str, str | None] = {}
    for sample in iter_dataset(spec, report):
        result.records += 1
        if len(sample.images) != 1:
            result.error("not_a_pair", f"{sample.source}: {len(sample.images)} images; a pair has exactly one")
            continue
        name = sample.images[0]
        if check_images and name not in seen:
            seen[name] = image_problem(name)
        if check_images and seen[name]:
            result.error(seen[name], f"{sample.source}: image {name} "
                         f"{'not found' if seen[name] == 'missing_image' else 'cannot be read'}")
            continue
        result.usable += 1
        length = len(tokenizer(sample.messages[-1]["content"])["input_ids"])
        result.lengths.append(length)
        if length > max_text_length:
            result.over_max_length["truncated"] += 1
        result.text_tokens += min(length, max_text_length)
    for kind, count in report.counts.items():
        result.errors[kind] += count
    result.records += report.skipped
    result.examples = (report.examples + result.examples)[:MAX_EXAMPLES]
    return result


def check_data(cfg: Config, out_dir: str | None = None, max_error_rate: float = 0.0,
               check_images: bool = True) -> CheckReport:
    data = cfg.data
    if cfg.model.retrieval is not None:  # image-caption pairs; their length limit is the caption's
        from zerovl.models.builder import load_tokenizer

        tokenizer, limit = load_tokenizer(cfg.model), cfg.model.retrieval.max_text_length
        checks = [check_pair_dataset(spec, "train", tokenizer, limit, check_images, key)
                  for spec, key in zip(data.train_datasets(), dataset_keys(data))]
        if data.val:
            checks.append(check_pair_dataset(data.val_dataset(data.val), "val", tokenizer, limit, check_images,
                                             "data.val"))
    else:
        template, has_vision, limit = text_template(cfg), cfg.model.has_vision, data.max_length
        checks = [check_dataset(spec, "train", template, data, has_vision, check_images, key)
                  for spec, key in zip(data.train_datasets(), dataset_keys(data))]
        if data.val:
            checks.append(check_dataset(data.val_dataset(data.val), "val", template, data, has_vision,
                                        check_images, "data.val"))
    report = CheckReport(checks, limit, max_error_rate)
    train = [c for c in checks if c.split == "train"]
    counts = mixture_counts([c.kept for c in train], [c.weight for c in train]) if any(c.kept for c in train) \
        else [0] * len(train)
    for c, n in zip(train, counts):
        report.samples_per_epoch += n
        report.text_tokens_per_epoch += round(n * c.text_tokens / max(c.kept, 1))
        report.image_tokens_per_epoch += round(n * c.image_tokens / max(c.kept, 1))
    out = Path(out_dir or Path(cfg.train.output_dir) / "data_check")
    out.mkdir(parents=True, exist_ok=True)
    report.histogram_png = save_histogram(checks, limit, out / "token_lengths.png")
    report.report_json = str(out / "data_check.json")
    Path(report.report_json).write_text(json.dumps(_as_json(report), indent=1))
    return report


def _as_json(report: CheckReport) -> dict[str, Any]:
    body = {k: v for k, v in vars(report).items() if k != "datasets"}
    body["datasets"] = []
    for check in report.datasets:
        d = {k: dict(v) if isinstance(v, Counter) else v for k, v in vars(check).items()}  # asdict breaks Counters
        body["datasets"].append(d)
        lengths = np.asarray(check.lengths or [0])
        d["lengths"] = {"count": len(check.lengths), "mean": float(lengths.mean()), "p50": float(np.percentile(lengths, 50)),
                        "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max())}
        d["kept"] = check.kept
    body.update(records=report.records, errors=report.errors, error_rate=report.error_rate, passed=report.passed)
    return body
