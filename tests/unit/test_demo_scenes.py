"""The demo generator: deterministic, and every question's answer is right for its scene."""

import json
import random

import numpy as np
from PIL import Image

from zerovl.data.demo_scenes import (
    COLOURS,
    NUMBERS,
    SLOTS,
    WHERE,
    draw_scene,
    generate,
    questions,
    random_scene,
)


def test_answers_follow_from_the_scene():
    rng = random.Random(3)
    seen = set()
    for _ in range(300):
        scene = random_scene(rng)
        assert 1 <= len(scene) <= 3
        assert len({o.colour for o in scene}) == len({o.shape for o in scene}) == len({o.slot for o in scene}) == len(scene)
        by_where = {WHERE[o.slot]: o for o in scene}
        by_colour = {o.colour: o for o in scene}
        for kind, question, answer in questions(scene, rng):
            seen.add(kind)
            if kind == "colour":
                where = question.removeprefix("what colour is the shape ").removesuffix(" ?")
                assert by_where[where].colour == answer
            elif kind == "count":
                assert answer == NUMBERS[len(scene)]
            elif kind == "shape":
                assert len(scene) == 1 and answer == scene[0].shape
            elif kind == "where":
                assert answer == SLOTS[by_colour[question.split()[3]].slot]
            else:
                colour, where = question.split()[2], " ".join(question.split()[4:-1])
                assert answer == ("yes" if WHERE[by_colour[colour].slot] == where else "no")
    assert seen == {"colour", "count", "shape", "position", "where"}


def test_drawn_colours_sit_in_their_slots():
    rng = random.Random(0)
    scene = random_scene(rng)
    pixels = np.asarray(draw_scene(scene, 48, rng)).astype(int)
    for obj in scene:
        centre = pixels[24, int((obj.slot + 0.5) * 16)]
        assert np.abs(centre - np.array(COLOURS[obj.colour])).max() < 5


def test_generate_is_deterministic_and_val_has_only_questions(tmp_path):
    a = generate(tmp_path / "a", num_train_images=20, num_val_images=6, seed=1)
    b = generate(tmp_path / "b", num_train_images=20, num_val_images=6, seed=1)
    assert a["train"].read_text() == b["train"].read_text()
    assert (Image.open(a["train"].parent / "images" / "train_00003.png").tobytes()
            == Image.open(b["train"].parent / "images" / "train_00003.png").tobytes())
    val = [json.loads(line) for line in a["val"].read_text().splitlines()]
    assert val and all(r["type"] != "caption" and len(r["messages"]) == 2 for r in val)
