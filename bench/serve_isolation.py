"""Isolation: one client streams while another sends hostile requests; the hostile ones must fail alone, and the
stream's inter-token latency must stay within 2x of its undisturbed value.

The server is `seekstack serve` on the `tiny` preset with random weights (as in bench/serve_load.py). A round
streams one completion of `--tokens` tokens undisturbed, then one while a second client sends, one after
another until the stream ends: a `top_k` of 2**63 (which once failed every request in flight), `temperature`
NaN, 10,000 stop strings of 100 characters (once 14x slower streams), a 10 MB body (once froze the server for
~12 s), and a 3 MB prompt under the body limit (refused as too long before tokenizing). The hostile client runs
in a thread of its own, so the stream's client measures its gaps undisturbed by it.
Figures: medians over rounds of the stream's mean and p95 inter-token latency, disturbed / undisturbed (the mean,
not the median: a busy server sends some tokens in bursts, which lowers the median gap while the stream slows),
and the hostile requests' statuses (none may be 2xx or 5xx).

    python bench/serve_isolation.py                  # 3 rounds of 128 tokens
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
from collections import Counter
from pathlib import Path

import httpx
from options import positive_int
from serve_load import LevelRun, make_model, percentile, request_body, start_server, stream_one

HOSTILE = {
    "top_k 2**63": {"top_k": 2**63},
    "temperature NaN": "NaN",
    "10,000 stop strings": {"stop": ["x" * 100] * 10_000},
    "10 MB body": {"prompt": "x" * 10_000_000},
    "3 MB prompt": {"prompt": "word " * 600_000},
}


def hostile_bodies(model: str) -> dict[str, bytes]:
    bodies = {}
    for name, extra in HOSTILE.items():
        if extra == "NaN":
            bodies[name] = b'{"model": "%s", "prompt": "x", "temperature": NaN}' % model.encode()
        else:
            bodies[name] = json.dumps({"model": model, "prompt": "x", "max_tokens": 4, **extra}).encode()
    return bodies


def send_hostile(url: str, bodies: dict[str, bytes], until: threading.Event, statuses: Counter) -> None:
    """The hostile requests in turn, until `until` is set."""
    with httpx.Client(timeout=600) as http:
        while not until.is_set():
            for name, body in bodies.items():
                response = http.post(url, content=body, headers={"content-type": "application/json"})
                statuses[(name, response.status_code)] += 1


def stream_under_fire(
    base_url: str, model: str, tokens: int, bodies: dict[str, bytes] | None
) -> tuple[LevelRun, Counter]:
    """One streamed completion; with `bodies`, a second client in a thread sends them in turn meanwhile."""
    run, statuses, done = LevelRun(clients=1), Counter(), threading.Event()
    url = f"{base_url}/v1/completions"
    fire = threading.Thread(target=send_hostile, args=(url, bodies, done, statuses)) if bodies else None

    async def stream() -> None:
        async with httpx.AsyncClient(timeout=600) as http:
            await stream_one(http, url, request_body(model, 0, 0, tokens), run)

    if fire:
        fire.start()
    try:
        asyncio.run(stream())
    finally:
        done.set()
        if fire:
            fire.join()
    return run, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=positive_int, default=128)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--port", type=int, default=8932)
    parser.add_argument("--threads", type=positive_int, help="torch threads of the server")
    args = parser.parse_args()
    ratios: dict[str, list[float]] = {"mean": [], "p95": []}
    statuses: Counter = Counter()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = make_model(Path(scratch))
        server = start_server(model_dir, Path(scratch) / "bench.db", args.port, 4, args.threads)
        base_url = f"http://127.0.0.1:{args.port}"
        try:
            model = httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
            bodies = hostile_bodies(model)
            stream_under_fire(base_url, model, 8, None)  # warm-up
            for _ in range(args.rounds):
                calm, _ = stream_under_fire(base_url, model, args.tokens, None)
                fired, answered = stream_under_fire(base_url, model, args.tokens, bodies)
                statuses += answered
                ratios["mean"].append(statistics.mean(fired.itl_s) / statistics.mean(calm.itl_s))
                ratios["p95"].append(percentile(fired.itl_s, 95) / percentile(calm.itl_s, 95))
        finally:
            server.kill()
            server.wait()
    print(f"one stream of {args.tokens} tokens, undisturbed vs beside hostile requests; {args.rounds} rounds")
    for name, values in ratios.items():
        print(f"inter-token latency {name}, disturbed / undisturbed: {statistics.median(values):.2f}x")
    for (name, status), count in sorted(statuses.items()):
        print(f"  {name:<22} -> {status} x{count}")
    failed = [key for key in statuses if not 400 <= key[1] < 500]
    if failed:
        raise SystemExit(f"hostile requests that did not fail with a 4xx: {failed}")


if __name__ == "__main__":
    main()
