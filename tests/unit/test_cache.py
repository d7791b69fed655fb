"""The pre-tokenized cache: same tokens as encoding in memory, resumable, parallel, and refused when
anything that shaped its tokens changed."""

import os
import shutil

import numpy as np
import pytest

from tests.conftest import TINY_VISION, tiny_config
from zerovl.config import DataSettings, from_dict
from zerovl.data import cache as cache_module
from zerovl.data.cache import open_cache, prepare_cache
from zerovl.data.dataset import ChatDataset
from zerovl.data.samples import read_messages_jsonl
from zerovl.errors import DataError
from zerovl.models.builder import text_side
from zerovl.recipes.data import text_template


@pytest.fixture
def setup(scenes, tmp_path):
    tokenizer = shutil.copytree(scenes["tokenizer"], tmp_path / "tokenizer")
    train = shutil.copy(scenes["train"], tmp_path / "train.jsonl")
    os.symlink(scenes["train"].parent / "images", tmp_path / "images")
    raw = tiny_config(scenes, tmp_path / "run", data={"train": str(train), "cache_dir": str(tmp_path / "cache")})
    raw["model"]["tokenizer"] = str(tokenizer)
    cfg = from_dict(raw)
    return cfg, text_template(cfg), str(tokenizer)


def prepare(cfg, template, tokenizer, **kwargs):
    return prepare_cache(cfg.data, template, tokenizer, has_vision=True, **kwargs)


def test_cache_holds_exactly_what_in_memory_encoding_gives(setup):
    cfg, template, tokenizer = setup
    result = prepare(cfg, template, tokenizer, shard_size=15)
    memory = ChatDataset(read_messages_jsonl(cfg.data.train), template, _NoImages(), cfg.data.max_length,
                         cfg.data.max_pixels)
    shards = [n for n in os.listdir(cfg.data.cache_dir) if n.startswith("d00-")]
    assert result.samples == len(memory) and result.shards_written == len(shards) > 1
    (cached,) = open_cache(cfg.data, template, tokenizer, _NoImages())
    assert len(cached) == len(memory) and list(cached.sources) == [s.source for s in memory.samples]
    for i in range(len(memory)):
        assert np.array_equal(cached.tokens.ids(i), memory.tokens.ids(i))
        assert np.array_equal(cached.tokens.labels(i), memory.tokens.labels(i))
        assert list(cached.image_paths[i]) == memory.samples[i].images
    assert np.array_equal(cached.tokens.image_tokens, memory.tokens.image_tokens)
    assert cached.tokens.image_tokens.max() == template.tokens_per_image  # one image per demo sample
    assert isinstance(cached.tokens.parts[0].ids, np.memmap)
    shard = cfg.data.cache_dir + "/d00-s00000"
    assert np.array_equal(np.load(shard + "/text_tokens.npy") + np.load(shard + "/image_tokens.npy"),
                          np.diff(np.load(shard + "/offsets.npy")))


class _NoImages:
    def __call__(self, images):
        raise AssertionError("images are not loaded in these tests")


def test_interrupted_prepare_resumes_with_the_missing_shards(setup, monkeypatch):
    cfg, template, tokenizer = setup
    real = cache_module._write_shard
    calls = []

    def crash_on_third(task, out):
        calls.append(task.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like a killed job, mid-way
        return real(task, out)

    monkeypatch.setattr(cache_module, "_write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, template, tokenizer, shard_size=10)
    monkeypatch.setattr(cache_module, "_write_shard", real)
    with pytest.raises(DataError, match=r"is incomplete \(\d+ of \d+ shards missing, e.g. d00-s00002\)"):
        open_cache(cfg.data, template, tokenizer, None)
    os.makedirs(os.path.join(cfg.data.cache_dir, ".d00-s00002.tmp-1234"))  # debris of the killed writer
    result = prepare(cfg, template, tokenizer, shard_size=10)
    assert result.shards_reused == 2 and result.shards_written >= 1
    assert not [n for n in os.listdir(cfg.data.cache_dir) if ".tmp-" in n]
    (cached,) = open_cache(cfg.data, template, tokenizer, None)
    assert len(cached) == result.samples


def test_parallel_prepare_writes_the_same_cache(setup, tmp_path):
    cfg, template, tokenizer = setup
    serial = prepare(cfg, template, tokenizer, shard_size=12)
    other = cfg.data.model_copy(update={"cache_dir": str(tmp_path / "cache2")})
    parallel = prepare_cache(other, template, tokenizer, True, workers=2, shard_size=12)
    assert parallel.samples == serial.samples and parallel.shards_written == serial.shards_written
    for name in sorted(os.listdir(cfg.data.cache_dir)):
        if name.startswith("d"):
            for array in ("ids.npy", "supervised.npy", "offsets.npy"):
                a = np.load(os.path.join(cfg.data.cache_dir, name, array))
                b = np.load(os.path.join(other.cache_dir, name, array))
                assert np.array_equal(a, b)


def test_stale_cache_is_refused_with_what_changed(setup):
    cfg, template, tokenizer = setup
    with pytest.raises(DataError, match="holds no prepared cache; run `zerovl data prepare CONFIG`"):
        open_cache(cfg.data, template, tokenizer, None)
    prepare(cfg, template, tokenizer)
    reweighted = DataSettings.model_validate({**cfg.data.model_dump(), "train": None,
                                              "datasets": [{"path": cfg.data.train, "weight": 5.0}]})
    assert len(open_cache(reweighted, template, tokenizer, None)) == 1  # weights do not change tokens

    with pytest.raises(DataError, match=r"is stale \(max_length changed"):
        open_cache(cfg.data.model_copy(update={"max_length": 32}), template, tokenizer, None)
    template.tokens_per_image += 1
    with pytest.raises(DataError, match=r"stale \(tokens_per_image changed"):
        open_cache(cfg.data, template, tokenizer, None)
    template.tokens_per_image -= 1
    with open(os.path.join(tokenizer, "tokenizer_config.json"), "a") as f:
        f.write("\n")
    with pytest.raises(DataError, match=r"stale \(tokenizer_sha256 changed"):
        open_cache(cfg.data, template, tokenizer, None)
    with pytest.raises(DataError, match=r"holds a cache made from other settings .*--overwrite"):
        prepare(cfg, template, tokenizer)
    prepare(cfg, template, tokenizer, overwrite=True)
    with open(cfg.data.train, "a") as f:
        f.write("\n")  # the data file changed (size and mtime)
    with pytest.raises(DataError, match=r"stale \(datasets\[0\].files changed.*run `zerovl data prepare"):
        open_cache(cfg.data, template, tokenizer, None)


@pytest.mark.parametrize("vision,connector", [
    (dict(TINY_VISION), {"type": "mlp"}),
    ({**TINY_VISION, "model_type": "clip_vision_model"}, {"type": "linear"}),
    ({**TINY_VISION, "model_type": "clip_vision_model"}, {"type": "qformer", "num_query_tokens": 5,
                                                          "qformer": {"hidden_size": 32, "num_hidden_layers": 1,
                                                                      "num_attention_heads": 2,
                                                                      "intermediate_size": 64}}),
])
def test_tokens_per_image_from_configs_matches_the_built_model(scenes, tmp_path, vision, connector):
    from zerovl.models.builder import build_model

    cfg = from_dict(tiny_config(scenes, tmp_path, model={
        "vision": {"config": vision, "mode": "full"}, "connector": connector,
        "llm": {"config": tiny_config(scenes, tmp_path)["model"]["llm"]["config"], "mode": "full"},
        "tokenizer": str(scenes["tokenizer"])}))
    assert text_side(cfg.model)[1] == build_model(cfg.model, "fp32").tokens_per_image
