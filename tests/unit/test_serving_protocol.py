"""The OpenAI request rules and the image policy, without a server."""

from __future__ import annotations

import base64
import io
import os

import pytest
from PIL import Image

from zerovl.serving.media import ImageRefused, MediaPolicy, image_bytes
from zerovl.serving.protocol import Limits, RequestError, parse_chat

LIMITS = Limits(max_images=2, max_tokens=100, default_max_tokens=16)


def png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(content):
    return {"messages": [{"role": "user", "content": content}]}


def test_content_parts_become_image_tags_in_order():
    req = parse_chat({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:a"}},
                                     {"type": "text", "text": "left or right?"},
                                     {"type": "image_url", "image_url": "data:b"}]},
        {"role": "assistant", "content": "left"},
        {"role": "user", "content": "sure?"}], "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
        "stop": "\n", "seed": 3, "stream": True, "stream_options": {"include_usage": True}, "model": "m"}, LIMITS)
    assert [m["role"] for m in req.messages] == ["system", "user", "assistant", "user"]
    assert req.messages[1]["content"] == "<image>left or right?<image>"
    assert req.image_urls == ["data:a", "data:b"]
    assert req.image_params == ["messages[1].content[0]", "messages[1].content[2]"]
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.stop, s.seed) == (7, 0.5, 0.9, ("\n",), 3)
    assert req.stream and req.include_usage and req.model == "m"


def test_defaults():
    req = parse_chat(user("hi"), LIMITS)
    assert req.sampling.max_tokens == 16 and req.sampling.temperature == 0.0 and not req.stream
    assert parse_chat({**user("hi"), "max_completion_tokens": 9}, LIMITS).sampling.max_tokens == 9


@pytest.mark.parametrize("body, param, words", [
    ([1, 2], None, "JSON object"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "unknown role 'tool'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages[0].role", "last message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "user", "content": "c"}]}, "messages", "system message may only come first"),
    (user([{"type": "input_audio", "input_audio": {}}]), "messages[0].content[0]", "unsupported content type"),
    (user([{"type": "image_url", "image_url": {"url": ""}}]), "messages[0].content[0]", "non-empty string"),
    (user(42), "messages[0].content", "string or a list"),
    (user("look: <image>"), "messages[0].content", "reserved text"),
    (user([{"type": "image_url", "image_url": {"url": "data:x"}}] * 3), "messages", "limit is 2"),
    ({**user("hi"), "n": 2}, "n", "n=1"),
    ({**user("hi"), "max_tokens": 101}, "max_tokens", "[1, 100]"),
    ({**user("hi"), "max_tokens": "5"}, "max_tokens", "integer"),
    ({**user("hi"), "temperature": 3}, "temperature", "[0.0, 2.0]"),
    ({**user("hi"), "top_p": 0}, "top_p", "top_p"),
    ({**user("hi"), "stop": ["a"] * 5}, "stop", "at most 4"),
    ({**user("hi"), "stream": "yes"}, "stream", "true or false"),
])
def test_bad_requests_name_the_field(body, param, words):
    with pytest.raises(RequestError) as e:
        parse_chat(body, LIMITS)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_data_urls_decode_and_malformed_ones_are_refused():
    assert image_bytes(data_url(png()), MediaPolicy()) == png()
    for bad, words in [("data:image/png;base64,@@@", "malformed"), ("data:text/plain;base64,aGk=", "data:image/"),
                       (data_url(b"not an image"), "cannot be decoded")]:
        with pytest.raises(ImageRefused, match=words):
            image_bytes(bad, MediaPolicy())


def test_pixel_limit_reads_the_header_only():
    big = png((300, 200))
    with pytest.raises(ImageRefused, match="300x200 = 60,000 pixels; the limit is 50,000"):
        image_bytes(data_url(big), MediaPolicy(max_image_pixels=50_000))
    with pytest.raises(ImageRefused, match="bytes; the limit"):
        image_bytes(data_url(big), MediaPolicy(max_image_bytes=100))


def test_remote_urls_are_refused_unless_allowed():
    with pytest.raises(ImageRefused, match="--allow-remote-images"):
        image_bytes("http://127.0.0.1:9/x.png", MediaPolicy())
    with pytest.raises(ImageRefused, match="could not fetch"):  # allowed, but nothing listens on port 9
        image_bytes("http://127.0.0.1:9/x.png", MediaPolicy(allow_remote=True, fetch_timeout_s=2))


def test_local_paths_only_under_the_image_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(png())
    secret = tmp_path / "secret.png"
    secret.write_bytes(png())
    os.symlink(secret, root / "link.png")
    policy = MediaPolicy(image_root=root)
    assert image_bytes("sub/ok.png", policy) == png()
    assert image_bytes(f"file://{root}/sub/ok.png", policy) == png()
    for url in ["../secret.png", "sub/../../secret.png", str(secret), f"file://{secret}", "link.png",
                "file:///etc/passwd", "%2e%2e/secret.png"]:
        with pytest.raises(ImageRefused, match="outside --image-root|does not exist"):
            image_bytes(url, policy)
    with pytest.raises(ImageRefused, match="--image-root DIR"):
        image_bytes("sub/ok.png", MediaPolicy())
    with pytest.raises(ImageRefused, match="scheme 'ftp'"):
        image_bytes("ftp://host/x.png", policy)
