"""Token ids and label masks of many samples in flat NumPy arrays.

Python lists of ints cost ~60 bytes per token (ids + labels); a million samples would not fit in RAM.
Here one sample is a slice ``[offsets[i], offsets[i + 1])`` of an int32 id array and a uint8 mask
(1 where the token is supervised), held in memory or memory-mapped from a prepared cache shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from zerovl.data.template import IGNORE_INDEX, Encoded


@dataclass
class TokenPart:
    """One block of samples (a cache shard, or a dataset encoded in memory)."""

    ids: np.ndarray  # int32, every sample's ids back to back
    supervised: np.ndarray  # uint8, 1 where the label is the id itself
    offsets: np.ndarray  # int64, num_samples + 1
    image_tokens: np.ndarray  # int32, image tokens per sample

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_encoded(cls, encoded: Sequence[Encoded]) -> TokenPart:
        lengths = np.fromiter((len(e.input_ids) for e in encoded), dtype=np.int64, count=len(encoded))
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((t for e in encoded for t in e.input_ids), dtype=np.int32, count=int(offsets[-1]))
        supervised = np.fromiter((lab != IGNORE_INDEX for e in encoded for lab in e.labels), dtype=np.uint8,
                                 count=int(offsets[-1]))
        images = np.fromiter((e.image_tokens for e in encoded), dtype=np.int32, count=len(encoded))
        return cls(ids, supervised, offsets, images)


class TokenTable:
    """Samples of several parts addressed by one global index."""

    def __init__(self, parts: list[TokenPart]):
        self.parts = [p for p in parts if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.lengths = (np.concatenate([np.diff(p.offsets) for p in self.parts]) if self.parts
                        else np.zeros(0, dtype=np.int64))
        self.image_tokens = (np.concatenate([p.image_tokens for p in self.parts]).astype(np.int64) if self.parts
                             else np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def text_tokens(self) -> np.ndarray:
        return self.lengths - self.image_tokens

    def _locate(self, index: int) -> tuple[TokenPart, int, int]:
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        part = self.parts[k]
        local = index - int(self.starts[k])
        return part, int(part.offsets[local]), int(part.offsets[local + 1])

    def ids(self, index: int) -> np.ndarray:
        part, start, stop = self._locate(index)
        return np.asarray(part.ids[start:stop], dtype=np.int64)

    def labels(self, index: int) -> np.ndarray:
        part, start, stop = self._locate(index)
        ids = np.asarray(part.ids[start:stop], dtype=np.int64)
        return np.where(np.asarray(part.supervised[start:stop]) != 0, ids, IGNORE_INDEX)

    @classmethod
    def concat(cls, tables: Sequence[TokenTable]) -> TokenTable:
        return cls([p for t in tables for p in t.parts])
