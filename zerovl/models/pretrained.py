"""Reading model directories as the Hub lays them out, including those that ship their own Python code
(Qwen-7B-Chat, ChatGLM3: ``auto_map`` in config.json / tokenizer_config.json names a ``modeling_*.py`` /
``tokenization_*.py`` beside the weights). Running that code is opt-in per part
(``model.<part>.trust_remote_code``); when a directory needs it and the switch is off, the user gets one
line naming the key instead of transformers' paragraph."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from zerovl.errors import ConfigError


def code_files(path: str | Path) -> list[str]:
    """The Python files a remote-code directory ships (what ``auto_map`` entries point into)."""
    return sorted(p.name for p in Path(path).glob("*.py"))


def copy_code_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy SRC's ``*.py`` into DST (an export), so it loads with ``trust_remote_code=True`` as SRC did;
    files DST already has (transformers may have written them) are left as they are."""
    copied = []
    for name in code_files(src):
        if not (Path(dst) / name).exists():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def _refused(error: Exception) -> bool:
    return "trust_remote_code" in str(error)


def refusal(key: str, path: str | Path, switch: str | None = None) -> ConfigError:
    files = ", ".join(code_files(path)) or "the code its auto_map names"
    return ConfigError(f"{key}: {path} ships its own Python code ({files}); set "
                       f"{switch or key + '.trust_remote_code'}=true to run it (only for a directory you trust)")


def from_pretrained(loader: Any, path: str | Path, key: str, trust: bool, switch: str | None = None,
                    **kwargs) -> Any:
    """``loader.from_pretrained(path, trust_remote_code=trust, **kwargs)``; a refusal to run the
    directory's code becomes one ConfigError naming ``key`` (``model.llm``) and the switch to set."""
    try:
        return loader.from_pretrained(path, trust_remote_code=trust, **kwargs)
    except ValueError as e:
        if not trust and _refused(e):
            raise refusal(key, path, switch) from None
        raise


def part_config(part: Any, key: str, default_model_type: str | None = None) -> Any:
    """The transformers config of a model part: read from ``part.path`` or built from its inline
    ``config`` (random init). ``key`` names the part in errors (``model.llm``)."""
    from transformers import AutoConfig

    if part.path is not None:
        try:
            return from_pretrained(AutoConfig, part.path, key, getattr(part, "trust_remote_code", False))
        except (OSError, ValueError) as e:  # a refusal is already a ConfigError, which passes through
            raise ConfigError(f"{key}.path: cannot read a config.json in {part.path} ({e})") from None
    inline = dict(part.config)
    model_type = inline.pop("model_type", default_model_type)
    if model_type is None:
        raise ConfigError(f"{key}.config needs a model_type, e.g. qwen2")
    return AutoConfig.for_model(model_type, **inline)


def causal_lm_class(config: Any, path: str | None, trust: bool) -> type:
    """The class ``AutoModelForCausalLM`` would instantiate for ``config``, imported now (ZeRO-3 builds
    import every modeling module before ``deepspeed.zero.Init``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    auto_map = getattr(config, "auto_map", None) or {}
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if trust and path is not None and "AutoModelForCausalLM" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], path)
    raise ConfigError(f"model.llm: {type(config).__name__} is not a causal LM transformers knows"
                      + ("; its directory maps none in auto_map" if trust else ""))
