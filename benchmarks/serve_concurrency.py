"""Requests/s and latency of `zerovl serve` for 1, 4 and 16 concurrent clients, side by side.

    python benchmarks/serve_concurrency.py [--source runs/demo] [--rounds 3] [--max-batch 16] [--smoke]

``--source`` is a run (by default the one ``zerovl demo`` leaves in ``runs/demo``); ``--smoke``
trains a tiny run for a few steps instead. One ``zerovl serve SOURCE --max-batch N`` process serves
every measurement on a loopback port. Each client is a thread that sends its next request as soon
as its last reply arrived: a demo val question with its image as a ``data:`` URL, greedy,
``max_tokens`` 12, no streaming, on one kept-alive HTTP connection per client. For each client count, every round sends ``--requests-per-client``
requests per client (at least ``--min-requests`` in all) after a warm-up; the order of the client
counts alternates every round. Figures: requests/s = requests / wall time of the round; p50 / p95 =
per-request latency from send to the last byte; requests per batch = the server's own count of
generate calls (``/health``) over the round. Medians over rounds, and the ratio of medians.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

REPO = _common.REPO
CLIENTS = (1, 4, 16)


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="runs/demo", help="a run, checkpoint or export to serve")
    p.add_argument("--data", help="questions (default: SOURCE/data/val.jsonl, as `zerovl demo` writes it)")
    p.add_argument("--work", default="runs/bench_serve", help="the server log and result.json go here")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="zerovl serve's --batch-wait-ms")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--requests-per-client", type=int, default=32)
    p.add_argument("--min-requests", type=int, default=128, help="per client count and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help=_common.SMOKE_HELP)
    args = p.parse_args()
    if args.smoke:
        args.rounds, args.requests_per_client, args.min_requests = 1, 2, 8
        if args.work == p.get_default("work"):
            args.work = _common.smoke_dir("serve_concurrency")
    return args


def smoke_run(work: Path) -> Path:
    """A tiny run trained a few steps on generated scenes (the smoke test's model)."""
    from eval_throughput import train_run

    from zerovl.data.demo_scenes import generate

    generate(work / "data", num_train_images=32, num_val_images=4)
    return train_run(work, SimpleNamespace(nproc=2, train_steps=5))


def questions(path: Path) -> list[dict]:
    """OpenAI request bodies: each val question with its image inlined."""
    bodies = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        image = base64.b64encode((path.parent / rec["images"][0]).read_bytes()).decode()
        text = rec["messages"][0]["content"].replace("<image>", "").strip()
        bodies.append({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            {"type": "text", "text": text}]}]})
    return bodies


def start_server(source: Path, work: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "zerovl", "serve", str(source), "--port", str(port),
                             "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise _common.fail(f"serve_concurrency: the server did not start (log: {work / 'serve.log'})") from None
            time.sleep(0.5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(conn: http.client.HTTPConnection, body: dict) -> float:
    """One request on the client's kept-alive connection (as the openai client does); its latency."""
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    reply = json.loads(response.read())
    if response.status != 200 or reply["choices"][0]["finish_reason"] not in ("stop", "length"):
        raise RuntimeError(f"unexpected reply {response.status}: {reply}")
    return time.perf_counter() - started


def _health(url: str) -> dict:
    return json.load(urllib.request.urlopen(url + "/health", timeout=30))


def measure(url: str, bodies: list[dict], clients: int, total: int, max_tokens: int) -> dict:
    """``clients`` threads share ``total`` requests; each sends its next one as its last reply lands."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    counter = iter(range(total))
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=300)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                conn.close()
                return
            try:
                latencies.append(_post(conn, {**bodies[i % len(bodies)], "max_tokens": max_tokens}))
            except BaseException as e:  # counted, reported
                errors.append(e)

    before = _health(url)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = _health(url)
    latencies.sort()
    batches = after["batches"] - before["batches"]
    return {"requests": total, "failures": len(errors), "wall_s": wall, "rps": len(latencies) / wall,
            "p50_s": latencies[len(latencies) // 2],
            "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "per_batch": (after["requests"] - before["requests"]) / max(batches, 1),
            "first_error": repr(errors[0]) if errors else None}


def main() -> None:
    args = arguments()
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    source = smoke_run(work) if args.smoke else Path(args.source).absolute()
    data = Path(args.data) if args.data else (work / "data" / "val.jsonl" if args.smoke
                                              else source / "data" / "val.jsonl")
    if not data.is_file():
        raise _common.fail(f"serve_concurrency: {data} not found: run `zerovl demo` first, or give --source and --data")
    bodies = questions(data)
    proc, url = start_server(source, work, args)
    results: dict[int, list[dict]] = {c: [] for c in CLIENTS}
    try:
        measure(url, bodies, 16, 32, args.max_tokens)  # warm-up
        for round_ in range(args.rounds):
            for clients in CLIENTS if round_ % 2 == 0 else CLIENTS[::-1]:
                total = max(args.min_requests, clients * args.requests_per_client)
                got = measure(url, bodies, clients, total, args.max_tokens)
                results[clients].append(got)
                print(f"[round {round_}] {clients:>2} client(s): {got['requests']} requests in {got['wall_s']:.1f} s = "
                      f"{got['rps']:.2f} requests/s, p50 {got['p50_s'] * 1000:.0f} ms, p95 {got['p95_s'] * 1000:.0f} "
                      f"ms, {got['per_batch']:.1f} requests per batch, {got['failures']} failures", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    med = {c: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50_s", "p95_s", "per_batch")}
           for c, rs in results.items()}
    failures = sum(r["failures"] for rs in results.values() for r in rs)
    print(f"\n{source.name}: {len(bodies)} distinct questions, max_tokens {args.max_tokens}, --max-batch "
          f"{args.max_batch}, --batch-wait-ms {args.batch_wait_ms:g}, {args.rounds} round(s), medians")
    print(f"{'clients':>7} {'requests/s':>11} {'p50 ms':>8} {'p95 ms':>8} {'requests/batch':>15}")
    for c in CLIENTS:
        m = med[c]
        print(f"{c:>7} {m['rps']:11.2f} {m['p50_s'] * 1000:8.0f} {m['p95_s'] * 1000:8.0f} {m['per_batch']:15.1f}")
    ratio = med[16]["rps"] / med[1]["rps"]
    print(f"failures: {failures}")
    print(f"4 clients / 1 client requests/s (ratio of medians): {med[4]['rps'] / med[1]['rps']:.2f}x")
    print(f"16 clients / 1 client requests/s (ratio of medians): {ratio:.2f}x")
    (work / "result.json").write_text(json.dumps({"source": str(source), "per_round": results, "medians": med,
                                                  "ratio_16_over_1": ratio, "failures": failures,
                                                  "args": vars(args)}, indent=2) + "\n")
    if args.smoke:
        print(_common.SMOKE_NOTE)
    if failures:
        raise _common.fail(f"serve_concurrency: {failures} request(s) failed")


if __name__ == "__main__":
    main()
