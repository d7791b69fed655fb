"""LLaMA-Factory's ``dataset_info.json`` as a data source: ``data.train: data/dataset_info.json#mllm_demo``.

A LLaMA-Factory user keeps a ``data/`` folder with ``dataset_info.json`` and names datasets in it
(``dataset: identity,alpaca_en_demo``). zerovl reads the same folder: the path is the ``dataset_info.json``
(or the folder holding it) and ``#`` names one or more entries, comma-separated; several entries are read
one after the other, as LLaMA-Factory's default ``mix_strategy: concat`` does (use ``data.datasets`` for
weights). Each entry's ``file_name`` (a file, or a folder whose files are all read), ``formatting``
(``alpaca`` | ``sharegpt``), ``columns`` and ``tags`` are honoured with LLaMA-Factory's defaults, and image
paths are resolved against the dataset folder first, as LLaMA-Factory's ``media_dir`` does.

Entries zerovl cannot train are refused in one line: hub-only entries (``hf_hub_url``..., nothing is ever
downloaded), preference data (``ranking``, ``kto_tag``) and a file that is not there.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field

from zerovl.data.records import load_json_document, split_source
from zerovl.errors import DataError

log = logging.getLogger(__name__)

INFO_FILE = "dataset_info.json"
SOURCE_KEYS = ("file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
# LLaMA-Factory's DatasetAttr defaults
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
                  "system": None, "images": None, "videos": None, "audios": None}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": None, "tools": None, "images": None, "videos": None,
                    "audios": None}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
# keys that change which records LLaMA-Factory reads; zerovl reads every record of the file
UNHONOURED = ("num_samples", "split", "subset", "folder")


@dataclass
class Entry:
    """One dataset of a dataset_info.json, with LLaMA-Factory's defaults filled in."""

    name: str
    files: list[str]
    formatting: str
    columns: dict[str, str | None] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    media_dir: str = ""


def info_path(path: str) -> tuple[str, list[str]]:
    """(the dataset_info.json, the entry names) a ``data.train`` value points at."""
    file, names = split_source(path)
    if os.path.isdir(file):
        file = os.path.join(file, INFO_FILE)
    return file, names


def is_dataset_info(document: object) -> bool:
    """A mapping of names to entries that say where their data is (LLaMA-Factory's registry shape)."""
    return isinstance(document, dict) and bool(document) and all(
        isinstance(v, dict) and any(k in v for k in SOURCE_KEYS) for v in document.values())


def local_entries(document: dict) -> list[str]:
    return [name for name, attrs in document.items() if "file_name" in attrs]


def load_entries(path: str, key: str | None = None) -> list[Entry]:
    """The entries ``path`` (``dataset_info.json#a,b``) names, each checked to be trainable here."""
    file, names = info_path(path)
    if not os.path.isfile(file):
        raise DataError(f"{file} not found; a LLaMA-Factory source is data/{INFO_FILE}#NAME (or data#NAME)")
    document = load_json_document(file, key)
    if isinstance(document, list) and any(isinstance(d, dict) and "ms_dataset_id" in d for d in document):
        raise DataError(f"{file}: this is ms-swift's registry of hub datasets (ms_dataset_id / hf_dataset_id), not "
                        f"a LLaMA-Factory {INFO_FILE}; zerovl never downloads: point data.train at a local data file")
    if not is_dataset_info(document):
        raise DataError(f"{file}: not a LLaMA-Factory {INFO_FILE} (a mapping of dataset names to entries with "
                        f"file_name, formatting, columns)")
    local = local_entries(document)
    if not names:
        raise DataError(f"{file}: name the datasets to train after '#', as in {file}#{local[0] if local else 'NAME'} "
                        f"(entries with local files: {', '.join(local) or 'none'})")
    return [_entry(file, document, name) for name in names]


def _entry(file: str, document: dict, name: str) -> Entry:
    if name not in document:
        near = difflib.get_close_matches(name, list(document), n=1)
        hint = f"did you mean {near[0]}?" if near else f"entries with local files: {', '.join(local_entries(document))}"
        raise DataError(f"{file}: no dataset {name!r} ({hint})")
    attrs = document[name]
    where = f"{file}#{name}"
    if "file_name" not in attrs:
        hub = next((attrs[k] for k in SOURCE_KEYS if k in attrs), "?")
        raise DataError(f"{where}: the entry has no file_name, only a hub or script source ({hub}); zerovl never "
                        "downloads: fetch the data, then point file_name at the local file")
    columns = attrs.get("columns") or {}
    if attrs.get("ranking") or "chosen" in columns or "kto_tag" in columns:
        raise DataError(f"{where}: preference data (ranking / chosen-rejected / kto_tag) is for DPO, RM or KTO; "
                        "zerovl trains supervised fine-tuning: name an SFT dataset")
    formatting = attrs.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DataError(f"{where}: formatting {formatting!r} is not supported (alpaca or sharegpt)")
    ignored = [k for k in UNHONOURED if k in attrs]
    if ignored:
        log.warning("%s: %s ignored; every record of the file is read", where, ", ".join(ignored))
    dataset_dir = os.path.dirname(os.path.abspath(file))
    target = os.path.join(dataset_dir, attrs["file_name"])
    if os.path.isdir(target):
        files = sorted(os.path.join(target, f) for f in os.listdir(target)
                       if os.path.isfile(os.path.join(target, f)) and not f.startswith("."))
    elif os.path.isfile(target):
        files = [target]
    else:
        raise DataError(f"{where}: file_name {attrs['file_name']} not found in {dataset_dir}")
    if not files:
        raise DataError(f"{where}: the folder {target} holds no files")
    if any(f.endswith(".txt") for f in files):
        raise DataError(f"{where}: plain-text files are LLaMA-Factory pre-training corpora; zerovl reads "
                        "JSON, JSON lines, CSV or TSV records")
    defaults = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    tags = {**SHAREGPT_TAGS, **(attrs.get("tags") or {})} if formatting == "sharegpt" else {}
    return Entry(name, files, formatting, {**defaults, **columns}, tags, dataset_dir)


def entry_files(path: str) -> list[str]:
    """Every file a dataset_info source reads (the registry and the entries' data), for fingerprints."""
    file, _ = info_path(path)
    return [file] + [f for entry in load_entries(path) for f in entry.files]
