"""The frozen-feature cache: it stores exactly the frozen prefix's output, resumes an interrupted build
with the missing shards only, refuses a stale cache in one line, and is refused for trainable towers."""

import os

import pytest
import torch

from tests.conftest import tiny_config
from zerovl.config import from_dict
from zerovl.data import features as features_module
from zerovl.data.features import FeatureCache
from zerovl.data.images import load_image
from zerovl.errors import ConfigError, DataError
from zerovl.models.builder import build_model
from zerovl.recipes.features import check_cacheable, image_keys, prepare_features
from zerovl.recipes.train import set_seed

QFORMER = {"type": "qformer", "mode": "projection", "num_query_tokens": 4,
           "qformer": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}}


def config(scenes, tmp_path, connector=None, vision=None, **data):
    raw = tiny_config(scenes, tmp_path / "run", data={"feature_cache": str(tmp_path / "features"), **data})
    raw["model"]["vision"]["mode"] = "frozen"
    raw["model"]["vision"].update(vision or {})
    raw["model"]["connector"] = connector or dict(QFORMER)
    raw["model"]["llm"]["mode"] = "lora"
    return from_dict(raw)


@pytest.mark.parametrize("connector", [QFORMER, {"type": "mlp"}], ids=["qformer-projection", "mlp-full"])
def test_cache_holds_the_frozen_prefix_output_and_training_reads_it(scenes, tmp_path, connector):
    cfg = config(scenes, tmp_path, connector)
    done = prepare_features(cfg, shard_size=16)
    assert done["shards_written"] == done["shards_reused"] + done["shards_written"] > 1
    set_seed(cfg.train.seed)
    built = build_model(cfg.model, "fp32", cfg.data.max_pixels)
    model = built.model.eval()
    assert model.feature_stage == ("projection" if connector["type"] == "qformer" else "vision")
    cache = FeatureCache(cfg.data.feature_cache).open()
    keys = cache.index()["keys"][:5]
    pixels = built.image_processor([load_image(k, cfg.data.max_pixels) for k in keys])["pixel_values"]
    expected = model.frozen_features(pixels)
    got = cache.get(keys)
    assert got.shape == (5, *model.feature_shape()) and torch.equal(got, expected)
    assert isinstance(cache._array("s00000"), __import__("numpy").memmap)
    # the rest of the model gives the same embeddings from cached features as from pixels
    assert torch.equal(model.encode_features(got), model.encode_images(pixels))


def test_same_loss_from_features_and_pixels_with_text_only_batches(scenes, tmp_path):
    cfg = config(scenes, tmp_path)
    set_seed(0)
    built = build_model(cfg.model, "fp32", cfg.data.max_pixels)
    model = built.model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask, labels = torch.ones_like(ids), ids.clone()
    plain = model(ids, mask, labels=labels)
    model.reads_features = True  # text-only in training: a zero dummy feature through the projection only
    calls = []
    model.vision.register_forward_hook(lambda *a: calls.append(1))
    cached = model(ids, mask, labels=labels)
    assert torch.equal(plain, cached) and not calls
    cached.backward()
    assert torch.count_nonzero(model.connector.proj.weight.grad) == 0  # weighted by 0, but it ran


def test_interrupted_build_resumes_with_the_missing_shards(scenes, tmp_path, monkeypatch):
    cfg = config(scenes, tmp_path)
    real = FeatureCache.write_shard
    calls = []

    def crash_on_third(self, name, *args):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like a killed job, mid-way
        return real(self, name, *args)

    monkeypatch.setattr(FeatureCache, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_features(cfg, shard_size=16)
    monkeypatch.setattr(FeatureCache, "write_shard", real)
    with pytest.raises(DataError, match=r"is incomplete \(\d+ of \d+ shards missing, e.g. s00002\)"):
        FeatureCache(cfg.data.feature_cache).open()
    first = os.stat(os.path.join(cfg.data.feature_cache, "s00000", "features.npy")).st_mtime_ns
    os.makedirs(os.path.join(cfg.data.feature_cache, ".s00002.tmp-1234"))  # debris of the killed writer
    done = prepare_features(cfg, shard_size=16)
    assert done["shards_reused"] == 2 and done["shards_written"] >= 1
    assert os.stat(os.path.join(cfg.data.feature_cache, "s00000", "features.npy")).st_mtime_ns == first
    assert not any(n.startswith(".") for n in os.listdir(cfg.data.feature_cache))
    cache = FeatureCache(cfg.data.feature_cache).open()
    assert len(cache._rows) == len(cache.index()["keys"])


@pytest.mark.parametrize("change, named", [
    ({"train": {"seed": 1}}, "frozen weights"),
    ({"vision": {"image_processor": {"image_mean": [0.1, 0.2, 0.3]}}}, "image processor"),
    ({"data": {"max_pixels": 512}}, "data.max_pixels"),
    ({"connector": {**QFORMER, "qformer": {**QFORMER["qformer"], "layer_norm_eps": 1e-6}}}, "model.connector.qformer"),
])
def test_stale_cache_is_refused_naming_what_changed(scenes, tmp_path, change, named):
    cfg = config(scenes, tmp_path)
    prepare_features(cfg, shard_size=64)
    raw = cfg.model_dump(mode="json")
    for section, values in change.items():
        target = raw["model"] if section in ("vision", "connector") else raw
        target[section] = values if section == "connector" else {**target[section], **values}
    stale = from_dict(raw)
    with pytest.raises(DataError, match=rf"data.feature_cache .* is stale \({named}.* changed since it was built\); "
                                        r"run `zerovl data prepare CONFIG --overwrite`"):
        prepare_features(stale, shard_size=64)
    assert prepare_features(stale, overwrite=True, shard_size=64)["shards_written"] == 1


def test_changed_image_file_makes_the_cache_stale(scenes, tmp_path):
    cfg = config(scenes, tmp_path)
    prepare_features(cfg, shard_size=64)
    keys = FeatureCache(cfg.data.feature_cache).index()["keys"]
    stat = os.stat(keys[0])
    try:
        os.utime(keys[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        with pytest.raises(DataError, match=r"stale \(image files changed"):
            prepare_features(cfg, shard_size=64)
    finally:
        os.utime(keys[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_trainable_vision_tower_is_refused(scenes, tmp_path, mode):
    cfg = config(scenes, tmp_path, vision={"mode": mode})
    with pytest.raises(ConfigError, match=rf"needs a frozen vision tower but model.vision.mode is {mode}"):
        check_cacheable(cfg)


def test_native_models_are_refused(scenes, tmp_path):
    raw = tiny_config(scenes, tmp_path / "run", data={"feature_cache": str(tmp_path / "f")})
    raw["model"] = {"native": {"config": {"model_type": "qwen2_vl"}}, "tokenizer": str(scenes["tokenizer"])}
    with pytest.raises(ConfigError, match=r"native VLMs \(model.native\)"):
        check_cacheable(from_dict(raw))


def test_image_keys_are_the_training_sets_unique_images():
    class Set:
        image_paths = [["b.png"], [], ["a.png", "b.png"]]

    assert image_keys(Set()) == ["a.png", "b.png"]
    assert features_module.shard_plan(["a", "b", "c"], 2) == [{"name": "s00000", "start": 0, "stop": 2},
                                                               {"name": "s00001", "start": 2, "stop": 3}]


def test_dataset_items_carry_features_instead_of_pixels_also_in_loader_workers(scenes, tmp_path):
    import pickle

    from zerovl.data.pipeline import build_train_set

    cfg = config(scenes, tmp_path)
    prepare_features(cfg, shard_size=16)
    set_seed(cfg.train.seed)
    built = build_model(cfg.model, "fp32", cfg.data.max_pixels)
    train_set = build_train_set(cfg.data, built.template(), built.image_processor, cfg.model.tokenizer_path)
    train_set.features = FeatureCache(cfg.data.feature_cache).open()
    first = train_set[0]
    assert "pixel_values" not in first and first["image_features"].shape == (1, *built.model.feature_shape())
    copy = pickle.loads(pickle.dumps(train_set.features))  # a spawned loader worker reopens its own maps
    assert train_set.features._arrays and not copy._arrays
    assert torch.equal(copy.get(list(train_set.image_paths[0])), first["image_features"])
    packed = train_set[(0, 1)]
    assert packed["image_features"].shape[0] == 2
