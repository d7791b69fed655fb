"""Serving a trained model: the OpenAI-compatible HTTP API (``zerovl serve``) and the Gradio web chat
(``zerovl webui``), both thin clients of one ``Batcher`` over ``generation`` -- the batched form of the
generate call ``chat`` and ``eval`` make."""
