"""Dataset formats: one reader per format name, each turning records into the same :class:`Sample`.

``READERS`` maps the ``format`` a config names to a function ``(spec, report) -> Iterator[Sample]``; a new
format is one function and one ``@reader("name")`` line. ``auto`` (the default) picks the reader from the
file's content (:mod:`zerovl.data.detect`) and logs the choice once. Records come from
:mod:`zerovl.data.records` (JSON array, JSON lines, CSV/TSV; BOM, CRLF and non-UTF-8 bytes handled there),
so a format that is a set of keys (``alpaca``, ``swift``...) reads from any of them. Every sample keeps
``source`` = ``file:line`` (``file:annotations[i]`` for COCO, ``shard:key`` for tar shards) so errors point
at the record. A bad record raises, or — with ``data.skip_bad_samples`` — is counted in the
:class:`ReadReport`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from zerovl.config import SHARD_SUFFIXES, DatasetSpec
from zerovl.data.dataset_info import entry_files, load_entries
from zerovl.data.detect import IMAGE_KEYS, TEXT_KEYS, detect_format
from zerovl.data.records import has_bad_bytes, iter_records, read_text, split_source, table_rows
from zerovl.data.samples import (
    IMAGE_TAG,
    ImageResolver,
    RecordError,
    Sample,
    count_image_tags,
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
# ShareGPT / LLaVA / LLaMA-Factory speaker names -> chat roles. A tool call is the model's turn; a tool's
# result is input to it (LLaMA-Factory's function_call / observation, OpenAI's tool).
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
              "bot": "assistant", "system": "system", "function_call": "assistant", "observation": "user",
              "tool": "user", "function": "user"}
MEDIA_KEYS = ("videos", "video", "audios", "audio")
MEDIA_TAGS = ("<video>", "<audio>")
# Qwen-VL / ms-swift inline images, and MiniGPT4Qwen's placeholder
INLINE_IMAGE = re.compile(r"<img>(.*?)</img>", re.DOTALL)
PLACEHOLDERS = ("<Img><ImageHere></Img>", "<ImageHere>")
COCO_FILE = re.compile(r"(?:captions|instances)_(\w+)\.json$")
MAX_LOGGED = 10


@dataclass
class ReadReport:
    """What reading skipped and why; raises instead when bad records are not to be skipped. ``key`` is the
    config key the dataset came from (``data.train``, ``data.val``, ``data.datasets[1]``), for messages."""

    skip_bad: bool = False
    key: str | None = None
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


def dataset_keys(data) -> list[str]:
    """The config key each of ``data.train_datasets()`` comes from, for error messages."""
    return ["data.train"] if data.train is not None else [f"data.datasets[{i}]" for i in range(len(data.datasets))]


def read_dataset(spec: DatasetSpec, report: ReadReport) -> list[Sample]:
    """All samples of one dataset, in file order."""
    return list(iter_dataset(spec, report))


def iter_dataset(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    if spec.format not in READERS:
        raise DataError(f"{spec.path}: unknown format {spec.format!r} (known: {', '.join(sorted(READERS))})")
    if spec.format != "webdataset" and not spec.path.endswith(SHARD_SUFFIXES):
        file, names = split_source(spec.path)
        if not (os.path.isfile(file) or ((names or spec.format == "dataset_info") and os.path.isdir(file))):
            raise DataError(f"data file {file} not found; check {report.key or 'data.train / data.datasets[].path'}")
    return _not_empty(spec, report, READERS[spec.format](spec, report))


def _not_empty(spec: DatasetSpec, report: ReadReport, samples: Iterator[Sample]) -> Iterator[Sample]:
    """A file with no records at all (``[]``, a bare CSV header) is named, not left to a later 'no samples'."""
    before, count = report.skipped, 0
    for sample in samples:
        count += 1
        yield sample
    if count == 0 and report.skipped == before:
        where = f" (from {report.key})" if report.key else ""
        raise DataError(f"{spec.path}: holds no records{where}; put records in it or point "
                        f"{report.key or 'the config'} at another file")


_announced: set[tuple[str, str]] = set()


def resolve_format(spec: DatasetSpec, key: str | None = None) -> DatasetSpec:
    """``spec`` with ``auto`` replaced by the detected format (logged once per file and process; other ranks
    log at warning level only, so this is rank 0's line)."""
    if spec.format != "auto":
        return spec
    found = detect_format(spec.path, key, spec.image_column, spec.text_column, spec.prompt_column)
    if (spec.path, found.format) not in _announced:
        _announced.add((spec.path, found.format))
        log.info("%s%s: format %s (%s)", f"{key}: " if key else "", spec.path, found.format, found.reason)
    return spec.model_copy(update={"format": found.format})


def data_files(spec: DatasetSpec) -> list[str]:
    """The files a dataset reads (shards; a dataset_info.json and its entries' files; else the path)."""
    spec = resolve_format(spec)
    if spec.format == "webdataset":
        return expand_shards(spec.path)
    if spec.format == "dataset_info":
        return entry_files(spec.path)
    return [spec.path]


# -- shared helpers ----------------------------------------------------------------------------------
def image_root(spec: DatasetSpec) -> ImageResolver:
    file = split_source(spec.path)[0]
    return ImageResolver(spec.image_root or os.path.dirname(os.path.abspath(file)), spec.label)


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


def _unsupported_media(source: str, what: str) -> RecordError:
    return RecordError(f"{source}: the record has {what}; zerovl trains on images and text only (remove such "
                       "records, or set data.skip_bad_samples=true to skip and count them)", kind="unsupported_media")


def _refuse_media(record: dict[str, Any], source: str, keys: tuple[str | None, ...] = MEDIA_KEYS) -> None:
    for key in keys:
        if key and record.get(key):
            raise _unsupported_media(source, key)


def _refuse_media_tags(text: str, source: str) -> None:
    for tag in MEDIA_TAGS:
        if tag in text:
            raise _unsupported_media(source, f"{tag} tags")


def conversation_messages(turns: Any, source: str, system: Any = None,
                          tags: dict[str, str] | None = None) -> list[dict[str, str]]:
    """ShareGPT/LLaVA turns -> chat messages. Turns are ``from``/``value`` or ``role``/``content``, or
    ms-swift's ``{"human": q, "assistant": a}`` pairs; ``tags`` is a LLaMA-Factory ``tags`` mapping
    (``role_tag``, ``content_tag``, ``user_tag``...) that replaces the built-in names."""
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{source}: 'conversations' must be a non-empty list of turns")
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    roles = ROLE_NAMES
    if tags is not None:
        roles = {tags.get("user_tag"): "user", tags.get("observation_tag"): "user",
                 tags.get("assistant_tag"): "assistant", tags.get("function_tag"): "assistant",
                 tags.get("system_tag"): "system"}
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"{source}: turn {i} must be an object with from/value or role/content")
        if tags is None and not {"from", "role"} & set(turn) and {"human", "assistant"} <= set(turn):
            query, reply = turn["human"], turn["assistant"]
            if not isinstance(query, str) or not isinstance(reply, str):
                raise RecordError(f"{source}: turn {i}: 'human' and 'assistant' must be strings")
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]
            continue
        if tags is not None:
            speaker, text = turn.get(tags.get("role_tag", "from")), turn.get(tags.get("content_tag", "value"))
            role = roles.get(speaker)
        else:
            speaker, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
            role = roles.get(str(speaker).lower())
        if role is None or not isinstance(text, str):
            names = ", ".join(str(n) for n in roles if n)
            raise RecordError(f"{source}: turn {i} has speaker {speaker!r} (expected one of {names}) or a "
                              "non-text value")
        _refuse_media_tags(text, source)
        messages.append({"role": role, "content": text})
    return messages


def _json_samples(spec: DatasetSpec, report: ReadReport, build: Callable[[Any, ImageResolver, str], Sample]
                  ) -> Iterator[Sample]:
    root = image_root(spec)
    for line, record in iter_records(spec.path, report.key):
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
@reader("auto")
def read_auto(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """The reader :func:`~zerovl.data.detect.detect_format` picks from the file's content."""
    resolved = resolve_format(spec, report.key)
    return READERS[resolved.format](resolved, report)


def _content_text(content: Any, source: str, i: int) -> tuple[str, list[str | None]]:
    """A message's content as text with ``<image>`` tags, and the images its parts name (None for a part
    that only marks where an image goes, as in ``[{"type": "image"}, {"type": "text", "text": ...}]``)."""
    if isinstance(content, str):
        _refuse_media_tags(content, source)
        return content, []
    if not isinstance(content, list):
        raise RecordError(f"{source}: messages[{i}].content must be a string or a list of parts")
    text, images = "", []
    for part in content:
        if isinstance(part, str):
            text += part
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            value = part.get("text", part.get("value"))
            if not isinstance(value, str):
                raise RecordError(f"{source}: messages[{i}] has a text part without a string 'text'")
            _refuse_media_tags(value, source)
            text += value
        elif kind in ("image", "image_url"):
            ref = next((part[k] for k in ("image", "image_url", "url", "path", "value") if part.get(k)), None)
            if isinstance(ref, dict):
                ref = ref.get("url", ref.get("path"))
            text += IMAGE_TAG
            images.append(ref)
        elif kind in ("video", "video_url", "audio", "audio_url", "input_audio"):
            raise _unsupported_media(source, f"{kind} parts")
        else:
            raise RecordError(f"{source}: messages[{i}] has a content part of type {kind!r} (text, image or "
                              "image_url)")
    return text, images


def _messages_sample(record: Any, root: ImageResolver, source: str) -> Sample:
    record = _object(record, source)
    if not isinstance(record.get("messages"), list):
        raise RecordError(f"{source}: expected an object with a 'messages' list")
    _refuse_media(record, source)
    messages, named = [], []
    for i, m in enumerate(record["messages"]):
        if not isinstance(m, dict):
            raise RecordError(f"{source}: messages[{i}] must be an object with role and content")
        role = ROLE_NAMES.get(str(m.get("role")).lower())
        if role is None:
            raise RecordError(f"{source}: messages[{i}] has role {m.get('role')!r} (system, user or assistant)")
        text, images = _content_text(m.get("content"), source, i)
        messages.append({"role": role, "content": text})
        named += images
    images = record.get("images")
    if any(p is not None for p in named):
        if None in named or images:
            raise RecordError(f"{source}: give each image once: as a path in its content part or in 'images'")
        images = named
    return sample_from_messages({**record, "messages": messages, "images": images}, root, source)


@reader("messages")
def read_messages(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """``{"messages": [{"role", "content"}], "images": [...]}`` per line (or a JSON array of them). Content
    may be a list of parts (OpenAI / LLaMA-Factory v1): ``{"type": "text", "text"|"value"}`` and
    ``{"type": "image"|"image_url", ...}`` with the path in the part or, for a bare ``{"type": "image"}``,
    in ``images``. Records with videos or audio are refused (per record)."""
    return _json_samples(spec, report, _messages_sample)


def _llava_sample(record: Any, root: ImageResolver, source: str) -> Sample:
    record = _object(record, source)
    _refuse_media(record, source)
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


def _sharegpt_sample(record: Any, root: ImageResolver, source: str, columns: dict[str, str | None] | None = None,
                     tags: dict[str, str] | None = None) -> Sample:
    """A ShareGPT record; ``columns``/``tags`` are a LLaMA-Factory entry's (only mapped columns are read)."""
    record = _object(record, source)
    if columns is None:
        turns = record.get("conversations", record.get("messages", record.get("conversation")))
        system, images, tools = record.get("system"), record.get("images", record.get("image")), record.get("tools")
        _refuse_media(record, source)
        used = ("conversations", "messages", "conversation", "images", "image", "system")
    else:
        turns = record.get(columns["messages"])
        system, images, tools = (record.get(columns[k]) if columns.get(k) else None for k in ("system", "images",
                                                                                              "tools"))
        _refuse_media(record, source, (columns.get("videos"), columns.get("audios")))
        used = tuple(v for k, v in columns.items() if v and k != "tools")
    meta = {k: v for k, v in record.items() if k not in used}
    if tools:
        meta["tools"] = tools  # kept for callers; the chat template is not given tool schemas
    sample = Sample(conversation_messages(turns, source, system, tags),
                    resolve_image_paths(images or None, root, source), source, meta)
    validate_sample(sample)
    return sample


@reader("sharegpt")
def read_sharegpt(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """ShareGPT JSON or JSONL: ``conversations`` or ``messages`` with from/value or role/content turns (or
    ms-swift's ``conversation`` of human/assistant pairs), optional ``system``, ``images`` and ``tools``;
    LLaMA-Factory's ``function_call`` turns are the assistant's, ``observation`` turns the user's."""
    return _json_samples(spec, report, _sharegpt_sample)


# -- instruction formats: one prompt (plus history) and one response per record -------------------------
@dataclass(frozen=True)
class Columns:
    """Which record keys hold what, for the instruction-style formats."""

    prompt: str | None
    query: str | None
    response: str | None
    history: str | None = None
    system: str | None = None
    images: tuple[str, ...] = ()
    media: tuple[str, ...] = MEDIA_KEYS

    @classmethod
    def llamafactory(cls, columns: dict[str, str | None]) -> Columns:
        return cls(columns.get("prompt"), columns.get("query"), columns.get("response"), columns.get("history"),
                   columns.get("system"), tuple(c for c in (columns.get("images"),) if c),
                   tuple(c for c in (columns.get("videos"), columns.get("audios")) if c))


ALPACA = Columns("instruction", "input", "output", "history", "system", ("images", "image"))
SWIFT = Columns("query", None, "response", "history", "system", ("images", "image"))
MINIGPT4QWEN = Columns("instruction", None, "output", None, "system", ("image", "images"))


def _text(record: dict[str, Any], column: str | None, source: str) -> Any:
    value = record.get(column) if column else None
    if value is None or value == "":
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if not isinstance(value, str):
        raise RecordError(f"{source}: '{column}' must be a string (or a list of strings), got {type(value).__name__}")
    return value


def _inline_images(text: str) -> tuple[str, list[str]]:
    """Qwen-VL's ``<img>path</img>`` and MiniGPT4Qwen's ``<ImageHere>`` as ``<image>`` tags."""
    for placeholder in PLACEHOLDERS:
        text = text.replace(placeholder, IMAGE_TAG)
    found = INLINE_IMAGE.findall(text)
    return INLINE_IMAGE.sub(IMAGE_TAG, text), [p.strip() for p in found]


def _instruction_sample(record: Any, root: ImageResolver, source: str, cols: Columns) -> Sample:
    """Alpaca-like record -> chat: ``system``, the ``history`` pairs, then prompt (+ ``"\\n"`` + query) and
    response. Lists in prompt and response are turns (MiniGPT4Qwen); a record with only a response is
    pre-training text (an empty user turn). Images without ``<image>`` tags go before the first prompt."""
    record = _object(record, source)
    _refuse_media(record, source, cols.media)
    pairs: list[tuple[Any, Any]] = []
    history = record.get(cols.history) if cols.history else None
    if history:
        if not isinstance(history, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in history):
            raise RecordError(f"{source}: '{cols.history}' must be a list of [query, response] pairs")
        pairs += [tuple(p) for p in history]
    prompt, query = _text(record, cols.prompt, source), _text(record, cols.query, source)
    response = record.get(cols.response) if cols.response else None
    if isinstance(prompt, list) or isinstance(response, list):
        prompts = prompt if isinstance(prompt, list) else [prompt]
        responses = response if isinstance(response, list) else [response]
        if len(prompts) != len(responses):
            raise RecordError(f"{source}: {len(prompts)} '{cols.prompt}' turns but {len(responses)} "
                              f"'{cols.response}' turns")
        pairs += list(zip(prompts, responses))
    else:
        pairs.append(("\n".join(t for t in (prompt, query) if t), response))
    messages, inline = [], []
    system = _text(record, cols.system, source)
    if isinstance(system, str):
        messages.append({"role": "system", "content": system})
    for q, a in pairs:
        if not isinstance(a, str) or not a.strip():
            raise RecordError(f"{source}: no '{cols.response}' to learn from (missing or empty)")
        if q is not None and not isinstance(q, str):
            raise RecordError(f"{source}: a prompt must be a string, got {type(q).__name__}")
        q, found = _inline_images(q or "")
        _refuse_media_tags(q, source)
        inline += found
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    listed = next((record[k] for k in cols.images if record.get(k)), None)
    listed = [listed] if isinstance(listed, str) else listed
    images = resolve_image_paths(inline + list(listed or []), root, source)
    if images and count_image_tags(messages) == 0:
        first = next(m for m in messages if m["role"] == "user")
        first["content"] = IMAGE_TAG * len(images) + ("\n" + first["content"] if first["content"] else "")
    used = {cols.prompt, cols.query, cols.response, cols.history, cols.system, *cols.images}
    sample = Sample(messages, images, source, {k: v for k, v in record.items() if k not in used})
    validate_sample(sample)
    return sample


@reader("alpaca")
def read_alpaca(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """Alpaca (LLaMA-Factory's default, ms-swift's alpaca): ``instruction``, ``input``, ``output``, optional
    ``system``, ``history`` ([[query, response], ...]) and ``images``; JSON, JSONL, CSV or TSV."""
    return _json_samples(spec, report, partial(_instruction_sample, cols=ALPACA))


@reader("swift")
def read_swift(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """ms-swift's query/response: ``query``, ``response``, ``history``, ``system``, ``images`` (or Qwen-VL's
    ``<img>path</img>`` in the query); a bare ``response`` is pre-training text. JSON, JSONL, CSV or TSV.
    Image URLs are refused per record: zerovl never downloads."""
    return _json_samples(spec, report, partial(_instruction_sample, cols=SWIFT))


@reader("minigpt4qwen")
def read_minigpt4qwen(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """MiniGPT4Qwen's instruction data: ``{"image", "instruction", "output"}`` with strings, or equal-length
    lists for multi-turn chats; ``<ImageHere>`` placeholders become ``<image>``."""
    return _json_samples(spec, report, partial(_instruction_sample, cols=MINIGPT4QWEN))


def _first_key(record: dict[str, Any], preferred: str | None, keys: tuple[str, ...]) -> str | None:
    if preferred and preferred in record:
        return preferred
    return next((k for k in keys if k in record), None)


@reader("captions")
def read_captions(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """Image-text records in JSON/JSONL: the image under ``image_column`` or one of image, image_path, img,
    file_name..., the target text under ``text_column`` or caption, captions (a list: one sample each), text
    or prompt (MiniGPT4Qwen's image2prompt); the user prompt comes from ``caption_prompts``."""
    root = image_root(spec)
    for line, record in iter_records(spec.path, report.key):
        source = f"{spec.path}:{line}"
        try:
            if isinstance(record, DataError):
                raise record
            record = _object(record, source)
            image_key = _first_key(record, spec.image_column, IMAGE_KEYS + ("images",))
            text_key = _first_key(record, spec.text_column, TEXT_KEYS)
            if text_key is None:
                raise RecordError(f"{source}: no caption ({', '.join(TEXT_KEYS)}, or set text_column)")
            texts = record[text_key] if isinstance(record[text_key], list) else [record[text_key]]
            images = resolve_image_paths(record.get(image_key) if image_key else None, root, source)
            meta = {k: v for k, v in record.items() if k not in (image_key, text_key)}
        except DataError as e:
            report.bad(e)
            continue
        for k, text in enumerate(texts):
            try:
                yield caption_sample(pick_prompt(spec.caption_prompts, f"{source}|{k}"), text, images, source, meta)
            except DataError as e:
                report.bad(e)


@reader("dataset_info")
def read_dataset_info(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """LLaMA-Factory entries named as ``data/dataset_info.json#a,b`` (see :mod:`zerovl.data.dataset_info`):
    each entry's files in its ``formatting`` with its ``columns`` and ``tags``; images under the dataset
    folder first (``data.image_root`` overrides it)."""
    for entry in load_entries(spec.path, report.key):
        if entry.formatting == "alpaca":
            build = partial(_instruction_sample, cols=Columns.llamafactory(entry.columns))
        else:
            build = partial(_sharegpt_sample, columns=entry.columns, tags=entry.tags)
        for file in entry.files:
            log.info("%s: LLaMA-Factory dataset %s: %s (%s)", report.key or spec.label, entry.name, file,
                     entry.formatting)
            member = spec.model_copy(update={"path": file, "image_root": spec.image_root or entry.media_dir})
            yield from _json_samples(member, report, build)


@reader("coco")
def read_coco(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """COCO captions (``images`` + ``annotations``): one captioning sample per annotation, its prompt
    picked from ``caption_prompts`` by the annotation id."""
    text = read_text(spec.path, report.key)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{spec.path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{spec.path}: a COCO captions file needs top-level 'images' and 'annotations' lists")
    root = image_root(spec)
    split = COCO_FILE.match(os.path.basename(spec.path))
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(spec.path))), split.group(1)) if split else ""
    if spec.image_root is None and split and os.path.isdir(beside):
        # COCO's own layout: annotations/captions_val2017.json beside val2017/
        log.info("%s: images from %s (COCO layout; data.image_root overrides it)", spec.label, beside)
        root = ImageResolver(beside, spec.label)
    files = {im.get("id"): im.get("file_name") for im in data["images"] if isinstance(im, dict)}
    for i, ann in enumerate(data["annotations"]):
        source = f"{spec.path}:annotations[{i}]"
        try:
            ann = _object(ann, source)
            file_name = files.get(ann.get("image_id"))
            if not isinstance(file_name, str):
                raise RecordError(f"{source}: image_id {ann.get('image_id')!r} has no entry in 'images'")
            if has_bad_bytes(ann.get("caption")) or has_bad_bytes(file_name):
                raise RecordError(f"{source}: its caption or file name is not UTF-8; re-save the file as UTF-8",
                                  kind="not_utf8")
            key = str(ann.get("id", i))
            yield caption_sample(pick_prompt(spec.caption_prompts, key), ann.get("caption"),
                                 resolve_image_paths(file_name, root, source), source,
                                 {"id": ann.get("id"), "image_id": ann.get("image_id")})
        except DataError as e:
            report.bad(e)


@reader("karpathy")
def read_karpathy(spec: DatasetSpec, report: ReadReport) -> Iterator[Sample]:
    """Karpathy's split files (``dataset_coco.json``, ``dataset_flickr30k.json``): ``images`` with
    ``filepath``/``filename``, ``sentences[].raw`` and ``split``; one captioning sample per sentence.
    ``split`` picks one split (``train`` also takes ``restval``, as BLIP and LAVIS train on both)."""
    text = read_text(spec.path, report.key)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{spec.path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{spec.path}: a Karpathy split file needs a top-level 'images' list")
    wanted = {spec.split, "restval"} if spec.split == "train" else {spec.split}
    splits = sorted({str(im.get("split")) for im in data["images"] if isinstance(im, dict)})
    if spec.split is not None and not wanted & set(splits):
        raise DataError(f"{spec.path}: no image in split {spec.split!r} (splits: {', '.join(splits)}); set split")
    root = image_root(spec)
    for i, image in enumerate(data["images"]):
        source = f"{spec.path}:images[{i}]"
        try:
            image = _object(image, source)
            if spec.split is not None and image.get("split") not in wanted:
                continue
            name = image.get("filename")
            if not isinstance(name, str):
                raise RecordError(f"{source}: no filename")
            rel = os.path.join(image["filepath"], name) if isinstance(image.get("filepath"), str) else name
            images = resolve_image_paths(rel, root, source)
            sentences = [s.get("raw") if isinstance(s, dict) else s for s in image.get("sentences") or []]
            if not sentences:
                raise RecordError(f"{source}: no sentences")
            key = str(image.get("cocoid", image.get("imgid", i)))
        except DataError as e:
            report.bad(e)
            continue
        for k, sentence in enumerate(sentences):
            try:
                yield caption_sample(pick_prompt(spec.caption_prompts, f"{key}|{k}"), sentence, images, source,
                                     {"image_id": key, "split": image.get("split")})
            except DataError as e:
                report.bad(e)


def _cell_images(value: str | None, root: ImageResolver, source: str) -> list[str]:
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
    columns, rows = table_rows(spec.path, delimiter, key=report.key)
    if spec.text_column == "text" and "text" not in columns and "caption" in columns:
        spec = spec.model_copy(update={"text_column": "caption"})  # image,caption pairs (retrieval CSVs)
    wanted = {"image_column": spec.image_column, "text_column": spec.text_column,
              "prompt_column": spec.prompt_column}
    for option, column in wanted.items():
        if column is not None and column not in columns:
            raise DataError(f"{spec.path}:1: no column {column!r} for {option} (header: {', '.join(columns)}); "
                            f"set {option} to one of them")
    for line, row in rows:
        source = f"{spec.path}:{line}"
        try:
            if isinstance(row, DataError):
                raise row
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
    ``prompt_column`` (or a prompt from ``caption_prompts``). Alpaca / ms-swift columns in a CSV are read
    by ``alpaca`` / ``swift`` (what ``auto`` picks for them)."""
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
