"""Dataset formats: one reader per format name, each turning records into the same :class:`Sample`.

``READERS`` maps the ``format`` a config names (``messages``, ``llava``, ``sharegpt``, ``coco``,
``csv``, ``tsv``, ``webdataset``) to a function ``(spec, report) -> Iterator[Sample]``; a new format
is one function and one ``@reader("name")`` line. Every sample keeps ``source`` = ``file:line``
(``file:annotations[i]`` for COCO, ``shard:key`` for tar shards) so errors point at the record.
A bad record raises, or — with ``data.skip_bad_samples`` — is counted in the :class:`ReadReport`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from zerovl.config import DatasetSpec
from zerovl.data.samples import (
    IMAGE_TAG,
    RecordError,
    Sample,
    resolve_image_paths,
    sample_from_messages,
    validate_sample,
)
from zerovl.data.shards import IMAGE_EXTENSIONS, expand_shards, read_shard
from zerovl.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Write a short caption for the image.",
    "What does the image show?",
)
# ShareGPT / LLaVA speaker names -> chat roles
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
              "bot": "assistant", "system": "system"}
MAX_LOGGED = 10


@dataclass
class ReadReport:
    """What reading skipped and why; raises instead when bad records are not to be skipped."""

    skip_bad: bool = False
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def bad(self, error: DataError) -> None:
        if not self.skip_bad:
            raise error
        self.counts[getattr(error, "kind", "bad_record")] += 1
        if len(self.examples) < MAX_LOGGED:
            self.examples.append(str(error))
            log.warning("skipping %s", error)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())


Reader = Callable[[DatasetSpec, ReadReport], Iterator[Sample]]
READERS: dict[str, Reader] = {}


def reader(name: str) -> Callable[[Reader], Reader]:
    def register(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn

    return register


def read_dataset(spec: DatasetSpec, report: ReadReport) -> list[Sample]:
    """All samples of one dataset, in file order."""
    return list(iter_dataset(spec, report))


def iter_dataset(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    if spec.format not in READERS:
        raise DataError(f"{spec.path}: unknown format {spec.format!r} (known: {', '.join(sorted(READERS))})")
    if spec.format != "webdataset" and not os.path.isfile(spec.path):
        raise DataError(f"data file {spec.path} not found; check data.train / data.datasets[].path")
    return READERS[spec.format](spec, report)


# -- shared helpers ----------------------------------------------------------------------------------
def image_root(spec: DatasetSpec) -> str:
    return spec.image_root or os.path.dirname(os.path.abspath(spec.path))


def pick_prompt(prompts: list[str] | tuple[str, ...] | None, key: str) -> str:
    """The same record always gets the same prompt (a hash of its id), independent of file order."""
    prompts = prompts or DEFAULT_CAPTION_PROMPTS
    return prompts[zlib.crc32(key.encode()) % len(prompts)]


def caption_sample(prompt: str, reply: str, images: list[str], source: str, meta: dict[str, Any]) -> Sample:
    """One user turn (prompt, with an ``<image>`` per image prepended when it has none) and the reply."""
    if images and IMAGE_TAG not in prompt:
        prompt = IMAGE_TAG * len(images) + "\n" + prompt
    if not isinstance(reply, str) or not reply.strip():
        raise RecordError(f"{source}: empty or missing caption/text")
    sample = Sample([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}], images,
                    source, meta)
    validate_sample(sample)
    return sample


def conversation_messages(turns: Any, source: str, system: Any = None) -> list[dict[str, str]]:
    """ShareGPT/LLaVA turns (``from``/``value`` or ``role``/``content``) -> chat messages."""
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{source}: 'conversations' must be a non-empty list of turns")
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"{source}: turn {i} must be an object with from/value or role/content")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        role = ROLE_NAMES.get(str(speaker).lower())
        if role is None or not isinstance(text, str):
            raise RecordError(f"{source}: turn {i} has speaker {speaker!r} (expected one of "
                              f"{', '.join(ROLE_NAMES)}) or a non-text value")
        messages.append({"role": role, "content": text})
    return messages


def iter_json_records(path: str) -> Iterator[tuple[int, Any]]:
    """(line, record) from a JSON array file or a JSON-lines file; lines are where each record
    starts, so errors name the line to open even in a pretty-printed array."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = len(text) - len(text.lstrip())
    if not text[start:start + 1] == "[":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    yield lineno, RecordError(f"{path}:{lineno}: not valid JSON ({e.msg})")
        return
    decoder = json.JSONDecoder()
    pos, line, counted = start + 1, 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield line, RecordError(f"{path}:{line}: not valid JSON ({e.msg}); the rest of the file is unreadable")
            return
        yield line, record


def _json_samples(spec: DatasetSpec, report: ReadReport, build: Callable[[Any, str, str], Sample]) -> Iterator[Sample]:
    root = image_root(spec)
    for line, record in iter_json_records(spec.path):
        source = f"{spec.path}:{line}"
        try:
            if isinstance(record, DataError):
                raise record
            yield build(record, root, source)
        except DataError as e:
            report.bad(e)


def _object(record: Any, source: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise RecordError(f"{source}: expected a JSON object, got {type(record).__name__}")
    return record


# -- formats -------------------------------------------------------------------------------------------
@reader("messages")
def read_messages(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """``{"messages": [{"role", "content"}], "images": [...]}`` per line (or a JSON array of them)."""
    return _json_samples(spec, report, sample_from_messages)


def _llava_sample(record: Any, root: str, source: str) -> Sample:
    record = _object(record, source)
    turns = record.get("conversations")
    sample = Sample(conversation_messages(turns, source, record.get("system")),
                    resolve_image_paths(record.get("image", record.get("images")), root, source), source,
                    {k: v for k, v in record.items() if k not in ("conversations", "image", "images", "system")})
    validate_sample(sample)
    return sample


@reader("llava")
def read_llava(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """LLaVA JSON: ``[{"id", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
    {"from": "gpt", "value": ...}]}]``; ``image`` may be a list for multi-image records."""
    return _json_samples(spec, report, _llava_sample)


def _sharegpt_sample(record: Any, root: str, source: str) -> Sample:
    record = _object(record, source)
    turns = record.get("conversations", record.get("messages"))
    sample = Sample(conversation_messages(turns, source, record.get("system")),
                    resolve_image_paths(record.get("images", record.get("image")), root, source), source,
                    {k: v for k, v in record.items()
                     if k not in ("conversations", "messages", "images", "image", "system")})
    validate_sample(sample)
    return sample


@reader("sharegpt")
def read_sharegpt(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """ShareGPT JSON or JSONL: ``conversations`` or ``messages`` with from/value or role/content turns,
    optional ``system`` and ``images``."""
    return _json_samples(spec, report, _sharegpt_sample)


@reader("coco")
def read_coco(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """COCO captions (``images`` + ``annotations``): one captioning sample per annotation, its prompt
    picked from ``caption_prompts`` by the annotation id."""
    try:
        with open(spec.path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{spec.path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{spec.path}: a COCO captions file needs top-level 'images' and 'annotations' lists")
    root = image_root(spec)
    files = {im.get("id"): im.get("file_name") for im in data["images"] if isinstance(im, dict)}
    for i, ann in enumerate(data["annotations"]):
        source = f"{spec.path}:annotations[{i}]"
        try:
            ann = _object(ann, source)
            file_name = files.get(ann.get("image_id"))
            if not isinstance(file_name, str):
                raise RecordError(f"{source}: image_id {ann.get('image_id')!r} has no entry in 'images'")
            key = str(ann.get("id", i))
            yield caption_sample(pick_prompt(spec.caption_prompts, key), ann.get("caption"),
                                 resolve_image_paths(file_name, root, source), source,
                                 {"id": ann.get("id"), "image_id": ann.get("image_id")})
        except DataError as e:
            report.bad(e)


def _cell_images(value: str | None, root: str, source: str) -> list[str]:
    value = (value or "").strip()
    if not value:
        return []
    if value.startswith("["):
        try:
            return resolve_image_paths(json.loads(value), root, source)
        except json.JSONDecodeError:
            raise RecordError(f"{source}: image cell starts with '[' but is not a JSON list") from None
    return resolve_image_paths(value, root, source)


def _read_table(spec: DatasetSpec, report: ReadReport, delimiter: str) -> Iterator[Sample]:
    root = image_root(spec)
    with open(spec.path, encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter=delimiter)
        columns = rows.fieldnames or []
        wanted = {"image_column": spec.image_column, "text_column": spec.text_column,
                  "prompt_column": spec.prompt_column}
        for option, column in wanted.items():
            if column is not None and column not in columns:
                raise DataError(f"{spec.path}:1: no column {column!r} for {option} (header: {', '.join(columns)}); "
                                f"set {option} to one of them")
        line = 1
        for row in rows:
            source = f"{spec.path}:{line + 1}"  # the row's first line; header is line 1
            line = rows.line_num
            try:
                images = _cell_images(row.get(spec.image_column), root, source)
                if spec.prompt_column is not None:
                    prompt = row.get(spec.prompt_column) or ""
                else:
                    prompt = pick_prompt(spec.caption_prompts, f"{row.get(spec.image_column)}|{source}")
                meta = {k: v for k, v in row.items() if k not in wanted.values()}
                yield caption_sample(prompt, row.get(spec.text_column), images, source, meta)
            except DataError as e:
                report.bad(e)


@reader("csv")
def read_csv(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """CSV with a header: ``image_column`` (a path or a JSON list), ``text_column`` (the reply) and
    ``prompt_column`` (or a prompt from ``caption_prompts``)."""
    return _read_table(spec, report, ",")


@reader("tsv")
def read_tsv(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """Tab-separated, otherwise like ``csv``."""
    return _read_table(spec, report, "\t")


def sample_from_shard_record(record: dict[str, bytes], source: str, spec: DatasetSpec) -> Sample:
    """A webdataset sample (``{ext: bytes}``) -> Sample with the image bytes in ``meta["image_bytes"]``.

    ``json`` may hold a chat (``messages``/``conversations``, like sharegpt) or a caption (``caption``
    or ``text``); otherwise ``txt`` is the caption. Images are the members with image extensions, in
    the order ``json["images"]`` lists them (extensions such as ``"0.jpg"``) or sorted by extension.
    """
    meta: dict[str, Any] = {}
    payload: Any = None
    if "json" in record:
        try:
            payload = json.loads(record["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecordError(f"{source}: json member is not valid JSON ({e})") from None
        payload = _object(payload, source)
    available = sorted(ext for ext in record if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS)
    order = payload.get("images") if isinstance(payload, dict) and isinstance(payload.get("images"), list) else None
    names = [str(n) for n in order] if order is not None else available
    missing = [n for n in names if n not in record]
    if missing:
        raise RecordError(f"{source}: json lists images {missing} that the shard does not hold")
    images = [f"{source}.{ext}" for ext in names]
    meta["image_bytes"] = [record[ext] for ext in names]
    if isinstance(payload, dict) and ("messages" in payload or "conversations" in payload):
        turns = payload.get("conversations", payload.get("messages"))
        sample = Sample(conversation_messages(turns, source, payload.get("system")), images, source, meta)
        validate_sample(sample)
        return sample
    if isinstance(payload, dict) and isinstance(payload.get("caption", payload.get("text")), str):
        reply = payload.get("caption", payload.get("text"))
        prompt = payload.get("prompt") or pick_prompt(spec.caption_prompts, source)
    elif "txt" in record:
        reply = record["txt"].decode("utf-8", errors="replace").strip()
        prompt = pick_prompt(spec.caption_prompts, source)
    else:
        raise RecordError(f"{source}: needs a json member (chat or caption) or a txt caption")
    return caption_sample(prompt, reply, images, source, meta)


@reader("webdataset")
def read_webdataset(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """Tar shards in the webdataset layout, read in shard order (training streams them instead)."""
    for shard in expand_shards(spec.path):
        for _, key, record in read_shard(shard):
            try:
                yield sample_from_shard_record(record, f"{shard}:{key}", spec)
            except DataError as e:
                report.bad(e)
