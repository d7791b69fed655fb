"""Requests that arrive together generate as one batch.

One worker thread owns the model. It takes the first waiting row, then keeps collecting rows for at
most ``max_wait_s`` (or until ``max_batch``), and generates them together; rows that arrive while a
batch runs form the next one. A failing batch fails its rows, never the worker.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from zerovl.recipes.chat import Chatbot
from zerovl.serving.generation import Row, generate_rows

log = logging.getLogger("zerovl.serve")

Done = Callable[[Row, BaseException | None], None]


class Batcher:
    def __init__(self, bot: Chatbot, max_batch: int = 16, max_wait_s: float = 0.01):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.bot, self.max_batch, self.max_wait_s = bot, max_batch, max_wait_s
        self._queue: queue.Queue[tuple[Row, Done] | None] = queue.Queue()
        self.batches = 0  # how many generate calls, and how many rows they held (for /health and tests)
        self.rows = 0
        self._thread = threading.Thread(target=self._loop, name="zerovl-generate", daemon=True)
        self._thread.start()

    def submit(self, row: Row, done: Done) -> None:
        """Queue a row; ``done(row, error)`` is called from the worker thread when it has finished."""
        self._queue.put((row, done))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _collect(self, first: tuple[Row, Done]) -> list[tuple[Row, Done]]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # close after this batch
                break
            batch.append(item)
        return batch

    def _loop(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [(row, done) for row, done in self._collect(first) if not row.cancelled.is_set()]
            if not batch:
                continue
            rows = [row for row, _ in batch]
            error = None
            try:
                generate_rows(self.bot, rows)
            except Exception as e:  # a bad batch fails its requests, not the server
                log.exception("generation failed for a batch of %d", len(rows))
                error = e
            self.batches += 1
            self.rows += len(rows)
            for row, done in batch:
                done(row, error)
