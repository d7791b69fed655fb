"""``zerovl serve``: an OpenAI-compatible HTTP API over a trained run, checkpoint or export.

Routes: ``POST /v1/chat/completions`` (streaming as server-sent events), ``GET /v1/models``,
``GET /health``. Requests are validated (``protocol``), their images resolved under the media policy
(``media``) and encoded in the request's own thread, then queued to the ``Batcher``, which generates
what arrived together as one batch. Every failure is an OpenAI-shaped error; none stops the server.
"""

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from zerovl.errors import DataError, ZeroVLError
from zerovl.recipes.chat import Chatbot
from zerovl.serving.batcher import Batcher
from zerovl.serving.generation import Row, encode
from zerovl.serving.media import ImageRefused, MediaPolicy, image_bytes
from zerovl.serving.protocol import (
    ChatRequest,
    Limits,
    RequestError,
    chunk,
    completion,
    completion_id,
    error_body,
    parse_chat,
    usage,
)

log = logging.getLogger("zerovl.serve")


def _fastapi():
    try:
        import fastapi
        import uvicorn  # noqa: F401
    except ImportError:
        raise ZeroVLError("zerovl serve needs FastAPI and uvicorn, which are not installed: "
                          "pip install 'zerovl[serve]'") from None
    return fastapi


@dataclass(frozen=True)
class ServeSettings:
    api_key: str | None = None
    model_name: str | None = None  # default: the source directory's name
    max_body_bytes: int = 32 * 1024 * 1024
    limits: Limits = field(default_factory=Limits)
    media: MediaPolicy = field(default_factory=MediaPolicy)


def _sse(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"request body is {int(declared):,} bytes; the limit is {limit:,}", status=413)
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise RequestError(f"request body exceeds the limit of {limit:,} bytes", status=413)
    return bytes(body)


def create_app(bot: Chatbot, batcher: Batcher, settings: ServeSettings = ServeSettings()):
    fastapi = _fastapi()
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = fastapi.FastAPI(title="zerovl", docs_url=None, redoc_url=None, openapi_url=None)
    model_name = settings.model_name or bot.name
    started = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(_, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error ({e.__class__.__name__})", "server_error"), status_code=500)

    def authorize(request) -> None:
        """The bearer key, checked in each /v1 route (cheaper than an HTTP middleware)."""
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise RequestError("missing or incorrect API key: send 'Authorization: Bearer KEY'", status=401,
                               code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "batches": batcher.batches, "requests": batcher.rows}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "zerovl"}]}

    def prepare(req: ChatRequest) -> Row:
        """Images fetched under the policy, prompt encoded: everything that can fail on bad input."""
        images = []
        for url, param in zip(req.image_urls, req.image_params):
            try:
                images.append(image_bytes(url, settings.media))
            except ImageRefused as e:
                raise RequestError(f"{param}: {e}", param) from None
        try:
            prompt, vision = encode(bot, req.messages, images)
        except DataError as e:
            raise RequestError(str(e).replace("request: ", "", 1), "messages") from None
        if len(prompt) > settings.limits.max_prompt_tokens:
            raise RequestError(f"the prompt is {len(prompt)} tokens; the limit is {settings.limits.max_prompt_tokens} "
                               "(--max-prompt-tokens)", "messages", code="context_length_exceeded")
        return Row(prompt, vision, req.sampling)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        raw = await _read_body(request, settings.max_body_bytes)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON ({e})") from None
        req = parse_chat(body, settings.limits)
        if req.model not in (None, model_name):
            raise RequestError(f"model {req.model!r} is not served here; use {model_name!r}", "model", 404,
                               "model_not_found")
        row = await run_in_threadpool(prepare, req)
        cid = completion_id()
        loop = asyncio.get_running_loop()
        if not req.stream:
            finished: asyncio.Future = loop.create_future()
            batcher.submit(row, lambda r, err: loop.call_soon_threadsafe(_settle, finished, err))
            await finished
            return JSONResponse(completion(cid, model_name, row.text, row.finish_reason, len(row.prompt),
                                           len(row.tokens)))
        events: asyncio.Queue = asyncio.Queue()
        row.on_text = lambda text: loop.call_soon_threadsafe(events.put_nowait, ("text", text))
        batcher.submit(row, lambda r, err: loop.call_soon_threadsafe(events.put_nowait, ("done", err)))
        return StreamingResponse(_stream(row, events, cid, model_name, req.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(RequestError(f"generation failed ({error.__class__.__name__}: {error})",
                                          status=500, kind="server_error"))


async def _stream(row: Row, events: asyncio.Queue, cid: str, model: str, include_usage: bool):
    try:
        yield _sse(chunk(cid, model, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await events.get()
            if kind == "text":
                yield _sse(chunk(cid, model, {"content": value}))
                continue
            if value is not None:
                yield _sse(error_body(f"generation failed ({value.__class__.__name__})", "server_error"))
            else:
                yield _sse(chunk(cid, model, {}, row.finish_reason))
                if include_usage:
                    yield _sse(chunk(cid, model, None, usage_=usage(len(row.prompt), len(row.tokens))))
            yield _sse("[DONE]")
            return
    finally:
        row.cancelled.set()  # a client that hung up stops its row at the next token


def serve(source: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16, max_wait_ms: float = 10.0,
          settings: ServeSettings = ServeSettings()) -> None:
    _fastapi()
    import uvicorn

    bot = Chatbot.load(source)
    batcher = Batcher(bot, max_batch, max_wait_ms / 1000)
    app = create_app(bot, batcher, settings)
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", host)
    log.info("serving %s as %r on http://%s:%d/v1 (batches of up to %d)", source, settings.model_name or bot.name,
             host, port, max_batch)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        batcher.close()
