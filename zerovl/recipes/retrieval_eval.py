"""``zerovl eval --task retrieval``: image->text and text->image recall of a BLIP-2 retrieval model.

The work is split over ranks and every rank keeps only its own share of the heavy tensors:

1. rank r encodes images r, r+W, ... (vision embeddings, kept for re-ranking, and ITC query features)
   and texts r, r+W, ...; the small ITC features are gathered, so every rank has all of them;
2. each rank takes the ITC top k for its own images and its own texts (a chunk of rows at a time);
3. ITM re-ranks every candidate pair on the rank that holds the pair's image embeddings — its own
   images' candidate texts, and every text's candidate images that are its own — so vision embeddings
   never travel; the scores (ITM match logit + ITC similarity, as LAVIS) are summed into place;
4. rank 0 ranks, scores and writes the top 10 per query.

Host memory per rank: its images' vision embeddings (I/W x tokens x width in the model dtype), all ITC
features (I x Q x D + T x D, fp32) and the top-k lists; see the issue note for COCO at ViT-g sizes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
from tqdm import tqdm

from zerovl.config import EvalTaskSettings
from zerovl.data.images import load_image
from zerovl.data.pairs import Pairs, read_pairs, tokenize_captions
from zerovl.engine.distributed import all_gather_objects
from zerovl.errors import ConfigError, DataError
from zerovl.eval import retrieval as score

log = logging.getLogger("zerovl.eval")

ITM_BATCH = 128  # pairs per ITM call: one query's candidates, as LAVIS batches k_test


def task_pairs(ev, settings: EvalTaskSettings, max_images: int | None) -> Pairs:
    spec = ev.data.val_dataset(settings.data).model_copy(
        update={"split": settings.split or "test", "image_root": settings.image_root or ev.data.image_root})
    from zerovl.data.detect import detect_format

    if spec.format == "auto" and detect_format(spec.path).format != "karpathy":
        spec = spec.model_copy(update={"split": None})  # splits exist only in Karpathy's files
    pairs = read_pairs(spec, ev.data.skip_bad_samples, settings.label)
    if max_images is not None and max_images < len(pairs.images):
        keep = [t for t, i in enumerate(pairs.image_of) if i < max_images]
        pairs = Pairs(pairs.images[:max_images], [pairs.captions[t] for t in keep],
                      [pairs.image_of[t] for t in keep], [pairs.sources[t] for t in keep])
    return pairs


@contextlib.contextmanager
def whole_queries(model):
    """ZeRO-3 fetches the query tokens only in the model's own forward; scoring calls its parts."""
    queries = model.hf.query_tokens
    if not hasattr(queries, "ds_id"):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([queries]):
        yield


def _equal_batches(n: int, size: int, dist, synced: bool) -> list[range]:
    """This rank's batches of ``n`` items; under ZeRO-3 every rank makes as many calls (the last repeats)."""
    batches = [range(s, min(n, s + size)) for s in range(0, n, size)]
    if synced:
        most = max(all_gather_objects(len(batches)))
        if not batches and most:
            raise DataError("fewer images than ranks: every rank needs at least one image to score")
        batches += [batches[-1]] * (most - len(batches))
    return batches


@torch.no_grad()
def encode(ev, pairs: Pairs, ids: torch.Tensor, mask: torch.Tensor, batch_size: int, bar):
    """This rank's (image indices, vision embeddings [cpu], ITC image features, text indices, ITC text features)."""
    model, dist = ev.module, ev.dist
    own_images = list(range(dist.rank, len(pairs.images), dist.world_size))
    own_texts = list(range(dist.rank, len(pairs.captions), dist.world_size))
    embeds, image_feats, text_feats = [], [], []
    first = {i: t for t, i in reversed(list(enumerate(pairs.image_of)))}
    done = set()
    for batch in _equal_batches(len(own_images), batch_size, dist, ev.synced):
        images = [load_image(pairs.images[own_images[j]], ev.max_pixels, pairs.sources[first[own_images[j]]])
                  for j in batch]
        pixels = ev.image_processor(images)["pixel_values"].to(dist.device)
        e = model.image_embeds(pixels)
        f = model.image_features(e)
        if batch.start not in done:
            done.add(batch.start)
            embeds.append(e.cpu())
            image_feats.append(f.float().cpu())
            bar.update(len(batch) * dist.world_size)
    done = set()
    for batch in _equal_batches(len(own_texts), batch_size * 4, dist, ev.synced):
        rows = [own_texts[j] for j in batch]
        f = model.text_features(ids[rows].to(dist.device), mask[rows].to(dist.device))
        if batch.start not in done:
            done.add(batch.start)
            text_feats.append(f.float().cpu())
    return (own_images, torch.cat(embeds) if embeds else None, torch.cat(image_feats) if image_feats else None,
            own_texts, torch.cat(text_feats) if text_feats else None)


def _gather_rows(own: list[int], rows: torch.Tensor | None, n: int) -> torch.Tensor:
    parts = all_gather_objects((own, rows))
    width = next(r.shape[1:] for _, r in parts if r is not None)
    out = torch.zeros(n, *width)
    for index, r in parts:
        if r is not None:
            out[index] = r
    return out


@torch.no_grad()
def rerank(ev, own_images, embeds, ids, mask, i2t_idx, t2i_idx, k: int, bar) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM match logits [I, k] and [T, k] for the ITC candidates, each pair scored where its image lives."""
    model, dist = ev.module, ev.dist
    position = {i: p for p, i in enumerate(own_images)}
    jobs: list[tuple[int, int, int, int, int]] = []  # (own image position, text, direction, row, column)
    for i in own_images:
        jobs += [(position[i], t, 0, i, j) for j, t in enumerate(i2t_idx[i, :k].tolist())]
    for t, row in enumerate(t2i_idx[:, :k].tolist()):
        jobs += [(position[i], t, 1, t, j) for j, i in enumerate(row) if i in position]
    out = [torch.zeros(i2t_idx.shape[0], k), torch.zeros(t2i_idx.shape[0], k)]
    done = set()
    for batch in _equal_batches(len(jobs), ITM_BATCH, dist, ev.synced):
        chunk = [jobs[j] for j in batch]
        image = embeds[[c[0] for c in chunk]].to(dist.device)
        texts = [c[1] for c in chunk]
        logits = model.itm_logits(image, ids[texts].to(dist.device), mask[texts].to(dist.device))
        if batch.start in done:
            continue
        done.add(batch.start)
        for (_, _, direction, row, col), value in zip(chunk, logits[:, 1].float().cpu().tolist()):
            out[direction][row, col] = value
        bar.update(len(chunk))
    # every entry was filled by exactly one rank: a sum puts them all in place on every rank
    if dist.world_size > 1:
        import torch.distributed as tdist

        for t in out:
            moved = t.to(dist.device)
            tdist.all_reduce(moved)
            t.copy_(moved.cpu())
    return out[0], out[1]


def run_retrieval(ev, settings: EvalTaskSettings, batch_size: int, max_samples: int | None, progress: bool = True):
    from zerovl.recipes.evaluate import TaskResult

    if getattr(ev.module, "kind", None) != "retrieval":
        raise ConfigError(f"eval task {settings.label}: retrieval needs a model.retrieval model (BLIP-2 ITC/ITM); "
                          "this one generates text")
    dist = ev.dist
    pairs = task_pairs(ev, settings, settings.max_samples or max_samples)
    ids, mask = tokenize_captions(ev.tokenizer, pairs.captions, ev.text_length)
    started = time.perf_counter()
    k = min(settings.rerank_k, len(pairs.captions), len(pairs.images))
    keep = max(k, min(10, len(pairs.captions), len(pairs.images)))
    bar = tqdm(total=len(pairs.images), disable=not (progress and dist.is_main), desc=f"eval {settings.label}",
               unit="image", dynamic_ncols=True, mininterval=1.0)
    with whole_queries(ev.module):
        own_images, embeds, image_feats, own_texts, text_feats = encode(ev, pairs, ids, mask, batch_size, bar)
        image_all = _gather_rows(own_images, image_feats, len(pairs.images))
        text_all = _gather_rows(own_texts, text_feats, len(pairs.captions))
        i2t_sim, i2t_idx = score.topk_image_to_text(image_all[own_images], text_all, keep)
        t2i_sim, t2i_idx = score.topk_text_to_image(text_all[own_texts], image_all, keep)
        i2t_sim, i2t_idx = _gather_rows(own_images, i2t_sim, len(pairs.images)), _gather_rows(
            own_images, i2t_idx.float(), len(pairs.images)).long()
        t2i_sim, t2i_idx = _gather_rows(own_texts, t2i_sim, len(pairs.captions)), _gather_rows(
            own_texts, t2i_idx.float(), len(pairs.captions)).long()
        bar.close()
        if settings.rerank_k > 0:
            pairs_total = (len(pairs.images) + len(pairs.captions)) * k
            bar = tqdm(total=math.ceil(pairs_total / dist.world_size), disable=not (progress and dist.is_main),
                       desc=f"{settings.label} ITM re-rank", unit="pair", dynamic_ncols=True, mininterval=1.0)
            i2t_itm, t2i_itm = rerank(ev, own_images, embeds, ids, mask, i2t_idx, t2i_idx, k, bar)
            bar.close()
    result = None
    if dist.is_main:
        result = _score(settings, pairs, i2t_idx, i2t_sim, t2i_idx, t2i_sim,
                        (i2t_itm, t2i_itm) if settings.rerank_k > 0 else None, k)
        result.metrics["seconds"] = time.perf_counter() - started
    metrics = all_gather_objects(result.metrics if result is not None else None)[0]
    return TaskResult(metrics, result.rows if result is not None else [])


def _score(settings, pairs: Pairs, i2t_idx, i2t_sim, t2i_idx, t2i_sim, itm, k: int):
    from zerovl.recipes.evaluate import TaskResult

    captions_of = pairs.captions_of()
    text_positives = [set(c) for c in captions_of]
    image_positives = [{i} for i in pairs.image_of]
    itc = score.metrics(score.ranks(i2t_idx, i2t_sim, text_positives), score.ranks(t2i_idx, t2i_sim, image_positives))
    if itm is None:
        i2t_final, t2i_final = i2t_sim, t2i_sim
    else:  # re-ranked candidates first (ITM logit + ITC similarity), the rest after in ITC order
        i2t_final, t2i_final = i2t_sim - 1e4, t2i_sim - 1e4
        i2t_final[:, :k] = itm[0] + i2t_sim[:, :k]
        t2i_final[:, :k] = itm[1] + t2i_sim[:, :k]
    i2t_ranks = score.ranks(i2t_idx, i2t_final, text_positives)
    t2i_ranks = score.ranks(t2i_idx, t2i_final, image_positives)
    metrics = {**score.metrics(i2t_ranks, t2i_ranks), "n_images": len(pairs.images), "n_texts": len(pairs.captions),
               "rerank_k": k if itm is not None else 0, "itc": itc,
               "chance": score.chance([len(c) for c in captions_of], len(pairs.images))}
    rows = []
    for i, rank in enumerate(i2t_ranks):
        order = i2t_final[i].argsort(descending=True, stable=True)[:10]
        rows.append({"query": "image", "id": pairs.images[i], "references": [pairs.captions[t] for t in captions_of[i]],
                     "top10": [pairs.captions[int(i2t_idx[i, o])] for o in order],
                     "top10_sources": [pairs.sources[int(i2t_idx[i, o])] for o in order],
                     "reference_sources": [pairs.sources[t] for t in captions_of[i]],
                     "scores": [round(float(i2t_final[i, o]), 4) for o in order], "rank": rank})
    for t, rank in enumerate(t2i_ranks):
        order = t2i_final[t].argsort(descending=True, stable=True)[:10]
        rows.append({"query": "text", "id": pairs.sources[t], "caption": pairs.captions[t],
                     "references": [pairs.images[pairs.image_of[t]]],
                     "top10": [pairs.images[int(t2i_idx[t, o])] for o in order],
                     "scores": [round(float(t2i_final[t, o]), 4) for o in order], "rank": rank})
    return TaskResult(metrics, rows)
