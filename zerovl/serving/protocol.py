"""The OpenAI chat-completions schema: validating a request body and shaping replies and errors.

Pure functions over plain dicts, so every rule is unit-tested without a server. A request becomes
messages in zerovl's own form (one ``<image>`` tag where each image part stood, as training data has
them) plus the image URLs in order; the server resolves those through ``media``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from zerovl.data.samples import IMAGE_TAG
from zerovl.serving.generation import Sampling

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(Exception):
    """An OpenAI-shaped 4xx: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    max_images: int = 4
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 256  # when it does not ask
    max_prompt_tokens: int = 4096


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict[str, str]]
    image_urls: list[str]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    image_params: list[str] = field(default_factory=list)  # where each image came from, for errors


def _number(body: dict, key: str, lo: float, hi: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise RequestError(f"'{key}' must be a number in [{lo}, {hi}], got {value!r}", key)
    return float(value)


def _integer(body: dict, key: str, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{key}' must be an integer, got {value!r}", key)
    return value


def _content(content: Any, param: str, urls: list[str], params: list[str]) -> str:
    """A message's content as text with ``<image>`` tags; image URLs appended to ``urls``."""
    if isinstance(content, str):
        if IMAGE_TAG in content:
            raise RequestError(f"{param} contains the reserved text {IMAGE_TAG!r}; send images as image_url parts",
                               param)
        return content
    if not isinstance(content, list):
        raise RequestError(f"{param} must be a string or a list of content parts", param)
    text = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{where}.text must be a string", where)
            text.append(_content(part["text"], f"{where}.text", urls, params))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise RequestError(f"{where}.image_url.url must be a non-empty string", where)
            urls.append(url)
            params.append(where)
            text.append(IMAGE_TAG)
        else:
            raise RequestError(f"unsupported content type {kind!r} at {where}: use 'text' or 'image_url'", where)
    return "".join(text)


def parse_chat(body: Any, limits: Limits) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body; raises RequestError naming the offending field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    urls: list[str] = []
    params: list[str] = []
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = ROLES.get(m.get("role"))
        if role is None:
            raise RequestError(f"unknown role {m.get('role')!r} at messages[{i}]: use system, user or assistant",
                               f"messages[{i}].role")
        parsed.append({"role": role, "content": _content(m.get("content"), f"messages[{i}].content", urls, params)})
    if parsed[-1]["role"] != "user":
        raise RequestError("the last message must come from the user", f"messages[{len(parsed) - 1}].role")
    if any(m["role"] == "system" for m in parsed[1:]):
        raise RequestError("a system message may only come first", "messages")
    if len(urls) > limits.max_images:
        raise RequestError(f"{len(urls)} images in one request; the limit is {limits.max_images}", "messages")
    if _integer(body, "n", 1) != 1:
        raise RequestError("only n=1 is supported", "n")
    max_tokens = _integer(body, "max_completion_tokens", None) or _integer(body, "max_tokens", None)
    max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise RequestError(f"max_tokens must be in [1, {limits.max_tokens}], got {max_tokens}", "max_tokens")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", "model")
    sampling = Sampling(max_tokens=max_tokens, temperature=_number(body, "temperature", 0.0, 2.0, 0.0),
                        top_p=_number(body, "top_p", 1e-9, 1.0, 1.0), stop=tuple(stop),
                        seed=_integer(body, "seed", None))
    return ChatRequest(model, parsed, urls, sampling, stream, bool(options.get("include_usage")), params)


# ---- replies -----------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None,
          usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` gives the usage-only chunk (``choices: []``)."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish_reason}]}
    if usage_ is not None:
        body["usage"] = usage_
    return body
