"""The built-in demo dataset: synthetic scenes of coloured shapes, with questions and captions.

Everything is generated from a seed, offline: PNG images with one to three shapes placed in the
left / middle / right of the picture, messages-JSONL files for train and val, and a small word-level
tokenizer (with a ChatML template) that covers every word the data uses. Within one scene every
object has its own colour and its own shape, so each question has exactly one right answer.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (150, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SLOTS = ("left", "middle", "right")
WHERE = ("on the left", "in the middle", "on the right")
NUMBERS = ("zero", "one", "two", "three")
SIDES = {"circle": "zero", "square": "four", "triangle": "three"}
QUESTION_TYPES = ("colour", "shape", "count", "position", "where")


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    slot: int  # column of the row: 0 = left, 1 = middle, 2 = right

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def random_scene(rng: random.Random) -> list[Shape]:
    k = rng.randint(1, 3)
    colours = rng.sample(sorted(COLOURS), k)
    shapes = rng.sample(SHAPES, k)
    slots = sorted(rng.sample(range(3), k))
    return [Shape(c, s, p) for c, s, p in zip(colours, shapes, slots)]


def draw_scene(scene: list[Shape], size: int, rng: random.Random, jitter: float = 0.5,
               radius: float = 0.42) -> Image.Image:
    shade = rng.randint(225, 255)
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for obj in scene:
        # one object per cell of a 3x3 grid, jittered a little, never crossing its cell
        r = (radius + rng.uniform(-0.06, 0.06) * jitter) * cell
        cx = (obj.slot + 0.5 + rng.uniform(-0.08, 0.08) * jitter) * cell
        cy = (1.5 + rng.uniform(-0.08, 0.08) * jitter) * cell  # the middle row of the 3x3 grid
        style = {"fill": COLOURS[obj.colour]}
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], **style)
        elif obj.shape == "square":
            draw.rectangle([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], **style)
        else:
            draw.polygon([(cx, cy - r), (cx - r * math.sqrt(3) / 2 * 1.1, cy + r * 0.6),
                          (cx + r * math.sqrt(3) / 2 * 1.1, cy + r * 0.6)], **style)
    return image


def questions(scene: list[Shape], rng: random.Random, position_questions: int = 1) -> list[tuple[str, str, str]]:
    """(type, question, answer) triples, one per question type that the scene allows.

    Objects are referred to by where they are (colour questions) or by their colour (position
    questions, yes or no, half of them yes; where questions, left / middle / right, which teach the
    step the yes-or-no form hides behind a 50 % prior); shape is asked of single-object scenes. Every question
    has exactly one right answer.
    """
    obj = rng.choice(scene)
    qa = [
        ("colour", f"what colour is the shape {WHERE[obj.slot]} ?", obj.colour),
        ("count", "how many shapes are there ?", NUMBERS[len(scene)]),
    ]
    where = rng.choice(scene)
    qa.append(("where", f"where is the {where.colour} shape ?", SLOTS[where.slot]))
    for _ in range(position_questions):
        target = rng.choice(scene)
        asked = target.slot if rng.random() < 0.5 else rng.choice([s for s in range(3) if s != target.slot])
        qa.append(("position", f"is the {target.colour} shape {WHERE[asked]} ?",
                   "yes" if asked == target.slot else "no"))
    if len(scene) == 1:
        qa.append(("shape", "what shape is it ?", scene[0].shape))
    return qa


def caption(scene: list[Shape]) -> str:
    return " then ".join(f"a {o.name}" for o in scene)


def make_records(scene: list[Shape], image: str, rng: random.Random, multi_turn: bool,
                 captions: bool = True, position_questions: int = 1) -> list[dict]:
    qa = questions(scene, rng, position_questions)
    rng.shuffle(qa)
    if captions and rng.random() < 0.2:
        qa.append(("caption", "describe the image .", caption(scene)))
    if not multi_turn:
        return [{"messages": [{"role": "user", "content": f"{q} <image>"}, {"role": "assistant", "content": a}],
                 "images": [image], "type": t} for t, q, a in qa]
    turns = rng.randint(2, len(qa)) if len(qa) >= 2 else 1
    messages = []
    for i, (_, q, a) in enumerate(qa[:turns]):
        messages += [{"role": "user", "content": q + (" <image>" if i == 0 else "")},
                     {"role": "assistant", "content": a}]
    return [{"messages": messages, "images": [image], "type": "multi"}]


def text_only_record(rng: random.Random) -> dict:
    shape = rng.choice(SHAPES)
    return {"messages": [{"role": "user", "content": f"how many sides does a {shape} have ?"},
                         {"role": "assistant", "content": SIDES[shape]}], "images": [], "type": "text"}


def generate(out_dir: str | Path, num_train_images: int = 3000, num_val_images: int = 150,
             image_size: int = 48, seed: int = 0, jitter: float = 0.5, radius: float = 0.42, train_position_questions: int = 2) -> dict[str, Path]:
    """Write images, ``train.jsonl``, ``val.jsonl`` and ``tokenizer/`` under ``out_dir``."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits = {"train": [], "val": []}
    for split, count in (("train", num_train_images), ("val", num_val_images)):
        for i in range(count):
            scene = random_scene(rng)
            rel = f"images/{split}_{i:05d}.png"
            draw_scene(scene, image_size, rng, jitter, radius).save(out / rel)
            # val keeps one question per line so exact-match accuracy is per question
            # captions are trained on but not scored: val holds only questions
            splits[split] += make_records(scene, rel, rng, multi_turn=split == "train" and rng.random() < 0.5,
                                          captions=split == "train",
                                          position_questions=train_position_questions if split == "train" else 1)
            if split == "train" and rng.random() < 0.05:
                splits[split].append(text_only_record(rng))
    paths = {}
    for split, records in splits.items():
        if split == "train":
            rng.shuffle(records)
        paths[split] = out / f"{split}.jsonl"
        with open(paths[split], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    paths["tokenizer"] = build_tokenizer(out / "tokenizer", vocabulary_words())
    return paths


def vocabulary_words() -> list[str]:
    """Every word the generator can emit (questions, answers, captions)."""
    words: set[str] = set()
    texts: Iterable[str] = [
        "what colour is the object ? shape how many shapes are there is left or right of describe image it yes no .",
        "on in where",
        "a then does have sides", " ".join(COLOURS), " ".join(SHAPES), " ".join(NUMBERS), " ".join(SLOTS),
        " ".join(SIDES.values()), "system user assistant you are helpful",
    ]
    for t in texts:
        words.update(t.split())
    return sorted(words)


def build_tokenizer(out_dir: str | Path, words: list[str]) -> Path:
    """A word-level fast tokenizer with ChatML special tokens and a chat template; no downloads."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from zerovl.data.template import CHATML_TEMPLATE

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>"]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<image>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


def placed_caption(scene: list[Shape]) -> str:
    return " and ".join(f"a {o.name} {WHERE[o.slot]}" for o in scene)


def generate_pairs(out_dir: str | Path, num_train_images: int = 400, num_val_images: int = 64, image_size: int = 32,
                   seed: int = 0) -> dict[str, Path]:
    """Image-caption pairs for retrieval models: ``train.json`` and ``val.json`` in the COCO captions layout
    (two captions per image: the shapes in order, and the shapes with their places), the images, and a
    WordPiece (BERT-style) ``tokenizer/`` covering every word."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths: dict[str, Path] = {}
    for split, count in (("train", num_train_images), ("val", num_val_images)):
        images, annotations = [], []
        for i in range(count):
            scene = random_scene(rng)
            rel = f"images/{split}_{i:05d}.png"
            draw_scene(scene, image_size, rng).save(out / rel)
            images.append({"id": i, "file_name": rel})
            for text in (caption(scene), placed_caption(scene)):
                annotations.append({"id": len(annotations), "image_id": i, "caption": text})
        paths[split] = out / f"{split}.json"
        paths[split].write_text(json.dumps({"images": images, "annotations": annotations}))
    words = sorted(set(vocabulary_words()) | {"and", "the"})
    paths["tokenizer"] = build_wordpiece_tokenizer(out / "tokenizer", words)
    return paths


def build_wordpiece_tokenizer(out_dir: str | Path, words: list[str]) -> Path:
    """BERT's tokenizer class over a small vocabulary ([PAD] [UNK] [CLS] [SEP] [MASK] + words), as BLIP-2's
    Q-Former uses BERT's; saved with ``save_pretrained``."""
    from transformers import BertTokenizer  # transformers 5: the fast (tokenizers) class under this name

    out = Path(out_dir)
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    BertTokenizer(vocab=vocab, do_lower_case=True).save_pretrained(out)
    return out
