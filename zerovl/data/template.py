"""Turn a chat Sample into token ids and assistant-only labels.

The tokenizer's own chat template renders the text (``apply_chat_template``); tokenizers without one
get ChatML. Each ``<image>`` tag becomes that image's number of image tokens — fixed by the connector
for composed models, or computed from the image size for dynamic-resolution native models (Qwen2-VL,
whose tokens are also wrapped in vision start/end tokens) — which the model later overwrites with
image features. Labels are ``-100`` everywhere except on the
assistant replies (content and end-of-turn token), found by rendering conversation prefixes. A fast
tokenizer maps those character spans onto tokens through its offsets; a slow one (Qwen-7B-Chat's
tiktoken ``QWenTokenizer``, ChatGLM3's sentencepiece tokenizer) has none, so the text is cut at the
span boundaries and tokenized piece by piece, as those models' own chat code builds its input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from zerovl.data.samples import IMAGE_TAG, Sample
from zerovl.errors import ConfigError, DataError

IGNORE_INDEX = -100

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Tokenizers without a chat template whose models expect a system turn when none is given: Qwen-7B-Chat's
# make_context (qwen_generation_utils.py) always writes this one, in ChatML.
DEFAULT_SYSTEM = {"QWenTokenizer": "You are a helpful assistant."}


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int
    image_tokens: int = 0  # image tokens in input_ids (all images of the sample)


class TooLong(Exception):
    """Raised when max_length would cut image tokens or leave no supervised token."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ChatTemplate:
    """``tokens_per_image``: an int, or a callable image path -> token count (dynamic resolution);
    ``image_text``: the text one image becomes, given its token count (default: the image token repeated)."""

    def __init__(self, tokenizer, image_token: str, tokens_per_image: int | Callable[[str], int],
                 system_prompt: str | None = None, image_text: Callable[[int], str] | None = None,
                 pieces: bool | None = None):
        """``pieces``: tokenize turn by turn instead of through offsets (default: when the tokenizer is slow)."""
        self.tokenizer = tokenizer
        self.pieces = not getattr(tokenizer, "is_fast", False) if pieces is None else pieces
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if (self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id) and tokens_per_image != 0:
            raise ConfigError(f"model.image_token {image_token!r} is not a token of the tokenizer")
        self.tokens_per_image = tokens_per_image
        self.image_text = image_text or (lambda count: image_token * count)
        self._image_span_ids = set(tokenizer.convert_tokens_to_ids(tokenizer.tokenize(self.image_text(1))))
        if system_prompt is None:
            system_prompt = DEFAULT_SYSTEM.get(type(tokenizer).__name__) if not tokenizer.chat_template else None
        self.system_prompt = system_prompt
        self.chat_template = None if tokenizer.chat_template else CHATML_TEMPLATE
        self.closing_eos = self._needs_closing_eos()

    def _needs_closing_eos(self) -> bool:
        """True for templates that write nothing after an assistant reply (ChatGLM3's): a model trained
        on them would never learn to stop, so the conversation's last reply gets the EOS token, as
        ChatGLM3's own fine-tuning code appends it."""
        eos = self.tokenizer.eos_token
        if eos is None:
            return False
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "REPLY"}]
        try:
            rendered = self.render(probe)
        except Exception:  # noqa: BLE001 (a template with demands of its own: it is not ChatGLM's kind)
            return False
        after = rendered[rendered.rindex("REPLY") + len("REPLY"):].strip()
        return not after

    # -- rendering -----------------------------------------------------------------------------
    @property
    def image_token_spec(self) -> str:
        """What decides image token counts (part of the pre-tokenized cache's fingerprint)."""
        spec = self.tokens_per_image
        return str(spec) if isinstance(spec, int) else spec.describe()

    def image_counts(self, sample: Sample) -> list[int]:
        if isinstance(self.tokens_per_image, int):
            return [self.tokens_per_image] * len(sample.images)
        counts = []
        held = sample.meta.get("image_bytes")  # tar-shard samples carry their images, not paths
        for i, path in enumerate(sample.images):
            try:
                counts.append(self.tokens_per_image(path, held[i] if held is not None else None))
            except DataError as e:  # the image's own problem; say which sample holds it
                raise DataError(f"{sample.source}: {e}") from None
        return counts

    def _messages(self, sample: Sample) -> tuple[list[dict[str, str]], int]:
        """Messages with image tags expanded, and the total number of image tokens."""
        msgs = [dict(role=m["role"], content=m["content"]) for m in sample.messages]
        if self.system_prompt is not None and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        tags = sum(m["content"].count(IMAGE_TAG) for m in msgs)
        if tags != len(sample.images):
            raise DataError(f"{sample.source}: {tags} {IMAGE_TAG} tag(s) in the text but {len(sample.images)} "
                            f"image(s); put one {IMAGE_TAG} where each image belongs")
        counts = iter(self.image_counts(sample))
        total = 0
        for m in msgs:
            pieces = m["content"].split(IMAGE_TAG)
            text = pieces[0]
            for piece in pieces[1:]:
                count = next(counts)
                total += count
                text += self.image_text(count) + piece
            m["content"] = text
        return msgs, total

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=self.chat_template,
        )

    def _assistant_spans(self, msgs: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
        spans = []
        cursor = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self.render(msgs[:i], add_generation_prompt=True)
            through = full if i == len(msgs) - 1 else self.render(msgs[: i + 1])  # same text, one render less
            if full.startswith(before) and full.startswith(through) and len(through) > len(before):
                # the reply and its end-of-turn token; not the newline a template writes after it
                # (ChatML's "<|im_end|>\n"), which the model never has to produce
                spans.append((len(before), len(before) + len(through[len(before):].rstrip())))
                cursor = len(through)
            else:  # template that rewrites earlier turns: fall back to locating the reply text
                start = full.find(m["content"], cursor)
                if start < 0:
                    raise DataError(f"chat template dropped an assistant reply; cannot build labels for {m!r}")
                spans.append((start, start + len(m["content"])))
                cursor = start + len(m["content"])
        return spans

    # -- encoding ------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _by_offsets(self, full: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        span_i = 0
        for t, (start, end) in enumerate(offsets):
            while span_i < len(spans) and start >= spans[span_i][1]:
                span_i += 1
            if span_i < len(spans) and spans[span_i][0] <= start < spans[span_i][1] and end > start:
                labels[t] = ids[t]
        return ids, labels

    def _by_pieces(self, full: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """The text cut at every reply's start and end, each piece tokenized alone: no offsets needed."""
        ids, labels, cursor = [], [], 0
        for start, end in spans:
            before, reply = self._ids(full[cursor:start]), self._ids(full[start:end])
            ids += before + reply
            labels += [IGNORE_INDEX] * len(before) + reply
            cursor = end
        rest = self._ids(full[cursor:])
        return ids + rest, labels + [IGNORE_INDEX] * len(rest)

    def encode(self, sample: Sample, max_length: int | None = None) -> Encoded:
        """Token ids and labels for training. Raises TooLong if max_length would cut an image."""
        msgs, image_tokens = self._messages(sample)
        full = self.render(msgs)
        spans = self._assistant_spans(msgs, full)
        ids, labels = (self._by_pieces if self.pieces else self._by_offsets)(full, spans)
        if self.closing_eos and spans:
            ids, labels = ids + [self.tokenizer.eos_token_id], labels + [self.tokenizer.eos_token_id]
        self._check_image_tokens(ids, image_tokens, len(sample.images), sample.source)
        if max_length is not None and len(ids) > max_length:
            image_positions = [i for i, t in enumerate(ids) if t in self._image_span_ids]
            if image_positions and image_positions[-1] >= max_length:
                raise TooLong("image_tokens_cut")
            ids, labels = ids[:max_length], labels[:max_length]
        if all(lab == IGNORE_INDEX for lab in labels):
            raise TooLong("no_supervised_tokens")
        return Encoded(ids, labels, len(sample.images), image_tokens)

    def encode_prompt(self, sample: Sample) -> list[int]:
        """Ids of the conversation up to (not including) the last assistant reply, ready to generate."""
        msgs, image_tokens = self._messages(sample)
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        text = self.render(msgs, add_generation_prompt=True)
        if self.pieces:  # cut where training cut, so earlier replies tokenize as they were trained
            ids = self._by_pieces(text, self._assistant_spans(msgs, text))[0]
        else:
            ids = self._ids(text)
        self._check_image_tokens(ids, image_tokens, len(sample.images), sample.source)
        return ids

    def _check_image_tokens(self, ids: list[int], expected: int, num_images: int, source: str) -> None:
        found = sum(1 for t in ids if t == self.image_token_id)
        if found != expected:
            raise DataError(
                f"{source}: {found} image tokens after templating but {num_images} image(s) should give "
                f"{expected}; is {self.image_token!r} also in the plain text?"
            )
