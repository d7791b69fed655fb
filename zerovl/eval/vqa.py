"""Open-ended VQA scoring: the official VQA answer normaliser, soft (VQAv2) accuracy and exact match (GQA).

The normaliser reproduces ``processPunctuation`` + ``processDigitArticle`` of the official VQA evaluation
script (VQA-Challenge ``vqaEval.py``, also LAVIS ``vqa_tools/vqa_eval.py``) including its quirks, so that
numbers match published ones: the period regex's look-behind is really a look-ahead (every ``.`` not before
a digit goes), the digit-comma-digit test switches *every* mark to plain removal, and ``re.UNICODE`` is passed
where ``count`` goes, so at most 32 periods are stripped.
"""

from __future__ import annotations

import re

_PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
          "!")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)  # the official script passes re.UNICODE (32) positionally, i.e. as count

_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")

# The official table, verbatim (its capitalised keys never match: words are lowercased first).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

METRICS = ("vqa", "exact")


def _process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: the tests look at the input, the edits apply to the output."""
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def _process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lowercase, number words to digits, no articles, contractions."""
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """An answer as the official VQA evaluation compares it ("Two dogs." -> "2 dogs")."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_soft_score(prediction: str, answers: list[str]) -> float:
    """VQAv2 accuracy: the mean over the n leave-one-out subsets of min(1, matches among the others / 3).

    Both sides go through :func:`normalize_vqa_answer` (the official script normalises only the prediction
    fully; VQAv2's answers are already normalised, so this changes nothing there and helps other data).
    With a single reference leave-one-out is undefined, so one answer means exact match (1.0 or 0.0)."""
    if not answers:
        raise ValueError("vqa_soft_score needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = sum(r == pred for r in refs)
    # leaving out answer i removes one match exactly when answer i itself matches
    accs = [min(1.0, (matches - (r == pred)) / 3) for r in refs]
    return sum(accs) / len(accs)


def exact_score(prediction: str, answers: list[str]) -> float:
    """GQA-style accuracy: 1.0 when the normalised prediction equals any normalised answer."""
    pred = normalize_vqa_answer(prediction)
    return float(any(pred == normalize_vqa_answer(a) for a in answers))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def score_vqa(predictions: list[str], answers: list[list[str]], answer_types: list[str | None],
              metric: str = "vqa") -> tuple[list[float], dict]:
    """Per-sample scores and ``{"accuracy", "n", "by_type"}`` (fractions in [0, 1]; ``by_type`` only over
    samples with a type, absent when none has one)."""
    scorers = {"vqa": vqa_soft_score, "exact": exact_score}
    if metric not in scorers:
        raise ValueError(f"unknown VQA metric '{metric}': use vqa or exact")
    if not len(predictions) == len(answers) == len(answer_types):
        raise ValueError(f"score_vqa: {len(predictions)} predictions, {len(answers)} answer lists and "
                         f"{len(answer_types)} answer types: they must be the same length")
    scores = [scorers[metric](p, a) for p, a in zip(predictions, answers)]
    metrics: dict = {"accuracy": _mean(scores), "n": len(scores)}
    by_type: dict[str, list[float]] = {}
    for score, kind in zip(scores, answer_types):
        if kind is not None:
            by_type.setdefault(kind, []).append(score)
    if by_type:
        metrics["by_type"] = {kind: _mean(vals) for kind, vals in by_type.items()}
    return scores, metrics
