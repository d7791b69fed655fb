"""Multiple-choice scoring: VLMEvalKit's prompt layout, rule-based answer extraction and circular evaluation.

Extraction follows VLMEvalKit's ``can_infer`` (``vlmeval/utils/matching_util.py``) without its LLM judge and
without its random guess: an answer we cannot read counts as wrong and is reported as unmatched.
"""

from __future__ import annotations

LETTERS = "ABCDEFGHI"

_STRIP_CHARS = ".()[],:;!*#{}"  # VLMEvalKit replaces these with spaces before splitting into words
_LAST_WORDS = 5  # VLMEvalKit: the letter's first occurrence must satisfy index > len(words) - 5
_NOT_AN_ARTICLE = ("is", "or", "and")  # "A is right", "A or B": the word after a bare A that keeps it a letter


def _ordered(options: dict[str, str]) -> list[str]:
    """The option letters in letter order; anything but A..I is a caller's mistake."""
    bad = [k for k in options if k not in LETTERS]
    if bad:
        raise ValueError(f"option keys must be letters of {LETTERS}, got {bad}")
    return sorted(options, key=LETTERS.index)


def _no_hint(hint: str | None) -> bool:
    return hint is None or str(hint).strip().lower() in ("", "nan")  # float NaN prints as "nan" too


def build_mcq_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """VLMEvalKit's ``ImageMCQDataset.build_prompt`` text, without its trailing ``" \\n"``. A hint that is
    empty or pandas' missing value (NaN, or the string "nan" it becomes in a TSV) is left out."""
    lines = [] if _no_hint(hint) else [f"Hint: {hint}"]
    lines.append(f"Question: {question}")
    lines.append("Options:")
    lines += [f"{k}. {options[k]}" for k in _ordered(options)]
    lines.append("Please select the correct answer from the options above.")
    return "\n".join(lines)


def _words(answer: str) -> list[str]:
    for c in _STRIP_CHARS:
        answer = answer.replace(c, " ")
    return answer.split()


def _article_a(answer: str) -> bool:
    """True when the only "A" in the answer reads as the article: written bare (no ``A.``, ``(A)``, ``A:``)
    and followed by a word that starts in lowercase, as in "A cat on a mat" (but not "A is correct")."""
    raw = answer.split()
    for i, word in enumerate(raw[:-1]):
        nxt = raw[i + 1]
        if word == "A" and nxt[:1].islower() and nxt.strip(_STRIP_CHARS).lower() not in _NOT_AN_ARTICLE:
            return True
    return False


def _by_letter(answer: str, letters: list[str]) -> str | None:
    """VLMEvalKit's ``can_infer_option``: exactly one distinct option letter among the words, near the end."""
    words = _words(answer)
    if len(words) == 1 and words[0].upper() in letters:  # a whole answer "b" / "b." / "(b)"
        return words[0].upper()
    found = [c for c in letters if c in words]
    if len(found) != 1:
        return None
    letter = found[0]
    if letter == "A" and _article_a(answer):
        return None
    return letter if words.index(letter) > len(words) - _LAST_WORDS else None


def _by_text(answer: str, options: dict[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_text``: exactly one option text inside a not-too-long answer."""
    low = answer.lower()
    if len(low) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    found = [k for k, v in options.items() if str(v).strip() and str(v).lower() in low]
    return found[0] if len(found) == 1 else None


def extract_choice(answer: str, options: dict[str, str]) -> str | None:
    """The option letter an answer picks, or None when it picks none or several.

    Choices beyond VLMEvalKit: a whole answer that is one lowercase letter ("b", "b.") counts as that
    letter, since small models answer so; a bare "A" followed by a lowercase word ("A cat") is read as the
    article, so the text match decides (VLMEvalKit would return A, or with VERBOSE set give up)."""
    letters = _ordered(options)
    answer = str(answer).strip()
    if not answer:
        return None
    return _by_letter(answer, letters) or _by_text(answer, options)


def circular_variants(options: dict[str, str], answer: str) -> list[tuple[dict[str, str], str]]:
    """The n rotations of the option texts over the same letters (rotation 0 is the original; rotation k
    puts the text of letter k+i at letter i), each with the correct letter in that rotation."""
    letters = _ordered(options)
    if answer not in options:
        raise ValueError(f"answer '{answer}' is not one of the options {letters}")
    n, pos = len(letters), letters.index(answer)
    texts = [options[k] for k in letters]
    return [({letters[i]: texts[(i + k) % n] for i in range(n)}, letters[(pos - k) % n]) for k in range(n)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _by_category(scores: list[float], categories: list[str | None]) -> dict[str, float]:
    grouped: dict[str, list[float]] = {}
    for score, cat in zip(scores, categories):
        if cat is not None:
            grouped.setdefault(cat, []).append(score)
    return {cat: _mean(vals) for cat, vals in grouped.items()}


def score_mcq(predictions: list[str], options: list[dict[str, str]], answers: list[str],
              groups: list[str] | None = None, categories: list[str | None] | None = None,
              ) -> tuple[list[float], list[str | None], dict]:
    """Per-item scores, the letters read from each prediction, and the metrics.

    With ``groups`` (circular evaluation) accuracy is over groups, a group right only when all its items
    are, ``n`` counts groups, ``accuracy_single`` is the plain accuracy of each group's first item in input
    order (rotation 0), and ``by_category`` is per group too, under its first item's category."""
    n = len(predictions)
    for name, seq in (("options", options), ("answers", answers), ("groups", groups),
                      ("categories", categories)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"score_mcq: {n} predictions but {len(seq)} {name}")
    letters = [extract_choice(p, o) for p, o in zip(predictions, options)]
    scores = [float(got is not None and got == str(want).strip().upper()) for got, want in zip(letters, answers)]
    metrics: dict = {"unmatched": sum(got is None for got in letters)}
    if groups is None:
        metrics.update(accuracy=_mean(scores), n=n)
        if categories is not None:
            metrics["by_category"] = _by_category(scores, categories)
        return scores, letters, metrics
    first: dict[str, int] = {}
    right: dict[str, bool] = {}
    for i, (g, score) in enumerate(zip(groups, scores)):
        first.setdefault(g, i)
        right[g] = right.get(g, True) and score == 1.0
    group_scores = [float(right[g]) for g in first]
    metrics.update(accuracy=_mean(group_scores), n=len(first),
                   accuracy_single=_mean([scores[i] for i in first.values()]))
    if categories is not None:
        metrics["by_category"] = _by_category(group_scores, [categories[i] for i in first.values()])
    return scores, letters, metrics
