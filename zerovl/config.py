"""The one typed schema behind every run: ``model``, ``data``, ``train``, ``deepspeed``, ``eval``.

A YAML file is loaded, ``key=value`` overrides from the command line are applied on top, and the
result is validated here once. Every mistake becomes a :class:`~zerovl.errors.ConfigError` with one
line naming the dotted key and, for unknown keys, the nearest valid one — users should never meet a
pydantic traceback.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from zerovl import config_aliases
from zerovl.errors import ConfigError

PartMode = Literal["frozen", "full", "lora"]
PRESET_NAMES = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class LoraSettings(_Strict):
    """peft LoRA hyper-parameters for one part."""

    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class VisionSettings(_Strict):
    """The vision tower: any HF vision encoder (SigLIP, CLIP vision, BLIP-2 vision)."""

    path: str | None = None
    config: dict[str, Any] | None = None
    image_processor: dict[str, Any] | None = None
    feature_layer: int = -1
    drop_cls: Literal["auto"] | bool = "auto"
    mode: PartMode = "frozen"
    lr: float | None = Field(None, gt=0)
    lora: LoraSettings = LoraSettings()
    gradient_checkpointing: bool = False


class ConnectorSettings(_Strict):
    """Maps vision features to LLM embeddings; fixes the number of image tokens per image."""

    type: Literal["linear", "mlp", "qformer"] = "mlp"
    path: str | None = Field(None, description="qformer: a BLIP-2 directory to load the Q-Former and queries from")
    mlp_depth: int = Field(2, ge=1)
    num_query_tokens: int = Field(32, gt=0)
    qformer: dict[str, Any] = Field(default_factory=dict)
    mode: Literal["frozen", "full", "projection", "lora"] = Field(
        "full", description="projection: only the final projection into the LLM trains (MiniGPT4Qwen); "
        "lora (model.retrieval only): LoRA on the Q-Former, its heads fully trained")
    lr: float | None = Field(None, gt=0)
    lora: LoraSettings = LoraSettings()

    @model_validator(mode="after")
    def _path_needs_qformer(self) -> ConnectorSettings:
        if self.path is not None and self.type != "qformer":
            raise ValueError("path loads a BLIP-2 Q-Former; set type: qformer (linear/mlp start from random init)")
        return self


class LLMSettings(_Strict):
    """Any HF causal LM loadable with ``AutoModelForCausalLM``."""

    path: str | None = None
    config: dict[str, Any] | None = None
    mode: PartMode = "full"
    lr: float | None = Field(None, gt=0)
    lora: LoraSettings = LoraSettings()
    gradient_checkpointing: bool = False
    trust_remote_code: bool = Field(False, description="run the Python code the directory ships (auto_map: "
                                    "Qwen-7B-Chat, ChatGLM3); only for directories you trust")


class NativeSettings(_Strict):
    """A ready HF vision-language model (Qwen2-VL, Qwen2.5-VL) loaded with transformers'
    image-text-to-text auto class; model.vision / connector / llm then only set per-part training
    modes, mapped onto its vision blocks, its merger and its language model."""

    path: str | None = None
    config: dict[str, Any] | None = None
    min_pixels: int | None = Field(None, gt=0, description="dynamic resolution: images are resized into [min, "
                                   "max] pixels; unset = the model directory's preprocessor_config.json value")
    max_pixels: int | None = Field(None, gt=0, description="unset = the directory's value (Qwen2-VL ships 12845056)")

    @model_validator(mode="after")
    def _pixel_range(self) -> NativeSettings:
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        return self


class RetrievalSettings(_Strict):
    """BLIP-2 image-text matching (stage 1): vision tower, Q-Former with its text side, ITC projections
    and temperature, ITM head — a transformers ``Blip2ForImageTextRetrieval`` directory or an inline
    ``Blip2Config`` (random init). model.vision / model.connector then only set the per-part training
    mode, lr and LoRA: vision = the tower, connector = the Q-Former, its queries and heads."""

    path: str | None = None
    config: dict[str, Any] | None = None
    image_processor: dict[str, Any] | None = Field(None, description="inline config: BlipImageProcessor options "
                                                   "(default: resize to the tower's image_size)")
    itc_weight: float = Field(1.0, ge=0, description="image-text contrastive loss weight")
    itm_weight: float = Field(1.0, ge=0, description="image-text matching loss weight (hard negatives from ITC)")
    itg_weight: float = Field(0.0, ge=0, description="image-grounded text generation through the Q-Former "
                              "(a causal text head BLIP-2 adds); 0 = off")
    temperature: float = Field(0.07, gt=0, description="initial ITC temperature (learned, kept in [0.001, 0.5])")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="ITC cross-entropy label smoothing (BLIP-2: 0.1)")
    max_text_length: int = Field(32, gt=1, description="caption tokens (BLIP-2 max_txt_len: 32)")

    @model_validator(mode="after")
    def _some_loss(self) -> RetrievalSettings:
        if self.itc_weight + self.itm_weight + self.itg_weight == 0:
            raise ValueError("itc_weight, itm_weight and itg_weight are all 0: nothing to train")
        return self


def _one_source(part: str, settings: Any) -> None:
    if (settings.path is None) == (settings.config is None):
        raise ValueError(f"model.{part}: give exactly one of path (a local HF directory) or config "
                         "(inline, random init)")


class ModelSettings(_Strict):
    native: NativeSettings | None = None
    retrieval: RetrievalSettings | None = None
    vision: VisionSettings | None = None
    connector: ConnectorSettings = ConnectorSettings()
    llm: LLMSettings = LLMSettings()
    tokenizer: str | None = Field(None, description="tokenizer directory; defaults to llm.path (or native.path)")
    tokenizer_trust_remote_code: bool | None = Field(
        None, description="run the tokenizer directory's own code (QWenTokenizer, ChatGLMTokenizer); unset = as "
        "model.llm when the tokenizer is model.llm's directory, else false")
    image_token: str = Field("<image>", description="added to the tokenizer; one that cannot add tokens "
                             "(tiktoken) lends a reserved special token instead, e.g. Qwen's <|extra_0|>")

    @property
    def tokenizer_path(self) -> str:
        if self.tokenizer is not None:
            return self.tokenizer
        if self.retrieval is not None:
            return self.retrieval.path
        return self.native.path if self.native is not None else self.llm.path

    @property
    def tokenizer_trusts_code(self) -> bool:
        if self.tokenizer_trust_remote_code is not None:
            return self.tokenizer_trust_remote_code
        if self.retrieval is not None:
            return False  # BLIP-2 ships BERT's tokenizer, transformers' own class
        part = self.native if self.native is not None else self.llm
        if self.tokenizer is not None and os.path.normpath(self.tokenizer) != os.path.normpath(part.path or ""):
            return False  # another directory: its code is trusted only when said so
        return getattr(part, "trust_remote_code", False)  # native models are transformers' own classes

    @property
    def has_vision(self) -> bool:
        return self.vision is not None or self.native is not None or self.retrieval is not None

    @model_validator(mode="after")
    def _sources(self) -> ModelSettings:
        if self.connector.mode == "lora" and self.retrieval is None:
            raise ValueError("model.connector.mode=lora applies to model.retrieval's Q-Former; composed models "
                             "train their connector full, frozen or projection-only")
        if self.retrieval is not None:
            if self.native is not None:
                raise ValueError("model.retrieval and model.native are two model kinds: give one")
            _one_source("retrieval", self.retrieval)
            for part in ("vision", "llm"):
                settings = getattr(self, part)
                if settings is not None and (settings.path or settings.config):
                    raise ValueError(f"model.{part}.path/config: with model.retrieval the parts come from the "
                                     f"BLIP-2 model; model.{part} only sets mode, lr and lora"
                                     if part == "vision" else "model.llm: a retrieval model has no LLM; remove "
                                     "model.llm")
            if self.connector.path is not None or self.connector.mode == "projection":
                raise ValueError("model.connector: with model.retrieval it is the BLIP-2 Q-Former; only mode "
                                 "(frozen, full, lora), lr and lora apply")
            if self.tokenizer is None and self.retrieval.path is None:
                raise ValueError("model.tokenizer is required when the retrieval model is built from an inline "
                                 "config (a BERT-style tokenizer directory)")
            return self
        if self.native is not None:
            _one_source("native", self.native)
            for part in ("vision", "llm"):
                settings = getattr(self, part)
                if settings is not None and (settings.path or settings.config):
                    raise ValueError(f"model.{part}.path/config: with model.native the parts come from the native "
                                     f"model; model.{part} only sets mode, lr, lora and gradient_checkpointing")
            if self.connector.path is not None:
                raise ValueError("model.connector.path: with model.native the merger comes from the native model")
            if self.tokenizer is None and self.native.path is None:
                raise ValueError("model.tokenizer is required when the native model is built from an inline config")
            return self
        _one_source("llm", self.llm)
        if self.vision is not None:
            _one_source("vision", self.vision)
        if self.tokenizer is None and self.llm.path is None:
            raise ValueError("model.tokenizer is required when the LLM is built from an inline config")
        return self


DataFormat = Literal["auto", "messages", "llava", "sharegpt", "alpaca", "swift", "minigpt4qwen", "captions", "coco",
                     "karpathy", "csv", "tsv", "webdataset", "dataset_info"]
SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")


def _local_path(value: str | None) -> str | None:
    """Absolute path for local files (so a run directory is self-contained); URLs stay as they are."""
    if value is None or "://" in value or value.startswith("pipe:"):
        return value
    return os.path.abspath(os.path.expanduser(value))


class ReaderOptions(_Strict):
    """How records of a file become chats; set on ``data`` (for every dataset) or per dataset."""

    image_root: str | None = Field(None, description="image paths are relative to this (default: the data file's directory)")
    caption_prompts: list[str] | None = Field(
        None, description="coco/csv/tsv/webdataset captions: user prompts, one picked per record by a hash of "
        "its id; '<image>' marks where the image goes (prepended when absent)")
    image_column: str = Field("image", description="csv/tsv: column with the image path (or a JSON list of paths)")
    text_column: str = Field("text", description="csv/tsv: column with the target text (the assistant reply)")
    prompt_column: str | None = Field(None, description="csv/tsv: column with the user prompt; default: caption_prompts")
    split: str | None = Field(None, description="karpathy: the split of dataset_coco.json / dataset_flickr30k.json "
                              "to read (train also takes restval); default: every image")

    @field_validator("image_root")
    @classmethod
    def _absolute_root(cls, value: str | None) -> str | None:
        return _local_path(value)

    @field_validator("caption_prompts")
    @classmethod
    def _some_prompts(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("give at least one prompt, or leave caption_prompts unset for the defaults")
        return value


class DatasetSpec(ReaderOptions):
    """One member of a training mixture; reader options left unset are taken from ``data``."""

    path: str = Field(description="data file, webdataset shards (brace pattern, e.g. shards/{000..099}.tar), or a "
                      "LLaMA-Factory dataset_info.json (or its folder) with #NAME[,NAME...]")
    format: DataFormat = Field("auto", description="auto: told from the file's content (logged)")
    weight: float = Field(1.0, gt=0, description="relative sampling probability in the mixture")
    name: str | None = Field(None, description="label in logs and reports; default: the file name")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, raw: Any) -> Any:
        # list items lose the nearest-key hint of the generic error path; give it here
        unknown = sorted(set(raw) - set(cls.model_fields)) if isinstance(raw, dict) else []
        if unknown:
            near = difflib.get_close_matches(unknown[0], list(cls.model_fields), n=1, cutoff=0.5)
            hint = f" (did you mean {near[0]}?)" if near else f" (known: {', '.join(cls.model_fields)})"
            raise ValueError(f"unknown key '{unknown[0]}' in a dataset entry{hint}")
        return raw

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        return _local_path(value)

    @field_validator("format")
    @classmethod
    def _shards_stream(cls, value: str, info: Any) -> str:
        # tar shards are told by their path, so the streamed-source checks below see them before any read
        if value == "auto" and str(info.data.get("path", "")).endswith(SHARD_SUFFIXES):
            return "webdataset"
        return value

    @property
    def label(self) -> str:
        return self.name or os.path.basename(self.path)


class DataSettings(ReaderOptions):
    """Training data: ``train`` (one file) or ``datasets`` (a weighted mixture, each entry may override the
    reader options given here), ``val`` (read with ``format`` and the options here), and how samples
    become batches (``max_length``, ``packing``, ``balance``, the prepared ``cache_dir``)."""

    train: str | None = Field(None, description="one training file (shorthand for a one-entry data.datasets)")
    val: str | None = None
    datasets: list[DatasetSpec] = Field(default_factory=list, description="training mixture with weights")
    format: DataFormat = Field("auto", description="format of data.train and data.val; auto: told from each "
                               "file's content (logged)")
    max_length: int = Field(2048, gt=0)
    max_pixels: int = Field(1024 * 1024, gt=0)
    too_long: Literal["drop", "error"] = Field(
        "drop", description="samples whose image tokens would be cut by max_length"
    )
    skip_bad_samples: bool = False
    system_prompt: str | None = None
    num_workers: int = Field(2, ge=0)
    shuffle: bool = True
    packing: bool = Field(False, description="pack several samples per row up to max_length, kept apart by "
                          "position ids restarting at 0 (block-diagonal causal attention)")
    balance: bool = Field(False, description="spread each step's samples over ranks by cost "
                          "(text + image tokens) so no rank waits for a heavy one")
    cache_dir: str | None = Field(None, description="pre-tokenized train set written by `zerovl data prepare`; "
                                  "used when its fingerprint matches, refused when stale")
    feature_cache: str | None = Field(
        None, description="frozen-feature cache: with a frozen vision tower (and a frozen Q-Former/MLP before a "
        "trained projection) their output per image is computed once, stored here and read in training instead "
        "of pixels; built by training or `zerovl data prepare` when missing, refused when stale")

    @field_validator("cache_dir", "feature_cache")
    @classmethod
    def _absolute_cache(cls, value: str | None) -> str | None:
        return _local_path(value)

    @model_validator(mode="after")
    def _one_train_source(self) -> DataSettings:
        if (self.train is None) == (not self.datasets):
            raise ValueError("give data.train (one dataset) or data.datasets (a weighted mixture), exactly one")
        streamed = [d for d in self.train_datasets() if d.format == "webdataset"]
        if streamed and len(self.train_datasets()) > 1:
            raise ValueError("a webdataset source is streamed and cannot be mixed with other datasets; list all "
                             "its shards in one path (e.g. shards/{000..099}.tar)")
        if streamed and (self.packing or self.balance or self.cache_dir or self.feature_cache):
            raise ValueError("data.packing, data.balance, data.cache_dir and data.feature_cache need a map-style "
                             "format; webdataset "
                             "shards are streamed and tokenized on the fly")
        return self

    def _resolved(self, spec: DatasetSpec) -> DatasetSpec:
        inherited = {k: getattr(self, k) for k in ReaderOptions.model_fields if k not in spec.model_fields_set}
        return spec.model_copy(update=inherited)

    def train_datasets(self) -> list[DatasetSpec]:
        """The training sources with every reader option filled in (``data.train`` as a one-entry mixture)."""
        if self.train is not None:
            return [self.val_dataset(self.train)]
        return [self._resolved(spec) for spec in self.datasets]

    def val_dataset(self, path: str) -> DatasetSpec:
        """A single file read with the data-level format and reader options."""
        options = {k: getattr(self, k) for k in ReaderOptions.model_fields}
        return DatasetSpec(path=path, format=self.format, **options)


class TrainSettings(_Strict):
    output_dir: str = "runs/default"
    max_steps: int | None = Field(None, gt=0)
    stop_after_steps: int | None = Field(
        None, gt=0, description="end this invocation at this step (saving a checkpoint) without changing "
        "the schedule; for time-boxed jobs that resume later")
    epochs: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(1, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    loss_normalization: Literal["tokens", "samples"] = Field(
        "tokens", description="tokens: a step's loss is the sum of its per-token losses over every micro-batch "
        "and rank divided by its supervised tokens, whatever the batch split; samples: each micro-batch's own "
        "token mean, averaged equally (long and short micro-batches weigh the same)")
    loss_chunk_tokens: int = Field(1024, ge=0, description="supervised tokens per chunk of the LM head and its "
                                   "cross-entropy, so the [tokens x vocab] logits never exist whole; 0 = "
                                   "transformers' plain path")
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    seed: int = 42
    save_every: int = Field(0, ge=0)
    keep_last: int = Field(2, ge=1)
    save_final: bool = Field(True, description="checkpoint at the end of the run (benchmarks turn it off)")
    resume: str = Field("auto", description="auto | none | path to a checkpoint directory")
    log_every: int = Field(1, gt=0)
    eval_every: int = Field(0, ge=0)
    keep_best: str | None = Field(None, description="<task name>/<metric> of eval.tasks (or loss for val loss): "
                                  "the checkpoint where it was best stays out of the keep_last rotation")
    tensorboard: bool = False
    peak_tflops: float | None = Field(None, gt=0, description="device peak for MFU when not auto-detected")
    dist_timeout_s: float = Field(
        1800.0, gt=0, description="seconds the ranks may take to meet at start and to reach each collective; "
        "raise it when one rank does slow start-up work (data preparation) while the others wait")

    @model_validator(mode="after")
    def _lr_order(self) -> TrainSettings:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


EVAL_TASKS = ("vqa", "caption", "mcq", "loss", "open", "retrieval")


class EvalTaskSettings(_Strict):
    """One benchmark run at ``train.eval_every`` (and by ``zerovl eval`` with the same options)."""

    task: Literal["vqa", "caption", "mcq", "loss", "open", "retrieval"]
    data: str = Field(description="the task's file: VQAv2 questions JSON, COCO captions JSON, MMBench TSV, "
                      "Karpathy-split JSON, image-caption CSV, or JSON/JSONL")
    split: str | None = Field(None, description="retrieval: the split of a Karpathy dataset_*.json (default test)")
    rerank_k: int = Field(128, ge=0, description="retrieval: candidates per query re-ranked by the ITM head "
                          "(LAVIS k_test); 0 = ITC similarity only")
    annotations: str | None = Field(None, description="VQAv2 layout: the annotations JSON beside the questions")
    image_root: str | None = None
    name: str | None = Field(None, description="logged as val/<name>/<metric>; defaults to the task")
    metric: str | None = Field(None, description="vqa: vqa (soft accuracy, default) or exact (GQA-style)")
    prompt: str | None = Field(None, description="vqa: suffix after the question; caption/open: the prompt")
    circular: bool = Field(False, description="mcq: rotate the options; a question counts when every rotation is right")
    max_samples: int | None = Field(None, gt=0)
    max_new_tokens: int | None = Field(None, gt=0)
    num_beams: int | None = Field(None, gt=0)

    @property
    def label(self) -> str:
        return self.name or self.task


class EvalSettings(_Strict):
    exact_match: bool = Field(False, description="generate answers on val and score exact match")
    max_new_tokens: int | None = Field(None, gt=0, description="default: exact_match 16; each task its own "
                                       "(vqa and mcq 16, caption 32, open 128)")
    num_beams: int = Field(1, gt=0)
    batch_size: int = Field(16, gt=0)
    max_samples: int | None = Field(None, gt=0)
    tasks: list[EvalTaskSettings] = Field(default_factory=list, description="benchmarks run at train.eval_every "
                                          "through the code of `zerovl eval`")

    @model_validator(mode="after")
    def _unique_labels(self) -> EvalSettings:
        labels = [t.label for t in self.tasks]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"two eval.tasks are both named '{twice[0]}': give each a distinct name")
        return self


class Config(_Strict):
    model: ModelSettings
    data: DataSettings
    train: TrainSettings = TrainSettings()
    deepspeed: str | dict[str, Any] = "zero2"
    eval: EvalSettings = EvalSettings()

    @model_validator(mode="after")
    def _retrieval_training(self) -> Config:
        """Image-text matching has no supervised tokens: each micro-batch's loss is its own mean."""
        if self.model.retrieval is None:
            return self
        if "loss_normalization" in self.train.model_fields_set and self.train.loss_normalization == "tokens":
            raise ValueError("train.loss_normalization=tokens: model.retrieval has no supervised tokens; use samples")
        self.train.loss_normalization = "samples"
        d = self.data
        for key in ("packing", "balance", "cache_dir", "feature_cache"):
            if getattr(d, key):
                raise ValueError(f"data.{key}: not used by model.retrieval (image-caption pairs); unset it")
        if any(s.format == "webdataset" for s in d.train_datasets()):
            raise ValueError("model.retrieval reads map-style image-caption files (coco, karpathy, csv, captions), "
                             "not webdataset shards")
        return self

    @model_validator(mode="after")
    def _keep_best_names_a_task(self) -> Config:
        best = self.train.keep_best
        if best is None:
            return self
        labels = [t.label for t in self.eval.tasks]
        if best != "loss" and (best.count("/") != 1 or best.split("/")[0] not in labels):
            choices = ", ".join([f"{x}/<metric>" for x in labels] + ["loss"])
            raise ValueError(f"train.keep_best '{best}' names no eval task: use one of {choices}")
        if not self.train.eval_every:
            raise ValueError("train.keep_best needs train.eval_every > 0 (the best is judged at each evaluation)")
        return self

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_source(cls, ds: str | dict[str, Any]) -> str | dict[str, Any]:
        if isinstance(ds, str) and ds not in PRESET_NAMES and not ds.endswith(".json"):
            near = difflib.get_close_matches(ds, PRESET_NAMES, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ValueError(f"'{ds}' is neither a preset ({', '.join(PRESET_NAMES)}) nor a .json path{hint}")
        return ds


# Fields holding filesystem paths; made absolute at load time so a run directory is self-contained.
_PATH_FIELDS = (
    ("model", "vision", "path"),
    ("model", "connector", "path"),
    ("model", "native", "path"),
    ("model", "retrieval", "path"),
    ("model", "llm", "path"),
    ("model", "tokenizer"),
    ("data", "train"),
    ("data", "val"),
    ("data", "image_root"),
    ("train", "output_dir"),
)


def valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """All dotted keys of the schema (free-form dict fields count as leaves)."""
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        for sub in _submodels(field.annotation):
            keys.extend(valid_keys(sub, dotted + "."))
    return keys


def _submodels(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) is not None:
        return [m for a in get_args(annotation) for m in _submodels(a)]
    return []


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.max_steps=5`` -> (["train", "max_steps"], 5); values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. train.max_steps=5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        config_aliases.drop_other_spellings(raw, ".".join(parts))  # the command line wins, however spelled
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                here = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override '{item}': {here} is {child!r}, not a mapping; "
                    f"set {here} to an inline mapping (or a JSON file) to change its keys"
                )
            node = child
        node[parts[-1]] = value
    return raw


def _format_error(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
    # pydantic puts union member names (e.g. 'str', 'dict[str,any]') into loc; keep schema keys only
    key_parts = []
    model: Any = Config
    for part in loc:
        if part.isdigit() and key_parts:  # an index into a list of sections, e.g. data.datasets.0.weight
            key_parts.append(part)
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None:
            if part.isdigit() or not key_parts:
                key_parts.append(part)
            continue
        if part in fields:
            key_parts.append(part)
            subs = _submodels(fields[part].annotation)
            model = subs[0] if subs else None
        elif err["type"] == "extra_forbidden":
            key_parts.append(part)
            break
    key = ".".join(key_parts) or "config"
    if err["type"] == "extra_forbidden":
        near = config_aliases.suggest(key, valid_keys())
        hint = f" (did you mean {near}?)" if near else ""
        return f"unknown key {key}{hint}"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    msg = err["msg"].replace("Value error, ", "")
    got = err.get("input")
    shown = f", got {got!r}" if not isinstance(got, dict) and got is not None and repr(got) not in msg else ""
    return f"{key}: {msg}{shown}"


def _absolutize(data: dict[str, Any]) -> None:
    for path in _PATH_FIELDS:
        node: Any = data
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(path[-1]), str):
            node[path[-1]] = os.path.abspath(os.path.expanduser(node[path[-1]]))
    tasks = (data.get("eval") or {}).get("tasks") if isinstance(data.get("eval"), dict) else None
    for task in tasks if isinstance(tasks, list) else []:
        for key in ("data", "annotations", "image_root"):
            if isinstance(task, dict) and isinstance(task.get(key), str):
                task[key] = os.path.abspath(os.path.expanduser(task[key]))
    ds = data.get("deepspeed")
    if isinstance(ds, str) and ds.endswith(".json"):
        data["deepspeed"] = os.path.abspath(ds)


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a raw mapping; any problem becomes one ConfigError line."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping with model, data, train, deepspeed")
    try:
        raw, given_as = config_aliases.canonicalize(raw)  # peers' option names -> zerovl keys (a copy)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    _absolutize(raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        message = config_aliases.with_origin(_format_error(errors[0]), given_as)
        raise ConfigError(f"{source}: {message}{more}") from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Load YAML, apply dotted overrides, then the environment's MAX_PIXELS / MIN_PIXELS (``environ``,
    default ``os.environ``) where the config leaves them unset, validate. Raises ConfigError with one
    readable line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if isinstance(raw.get("deepspeed"), str) and raw["deepspeed"].endswith(".json"):
        ds_path = Path(raw["deepspeed"])
        if not ds_path.is_absolute() and not ds_path.exists():
            raw["deepspeed"] = str(path.parent / ds_path)  # allow paths relative to the YAML file
    raw = apply_overrides(raw, overrides or [])
    raw = config_aliases.apply_environment(raw, os.environ if environ is None else environ)
    return from_dict(raw, source=str(path))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def diff_configs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (as dicts)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
