"""``zerovl serve`` as users run it: its own process on a loopback port, a trained run, the official
``openai`` client and ``curl`` as clients, hostile requests, and a load test from 16 clients."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import subprocess
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest
from PIL import Image

from tests.distributed.helpers import free_port
from tests.serving.conftest import png_data_url, running

openai = pytest.importorskip("openai", reason="the openai client is in zerovl[dev]")
pytest.importorskip("fastapi", reason="zerovl[serve] not installed")

KEY = "test-key"


@pytest.fixture(scope="module")
def server(trained_run, scenes, tmp_path_factory):
    root = tmp_path_factory.mktemp("image_root")
    shutil.copy(next((scenes["train"].parent / "images").glob("*.png")), root / "shape.png")
    port = free_port()
    args = ["serve", str(trained_run), "--port", str(port), "--api-key", KEY, "--image-root", str(root),
            "--max-batch", "16", "--max-tokens", "64"]
    url = f"http://127.0.0.1:{port}"
    with running(args, tmp_path_factory.mktemp("log") / "serve.log", url + "/health") as (proc, log):
        yield {"url": url, "proc": proc, "root": root, "log": log}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _question(image_url=None, text="what colour is the shape ?"):
    parts = [{"type": "text", "text": text}]
    if image_url:
        parts.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return [{"role": "user", "content": parts}]


def _alive(server) -> None:
    assert server["proc"].poll() is None, "the server died"
    assert json.load(urllib.request.urlopen(server["url"] + "/health", timeout=10))["status"] == "ok"


def test_openai_client_plain_and_streamed_with_an_image(client, trained_run):
    model = client.models.list().data[0].id
    assert model == trained_run.name
    image = png_data_url()
    reply = client.chat.completions.create(model=model, messages=_question(image), max_tokens=8)
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    stream = client.chat.completions.create(model=model, messages=_question(image), max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy decoding: the same reply both ways
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    from zerovl.recipes.chat import Chatbot  # the same answer as `zerovl chat` gives

    path = trained_run.parent / "q.png"
    path.write_bytes(base64.b64decode(image.split(",", 1)[1]))
    assert Chatbot.from_run(trained_run).answer("what colour is the shape ?", [str(path)], 8) == text


def test_sampling_with_a_seed_repeats(client):
    model = client.models.list().data[0].id
    ask = lambda seed, name=model: client.chat.completions.create(  # noqa: E731
        model=name, messages=_question(), max_tokens=10, temperature=1.3, top_p=0.95, seed=seed
    ).choices[0].message.content
    assert ask(11) == ask(11)
    with pytest.raises(openai.NotFoundError, match="is not served here"):  # the model id must be the served one
        ask(11, "gpt-4o")


def test_curl(server, trained_run):
    body = json.dumps({"model": trained_run.name, "messages": _question(png_data_url()), "max_tokens": 4})
    base = ["curl", "-sS", "-H", "Content-Type: application/json", "-d", body, server["url"] + "/v1/chat/completions"]
    out = subprocess.run(base + ["-H", f"Authorization: Bearer {KEY}"], capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout)["object"] == "chat.completion", out.stdout + out.stderr
    streamed = json.dumps({**json.loads(body), "stream": True})
    out = subprocess.run(["curl", "-sSN", "-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json",
                          "-d", streamed, server["url"] + "/v1/chat/completions"], capture_output=True, text=True,
                         timeout=60)
    events = [line for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["object"] == "chat.completion.chunk"
    out = subprocess.run(base + ["-w", "%{http_code}", "-o", os.devnull], capture_output=True, text=True, timeout=60)
    assert out.stdout == "401"


class _Recorder(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_no_file_outside_the_root_and_no_network_fetch(client, server, tmp_path):
    recorder = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    os.symlink(secret, server["root"] / "escape.png")
    model = client.models.list().data[0].id
    hostile = [f"http://127.0.0.1:{recorder.server_address[1]}/probe.png", "../../../../etc/passwd",
               str(secret), f"file://{secret}", "escape.png", "file:///etc/hostname",
               f"https://127.0.0.1:{recorder.server_address[1]}/probe.png"]
    for url in hostile:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=_question(url), max_tokens=2)
        assert e.value.body["param"].startswith("messages[0].content"), url
    recorder.shutdown()
    assert _Recorder.hits == []
    inside = client.chat.completions.create(model=model, messages=_question("shape.png"), max_tokens=2)
    assert inside.choices[0].finish_reason in ("stop", "length")  # a path under --image-root is fine


def test_hostile_payloads_get_4xx_and_the_server_lives(server, client):
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # 400M pixels in a few kB
    bomb_url = "data:image/png;base64," + base64.b64encode(bomb.getvalue()).decode()
    rss = psutil.Process(server["proc"].pid).memory_info().rss
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match="pixels.*the limit is 25,000,000"):
        client.chat.completions.create(model=model, messages=_question(bomb_url), max_tokens=2)
    assert psutil.Process(server["proc"].pid).memory_info().rss < rss + 200 * 2**20  # never decoded
    with pytest.raises(openai.BadRequestError, match="the limit is 4"):
        client.chat.completions.create(model=model, messages=_question(png_data_url()) * 5, max_tokens=2)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    # a 40 MB upload is answered 413 from its Content-Length, before its body is read
    conn = http.client.HTTPConnection(server["url"].removeprefix("http://"), timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    for name, value in {**headers, "Content-Length": str(40 * 2**20)}.items():
        conn.putheader(name, value)
    conn.endheaders(b"x" * 1024)
    response = conn.getresponse()
    assert response.status == 413 and "limit is 33,554,432" in json.loads(response.read())["error"]["message"]
    conn.close()
    for data, status in [(b"{not json", 400), (b'{"messages": "hi"}', 400)]:
        request = urllib.request.Request(server["url"] + "/v1/chat/completions", data=data, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=60)
        assert e.value.code == status and "error" in json.loads(e.value.read())
    _alive(server)


def test_load_16_clients_zero_failures_stable_memory(server, client):
    model = client.models.list().data[0].id
    image = png_data_url()

    def one(i: int) -> str:
        messages = _question(image if i % 2 else None, f"question {i} : what colour ?")
        if i % 3 == 0:
            stream = client.chat.completions.create(model=model, messages=messages, max_tokens=6, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices) or "?"
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=6)
        return reply.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:  # warm-up: the allocator settles
        list(pool.map(one, range(48)))
    process = psutil.Process(server["proc"].pid)
    before = process.memory_info().rss
    health_before = json.load(urllib.request.urlopen(server["url"] + "/health"))
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(320)))
    after = process.memory_info().rss
    health = json.load(urllib.request.urlopen(server["url"] + "/health"))
    assert len(results) == 320 and all(results)  # any failure would have raised
    requests = health["requests"] - health_before["requests"]
    batches = health["batches"] - health_before["batches"]
    assert requests == 320 and batches < requests / 2, health  # requests that arrive together share a batch
    assert after < before * 1.25 + 64 * 2**20, (before, after)
    print(f"load: 320 requests from 16 clients, 0 failures, {requests / batches:.1f} requests per batch, "
          f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    _alive(server)
