"""Benchmark files -> :class:`EvalItem` (a prompt ``Sample``, its references, what the scorer needs).

One reader per task, each taking the layouts people publish: VQAv2's questions + annotations JSON and a
JSON/JSONL of (image, question, answers); COCO captions JSON and a JSONL of (image, references); MMBench's
TSV (images in base64 or as paths) and a JSONL; LLaVA's question files for open-ended generation. Any
zerovl training file (messages JSONL and the peers' formats) also works for vqa and open: the prompt is the
conversation up to its last reply, the reply is the reference. A record that cannot be evaluated is
counted under a reason (``problems``) and left out; a file that cannot be read, or an id given twice,
stops with one line naming the file and line.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import logging
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zerovl.config import EvalTaskSettings
from zerovl.data.samples import IMAGE_TAG, Sample
from zerovl.errors import DataError
from zerovl.eval.mcq import build_mcq_prompt, circular_variants

log = logging.getLogger(__name__)

VQA_SUFFIX = "Answer the question using a single word or phrase."  # lmms-eval's and VLMEvalKit's
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."  # lmms-eval's coco_cap prompt
OPTION_KEYS = "ABCDEFGHI"
BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")  # no dot, so never a file name with an extension


@dataclass
class EvalItem:
    id: str
    sample: Sample  # the prompt: messages up to the reply to generate, and the images
    references: list[str]
    meta: dict[str, Any] = field(default_factory=dict)  # answer_type, options, answer, group, category


@dataclass
class TaskData:
    items: list[EvalItem]
    problems: Counter = field(default_factory=Counter)  # reason -> records left out

    def drop(self, reason: str, source: str) -> None:
        if not self.problems[reason]:
            log.warning("%s: %s; such records are left out and counted in the report", source,
                        reason.replace("_", " "))
        self.problems[reason] += 1


# ---- reading files ---------------------------------------------------------------------------------


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); fix the file or pass the right one") from None


def records(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(``file:line`` or ``file[i]``, record) for a JSONL file or a JSON list (or ``{"data": [...]}``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    if p.suffix == ".jsonl":
        out = []
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{n}: not valid JSON ({e.msg}); fix or delete that line") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{p}:{n}: each line must be a JSON object")
                out.append((f"{p}:{n}", rec))
        return out
    data = _load_json(p)
    if isinstance(data, dict):
        data = next((data[k] for k in ("data", "questions", "samples") if isinstance(data.get(k), list)), None)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{p}: expected a JSON list of objects (or a .jsonl file)")
    return [(f"{p}[{i}]", r) for i, r in enumerate(data)]


def _image_root(settings: EvalTaskSettings) -> Path:
    return Path(settings.image_root) if settings.image_root else Path(settings.data).parent


def _images_of(rec: dict[str, Any], root: Path) -> list[str]:
    value = rec.get("image", rec.get("images", rec.get("image_path")))
    paths = [value] if isinstance(value, str) else list(value or [])
    return [p if os.path.isabs(p) else str(root / p) for p in paths if isinstance(p, str) and p]


def _first(rec: dict[str, Any], *keys: str) -> Any:
    return next((rec[k] for k in keys if rec.get(k) not in (None, "")), None)


def _prompt(images: list[str], text: str) -> str:
    """Image tags first, as LLaVA-style training data puts them, unless the text places them itself."""
    return text if IMAGE_TAG in text else IMAGE_TAG * len(images) + text


def _item_id(rec: dict[str, Any], source: str) -> str:
    value = _first(rec, "question_id", "id", "index", "image_id")
    return str(value) if value is not None else source


def _add(data: TaskData, seen: dict[str, str], item: EvalItem) -> None:
    if item.id in seen:
        raise DataError(f"{item.sample.source}: id {item.id!r} already used at {seen[item.id]}; ids must be "
                        f"unique (one prediction per id)")
    held = item.sample.meta.get("image_bytes") is not None  # images inside the file (MMBench's base64)
    missing = [] if held else [p for p in item.sample.images if not os.path.isfile(p)]
    if missing:
        data.drop("missing_image", f"{item.sample.source}: image {missing[0]} not found")
        return
    seen[item.id] = item.sample.source
    data.items.append(item)


def _answers(value: Any) -> list[str]:
    """VQAv2 ``[{"answer": ...}, ...]``, a list of strings, or one string."""
    if isinstance(value, str):
        return [value]
    out = []
    for a in value or []:
        a = a.get("answer") if isinstance(a, dict) else a
        if isinstance(a, (str, int, float)) and str(a).strip():
            out.append(str(a))
    return out


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _from_messages(rec: dict[str, Any], source: str, root: Path) -> EvalItem:
    """A training-format record: prompt = the conversation before its last reply, reference = that reply."""
    messages = [m for m in rec["messages"] if isinstance(m, dict)]
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError(f"{source}: the last message must be the assistant's reply to score")
    sample = Sample(messages=messages[:-1], images=_images_of(rec, root), source=source,
                    meta={k: v for k, v in rec.items() if k not in ("messages", "images", "image")})
    kind = _first(rec, "answer_type", "type", "category")
    return EvalItem(_item_id(rec, source), sample, [str(messages[-1].get("content", ""))],
                    {"answer_type": str(kind) if kind is not None else None})


# ---- vqa and open-ended -----------------------------------------------------------------------------


def _coco_image(root: Path, subtype: str | None, image_id: int) -> str:
    """VQAv2 names images after COCO 2014 (``COCO_val2014_<id>.jpg``); COCO 2017 drops the prefix."""
    named = root / f"COCO_{subtype}_{image_id:012d}.jpg" if subtype else None
    if named is not None and named.is_file():
        return str(named)
    plain = root / f"{image_id:012d}.jpg"
    return str(plain if plain.is_file() or named is None else named)


def read_vqav2(settings: EvalTaskSettings, suffix: str) -> TaskData:
    qpath, apath = Path(settings.data), Path(settings.annotations)
    questions = _load_json(qpath)
    if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
        raise DataError(f"{qpath}: a VQAv2 questions file holds {{'questions': [...]}}")
    annotations = _load_json(apath)
    if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
        raise DataError(f"{apath}: a VQAv2 annotations file holds {{'annotations': [...]}}")
    by_qid = {a.get("question_id"): a for a in annotations["annotations"] if isinstance(a, dict)}
    root, subtype = _image_root(settings), questions.get("data_subtype")
    data, seen = TaskData([]), {}
    for i, q in enumerate(questions["questions"]):
        source = f"{qpath}[{i}]"
        if not isinstance(q, dict) or "question" not in q or "image_id" not in q:
            raise DataError(f"{source}: a VQAv2 question needs 'question', 'image_id' and 'question_id'")
        ann = by_qid.get(q.get("question_id"), {})
        image = _coco_image(root, subtype, int(q["image_id"]))
        sample = Sample(_user(_prompt([image], _join(q["question"], suffix))), [image], source)
        _add(data, seen, EvalItem(str(q.get("question_id", source)), sample, _answers(ann.get("answers")),
                                  {"answer_type": ann.get("answer_type"), "question": q["question"]}))
    return data


def _join(question: str, suffix: str) -> str:
    return f"{question.strip()}\n{suffix}" if suffix else question.strip()


def items_from_samples(samples: list[Sample]) -> TaskData:
    """Training samples (any format the data readers take): the conversation before the last reply is the
    prompt, the reply the reference, the record's ``type``/``category`` its answer type."""
    data, seen = TaskData([]), {}
    for s in samples:
        if not s.messages or s.messages[-1]["role"] != "assistant":
            data.drop("no_reply_to_score", s.source)
            continue
        kind = _first(s.meta, "answer_type", "type", "category")
        prompt = Sample(s.messages[:-1], s.images, s.source, dict(s.meta))
        _add(data, seen, EvalItem(_item_id(s.meta, s.source), prompt, [s.messages[-1]["content"]],
                                  {"answer_type": str(kind) if kind is not None else None}))
    return data


def _training_file(settings: EvalTaskSettings) -> TaskData:
    from zerovl.config import DatasetSpec
    from zerovl.data.readers import ReadReport, read_dataset

    spec = DatasetSpec(path=settings.data, image_root=settings.image_root)
    return items_from_samples(read_dataset(spec, ReadReport(key=f"eval task {settings.label}")))


def _is_question(rec: dict[str, Any]) -> bool:
    return isinstance(rec.get("messages"), list) or isinstance(_first(rec, "question", "text", "prompt"), str)


def read_questions(settings: EvalTaskSettings, suffix: str) -> TaskData:
    """JSON/JSONL of questions: (image, question or LLaVA's text, answers or answer), or training records
    (messages JSONL here; any other training format through the data readers)."""
    root = _image_root(settings)
    data, seen = TaskData([]), {}
    rows = records(settings.data) if Path(settings.data).suffix in (".json", ".jsonl") else []
    if not rows or not _is_question(rows[0][1]):
        return _training_file(settings)
    for source, rec in rows:
        if isinstance(rec.get("messages"), list):
            _add(data, seen, _from_messages(rec, source, root))
            continue
        question = _first(rec, "question", "text", "prompt")
        if not isinstance(question, str):
            raise DataError(f"{source}: no question: give 'question' (or 'text'), or 'messages'")
        images = _images_of(rec, root)
        sample = Sample(_user(_prompt(images, _join(question, suffix))), images, source)
        kind = _first(rec, "answer_type", "type", "category")
        refs = _answers(rec.get("answers", rec.get("answer")))
        _add(data, seen, EvalItem(_item_id(rec, source), sample, refs,
                                  {"answer_type": str(kind) if kind is not None else None, "question": question}))
    return data


def read_vqa(settings: EvalTaskSettings) -> TaskData:
    suffix = VQA_SUFFIX if settings.prompt is None else settings.prompt
    return read_vqav2(settings, suffix) if settings.annotations else read_questions(settings, suffix)


def read_open(settings: EvalTaskSettings) -> TaskData:
    return read_questions(settings, settings.prompt or "")


# ---- captions ---------------------------------------------------------------------------------------


def read_caption(settings: EvalTaskSettings) -> TaskData:
    """COCO's ``captions_*.json`` (images + annotations) or JSON/JSONL of (image, references)."""
    prompt = CAPTION_PROMPT if settings.prompt is None else settings.prompt
    root = _image_root(settings)
    data, seen = TaskData([]), {}
    path = Path(settings.data)
    raw = _load_json(path) if path.suffix == ".json" else None
    if isinstance(raw, dict) and isinstance(raw.get("images"), list) and isinstance(raw.get("annotations"), list):
        refs: dict[Any, list[str]] = {}
        for a in raw["annotations"]:
            if isinstance(a, dict) and isinstance(a.get("caption"), str):
                refs.setdefault(a.get("image_id"), []).append(a["caption"].strip())
        for i, im in enumerate(raw["images"]):
            source = f"{path}[images][{i}]"
            image = str(root / im["file_name"])
            sample = Sample(_user(_prompt([image], prompt)), [image], source)
            _add(data, seen, EvalItem(str(im["id"]), sample, refs.get(im["id"], [])))
        return data
    for source, rec in records(settings.data):
        images = _images_of(rec, root)
        if len(images) != 1:
            raise DataError(f"{source}: a caption record needs one 'image'")
        refs_ = _answers(_first(rec, "references", "captions", "caption", "refs"))
        sample = Sample(_user(_prompt(images, prompt)), images, source)
        _add(data, seen, EvalItem(_item_id(rec, source), sample, refs_))
    return data


# ---- multiple choice --------------------------------------------------------------------------------


def _tsv_rows(path: Path) -> list[tuple[str, dict[str, str]]]:
    csv.field_size_limit(sys.maxsize)  # MMBench keeps whole images in a cell
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            return [(f"{path}:{n + 2}", row) for n, row in enumerate(reader)]
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None


def _present(value: Any) -> bool:
    return value is not None and str(value).strip() not in ("", "nan", "NaN", "None")


def _options(rec: dict[str, Any]) -> dict[str, str]:
    given = rec.get("options")
    if isinstance(given, dict):
        return {str(k).upper(): str(v) for k, v in given.items() if _present(v)}
    if isinstance(given, list):
        return {OPTION_KEYS[i]: str(v) for i, v in enumerate(given) if _present(v)}
    return {k: str(rec[k]).strip() for k in OPTION_KEYS if _present(rec.get(k))}


def _mcq_image(rec: dict[str, Any], root: Path, source: str, item_id: str) -> tuple[list[str], list[bytes] | None]:
    """MMBench stores the image as base64 in ``image``; other files give a path."""
    value = rec.get("image")
    if isinstance(value, str) and len(value) > 64 and BASE64.fullmatch(value[:256]) and not os.path.isfile(value):
        try:
            return [f"{item_id}.png"], [base64.b64decode(value, validate=False)]
        except (binascii.Error, ValueError):
            raise DataError(f"{source}: 'image' is neither a path nor base64 image data") from None
    return _images_of(rec, root), None


def read_mcq(settings: EvalTaskSettings) -> TaskData:
    path = Path(settings.data)
    rows = _tsv_rows(path) if path.suffix in (".tsv", ".csv") else records(settings.data)
    root = _image_root(settings)
    data, seen = TaskData([]), {}
    for source, rec in rows:
        options, answer = _options(rec), str(rec.get("answer") or "").strip().upper()
        question = rec.get("question")
        if not _present(question) or len(options) < 2:
            raise DataError(f"{source}: a multiple-choice record needs 'question' and at least options A and B")
        if answer not in options:
            data.drop("answer_not_an_option", f"{source}: answer {answer!r} is not one of {sorted(options)}")
            continue
        qid = _item_id(rec, source)
        images, held = _mcq_image(rec, root, source, qid)
        hint = rec.get("hint") if _present(rec.get("hint")) else None
        variants = circular_variants(options, answer) if settings.circular else [(options, answer)]
        for r, (opts, letter) in enumerate(variants):
            text = _prompt(images, build_mcq_prompt(str(question), opts, hint))
            meta = {"image_bytes": held} if held is not None else {}
            sample = Sample(_user(text), images, source, meta)
            item = EvalItem(qid if r == 0 else f"{qid}@{r}", sample, [letter],
                            {"options": opts, "answer": letter, "group": qid,
                             "category": str(rec["category"]) if _present(rec.get("category")) else None})
            _add(data, seen, item)
    return data
