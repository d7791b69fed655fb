"""Serving a trained model: the OpenAI-compatible HTTP API (``zerovl serve``), a thin layer over
``generation`` — the batched form of the generate call ``chat`` and ``eval`` make. A web chat would
be another thin client of the same ``Batcher``."""
