"""``zerovl chat``: answer questions about images with a trained run or an export, on one process.

``Chatbot`` is the loaded model that ``chat``, ``serve`` and ``webui`` share; all three generate
through ``zerovl.serving.generation`` (the same ``generate`` call ``zerovl eval`` makes).
"""

from __future__ import annotations

from pathlib import Path

from zerovl.data.samples import IMAGE_TAG
from zerovl.data.template import ChatTemplate
from zerovl.engine.restore import is_export, load_export, load_trained, split_run_and_checkpoint
from zerovl.errors import ConfigError
from zerovl.models.builder import BuiltModel


class Chatbot:
    def __init__(self, built: BuiltModel, template: ChatTemplate, max_pixels: int, source: str | Path = "model",
                 run_dir: Path | None = None):
        if template is None:
            raise ConfigError(f"{source} is an image-text retrieval model (model.retrieval): it scores pairs and "
                              "does not generate text; score it with zerovl eval --task retrieval")
        self.built = built
        self.template = template
        self.max_pixels = max_pixels
        self.name = Path(source).resolve().name  # what /v1/models lists
        self.run_dir = run_dir  # where metrics.jsonl lives (None for an export)
        built.model.eval()

    @classmethod
    def from_run(cls, run_or_ckpt: str | Path) -> Chatbot:
        cfg, built, _ = load_trained(run_or_ckpt)
        run_dir, _ = split_run_and_checkpoint(run_or_ckpt)
        return cls(built, built.template(cfg.data.system_prompt), cfg.data.max_pixels, run_or_ckpt, run_dir)

    @classmethod
    def from_export(cls, export_dir: str | Path, max_pixels: int = 1024 * 1024) -> Chatbot:
        _, built, _ = load_export(export_dir)
        return cls(built, built.template(), max_pixels, export_dir)

    @classmethod
    def load(cls, source: str | Path) -> Chatbot:
        """A run directory, one of its checkpoints, or a ``zerovl export`` directory."""
        return cls.from_export(source) if is_export(source) else cls.from_run(source)

    def answer(self, question: str, images: list[str] = (), max_new_tokens: int = 64,
               history: list[dict[str, str]] | None = None) -> str:
        from zerovl.serving.generation import Row, Sampling, encode, generate_rows

        content = question
        if images and not history and IMAGE_TAG not in question:  # images belong to the first turn
            content = IMAGE_TAG * len(images) + question
        messages = list(history or []) + [{"role": "user", "content": content}]
        prompt, vision = encode(self, messages, list(images), "chat")
        row = Row(prompt, vision, Sampling(max_tokens=max_new_tokens))
        generate_rows(self, [row])
        return row.text
