"""Serving a trained model: the OpenAI-compatible HTTP API (``zerovl serve``) and the web chat
(``zerovl webui``), both thin layers over ``generation`` — the batched form of the generate call
``chat`` and ``eval`` make."""
