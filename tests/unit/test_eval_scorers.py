"""The scorers on hand-computed cases: VQA normaliser and soft accuracy, MCQ extraction, prompts and
circular grouping, caption scores on the Python tokenisation (PTB / METEOR only where Java runs)."""

from __future__ import annotations

import logging

import pytest

from zerovl.eval import caption
from zerovl.eval.mcq import LETTERS, build_mcq_prompt, circular_variants, extract_choice, score_mcq
from zerovl.eval.vqa import exact_score, normalize_vqa_answer, score_vqa, vqa_soft_score

# -- VQA ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, norm", [
    ("two", "2"), ("Ten", "10"), ("none", "0"), ("a dog", "dog"), ("The Dog", "dog"), ("an apple", "apple"),
    ("dont", "don't"), ("isnt", "isn't"), ("don't", "don't"),
    ("1,000", "1000"),  # commaStrip: a digit-comma-digit anywhere makes every mark plain removal
    ("yes.", "yes"), ("3.5", "3.5"), ("Yes!", "yes"), ("yes !", "yes"),
    ("the cat's", "cat's"), ("red/blue", "red blue"), ("well-done", "well done"), ("red, white", "red white"),
    ("  hi\nthere\t", "hi there"), ("Ten dogs, two cats.", "10 dogs 2 cats"), ("A", ""),
    ("Im", "im"),  # the official table's capitalised keys never match: words are lowercased first
])
def test_normalize_vqa_answer(raw, norm):
    assert normalize_vqa_answer(raw) == norm


def test_normalize_strips_at_most_32_periods():
    """The official script passes re.UNICODE (32) as sub()'s count: reproduced, not fixed."""
    assert normalize_vqa_answer("a" + ". a" * 40).count(".") == 8


@pytest.mark.parametrize("pred, answers, want", [
    ("two", ["2"] * 10, 1.0),
    ("2", ["2"] * 2 + ["3"] * 8, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
    ("2", ["2"] * 3 + ["3"] * 7, (3 * (2 / 3) + 7 * 1) / 10),  # 0.9
    ("2", ["2"] * 4 + ["3"] * 6, 1.0),
    ("5", ["2"] * 10, 0.0),
    ("Dog.", ["a dog"], 1.0),  # one answer: exact match
    ("cat", ["dog"], 0.0),
])
def test_vqa_soft_score(pred, answers, want):
    assert vqa_soft_score(pred, answers) == pytest.approx(want, abs=1e-12)


def test_vqa_soft_score_needs_an_answer():
    with pytest.raises(ValueError):
        vqa_soft_score("x", [])


def test_exact_score():
    assert exact_score("The Dog", ["cat", "dog"]) == 1.0
    assert exact_score("two", ["2"]) == 1.0
    assert exact_score("dogs", ["dog"]) == 0.0


def test_score_vqa_metrics_and_by_type():
    preds = ["two", "no", "red"]
    answers = [["2"] * 10, ["yes"] * 10, ["red"] * 2 + ["blue"] * 8]
    scores, metrics = score_vqa(preds, answers, ["number", "yes/no", None])
    assert scores == pytest.approx([1.0, 0.0, 0.6])
    assert metrics["accuracy"] == pytest.approx(1.6 / 3) and metrics["n"] == 3
    assert metrics["by_type"] == {"number": 1.0, "yes/no": 0.0}
    scores, metrics = score_vqa(preds, answers, [None] * 3, metric="exact")
    assert scores == [1.0, 0.0, 1.0] and "by_type" not in metrics


def test_score_vqa_errors():
    with pytest.raises(ValueError, match="unknown VQA metric 'bleu': use vqa or exact"):
        score_vqa(["a"], [["a"]], [None], metric="bleu")
    with pytest.raises(ValueError, match="same length"):
        score_vqa(["a", "b"], [["a"]], [None])


# -- MCQ ----------------------------------------------------------------------------------------------------

ANIMALS = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("answer, want", [
    ("B", "B"), ("(B) cat", "B"), ("The answer is B.", "B"), ("B. cat", "B"), ("**B**", "B"),
    ("cat", "B"), ("It is a cat.", "B"), ("I think A or B", None), ("", None), ("   ", None),
    ("b", "B"), ("b.", "B"), ("(c)", "C"),  # a whole answer that is one lowercase letter
    ("b dog", "A"),  # a lowercase letter counts only as the whole answer: here the text decides
    ("A cat", "B"),  # a bare "A" before a lowercase word is the article: the text match decides
    ("A dog", "A"),  # ...and there it agrees with the letter
    ("A", "A"), ("A.", "A"), ("(A) dog", "A"), ("A is correct", "A"),
    ("B because the cat on the left is clearly sitting", None),  # letter not among the last words
    ("a zebra", None),  # no letter, no option text: never a guess
    ("E", None),  # not an option
])
def test_extract_choice(answer, want):
    assert extract_choice(answer, ANIMALS) == want


def test_extract_choice_shared_text_is_ambiguous():
    """An answer holding two options' texts picks neither (VLMEvalKit's can_infer_text)."""
    opts = {"A": "red", "B": "red car", "C": "blue"}
    assert extract_choice("a red car", opts) is None
    assert extract_choice("blue", opts) == "C"


def test_extract_choice_long_answer_skips_text_match():
    """Text matching is off for answers longer than twice the options' total length."""
    assert extract_choice("cat " + "x" * 100, ANIMALS) is None


def test_build_mcq_prompt():
    opts = {"B": "cat", "A": "dog"}
    assert build_mcq_prompt("What is it?", opts) == (
        "Question: What is it?\nOptions:\nA. dog\nB. cat\nPlease select the correct answer from the options above.")
    with_hint = build_mcq_prompt("What is it?", opts, hint="Look left.")
    assert with_hint.startswith("Hint: Look left.\nQuestion: What is it?\n")
    for empty in (None, "", "nan", float("nan")):
        assert not build_mcq_prompt("Q", opts, hint=empty).startswith("Hint")
    with pytest.raises(ValueError, match="letters"):
        build_mcq_prompt("Q", {"a": "x"})


def test_circular_variants():
    variants = circular_variants(ANIMALS, "B")
    assert len(variants) == 4
    assert variants[0] == (ANIMALS, "B")
    assert variants[1] == ({"A": "cat", "B": "bird", "C": "fish", "D": "dog"}, "A")
    assert variants[2][1] == "D" and variants[3][1] == "C"
    for opts, letter in variants:  # the right text is always under the right letter
        assert opts[letter] == "cat" and sorted(opts.values()) == sorted(ANIMALS.values())
    with pytest.raises(ValueError):
        circular_variants(ANIMALS, "E")


def test_score_mcq_plain_and_categories():
    preds = ["B", "dog", "I think A or B", "C"]
    answers = ["B", "A", "A", "D"]
    scores, letters, metrics = score_mcq(preds, [ANIMALS] * 4, answers, categories=["x", "x", "y", None])
    assert scores == [1.0, 1.0, 0.0, 0.0] and letters == ["B", "A", None, "C"]
    assert metrics == {"unmatched": 1, "accuracy": 0.5, "n": 4, "by_category": {"x": 1.0, "y": 0.0}}


def test_score_mcq_circular():
    """A question right in 3 of its 4 rotations counts wrong; accuracy_single reads rotation 0 only."""
    q1 = circular_variants(ANIMALS, "B")
    q2 = circular_variants({"A": "one", "B": "two"}, "A")
    options = [o for o, _ in q1] + [o for o, _ in q2]
    answers = [a for _, a in q1] + [a for _, a in q2]
    preds = [answers[0], answers[1], answers[2], "A" if answers[3] != "A" else "B"] + answers[4:]
    groups = ["q1"] * 4 + ["q2"] * 2
    scores, _, metrics = score_mcq(preds, options, answers, groups=groups, categories=["c1"] * 4 + ["c2"] * 2)
    assert scores == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert metrics["accuracy"] == 0.5 and metrics["n"] == 2 and metrics["accuracy_single"] == 1.0
    assert metrics["by_category"] == {"c1": 0.0, "c2": 1.0}


def test_letters_constant():
    assert LETTERS == "ABCDEFGHI"


# -- captions -----------------------------------------------------------------------------------------------

REFS = {
    "1": ["A dog runs on the grass.", "A brown dog running across a field."],
    "2": ["Two cats sleep on a red sofa.", "A pair of cats asleep on a couch."],
    "3": ["A man rides a wave on a surfboard.", "A surfer riding a large wave."],
}


@pytest.mark.parametrize("raw, tokens", [
    ("A dog runs.", "a dog runs"), ("Don't stop!", "do n't stop"),
    ("The cat's toy, (red)", "the cat 's toy -lrb- red -rrb-"),  # PTB's -LRB-, lowercased, is kept
    ("ice-cream 3.5 \"hi\" -- ok...", "ice-cream 3.5 hi ok"), ("", ""), ("...", ""), ("line\nbreak", "line break"),
])
def test_python_tokenize(raw, tokens):
    assert caption.python_tokenize(raw) == tokens


def test_caption_scores_python():
    exact = {k: v[0] for k, v in REFS.items()}
    wrong = {"1": "a plate of food on a table", "2": "a clock tower at night", "3": "a dog runs on the grass"}
    good, good_ids, used = caption.caption_scores(exact, REFS, tokenizer="python")
    bad, bad_ids, _ = caption.caption_scores(wrong, REFS, tokenizer="python")
    assert used == "python"
    assert set(good) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert good["Bleu_1"] == pytest.approx(1.0, abs=1e-6) and good["ROUGE_L"] > bad["ROUGE_L"]
    assert good["CIDEr"] > bad["CIDEr"] and set(good_ids) == set(REFS)
    assert good_ids["2"] > bad_ids["2"]


def test_caption_scores_ids_must_match():
    with pytest.raises(ValueError, match="'3'"):
        caption.caption_scores({"1": "a", "2": "b"}, REFS, tokenizer="python")
    with pytest.raises(ValueError, match="'9'"):
        caption.caption_scores({**{k: "a" for k in REFS}, "9": "x"}, REFS, tokenizer="python")
    with pytest.raises(ValueError, match="tokenizer"):
        caption.caption_scores({k: "a" for k in REFS}, REFS, tokenizer="nltk")


def test_caption_scores_empty_prediction():
    preds = {"1": "", "2": "two cats sleep on a red sofa", "3": "..."}
    metrics, per_id, _ = caption.caption_scores(preds, REFS, tokenizer="python")
    assert per_id["1"] == 0.0 and per_id["3"] == 0.0 and per_id["2"] > 0
    assert all(v == v for v in metrics.values())  # no NaN


def test_caption_scores_auto_without_java(monkeypatch, caplog, capsys):
    monkeypatch.setattr(caption, "java_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="zerovl.eval.caption"):
        metrics, _, used = caption.caption_scores({k: v[0] for k, v in REFS.items()}, REFS)
    assert used == "python" and "METEOR" not in metrics
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Java" in warnings[0].getMessage()
    assert capsys.readouterr().out == ""  # pycocoevalcap's prints stay off stdout
    with pytest.raises(RuntimeError, match="Java"):
        caption.caption_scores({k: "a" for k in REFS}, REFS, tokenizer="ptb")


@pytest.mark.skipif(not caption.java_available(), reason="no Java on PATH: PTB tokenizer and METEOR need it")
def test_caption_scores_ptb(capsys):
    preds = {"1": "A dog runs on the grass.", "2": "", "3": "a surfer riding a wave"}
    metrics, per_id, used = caption.caption_scores(preds, REFS, tokenizer="ptb")
    assert used == "ptb"
    assert set(metrics) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert per_id["2"] == 0.0 and per_id["1"] > per_id["3"] > 0
    assert capsys.readouterr().out == ""
