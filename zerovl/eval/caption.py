"""Captioning scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr) computed by pycocoevalcap itself.

With Java the text goes through pycocoevalcap's Stanford PTB tokenizer and the scorers run exactly as
``COCOEvalCap.evaluate`` runs them, so numbers are comparable with published ones (SPICE is left out: it
downloads Stanford CoreNLP on first use). Without Java a pure-Python tokenisation stands in and METEOR,
a Java program too, is skipped: those numbers are for comparing runs with each other only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess

log = logging.getLogger(__name__)

TOKENIZERS = ("auto", "ptb", "python")
_MISSING = "the caption task needs pycocoevalcap: pip install 'zerovl[eval]'"

# pycocoevalcap tokenizer/ptbtokenizer.py PUNCTUATIONS: tokens dropped after PTB tokenisation
_PTB_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                     "...", ";"}
# PTB turns brackets into -LRB- etc.; run with -lowerCase they come out as -lrb-, which the wrapper's
# upper-case list misses, so they stay. Double quotes become `` or '' and are dropped.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_DROPPED = _PTB_PUNCTUATIONS | {'"'}
_CONTRACTION = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\d+(?:[.,:]\d+)+|\w+(?:[-/.']\w+)*|--|\.\.\.|``|''|\S")


def java_available() -> bool:
    """True when ``java`` is on PATH and starts (PTB tokenizer and METEOR are Java programs)."""
    if shutil.which("java") is None:
        return False
    try:
        return subprocess.run(["java", "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def python_tokenize(text: str) -> str:
    """A pure-Python stand-in for pycocoevalcap's PTB step: lowercase, split off punctuation and the clitics
    PTB splits ("don't" -> "do n't", "cat's" -> "cat 's"), drop the tokens the wrapper drops.

    Close to PTB on ordinary captions but not identical (abbreviations such as "mr.", "cannot"), so scores
    computed on it are NOT comparable with published numbers."""
    text = _CONTRACTION.sub(r" \1", text.replace("\n", " ").lower())
    tokens = (_BRACKETS.get(t, t) for t in _TOKEN.findall(text))
    return " ".join(t for t in tokens if t not in _DROPPED)


def _import_scorers():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as e:
        raise ImportError(_MISSING) from e
    return PTBTokenizer, Bleu, Meteor, Rouge, Cider


def _check_ids(predictions: dict[str, str], references: dict[str, list[str]]) -> list[str]:
    """The ids in the references' order, after checking both sides have the same ones."""
    if not references:
        raise ValueError("caption_scores: no references given")
    for key in references:
        if key not in predictions:
            raise ValueError(f"caption_scores: id {key!r} has references but no prediction")
        if not references[key]:
            raise ValueError(f"caption_scores: id {key!r} has an empty reference list")
    for key in predictions:
        if key not in references:
            raise ValueError(f"caption_scores: id {key!r} has a prediction but no references")
    return list(references)


def _choose_tokenizer(tokenizer: str) -> str:
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown caption tokenizer '{tokenizer}': use auto, ptb or python")
    if tokenizer == "python":
        return "python"
    if java_available():
        return "ptb"
    if tokenizer == "ptb":
        raise RuntimeError("caption tokenizer 'ptb' needs Java on PATH (install a JRE), or use 'python'")
    log.warning("Java is missing: METEOR skipped, caption scores computed on a Python tokenisation, "
                "not comparable with published numbers")
    return "python"


def _score_all(scorers: list, gts: dict, res: dict) -> tuple[dict, dict]:
    """Each scorer's corpus score and per-id CIDEr, the way ``COCOEvalCap.evaluate`` loops over them."""
    metrics: dict = {}
    per_id: dict = {}
    for scorer, names in scorers:
        score, scores = scorer.compute_score(gts, res)
        if isinstance(names, list):
            metrics.update({m: float(s) for m, s in zip(names, score)})
        else:
            metrics[names] = float(score)
        if names == "CIDEr":
            per_id = {k: float(s) for k, s in zip(gts.keys(), scores)}
    return metrics, per_id


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]],
                   tokenizer: str = "auto") -> tuple[dict, dict[str, float], str]:
    """``(metrics, per-id CIDEr, tokenizer used)``; metric names and scale are pycocoevalcap's (Bleu_1..4,
    METEOR, ROUGE_L, CIDEr; CIDEr can exceed 1). ``tokenizer``: "ptb" (needs Java), "python" (no METEOR),
    or "auto" (ptb when Java runs)."""
    PTBTokenizer, Bleu, Meteor, Rouge, Cider = _import_scorers()
    ids = _check_ids(predictions, references)
    used = _choose_tokenizer(tokenizer)
    # an empty or missing prediction is scored as the empty caption: it scores 0, it does not crash
    res = {k: [predictions[k] or ""] for k in ids}
    gts = {k: list(references[k]) for k in ids}
    # pycocoevalcap prints progress and BLEU internals on stdout; ours is for results
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        if used == "ptb":
            ptb = PTBTokenizer()
            gts = ptb.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
            res = ptb.tokenize({k: [{"caption": c} for c in v] for k, v in res.items()})
            meteor = Meteor()
            try:
                metrics, per_id = _score_all([(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
                                              (meteor, "METEOR"), (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")],
                                             gts, res)
            finally:
                del meteor  # the last reference: its __del__ stops the Java process now
        else:
            gts = {k: [python_tokenize(c) for c in v] for k, v in gts.items()}
            res = {k: [python_tokenize(c) for c in v] for k, v in res.items()}
            scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Rouge(), "ROUGE_L"),
                       (Cider(), "CIDEr")]
            metrics, per_id = _score_all(scorers, gts, res)
    return metrics, per_id, used
