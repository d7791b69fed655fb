"""Run outputs on rank 0: ``metrics.jsonl`` (one JSON object per line) and the progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from zerovl.errors import ConfigError


class MetricsLog:
    """Appends one JSON object per optimizer step (and per eval) to ``<output_dir>/metrics.jsonl``.
    Only rank 0 writes; other ranks get a no-op."""

    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = open(self.path, "a") if enabled else None
        self._flushed = 0.0
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard=true needs TensorBoard: pip install 'zerovl[tensorboard]'") from None
            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        now = time.time()
        self._file.write(json.dumps({"time": round(now, 3), **record}) + "\n")
        if record.get("split") != "train" or now - self._flushed > 2.0:  # train lines: at most every 2 s
            self._file.flush()
            self._flushed = now
        if self._tb is not None and "step" in record:
            split = record.get("split", record.get("event", "misc"))
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(f"{split}/{key}", value, record["step"])
                elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                    self._tb.add_scalar(f"{split}/{key}_max", max(value), record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True, mininterval=1.0)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
