"""Models to serve: tiny random-init composed, native (Qwen2-VL) and text-only models built in process,
and a run trained for a few steps by ``zerovl train`` for the server started as its own process."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import TINY_LLM, TINY_VISION, tiny_config, write_config


def png_data_url(size=(32, 32), colour=(200, 30, 30), fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _bot(scenes, model: dict):
    from zerovl.config import ModelSettings
    from zerovl.models.builder import build_model
    from zerovl.recipes.chat import Chatbot

    torch.manual_seed(0)
    built = build_model(ModelSettings.model_validate({**model, "tokenizer": str(scenes["tokenizer"])}))
    return Chatbot(built, built.template(), 64 * 64, "tiny")


@pytest.fixture(scope="session")
def composed_bot(scenes):
    return _bot(scenes, {"vision": {"config": dict(TINY_VISION)}, "connector": {"type": "mlp"},
                         "llm": {"config": dict(TINY_LLM)}})


@pytest.fixture(scope="session")
def text_bot(scenes):
    return _bot(scenes, {"llm": {"config": dict(TINY_LLM)}})


@pytest.fixture(scope="session")
def native_bot(scenes):
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=80, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    return _bot(scenes, {"native": {"config": {"model_type": "qwen2_vl", "text_config": text,
                                               "vision_config": dict(depth=1, embed_dim=32, hidden_size=32,
                                                                     num_heads=2)},
                                    "min_pixels": 28 * 28, "max_pixels": 56 * 56}})


@pytest.fixture(scope="session")
def trained_run(scenes, tmp_path_factory):
    """A composed model trained 3 steps on one process, as a user's run directory looks. Its LM head is
    untied: a tiny tied model answers by repeating its last prompt token, which makes a poor check that
    a client shows the text the model generated."""
    from tests.distributed.helpers import check, run

    root = tmp_path_factory.mktemp("served")
    cfg = tiny_config(scenes, root / "run", train={"max_steps": 3, "save_every": 3})
    cfg["model"]["llm"]["config"]["tie_word_embeddings"] = False
    check(run(["train", str(write_config(cfg, root / "cfg.yaml"))], nproc=1, timeout=300))
    return root / "run"


@contextlib.contextmanager
def running(args: list[str], log_path: Path, probe_url: str):
    """``zerovl ARGS`` in its own process group, its output in ``log_path``; yields (process, log file) once
    ``probe_url`` answers, and stops the whole group afterwards."""
    from tests.distributed.helpers import REPO

    log = open(log_path, "w+")
    proc = subprocess.Popen([sys.executable, "-m", "zerovl", *args], stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(probe_url, timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"zerovl {args[0]} did not come up:\n{log.read()[-3000:]}")
                time.sleep(0.5)
        yield proc, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        log.close()
