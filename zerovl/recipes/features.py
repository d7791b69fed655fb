"""Compute the frozen-feature cache (``data.feature_cache``) with the model: once per image, before training.

When the vision tower is frozen (and, with ``model.connector.mode: projection``, everything of the
connector but its final projection), its output per image never changes; it is computed here once,
stored by :mod:`zerovl.data.features`, and training reads it instead of pixels. Training calls
:func:`use_feature_cache` after the DeepSpeed engine exists: missing shards are computed by all ranks
(shard ``i`` by rank ``i % world``; every rank makes the same number of forward calls, padding with a
dummy image, so ZeRO-3's parameter gathers stay in step), then the model switches to reading
features. ``zerovl data prepare`` calls :func:`prepare_features` in one process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import numpy as np
import torch

from zerovl.config import Config
from zerovl.data.features import SHARD_IMAGES, FeatureCache, images_digest, to_numpy
from zerovl.data.images import load_image
from zerovl.errors import ConfigError, DataError
from zerovl.models.connectors import projection

log = logging.getLogger("zerovl.features")
BATCH_IMAGES = 16  # images per forward call of the frozen prefix
# image processors whose output is a pure function of the image (resize, crop, rescale, normalise)
DETERMINISTIC_PROCESSORS = ("SiglipImageProcessor", "CLIPImageProcessor", "BlipImageProcessor")


def check_cacheable(cfg: Config) -> None:
    """A one-line ConfigError unless the frozen prefix's output per image is fixed for the whole run."""
    if cfg.data.feature_cache is None:
        return
    m = cfg.model
    if m.native is not None:
        raise ConfigError("data.feature_cache applies to composed models (model.vision + model.connector); "
                          "native VLMs (model.native) run their vision blocks inside the HF model: unset it")
    if m.vision is None:
        raise ConfigError("data.feature_cache needs a vision tower (model.vision); unset it for text-only models")
    if m.vision.mode != "frozen":
        raise ConfigError(f"data.feature_cache needs a frozen vision tower but model.vision.mode is "
                          f"{m.vision.mode} (its features change every step); set model.vision.mode=frozen or "
                          "unset data.feature_cache")


def check_processor(processor) -> None:
    name = type(getattr(processor, "processor", processor)).__name__
    if not name.startswith(DETERMINISTIC_PROCESSORS):
        raise ConfigError(f"data.feature_cache: image preprocessing by {name} is not known to be deterministic "
                          "(cacheable: SigLIP, CLIP and BLIP image processors); unset data.feature_cache")


def frozen_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The frozen prefix's parameters, in a fixed order: what the cached features depend on."""
    params = [(f"vision.{n}", p) for n, p in model.vision.named_parameters()]
    if model.feature_stage != "vision":
        skip = {id(p) for p in projection(model.connector).parameters()} if model.feature_stage == "projection" else set()
        params += [(f"connector.{n}", p) for n, p in model.connector.named_parameters() if id(p) not in skip]
    return params


def weights_digest(model) -> str:
    """sha256 over the frozen prefix's weights; under ZeRO-3 gathered a few at a time on every rank."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    digest = hashlib.sha256()
    params = frozen_parameters(model)
    for start in range(0, len(params), 32):
        chunk = params[start:start + 32]
        with GatheredParameters([p for _, p in chunk]):  # a no-op for parameters ZeRO-3 did not partition
            for name, p in chunk:
                data = p.detach().cpu().contiguous()
                digest.update(f"{name}\0{tuple(data.shape)}\0{data.dtype}\n".encode())
                digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def fingerprint(cfg: Config, model, processor, keys: list[str]) -> dict[str, Any]:
    inner = getattr(processor, "processor", processor)
    vision = cfg.model.vision.model_dump(mode="json", include={"path", "config", "feature_layer",
                                                                "drop_cls"})
    connector = cfg.model.connector.model_dump(mode="json", include={"type", "path", "mlp_depth", "num_query_tokens",
                                                                      "qformer"})
    return {"version": 1, "stage": model.feature_stage, "dtype": str(model.vision.dtype).replace("torch.", ""),
            "shape": list(model.feature_shape()), "weights_sha256": weights_digest(model),
            "processor": {"class": type(inner).__name__, **json.loads(inner.to_json_string())},
            "model": {"vision": vision, "connector": connector} if model.feature_stage != "vision"
            else {"vision": vision}, "max_pixels": cfg.data.max_pixels, "images": images_digest(keys)}


def image_keys(dataset) -> list[str]:
    return sorted({p for paths in dataset.image_paths for p in paths})


def _load(keys: list[str], processor, max_pixels: int, skip_bad: bool, bad: list[str]):
    images, good = [], []
    for key in keys:
        try:
            images.append(load_image(key, max_pixels, key))
            good.append(key)
        except DataError:
            if not skip_bad:
                raise
            bad.append(key)
    return good, (processor(images)["pixel_values"] if images else None)


def compute_shards(cache: FeatureCache, shards: list[dict[str, Any]], model, processor, cfg: Config, rank: int,
                   world: int, device: torch.device, calls: int | None = None) -> int | DataError:
    """Compute this rank's share of ``shards`` (``shards[rank::world]``) and publish each. ``calls`` (the
    most forward calls any rank makes) pads this rank with dummy-image calls so all ranks call the
    frozen modules equally often. Returns the shards written."""
    mine = shards[rank::world]
    batches = [(s, keys[i:i + BATCH_IMAGES]) for s in mine
               for keys in [cache.keys_of(s)] for i in range(0, len(keys), BATCH_IMAGES)]
    size = model.vision.image_size
    dummy = torch.zeros(1, 3, size, size, device=device)
    done: dict[str, tuple[list[str], list[np.ndarray], list[str]]] = {s["name"]: ([], [], []) for s in mine}
    error = None
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    # the Q-Former's query tokens belong to the connector itself, whose own forward is not called here
    own = list(model.connector.parameters(recurse=False)) if model.feature_stage == "projection" else []
    with GatheredParameters(own), torch.no_grad():
        for call in range(max(calls or 0, len(batches))):
            pixels = None
            if call < len(batches) and error is None:
                shard, keys = batches[call]
                good, bad = done[shard["name"]][0], done[shard["name"]][2]
                try:
                    loaded, pixels = _load(keys, processor, cfg.data.max_pixels, cfg.data.skip_bad_samples, bad)
                except DataError as e:  # keep calling in step with the other ranks; stop after
                    error = e
            if pixels is None:
                model.frozen_features(dummy)
                continue
            done[shard["name"]][1].append(to_numpy(model.frozen_features(pixels.to(device))))
            good += loaded
    if error is None:
        shape = model.feature_shape()
        for s in mine:
            keys, parts, bad = done[s["name"]]
            features = np.concatenate(parts) if parts else np.zeros((0, *shape), dtype=np.float32)
            cache.write_shard(s["name"], keys, features, bad)
    return error if error is not None else len(mine)


def use_feature_cache(cfg: Config, model, processor, train_set, dist) -> None:
    """Training: build the missing shards on all ranks, then read features instead of pixels."""
    from zerovl.engine.distributed import all_gather_objects, barrier

    check_processor(processor)
    started = time.perf_counter()
    cache = FeatureCache(cfg.data.feature_cache)
    keys = image_keys(train_set)
    current = fingerprint(cfg, model, processor, keys)
    missing = cache.missing(current, keys)  # every rank the same answer, or the same stale error
    if missing:
        if dist.is_main:
            cache.write_index(current, keys)
            log.info("data.feature_cache: computing %d of %d shards of frozen features (%d images) on %d ranks",
                     len(missing), len(cache.index()["shards"]), len(keys), dist.world_size)
        barrier()
        per_rank = [sum(-(-len(cache.keys_of(s)) // BATCH_IMAGES) for s in missing[r::dist.world_size])
                    for r in range(dist.world_size)]
        model.eval()
        result = compute_shards(cache, missing, model, processor, cfg, dist.rank, dist.world_size, dist.device,
                                max(per_rank))
        model.train()
        errors = [e for e in all_gather_objects(str(result) if isinstance(result, DataError) else None) if e]
        if errors:
            raise DataError(errors[0])
        if dist.is_main:
            log.info("data.feature_cache: built in %.1f s", time.perf_counter() - started)
    barrier()
    train_set.features = cache.open()
    model.reads_features = True


def prepare_features(cfg: Config, overwrite: bool = False, shard_size: int = SHARD_IMAGES) -> dict[str, Any]:
    """``zerovl data prepare``: build ``data.feature_cache`` in this process (loads the model's weights)."""
    from zerovl.data.pipeline import build_train_set
    from zerovl.models.builder import build_model, import_model_classes
    from zerovl.recipes.train import set_seed

    check_cacheable(cfg)
    started = time.perf_counter()
    set_seed(cfg.train.seed)  # as training does: random-init towers get the same weights
    import_model_classes(cfg.model)
    built = build_model(cfg.model, cfg.train.precision, cfg.data.max_pixels)
    check_processor(built.image_processor)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = built.model.to(device).eval()
    train_set = build_train_set(cfg.data, built.template(cfg.data.system_prompt), built.image_processor,
                                cfg.model.tokenizer_path)
    cache = FeatureCache(cfg.data.feature_cache)
    keys = image_keys(train_set)
    current = fingerprint(cfg, model, built.image_processor, keys)
    missing = cache.missing(current, keys, shard_size, overwrite)
    cache.write_index(current, keys, shard_size)
    total = len(cache.index()["shards"])
    result = compute_shards(cache, missing, model, built.image_processor, cfg, 0, 1, device)
    if isinstance(result, DataError):
        raise result
    return {"images": len(keys), "shards_written": result, "shards_reused": total - result,
            "seconds": time.perf_counter() - started}
