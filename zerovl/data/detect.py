"""``data.format: auto``: which reader a file needs, told from its content, with the reason.

Peers' data arrives as it is — LLaMA-Factory, ms-swift, LLaVA, MiniGPT4Qwen, COCO, a CSV from a
notebook — and naming its format is one more thing to get wrong. :func:`detect_format` reads the file's
head (the first records of a JSON array, JSON lines or CSV/TSV table; a whole file only for a top-level
JSON document such as COCO's) and classifies record keys. Files that are recognisably *not* training
data — evaluation questions without answers, caption results, registries of hub datasets — are refused
with what they are; a file that matches nothing says what it saw and which formats exist.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from zerovl.config import SHARD_SUFFIXES
from zerovl.data.dataset_info import INFO_FILE, is_dataset_info
from zerovl.data.records import read_head, split_source
from zerovl.data.samples import RecordError
from zerovl.errors import DataError

# name -> the keys that identify it, for "which formats exist"
FORMATS = {
    "messages": "messages: [{role, content}] (content a string or a list of parts)",
    "sharegpt": "conversations: [{from, value} | {role, content}]",
    "llava": "image + conversations",
    "alpaca": "instruction, input, output",
    "swift": "query, response, history (ms-swift)",
    "minigpt4qwen": "image, instruction, output",
    "captions": "image | image_path + caption | captions | text | prompt",
    "coco": "images + annotations",
    "karpathy": "images: [{filename, sentences, split}] (Karpathy's dataset_coco.json / dataset_flickr30k.json)",
    "csv": "a table with image and text columns (or alpaca / swift columns)",
    "tsv": "the same, tab-separated",
    "webdataset": "tar shards",
    "dataset_info": f"LLaMA-Factory {INFO_FILE}#NAME",
}
IMAGE_KEYS = ("image", "image_path", "img", "img_path", "image_file", "file_name", "filename")
TEXT_KEYS = ("caption", "captions", "text", "prompt")
ANSWER_KEYS = ("answer", "answers", "output", "response", "gpt", "label", "caption", "captions", "conversations",
               "messages")
SAMPLE = 8  # records looked at


@dataclass(frozen=True)
class Detection:
    format: str
    reason: str


class NotTrainingData(DataError):
    """The file is a known kind of data that has nothing to learn from (or is not data at all)."""


def known_formats() -> str:
    return "; ".join(f"{name} ({keys})" for name, keys in FORMATS.items())


def classify(record: Any) -> str | None:
    """The format one record is in, or None. Raises NotTrainingData for shapes known not to train."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if isinstance(record.get("messages"), list):
        first = next((t for t in record["messages"] if isinstance(t, dict)), {})
        return "sharegpt" if "from" in first else "messages"
    if isinstance(record.get("conversations"), list):
        return "llava" if "image" in keys else "sharegpt"
    if isinstance(record.get("conversation"), list):
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "minigpt4qwen" if "image" in keys else "alpaca"
    if "response" in keys and ("query" in keys or keys <= {"response", "system", "history", "images"}):
        return "swift"
    if "question_id" in keys or ("question" in keys and not keys & set(ANSWER_KEYS)):
        raise NotTrainingData("records are evaluation questions (question_id / question, no answer): nothing to "
                              "learn from; train on a file with answers")
    if keys & set(IMAGE_KEYS) and keys & set(TEXT_KEYS):
        return "captions"
    if "image_id" in keys and "caption" in keys:
        raise NotTrainingData("records are caption results (image_id + caption, no image file): predictions to "
                              "score, not training data")
    if "ms_dataset_id" in keys or "hf_dataset_id" in keys:
        raise NotTrainingData("this is ms-swift's registry of hub datasets (ms_dataset_id / hf_dataset_id); "
                              "zerovl never downloads: point data.train at a local data file")
    return None


def _document(document: Any) -> str | None:
    """The format of a file that is one JSON object (COCO, a dataset_info.json, or a single record)."""
    if isinstance(document, dict):
        if isinstance(document.get("images"), list) and isinstance(document.get("annotations"), list):
            return "coco"
        images = document.get("images")
        if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" in images[0]:
            return "karpathy"
        if is_dataset_info(document):
            return "dataset_info"
        values = list(document.values())
        if values and all(isinstance(v, list) and v and all(isinstance(p, list) and len(p) == 2 for p in v)
                          for v in values):
            raise NotTrainingData("a mapping of names to [[prompt, image]] pairs: evaluation prompts without "
                                  "answers, nothing to learn from")
    return classify(document)


def _keys(record: Any) -> str:
    if isinstance(record, dict):
        return "keys " + ", ".join(list(record)[:10])
    return f"a {type(record).__name__}"


def detect_format(path: str, key: str | None = None, image_column: str = "image", text_column: str = "text",
                  prompt_column: str | None = None) -> Detection:
    """The reader a file needs and why; DataError (one line) when it cannot be told or is not training data."""
    if path.endswith(SHARD_SUFFIXES):
        return Detection("webdataset", "the path names tar shards")
    file, names = split_source(path)
    if names or os.path.isfile(os.path.join(file, INFO_FILE)):
        return Detection("dataset_info", f"a LLaMA-Factory {INFO_FILE} entry")
    if not os.path.isfile(file):
        raise DataError(f"data file {file} not found; check {key or 'data.train / data.datasets[].path'}")
    try:
        return _detect(file, key, image_column, text_column, prompt_column)
    except NotTrainingData as e:
        raise DataError(f"{file}: {e}") from None


def _detect(path: str, key: str | None, image_column: str, text_column: str,
            prompt_column: str | None) -> Detection:
    head = read_head(path, SAMPLE, key)
    if head.header is not None:
        return _table(path, head.container, head.header, image_column, text_column, prompt_column)
    if head.container == "text":
        raise DataError(f"{path}: not JSON, JSON lines, CSV or TSV (first line: {head.first_line[:60]!r}); "
                        f"known formats: {known_formats()}")
    records = [(line, r) for line, r in head.records if not isinstance(r, RecordError)]
    if not records:
        if head.records:  # the first records are unreadable: their own error says why
            raise head.records[0][1]
        raise DataError(f"{path}: holds no records{f' (from {key})' if key else ''}")
    one_line = head.container == "json lines" and len(records) == 1  # COCO's files are one minified line
    if head.container == "json document" or one_line:
        found = _document(records[0][1])
        if found == "dataset_info":
            raise DataError(f"{path} is a LLaMA-Factory {INFO_FILE}: name the datasets to train after '#', as in "
                            f"{path}#{next(iter(records[0][1]))} (entries: {', '.join(list(records[0][1])[:12])})")
        if found is not None and (found in ("coco", "karpathy") or not one_line):
            return Detection(found, f"a JSON object with {_keys(records[0][1])}")
        if not one_line:
            raise DataError(f"{path}: cannot tell the format: one JSON object with {_keys(records[0][1])}; "
                            f"known formats: {known_formats()}; or set the format explicitly")
    votes: Counter = Counter()
    first_seen: dict[str, int] = {}
    for line, record in records:
        found = classify(record)
        if found is not None:
            votes[found] += 1
            first_seen.setdefault(found, line)
    if not votes:
        line, record = records[0]
        raise DataError(f"{path}: cannot tell the format: {head.container} whose record at line {line} has "
                        f"{_keys(record)}; known formats: {known_formats()}; or set the format explicitly")
    best = max(votes, key=lambda f: (votes[f], -first_seen[f]))
    line = first_seen[best]
    record = dict(records)[line]
    return Detection(best, f"{head.container}; record at line {line} has {_keys(record)}")


def _table(path: str, container: str, header: list[str], image_column: str, text_column: str,
           prompt_column: str | None) -> Detection:
    columns = set(header)
    reason = f"{container.upper()} header: {', '.join(header[:10])}"
    if "instruction" in columns and "output" in columns:
        return Detection("alpaca", reason)
    if "response" in columns and ("query" in columns or columns <= {"response", "system", "history"}):
        return Detection("swift", reason)
    if {image_column, text_column, prompt_column} & columns:
        return Detection(container, reason)
    raise DataError(f"{path}: cannot tell the format: {reason}; a table needs alpaca (instruction, output), swift "
                    f"(query, response) or caption columns (image_column {image_column!r}, text_column "
                    f"{text_column!r}); known formats: {known_formats()}")
