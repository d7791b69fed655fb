"""The HTTP layer in process (FastAPI's test client): every model kind answers, bad input gets an
OpenAI-shaped 4xx, and the server keeps answering after it."""

from __future__ import annotations

import json

import pytest

from tests.serving.conftest import png_data_url

pytest.importorskip("fastapi", reason="zerovl[serve] not installed")


def client(bot, **settings):
    from fastapi.testclient import TestClient

    from zerovl.serving.app import ServeSettings, create_app
    from zerovl.serving.batcher import Batcher

    return TestClient(create_app(bot, Batcher(bot, 4, 0.005), ServeSettings(**settings)))


def ask(c, content, **extra):
    return c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], **extra})


def image_part(url=None):
    return {"type": "image_url", "image_url": {"url": url or png_data_url()}}


@pytest.mark.parametrize("model", ["composed_bot", "native_bot", "text_bot"])
def test_every_model_kind_answers_plain_and_streamed(model, request):
    bot = request.getfixturevalue(model)
    c = client(bot)
    content = "what colour ?" if model == "text_bot" else [{"type": "text", "text": "what colour ?"}, image_part()]
    r = ask(c, content, max_tokens=4)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["prompt_tokens"] > 0 and 0 < body["usage"]["completion_tokens"] <= 4
    s = ask(c, content, max_tokens=4, stream=True, stream_options={"include_usage": True})
    events = [line[6:] for line in s.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and s.headers["content-type"].startswith("text/event-stream")
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
    assert text == choice["message"]["content"]  # greedy: the same reply either way
    assert chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]


def test_models_health_and_the_model_name(composed_bot):
    c = client(composed_bot, model_name="demo")
    assert c.get("/v1/models").json()["data"][0]["id"] == "demo"
    assert c.get("/health").json()["status"] == "ok"
    assert ask(c, "hi", model="demo", max_tokens=2).status_code == 200
    r = ask(c, "hi", model="gpt-4o")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_api_key(composed_bot):
    c = client(composed_bot, api_key="s3cret")
    assert ask(c, "hi").status_code == 401
    assert ask(c, "hi").json()["error"]["code"] == "invalid_api_key"
    assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = c.post("/v1/chat/completions", headers={"Authorization": "Bearer s3cret"},
               json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200
    assert c.get("/health").status_code == 200  # probes need no key


def test_bad_input_is_a_4xx_and_the_server_keeps_going(composed_bot, tmp_path):
    from zerovl.serving.media import MediaPolicy
    from zerovl.serving.protocol import Limits

    (tmp_path / "root").mkdir()
    c = client(composed_bot, max_body_bytes=200_000, limits=Limits(max_prompt_tokens=40, max_images=2),
               media=MediaPolicy(image_root=tmp_path / "root", max_image_pixels=100_000))
    cases = [
        (c.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}),
         400, "not valid JSON"),
        (c.post("/v1/chat/completions", content=b"\xff\xfe", headers={"content-type": "application/json"}),
         400, "not valid JSON"),
        (ask(c, "x" * 300_000), 413, "limit is 200,000"),
        (ask(c, [image_part("data:image/png;base64,AAAA")]), 400, "cannot be decoded"),
        (ask(c, [image_part(png_data_url((400, 300)))]), 400, "limit is 100,000"),
        (ask(c, [image_part("../../etc/passwd")]), 400, "outside --image-root"),
        (ask(c, [image_part("http://127.0.0.1:9/a.png")]), 400, "--allow-remote-images"),
        (ask(c, [{"type": "video_url", "video_url": {"url": "x"}}]), 400, "unsupported content type"),
        (c.post("/v1/chat/completions", json={"messages": [{"role": "function", "content": "x"}]}), 400,
         "unknown role"),
        (ask(c, "word " * 60), 400, "the limit is 40"),
        (ask(c, "hi", max_tokens=10**6), 400, "max_tokens"),
        (c.get("/v1/nothing"), 404, "Not Found"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, (words, r.text)
        assert words in r.json()["error"]["message"], r.text
    assert ask(c, "hi", max_tokens=2).status_code == 200
