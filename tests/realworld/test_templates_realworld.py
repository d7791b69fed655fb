"""Assistant-only labels under each real Qwen chat template, token by token (single process, fast).

Each case is a real tokenizer directory as a user has it (its tokenizer_config.json with the template
inline, or the processor's chat_template.json), loaded through zerovl's own ``load_tokenizer`` and
encoded by the ``ChatTemplate`` that ``BuiltModel.template`` builds. The contract (zerovl/data/template.py):
labels are -100 everywhere except on each assistant reply's content and its end-of-turn token
(``<|im_end|>``), and the ids are the tokenizer's own ``apply_chat_template`` rendering, token for token.
GPT-2 and CLIP tokenizers have no chat template and are not covered here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.realworld.conftest import TOKENIZERS
from zerovl.data.samples import Sample
from zerovl.data.template import IGNORE_INDEX
from zerovl.models.builder import BuiltModel, load_tokenizer
from zerovl.models.native import IMAGE_PAD, VISION_END, VISION_START, image_text

# case -> (files laid out in the tokenizer directory, chat_template.json to use instead of the inline one)
CASES = {
    # tool-calling template, default system "You are Qwen, created by Alibaba Cloud. ..."
    "qwen2.5-7b-instruct": ({f: "qwen2.5-7b-instruct/" + f for f in ("vocab.json", "merges.txt",
                                                                     "tokenizer_config.json")}, None),
    # simple ChatML with a default system prompt; only tokenizer_config.json was saved: vocab.json and
    # merges.txt are the Qwen2-family blobs (SOURCES.md), taken from qwen2.5-7b-instruct
    "qwen2-7b-instruct": ({"vocab.json": "qwen2.5-7b-instruct/vocab.json",
                           "merges.txt": "qwen2.5-7b-instruct/merges.txt",
                           "tokenizer_config.json": "qwen2-7b-instruct/tokenizer_config.json"}, None),
    # VL template inline (merges.txt with the '#version: 0.2' header)
    "qwen2-vl-2b-instruct": ({f: "qwen2-vl-2b-instruct/" + f for f in ("vocab.json", "merges.txt",
                                                                      "tokenizer_config.json")}, None),
    "qwen2-vl-2b-instruct/chat_template.json": (
        {f: "qwen2-vl-2b-instruct/" + f for f in ("vocab.json", "merges.txt", "tokenizer_config.json")},
        "qwen2-vl-2b-instruct/chat_template.json"),
    # the older tokenizer_config.json (padding_side left, model_max_length 32768)
    "qwen2-vl-2b-instruct/older-copy": ({"vocab.json": "qwen2-vl-2b-instruct/vocab.json",
                                         "merges.txt": "qwen2-vl-2b-instruct/merges.txt",
                                         "tokenizer_config.json": "qwen2-vl-2b-instruct/older-copy/tokenizer_config.json"},
                                        None),
    # tokenizers/qwen2.5-vl has no vocab.json/merges.txt: the Qwen2.5 ones are the same blobs (SOURCES.md)
    "qwen2.5-vl": ({"vocab.json": "qwen2.5-7b-instruct/vocab.json", "merges.txt": "qwen2.5-7b-instruct/merges.txt",
                    "tokenizer_config.json": "qwen2.5-vl/tokenizer_config.json"}, None),
    "qwen2.5-vl/chat_template.json": ({"vocab.json": "qwen2.5-7b-instruct/vocab.json",
                                       "merges.txt": "qwen2.5-7b-instruct/merges.txt",
                                       "tokenizer_config.json": "qwen2.5-vl/tokenizer_config.json"},
                                      "qwen2.5-vl/chat_template.json"),
}
VL_CASES = [c for c in CASES if "vl" in c]

CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And in words, with some unicode and a second line?"},
    {"role": "assistant", "content": "Four — vier, quatre ✓\nThat is all."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "  You're welcome.  "},  # leading / trailing spaces stay the reply's
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for case, (files, _) in CASES.items():
        d = root / case.replace("/", "__")
        d.mkdir()
        for name, src in files.items():
            shutil.copyfile(TOKENIZERS / src, d / name)
        out[case] = d
    return out


def _tokenizer(tokenizer_dirs, case: str, native_dir: Path | None = None):
    """The case's tokenizer through zerovl's loading; with ``native_dir`` (a native model directory) also
    the per-image token counter ``text_side`` gives the chat template."""
    from zerovl.config import ModelSettings
    from zerovl.models.builder import text_side

    d = tokenizer_dirs[case]
    if native_dir is not None:
        tok, tokens, _, _ = text_side(ModelSettings.model_validate({"native": {"path": str(native_dir)},
                                                                    "tokenizer": str(d)}))
    else:
        tok = load_tokenizer(ModelSettings.model_validate({"llm": {"config": {"model_type": "qwen2"}},
                                                           "tokenizer": str(d)}))
        tokens = None
    chat_template_json = CASES[case][1]
    if chat_template_json is not None:
        tok.chat_template = json.loads((TOKENIZERS / chat_template_json).read_text())["chat_template"]
    return (tok, tokens) if native_dir is not None else tok


def _hf_ids(tok, messages, **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])


def _supervised_runs(labels: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, lab in enumerate([*labels, IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _check_labels(tok, enc, replies: list[str], strict_end: bool = False) -> None:
    """Token by token: supervised positions are, per reply, the reply's own tokens and <|im_end|>, each run
    right after '<|im_start|>assistant\\n'; every other label is IGNORE_INDEX. Unless ``strict_end``, the
    one template newline after <|im_end|> is let through here: test_nothing_after_end_of_turn_is_supervised
    holds that part of the contract on its own."""
    ids, labels = enc.input_ids, enc.labels
    assert len(ids) == len(labels)
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(labels, ids))
    runs = _supervised_runs(labels)
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(runs) == len(replies), [tok.decode(ids[a:b]) for a, b in runs]
    for (a, b), reply in zip(runs, replies):
        assert ids[a - len(header):a] == header
        want = tok(reply, add_special_tokens=False)["input_ids"] + [im_end]
        if not strict_end and ids[a:b] == want + newline:
            b -= len(newline)
        assert tok.decode(ids[a:b]) == reply + "<|im_end|>"
        assert ids[a:b] == want


@pytest.mark.parametrize("case", list(CASES))
def test_multi_turn_labels_and_ids_match_the_real_template(tokenizer_dirs, case):
    tok = _tokenizer(tokenizer_dirs, case)
    assert tok.is_fast
    template = BuiltModel(None, tok, None, 4, "<image>").template()
    enc = template.encode(Sample(messages=CHAT, images=[], source="chat.jsonl:1"))
    assert enc.input_ids == _hf_ids(tok, CHAT)
    _check_labels(tok, enc, [m["content"] for m in CHAT if m["role"] == "assistant"])
    text = tok.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\n")  # every one of these templates adds a default system turn
    default_system = text.split("<|im_end|>")[0]
    assert ("You are Qwen, created by Alibaba Cloud" in default_system) == (case == "qwen2.5-7b-instruct")


@pytest.mark.parametrize("case", list(CASES))
def test_system_prompt_from_config_and_from_data(tokenizer_dirs, case):
    tok = _tokenizer(tokenizer_dirs, case)
    replies = ["Paris.", "About 2.1 million."]
    chat = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": replies[0]},
            {"role": "user", "content": "Population?"}, {"role": "assistant", "content": replies[1]}]
    # data.system_prompt: prepended as a system turn, which replaces the template's default
    template = BuiltModel(None, tok, None, 4, "<image>").template("You answer in one short line.")
    enc = template.encode(Sample(messages=chat, images=[], source="t:1"))
    expected = [{"role": "system", "content": "You answer in one short line."}, *chat]
    assert enc.input_ids == _hf_ids(tok, expected)
    assert tok.decode(enc.input_ids).count("<|im_start|>system\n") == 1
    _check_labels(tok, enc, replies)
    # a system message in the data wins over data.system_prompt
    own = [{"role": "system", "content": "Be terse."}, *chat]
    enc = template.encode(Sample(messages=own, images=[], source="t:2"))
    assert enc.input_ids == _hf_ids(tok, own)
    assert "You answer in one short line." not in tok.decode(enc.input_ids)
    _check_labels(tok, enc, replies)


@pytest.mark.parametrize("case", list(CASES))
def test_composed_image_tokens_are_never_supervised(tokenizer_dirs, case):
    """A composed model (LLaVA / MiniGPT4Qwen): each <image> becomes N copies of the added <image> token."""
    tok = _tokenizer(tokenizer_dirs, case)
    template = BuiltModel(None, tok, None, 5, "<image>").template()
    chat = [{"role": "user", "content": "<image>\nWhat is shown?"}, {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "And here?<image>"}, {"role": "assistant", "content": "A dog on a sofa."}]
    enc = template.encode(Sample(messages=chat, images=["a.jpg", "b.jpg"], source="t:1"))
    image_id = tok.convert_tokens_to_ids("<image>")
    assert enc.input_ids.count(image_id) == 10 and enc.image_tokens == 10
    expanded = [dict(m, content=m["content"].replace("<image>", "<image>" * 5)) for m in chat]
    assert enc.input_ids == _hf_ids(tok, expanded)
    _check_labels(tok, enc, ["A cat.", "A dog on a sofa."])


@pytest.mark.parametrize("case", VL_CASES)
def test_native_image_text_matches_the_vl_processor_layout(tokenizer_dirs, tiny_model, tmp_path, case):
    """Native Qwen2-VL / Qwen2.5-VL: zerovl's <image> expansion (vision_start, N image_pad, vision_end, N
    from the image's size) is what the real VL chat template renders for an image content part, with its
    one <|image_pad|> expanded to the image's token count as Qwen2VLProcessor does; labels stay on the
    replies only."""
    from PIL import Image

    native_dir = tiny_model("qwen2.5-vl-3b-instruct" if case.startswith("qwen2.5") else "qwen2-vl-2b-instruct")
    tok, tokens = _tokenizer(tokenizer_dirs, case, native_dir)
    images = []
    for w, h in ((56, 84), (1, 1)):
        images.append(str(tmp_path / f"{w}x{h}.png"))
        Image.new("RGB", (w, h), (90, 20, 160)).save(images[-1])
    template = BuiltModel(None, tok, None, tokens, IMAGE_PAD, image_text).template()
    chat = [{"role": "user", "content": "<image>Describe it."}, {"role": "assistant", "content": "Two cats."},
            {"role": "user", "content": "Compare with <image>"}, {"role": "assistant", "content": "Same cats."}]
    enc = template.encode(Sample(messages=chat, images=images, source="t:1"))
    start, pad, end = tok.convert_tokens_to_ids([VISION_START, IMAGE_PAD, VISION_END])
    opens = [i for i, t in enumerate(enc.input_ids) if t == start]
    closes = [i for i, t in enumerate(enc.input_ids) if t == end]
    assert len(opens) == len(closes) == 2
    counts = [c - o - 1 for o, c in zip(opens, closes)]
    assert all(set(enc.input_ids[o + 1:c]) == {pad} for o, c in zip(opens, closes))
    assert counts == [6, 4]  # 56x84 -> a 4x6 patch grid; 1x1 -> min_pixels 3136 -> 56x56 -> 4x4; merge 2x2
    assert enc.input_ids.count(pad) == sum(counts) == enc.image_tokens
    _check_labels(tok, enc, ["Two cats.", "Same cats."])
    vl_template = json.loads((TOKENIZERS / case.split("/")[0] / "chat_template.json").read_text())["chat_template"]
    structured = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": "Two cats."},
        {"role": "user", "content": [{"type": "text", "text": "Compare with "}, {"type": "image"}]},
        {"role": "assistant", "content": "Same cats."},
    ]
    pieces = tok.apply_chat_template(structured, tokenize=False, chat_template=vl_template).split(
        VISION_START + IMAGE_PAD + VISION_END)
    official = pieces[0] + image_text(counts[0]) + pieces[1] + image_text(counts[1]) + pieces[2]
    ours = tok.decode(enc.input_ids)
    if CASES[case][1] is not None or "vl-2b" in case:  # the VL template itself is in force
        assert ours == official
    else:  # Qwen2.5-VL's tokenizer_config.json carries the text (tool-calling) template: same turns
        assert ours.split("<|im_start|>user\n", 1)[1] == official.split("<|im_start|>user\n", 1)[1]


@pytest.mark.parametrize("case", ["qwen2.5-7b-instruct", "qwen2-vl-2b-instruct/chat_template.json"])
def test_nothing_after_end_of_turn_is_supervised(tokenizer_dirs, case):
    """The template's newline after <|im_end|> is formatting between turns, not part of the reply: the
    documented contract supervises content and end-of-turn token only."""
    tok = _tokenizer(tokenizer_dirs, case)
    enc = BuiltModel(None, tok, None, 4, "<image>").template().encode(Sample(messages=CHAT, images=[], source="t:1"))
    supervised = [tok.decode(enc.input_ids[a:b]) for a, b in _supervised_runs(enc.labels)]
    assert supervised == [m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"], supervised


@pytest.mark.parametrize("case", list(CASES))
def test_labels_without_offsets_equal_the_offset_path(tokenizer_dirs, case):
    """The slow-tokenizer path (text cut at each reply, tokenized piece by piece; zerovl/data/template.py)
    run on a real fast tokenizer gives the offset path's ids and labels exactly: plain, with a system
    prompt, and with composed image tokens."""
    from zerovl.data.template import ChatTemplate

    tok = _tokenizer(tokenizer_dirs, case)
    images = [{"role": "user", "content": "<image>\nWhat is shown?"}, {"role": "assistant", "content": "A cat."},
              {"role": "user", "content": "And here?<image>"}, {"role": "assistant", "content": "A dog on a sofa."}]
    for system in (None, "You answer in one short line."):
        for chat, pictures in ((CHAT, []), (images, ["a.jpg", "b.jpg"])):
            sample = Sample(messages=chat, images=pictures, source="t:1")
            by_offsets, by_pieces = (ChatTemplate(tok, "<image>", 5, system, pieces=p) for p in (False, True))
            a, b = by_offsets.encode(sample), by_pieces.encode(sample)
            assert (b.input_ids, b.labels) == (a.input_ids, a.labels)
            assert by_pieces.encode_prompt(sample) == by_offsets.encode_prompt(sample)
