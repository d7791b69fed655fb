"""Retrieval scoring as LAVIS computes it: ITC similarity for every image-text pair, ITM re-ranking of
each query's top k, recall@1/5/10 per direction, an image's rank being that of its best caption.

Everything here is tensor arithmetic with bounded memory: similarities are taken a chunk of query rows
at a time and only each row's top k survive, so the 5,000 x 25,000 COCO matrix never exists whole.
"""

from __future__ import annotations

import math

import torch

KS = (1, 5, 10)
CHUNK_ELEMENTS = 1 << 25  # query-token similarities per chunk: 128 MiB of fp32


def max_query_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """[I, T] cosine similarity: for each image the best of its query tokens ([I, Q, D] x [T, D])."""
    return torch.einsum("iqd,td->itq", image_feats.float(), text_feats.float()).amax(-1)


def topk_image_to_text(image_feats: torch.Tensor, text_feats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [I, k] of each image's most similar texts, a chunk of images at a time."""
    k = min(k, text_feats.shape[0])
    rows = max(1, CHUNK_ELEMENTS // max(1, image_feats.shape[1] * text_feats.shape[0]))
    values, indices = [], []
    for start in range(0, image_feats.shape[0], rows):
        v, i = max_query_similarity(image_feats[start:start + rows], text_feats).topk(k, dim=1)
        values.append(v)
        indices.append(i)
    return _cat(values, k), _cat(indices, k, torch.long)


def topk_text_to_image(text_feats: torch.Tensor, image_feats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [T, k] of each text's most similar images, a chunk of texts at a time."""
    k = min(k, image_feats.shape[0])
    rows = max(1, CHUNK_ELEMENTS // max(1, image_feats.shape[1] * image_feats.shape[0]))
    values, indices = [], []
    for start in range(0, text_feats.shape[0], rows):
        v, i = max_query_similarity(image_feats, text_feats[start:start + rows]).t().topk(k, dim=1)
        values.append(v)
        indices.append(i)
    return _cat(values, k), _cat(indices, k, torch.long)


def _cat(parts: list[torch.Tensor], k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, k, dtype=dtype)


def ranks(candidates: torch.Tensor, scores: torch.Tensor, positives: list[set[int]]) -> list[int]:
    """Per query, the 0-based position of its best-placed positive when its candidates are sorted by
    score (highest first); a query with no positive among its candidates ranks ``len(candidates)``
    (LAVIS scores pairs outside the top k as -100: they rank below every candidate)."""
    out = []
    order = scores.argsort(dim=1, descending=True, stable=True)
    for row, ranked in enumerate(candidates.gather(1, order).tolist()):
        out.append(next((pos for pos, c in enumerate(ranked) if c in positives[row]), len(ranked)))
    return out


def recall(rank_list: list[int], ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@K in percent (as LAVIS and the BLIP-2 paper report them) and their mean."""
    n = max(1, len(rank_list))
    out = {f"r{k}": 100.0 * sum(1 for r in rank_list if r < k) / n for k in ks}
    out["mean"] = sum(out[f"r{k}"] for k in ks) / len(ks)
    return out


def chance(captions_per_image: list[int], num_images: int, ks: tuple[int, ...] = KS) -> dict[str, dict[str, float]]:
    """Expected recall@K of a random ranking, for comparison: image->text (an image with c of T captions
    is found when any of its c lands in the top K) and text->image (K of I)."""
    texts = sum(captions_per_image)

    def any_of(c: int, k: int) -> float:  # 1 - P(none of the c among the top k)
        return 1.0 - math.prod(max(0, texts - k - j) / (texts - j) for j in range(c))

    n = max(1, len(captions_per_image))
    return {"i2t": {f"r{k}": 100.0 * sum(any_of(c, k) for c in captions_per_image) / n for k in ks},
            "t2i": {f"r{k}": 100.0 * min(1.0, k / max(1, num_images)) for k in ks}}


def metrics(i2t_ranks: list[int], t2i_ranks: list[int]) -> dict[str, float]:
    """LAVIS's report: txt_r* (image->text), img_r* (text->image), their means and r_mean."""
    i2t, t2i = recall(i2t_ranks), recall(t2i_ranks)
    out = {f"txt_{k}": v for k, v in i2t.items() if k != "mean"}
    out["txt_r_mean"] = i2t["mean"]
    out.update({f"img_{k}": v for k, v in t2i.items() if k != "mean"})
    out["img_r_mean"] = t2i["mean"]
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
