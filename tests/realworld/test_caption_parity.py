"""caption_scores(tokenizer="ptb") against pycocoevalcap's own COCOEvalCap.evaluate on the real COCO-MINI
val2017 captions: the same numbers to 1e-9, corpus scores and per-image CIDEr. SPICE is stubbed out of
COCOEvalCap (it downloads Stanford CoreNLP); everything else runs as pycocoevalcap ships it."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from tests.realworld.conftest import DATASETS
from zerovl.eval import caption

COCO_CAPTIONS = DATASETS / "coco-mini" / "annotations" / "captions_val2017.json"
FAKECAP = DATASETS / "coco-caption" / "captions_val2014_fakecap_results.json"
FIXED = "A photo of something on a table."


def _references() -> dict[int, list[str]]:
    """image_id -> its captions, in image_id order."""
    ann = json.loads(COCO_CAPTIONS.read_text())
    refs: dict[int, list[str]] = defaultdict(list)
    for a in ann["annotations"]:
        refs[a["image_id"]].append(a["caption"])
    return {k: refs[k] for k in sorted(refs)}


def _prediction(i: int, refs: list[str]) -> str:
    """Deterministic predictions of graded quality: a reference itself, a scrambled one, a fixed string,
    and one empty caption."""
    if i == 5:
        return ""
    return (refs[-1], " ".join(reversed(refs[0].split())), FIXED)[i % 3]


class _Coco:
    """What COCOEvalCap reads of a COCO object: getImgIds() and imgToAnns."""

    def __init__(self, img_to_anns: dict[int, list[dict]]):
        self.imgToAnns = img_to_anns

    def getImgIds(self) -> list[int]:  # pycocotools spells it so
        return list(self.imgToAnns)


class _NoSpice:
    """SPICE would download CoreNLP: a stand-in scoring 0."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


@pytest.mark.skipif(not caption.java_available(), reason="no Java on PATH: PTB tokenizer and METEOR need it")
def test_ptb_scores_equal_coco_eval_cap(monkeypatch):
    pytest.importorskip("pycocoevalcap")
    import pycocoevalcap.eval as coco_eval

    refs = _references()
    preds = {k: _prediction(i, v) for i, (k, v) in enumerate(refs.items())}
    assert len(refs) == 79 and preds[list(refs)[5]] == ""

    monkeypatch.setattr(coco_eval, "Spice", _NoSpice)
    gt = _Coco({k: [{"image_id": k, "caption": c} for c in v] for k, v in refs.items()})
    res = _Coco({k: [{"image_id": k, "caption": p}] for k, p in preds.items()})
    official = coco_eval.COCOEvalCap(gt, res)
    official.evaluate()

    metrics, per_id, used = caption.caption_scores({str(k): p for k, p in preds.items()},
                                                   {str(k): v for k, v in refs.items()}, tokenizer="ptb")
    assert used == "ptb"
    assert set(metrics) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    for name, value in metrics.items():
        assert value == pytest.approx(official.eval[name], abs=1e-9), name
    assert per_id == pytest.approx({str(k): official.imgToEval[k]["CIDEr"] for k in refs}, abs=1e-9)
    # graded predictions grade: a copied reference beats a scrambled one beats the fixed string
    ids = [str(k) for k in refs]
    mean = {j: sum(per_id[ids[i]] for i in range(j, len(ids), 3) if i != 5) for j in range(3)}
    assert mean[0] > mean[1] > mean[2]
    assert 0 < metrics["CIDEr"] and 0 < metrics["METEOR"] < 1


def test_fakecap_results_parse():
    """The coco-caption repository's sample results file: the prediction format COCO tools exchange."""
    rows = json.loads(FAKECAP.read_text())
    assert isinstance(rows, list) and len(rows) > 0
    assert all(isinstance(r["image_id"], int) and isinstance(r["caption"], str) for r in rows)
    tokens = [caption.python_tokenize(r["caption"]) for r in rows]
    assert all(t and t == t.lower() for t in tokens)
