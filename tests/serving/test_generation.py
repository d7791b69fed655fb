"""Batched generation with per-row settings gives each row what it would get alone."""

from __future__ import annotations

import base64

import pytest

from tests.serving.conftest import png_data_url
from zerovl.serving.generation import Row, Sampling, encode, generate_rows

IMAGE = base64.b64decode(png_data_url().split(",", 1)[1])


def rows_for(bot, prompts, samplings):
    rows = []
    for (text, images), sampling in zip(prompts, samplings):
        prompt, vision = encode(bot, [{"role": "user", "content": text}], images)
        rows.append(Row(prompt, vision, sampling))
    return rows


PROMPTS = [("<image>what colour is the shape ?", [IMAGE]), ("how many shapes are there ?", []),
           ("is the red shape on the left ? <image>", [IMAGE]), ("hello", [])]


@pytest.mark.parametrize("model", ["composed_bot", "native_bot", "text_bot"])
def test_a_batch_gives_each_row_its_own_answer(model, request):
    bot = request.getfixturevalue(model)
    prompts = PROMPTS if model != "text_bot" else [(t.replace("<image>", ""), []) for t, _ in PROMPTS]
    samplings = [Sampling(max_tokens=6), Sampling(max_tokens=3), Sampling(max_tokens=8, temperature=0.8, seed=1),
                 Sampling(max_tokens=5, temperature=1.2, top_p=0.5, seed=2)]
    batch = rows_for(bot, prompts, samplings)
    generate_rows(bot, batch)
    for row, prompt, sampling in zip(batch, prompts, samplings):
        alone = rows_for(bot, [prompt], [sampling])
        generate_rows(bot, alone)
        assert (row.tokens, row.text, row.finish_reason) == (alone[0].tokens, alone[0].text, alone[0].finish_reason)
        assert len(row.tokens) <= sampling.max_tokens and row.finish_reason in ("stop", "length")
    assert [len(r.tokens) for r in batch[:2]] == [6, 3] or any(r.finish_reason == "stop" for r in batch[:2])


def test_greedy_rows_match_evals_generate_and_sampling_follows_the_seed(composed_bot, tmp_path):
    """Greedy rows of a mixed batch decode exactly as ``zerovl eval`` decodes the same prompts."""
    import torch

    from zerovl.data.samples import Sample
    from zerovl.engine.distributed import DistInfo
    from zerovl.eval.items import EvalItem
    from zerovl.recipes.evaluate import Evaluator, generate

    bot = composed_bot
    path = tmp_path / "shape.png"
    path.write_bytes(IMAGE)
    items = [EvalItem(str(i), Sample([{"role": "user", "content": t}], [str(path)] if ims else [], "t"), [])
             for i, (t, ims) in enumerate(PROMPTS)]
    ev = Evaluator(bot.built.model, bot.built.model, bot.template, bot.built.image_processor, bot.max_pixels,
                   None, DistInfo(0, 1, 0, torch.device("cpu"), True), False)
    expected = generate(ev, items, [bot.template.encode_prompt(it.sample) for it in items], 6, 1)
    rows = rows_for(bot, PROMPTS, [Sampling(max_tokens=6)] * 3 + [Sampling(max_tokens=6, temperature=1.0, seed=0)])
    generate_rows(bot, rows)
    assert [r.text for r in rows[:3]] == expected[:3]
    assert bot.answer("what colour is the shape ?", [str(path)], 6) == expected[0]
    seeded = [rows_for(bot, [PROMPTS[1]], [Sampling(max_tokens=12, temperature=1.5, seed=s)])[0] for s in (7, 7, 8)]
    for r in seeded:
        generate_rows(bot, [r])
    assert seeded[0].tokens == seeded[1].tokens
    assert seeded[0].tokens != seeded[2].tokens  # 12 tokens at temperature 1.5 from a random-init model


def test_stop_strings_cut_the_text_and_streamed_pieces_add_up(composed_bot):
    bot = composed_bot
    (free,) = rows_for(bot, [PROMPTS[1]], [Sampling(max_tokens=10, temperature=1.0, seed=5)])
    generate_rows(bot, [free])
    words = free.text.split()
    assert len(words) >= 3, free.text
    stop = " " + words[2]
    pieces = []
    (cut,) = rows_for(bot, [PROMPTS[1]], [Sampling(max_tokens=10, temperature=1.0, seed=5, stop=(stop,))])
    cut.on_text = pieces.append
    generate_rows(bot, [cut])
    assert cut.text == free.text[:free.text.index(stop)] and cut.finish_reason == "stop"
    assert "".join(pieces) == cut.text and len(pieces) >= 2


def test_a_cancelled_row_stops_at_its_next_token(composed_bot):
    bot = composed_bot
    rows = rows_for(bot, PROMPTS[:2], [Sampling(max_tokens=20)] * 2)
    rows[0].on_text = lambda _: rows[0].cancelled.set()
    generate_rows(bot, rows)
    assert rows[0].finish_reason == "cancelled" and len(rows[0].tokens) <= 2
    assert rows[1].finish_reason in ("stop", "length")
