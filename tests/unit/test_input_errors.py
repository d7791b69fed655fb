"""Inputs that must not crash: each gets one `zerovl: error:` line naming the key, a non-zero exit and
no traceback (run through the real CLI, single process)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, tiny_config, write_config


def _zerovl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zerovl", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": "/tmp",
                                            "OMP_NUM_THREADS": "1"})


def test_feature_layer_deeper_than_the_tower(tmp_path, scenes):
    cfg = write_config(tiny_config(scenes, tmp_path / "run"), tmp_path / "cfg.yaml")
    proc = _zerovl("train", str(cfg), "model.vision.feature_layer=5")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == ("zerovl: error: model.vision.feature_layer=5 is outside 0..1 (or -1..-2) for this "
                         "1-layer tower"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
