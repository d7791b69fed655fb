"""Peers' option names: the keys users bring from HF Trainer, ms-swift and LLaMA-Factory.

People arrive with a working ``per_device_train_batch_size: 4`` / ``learning_rate: 2e-5`` /
``freeze_vit: true`` config from another trainer. Rather than reject each key, the table below maps
the common ones onto zerovl's key — explicitly, one documented row per name, never by fuzzy guessing,
because a silently mis-mapped key trains the wrong model. Each applied alias is logged once; an
alias and its zerovl key given with different values stop the run naming both.

Everything here works on the raw mapping (YAML + overrides) before the schema validates it, so the
schema in :mod:`zerovl.config` stays the one truth and keeps rejecting every other unknown key —
with a better nearest-key hint (:func:`suggest`) that knows abbreviations such as ``grad_accum``.
``MAX_PIXELS`` / ``MIN_PIXELS`` (qwen-vl-utils' and ms-swift's environment variables) are read here
too, from the mapping the caller passes, so nothing below the config layer reads the environment.
"""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from zerovl.errors import ConfigError

log = logging.getLogger("zerovl.config")

HF, SWIFT, LLAMAFACTORY, LLAVA = "HF Trainer", "ms-swift", "LLaMA-Factory", "LLaVA"


@dataclass(frozen=True)
class Weak:
    """A value an alias implies but does not insist on: used only when nothing else sets the key
    (``lora_rank`` implies ``model.llm.mode: lora``; ``bf16: false`` implies fp32)."""

    value: Any


def _flag(on: str, off: str | Weak) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return on if value else off
    return convert


def _lora_targets(value: Any) -> Any:
    """LLaMA-Factory's ``lora_target: all`` / ``q_proj,v_proj`` -> peft's ``all-linear`` / a list."""
    if isinstance(value, str):
        if value.strip() in ("all", "all-linear"):
            return "all-linear"
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant",
              "cosine_with_min_lr": "cosine"}


def _schedule(value: Any) -> str:
    if value not in _SCHEDULES:
        raise ValueError(f"{value!r} has no zerovl schedule; zerovl has cosine, linear and constant "
                         "(each after linear warm-up)")
    return _SCHEDULES[value]


def _llm_mode(value: Any) -> str:
    modes = {"lora": "lora", "full": "full"}
    if value not in modes:
        raise ValueError(f"{value!r} has no zerovl equivalent; set model.llm.mode to frozen, full or lora")
    return modes[value]


def _max_steps(value: Any) -> Any:
    return None if value == -1 else value  # HF Trainer's "unset"


@dataclass(frozen=True)
class Alias:
    """``name`` (at the top level or inside any section on ``target``'s path) means ``target``."""

    name: str
    target: str
    origin: str
    convert: Callable[[Any], Any] | None = None
    note: str = ""
    implies: tuple[tuple[str, Any], ...] = ()  # (dotted key, value), applied weakly
    needs_vision: bool = False  # meaningless (and ignored) when the model has no vision tower

    @property
    def scopes(self) -> tuple[str, ...]:
        """Where the name is accepted: the top level and every section above the target, except the
        target's own section when the name is the target's own (``gradient_accumulation_steps`` at
        the top level is an alias; inside ``train`` it is the key itself)."""
        parts = self.target.split(".")
        scopes = [".".join(parts[:i]) for i in range(len(parts))]
        return tuple(s for s in scopes if not (s == ".".join(parts[:-1]) and self.name == parts[-1]))


_LORA = (("model.llm.mode", "lora"),)
_LORA_NOTE = "implies model.llm.mode: lora"  # weakly: LoRA is ms-swift's and LLaMA-Factory's default

ALIASES: tuple[Alias, ...] = (
    # ---- train ----
    Alias("per_device_train_batch_size", "train.micro_batch_size", f"{HF}, {SWIFT}, {LLAMAFACTORY}"),
    Alias("micro_batch_size", "train.micro_batch_size", "Megatron"),
    Alias("batch_size", "train.micro_batch_size", f"{SWIFT} 2.x"),
    Alias("gradient_accumulation_steps", "train.gradient_accumulation_steps", f"{HF}, {SWIFT}, {LLAMAFACTORY}"),
    Alias("learning_rate", "train.lr", f"{HF}, {SWIFT}, {LLAMAFACTORY}"),
    Alias("lr", "train.lr", "common"),
    Alias("num_train_epochs", "train.epochs", f"{HF}, {SWIFT}, {LLAMAFACTORY}"),
    Alias("epochs", "train.epochs", "common"),
    Alias("max_steps", "train.max_steps", HF, _max_steps, "-1 (HF's unset) becomes null"),
    Alias("warmup_steps", "train.warmup_steps", HF),
    Alias("weight_decay", "train.weight_decay", HF),
    Alias("max_grad_norm", "train.grad_clip", HF),
    Alias("adam_epsilon", "train.eps", HF),
    Alias("lr_scheduler_type", "train.schedule", HF, _schedule,
          "cosine, linear, constant; constant_with_warmup -> constant, cosine_with_min_lr -> cosine"),
    Alias("bf16", "train.precision", HF, _flag("bf16", Weak("fp32")), "true -> bf16; false -> fp32 unless set"),
    Alias("fp16", "train.precision", HF, _flag("fp16", Weak("fp32")), "true -> fp16; false -> fp32 unless set"),
    Alias("seed", "train.seed", HF),
    Alias("output_dir", "train.output_dir", HF),
    Alias("save_steps", "train.save_every", HF),
    Alias("save_total_limit", "train.keep_last", HF),
    Alias("logging_steps", "train.log_every", HF),
    Alias("eval_steps", "train.eval_every", HF),
    Alias("resume_from_checkpoint", "train.resume", HF),
    # ---- model: what trains ----
    Alias("freeze_vit", "model.vision.mode", SWIFT, _flag("frozen", "full"), "true -> frozen, false -> full",
          needs_vision=True),
    Alias("freeze_vision_tower", "model.vision.mode", LLAMAFACTORY, _flag("frozen", "full"),
          "true -> frozen, false -> full", needs_vision=True),
    Alias("freeze_aligner", "model.connector.mode", SWIFT, _flag("frozen", "full"), "true -> frozen, false -> full"),
    Alias("freeze_multi_modal_projector", "model.connector.mode", LLAMAFACTORY, _flag("frozen", "full"),
          "true -> frozen, false -> full"),
    Alias("freeze_llm", "model.llm.mode", SWIFT, _flag("frozen", "full"), "true -> frozen, false -> full"),
    Alias("freeze_language_model", "model.llm.mode", LLAMAFACTORY, _flag("frozen", "full"),
          "true -> frozen, false -> full"),
    Alias("train_type", "model.llm.mode", SWIFT, _llm_mode, "lora or full"),
    Alias("finetuning_type", "model.llm.mode", LLAMAFACTORY, _llm_mode, "lora or full"),
    Alias("gradient_checkpointing", "model.llm.gradient_checkpointing", HF),
    # ---- model: the LLM's LoRA ----
    Alias("lora_rank", "model.llm.lora.r", f"{SWIFT}, {LLAMAFACTORY}", note=_LORA_NOTE, implies=_LORA),
    Alias("lora_r", "model.llm.lora.r", LLAVA, note=_LORA_NOTE, implies=_LORA),
    Alias("lora_alpha", "model.llm.lora.alpha", f"{SWIFT}, {LLAMAFACTORY}, peft", note=_LORA_NOTE, implies=_LORA),
    Alias("lora_dropout", "model.llm.lora.dropout", f"{SWIFT}, {LLAMAFACTORY}, peft", note=_LORA_NOTE,
          implies=_LORA),
    Alias("lora_target", "model.llm.lora.target_modules", LLAMAFACTORY, _lora_targets,
          "all -> all-linear; a comma list -> a list"),
    Alias("target_modules", "model.llm.lora.target_modules", f"{SWIFT}, peft", _lora_targets,
          "all -> all-linear; a comma list -> a list"),
    # ---- data ----
    Alias("max_length", "data.max_length", SWIFT),
    Alias("cutoff_len", "data.max_length", LLAMAFACTORY),
    Alias("model_max_length", "data.max_length", f"{HF}, {LLAVA}"),
    Alias("image_max_pixels", "data.max_pixels", LLAMAFACTORY),
    Alias("dataloader_num_workers", "data.num_workers", HF),
    Alias("packing", "data.packing", f"{SWIFT}, {LLAMAFACTORY}"),
    Alias("system", "data.system_prompt", SWIFT),
    # ---- eval ----
    Alias("per_device_eval_batch_size", "eval.batch_size", HF),
    Alias("max_new_tokens", "eval.max_new_tokens", SWIFT),
)

# What people type for zerovl's own keys: only ever a suggestion in the error, never applied.
ABBREVIATIONS: dict[str, str | tuple[str, ...]] = {
    "bs": ("micro_batch_size", "batch_size"), "mbs": "micro_batch_size", "micro_bs": "micro_batch_size",
    "batch": ("micro_batch_size", "batch_size"), "checkpoint_every": "save_every", "ckpt_every": "save_every",
    "save_freq": "save_every", "log_freq": "log_every", "eval_freq": "eval_every", "grad_accum": "gradient_accumulation_steps",
    "accum": "gradient_accumulation_steps", "accumulation": "gradient_accumulation_steps",
    "ga": "gradient_accumulation_steps", "gas": "gradient_accumulation_steps",
    "grad_accumulation": "gradient_accumulation_steps", "wd": "weight_decay", "clip": "grad_clip",
    "clip_grad": "grad_clip", "grad_norm": "grad_clip", "epoch": "epochs", "num_epochs": "epochs",
    "steps": "max_steps", "warmup": "warmup_steps", "sched": "schedule", "scheduler": "schedule",
    "lr_schedule": "schedule", "dtype": "precision", "mixed_precision": "precision", "out": "output_dir",
    "outdir": "output_dir", "out_dir": "output_dir", "save_interval": "save_every",
    "log_interval": "log_every", "eval_interval": "eval_every", "rank": "r", "lora_rank": "r",
    "seq_len": "max_length", "max_seq_len": "max_length", "max_seq_length": "max_length",
    "workers": "num_workers", "prompt": "system_prompt",
}

_logged: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.info(message)


def _get(tree: Any, dotted: str) -> Any:
    node = tree
    for part in dotted.split(".") if dotted else []:
        node = node.get(part) if isinstance(node, dict) else None
    return node


_ABSENT = object()


def _lookup(tree: Any, dotted: str) -> Any:
    parent, _, leaf = dotted.rpartition(".")
    node = _get(tree, parent)
    return node.get(leaf, _ABSENT) if isinstance(node, dict) else _ABSENT


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"{'.'.join(parts[:depth + 1])} is {node[part]!r}, not a mapping; cannot set {dotted}")
        node = node[part]
    node[parts[-1]] = value


def _spelled(scope: str, name: str) -> str:
    return f"{scope}.{name}" if scope else name


def _has_vision(raw: dict[str, Any]) -> bool:
    model = raw.get("model")
    return isinstance(model, dict) and (model.get("vision") is not None or model.get("native") is not None)


def spellings(target: str) -> list[str]:
    """Every dotted key that sets ``target``: the key itself and each alias in each of its scopes."""
    return [target] + [_spelled(s, a.name) for a in ALIASES if a.target == target for s in a.scopes]


def alias_at(dotted: str) -> Alias | None:
    """The alias a dotted key spells, if it is one."""
    scope, _, name = dotted.rpartition(".")
    return next((a for a in ALIASES if a.name == name and scope in a.scopes), None)


def canonicalize(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Replace every alias in ``raw`` (a copy) by its zerovl key. Returns the mapping and, for error
    messages, {zerovl key: the spelling the user gave}. Conflicting values raise one ConfigError line."""
    raw = copy.deepcopy(raw)
    found: dict[str, list[tuple[str, Any]]] = {}  # target -> [(spelling, value)]
    weak: dict[str, list[tuple[str, Any]]] = {}
    for alias in ALIASES:
        for scope in alias.scopes:
            node = _get(raw, scope)
            if not isinstance(node, dict) or alias.name not in node:
                continue
            value = node.pop(alias.name)
            spelled = _spelled(scope, alias.name)
            if alias.needs_vision and not _has_vision(raw):
                _say_once(f"{spelled}: ignored, this model has no vision tower")
                continue
            if alias.convert is not None:
                try:
                    value = alias.convert(value)
                except ValueError as e:
                    raise ConfigError(f"{spelled} (for {alias.target}): {e}, got {value!r}") from None
            (weak if isinstance(value, Weak) else found).setdefault(alias.target, []).append(
                (spelled, value.value if isinstance(value, Weak) else value))
            for key, implied in alias.implies:
                weak.setdefault(key, []).append((spelled, implied))
    given_as: dict[str, str] = {}
    for target, values in found.items():
        current = _lookup(raw, target)
        first_spelling, first = (target, current) if current is not _ABSENT else values[0]
        for spelled, value in values:
            if value == first:
                continue
            if current is not _ABSENT:
                raise ConfigError(f"{spelled} ({value!r}) is another name for {target}, which is also set "
                                  f"({first!r}); keep one of them")
            raise ConfigError(f"{first_spelling} ({first!r}) and {spelled} ({value!r}) both mean {target}; "
                              "keep one of them")
        if current is _ABSENT:
            _set(raw, target, first)
            given_as[target] = first_spelling
        _say_once(f"{values[0][0]} -> {target}" + (f" = {first!r}" if _converted(values[0][0]) else ""))
    for target, values in weak.items():
        if _lookup(raw, target) is _ABSENT:
            spelled, value = values[0]
            _set(raw, target, value)
            given_as[target] = spelled
            _say_once(f"{spelled} -> {target} = {value!r}")
    return raw, given_as


def _converted(spelled: str) -> bool:
    alias = alias_at(spelled)
    return alias is not None and alias.convert is not None


def drop_other_spellings(raw: dict[str, Any], dotted: str) -> None:
    """Before the override ``dotted=value`` is written: remove every other spelling of the same key
    from ``raw``, so a command-line value replaces the file's whichever way either is spelled."""
    alias = alias_at(dotted)
    target = alias.target if alias is not None else dotted
    for spelled in spellings(target):
        if spelled != dotted:
            parent = _get(raw, spelled.rpartition(".")[0])
            if isinstance(parent, dict):
                parent.pop(spelled.rpartition(".")[2], None)


def with_origin(message: str, given_as: dict[str, str]) -> str:
    """'train.lr: Input should be ...' -> '... (given as learning_rate)' when an alias set that key."""
    key = message.split(":", 1)[0].split(" ")[0]
    spelled = given_as.get(key)
    return f"{message} (given as {spelled})" if spelled else message


# ---- the environment ----------------------------------------------------------------------------

ENV_PIXELS = (("MAX_PIXELS", "max_pixels"), ("MIN_PIXELS", "min_pixels"))


def apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """``MAX_PIXELS`` / ``MIN_PIXELS`` -> ``model.native.max_pixels`` / ``min_pixels`` where the config
    leaves them unset (a value in the config or on the command line wins, with a log line). They
    only mean something for native Qwen2-VL-style models; for others they are noted and unused."""
    native = _get(raw, "model.native")
    for env, key in ENV_PIXELS:
        text = environ.get(env)
        if text is None or not text.strip():
            continue
        if not isinstance(native, dict):
            _say_once(f"{env}={text} from the environment: unused, this config has no model.native "
                      "(composed models' images are bounded by data.max_pixels)")
            continue
        try:
            value = int(text.strip())
        except ValueError:
            raise ConfigError(f"{env} environment variable: {text!r} is not a whole number of pixels") from None
        if native.get(key) is None:
            native[key] = value
            _say_once(f"{env}={value} from the environment -> model.native.{key}")
        else:
            _say_once(f"model.native.{key}={native[key]} from the config wins over {env}={value} from the environment")
    return raw


# ---- suggestions for unknown keys -----------------------------------------------------------------

def _tokens(name: str) -> list[str]:
    return [t for t in name.replace("-", "_").lower().split("_") if t]


def _covers(typed: list[str], candidate: list[str]) -> bool:
    """Every typed token is a candidate token or a prefix of one (or the other way), 2+ letters."""
    def match(a: str, b: str) -> bool:
        return a == b or (min(len(a), len(b)) >= 2 and (b.startswith(a) or a.startswith(b)))
    return bool(typed) and all(any(match(t, c) for c in candidate) for t in typed)


def suggest(key: str, keys: list[str]) -> str | None:
    """The valid key meant by the unknown dotted ``key``: abbreviations (``bs``, ``grad_accum``),
    then abbreviated tokens (``grad_accum_steps``), then the same name in another section
    (``train.max_length`` -> ``data.max_length``), then plain spelling distance."""
    parent, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
    prefix = f"{parent}." if parent else ""
    wanted = ABBREVIATIONS.get(leaf.lower(), ())
    wanted = (wanted,) if isinstance(wanted, str) else wanted
    for name in wanted:
        if name in siblings:
            return prefix + name
    elsewhere = [k for name in wanted for k in keys if k.rpartition(".")[2] == name]
    if elsewhere:
        return elsewhere[0]
    typed = _tokens(leaf)
    covering = [s for s in siblings if _covers(typed, _tokens(s))]
    if covering:
        best = max(covering, key=lambda s: (-len(_tokens(s)), difflib.SequenceMatcher(None, leaf, s).ratio()))
        return prefix + best
    same_name = [k for k in keys if k.rpartition(".")[2] == leaf and k != key]
    if same_name:
        return same_name[0]
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not near:  # compare against the siblings alone
        near = difflib.get_close_matches(key, [prefix + s for s in siblings], n=1, cutoff=0.3)
    return near[0] if near else None


# ---- documentation --------------------------------------------------------------------------------

def alias_table() -> str:
    """The README's alias table (a test keeps README.md and this module in step)."""
    lines = ["| you write | where | zerovl key | from | note |", "|---|---|---|---|---|"]
    for a in ALIASES:
        where = ", ".join(f"`{s}`" if s else "top level" for s in a.scopes)
        lines.append(f"| `{a.name}` | {where} | `{a.target}` | {a.origin} | {a.note} |")
    for env, key in ENV_PIXELS:
        lines.append(f"| `{env}` | environment | `model.native.{key}` | qwen-vl-utils, {SWIFT} | "
                     "used when the config leaves it unset |")
    return "\n".join(lines)
