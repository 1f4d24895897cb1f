"""Serving under load: N concurrent streaming clients against one `seekstack serve`, for N = 1, 4, 16.

A `tiny`-preset model with random weights (its vocabulary that of a byte-level BPE trained on a slice
of the standard library's source) is saved to a temporary folder, or `--model DIR` is used, and served
by the real `seekstack serve` in a subprocess, open on localhost. Each of N clients streams
`--requests` completions one after the other, each exactly `--tokens` tokens long (`ignore_eos`), with
`logprobs: 0` so that every token arrives in an SSE chunk of its own even when it holds half a
UTF-8 character. Rounds go 1, 4, 16, 1, 4, 16, ... so that load from other processes falls on all
levels alike; each figure is the median over rounds.

Per level: generated tokens/s of all clients together (first request sent to last token received),
p50/p95 time to first token, p50/p95 inter-token latency (client-side gaps between chunks, divided
among the tokens a chunk carries). Ratio = tokens/s at N / tokens/s at 1: well above 1 means
concurrent requests share decode steps (continuous batching). Clients and server share the machine.

The row "engine" is the API's overhead reference: the same requests, one after the other, through
`Engine.stream` in this process with the server idle (same weights, sampling and torch threads), timed
the same way; "1 client / engine" is then the share of the engine's own speed that one streaming API
client gets.

    python bench/serve_load.py                               # default: 3 rounds, 64 tokens, 2 requests per client
    python bench/serve_load.py --rounds 1 --tokens 32        # quick check
    python bench/serve_load.py --clients 1 --threads 1 --tokens 128 --rounds 5   # API overhead at one client
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from options import checkpoint_folder, positive_int

import seekstack
from seekstack.infer import Engine, SamplingParams
from seekstack.tokenizer import Tokenizer, train_tokenizer

SEEKSTACK = str(Path(sys.executable).parent / "seekstack")


@dataclass
class LevelRun:
    """One round at one concurrency level."""

    clients: int
    tokens: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0  # CPU seconds of the process that generated (the server, or this one for the engine alone)
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def cpu_ms_per_token(self) -> float:
        return self.cpu_s * 1000 / self.tokens


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stdlib_tokenizer(vocab_size: int, out_path: Path) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens trained on ~300 KB of the standard library's source."""
    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1])
        if size > 300_000:
            break
    return train_tokenizer(texts, vocab_size=vocab_size, out_path=out_path)


def make_model(directory: Path) -> Path:
    """The `tiny` preset with random weights, and a 1024-token BPE trained on ~300 KB of stdlib source."""
    tokenizer = stdlib_tokenizer(1024, directory / "tokenizer")
    torch.manual_seed(0)
    config = seekstack.preset("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=1024)
    model_dir = seekstack.save_pretrained(seekstack.Transformer(config), directory / "tiny")
    for path in (directory / "tokenizer").iterdir():
        (model_dir / path.name).write_bytes(path.read_bytes())
    return model_dir


def start_server(
    model_dir: Path, database: Path, port: int, max_batch_size: int, threads: int | None
) -> subprocess.Popen:
    """`seekstack serve` of `model_dir` on `port`, once its /health answers. A port something already listens on is
    refused first: that listener's /health answered while ours loaded, and the bench measured it instead."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: past a run's TIME_WAIT
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise SystemExit(f"--port {port}: {error.strerror} (another server?): give a free --port") from None
    command = [SEEKSTACK, "serve", "--model", str(model_dir), "--port", str(port), "--db", str(database)]
    command += ["--max-batch-size", str(max_batch_size)] + (["--threads", str(threads)] if threads else [])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start within 120 s")


async def stream_one(http: httpx.AsyncClient, url: str, body: dict, run: LevelRun) -> None:
    """One streamed completion; records its time to first token and the gaps between tokens."""
    sent = time.perf_counter()
    last = None
    async with http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            carried = sum(len((choice.get("logprobs") or {}).get("tokens", [])) for choice in chunk["choices"])
            if not carried:
                continue
            now = time.perf_counter()
            if last is None:
                run.ttft_s.append(now - sent)
            else:
                run.itl_s += [(now - last) / carried] * carried
            last = now
            run.tokens += carried


def request_body(model: str, client: int, request: int, tokens: int) -> dict:
    """Client `client`'s `request`-th completion: a prompt of its own, `tokens` tokens sampled at temperature 1."""
    return {
        "model": model, "prompt": f"# client {client}, request {request}\ndef ", "max_tokens": tokens,
        "stream": True, "ignore_eos": True, "logprobs": 0, "temperature": 1.0, "seed": client,
    }  # fmt: skip


def run_engine_alone(engine: Engine, requests: int, tokens: int) -> LevelRun:
    """The requests of one client, through `Engine.stream` in this process, timed as a client times them."""
    run = LevelRun(clients=0)
    started, cpu_started = time.perf_counter(), time.process_time()
    for request in range(requests):
        body = request_body("", 0, request, tokens)
        params = SamplingParams(max_new_tokens=tokens, temperature=1.0, seed=0, ignore_eos=True, logprobs=True)
        sent, last = time.perf_counter(), None
        for output in engine.stream(engine.tokenizer.encode(body["prompt"]), params):
            now = time.perf_counter()
            if last is None:
                run.ttft_s.append(now - sent)
            else:
                run.itl_s += [(now - last) / len(output.token_ids)] * len(output.token_ids)
            last = now
            run.tokens += len(output.token_ids)
    run.seconds, run.cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    return run


async def run_level(base_url: str, model: str, clients: int, requests: int, tokens: int, server_pid: int) -> LevelRun:
    run = LevelRun(clients)
    cpu_started = process_cpu_s(server_pid)
    url = f"{base_url}/v1/completions"

    async def client(index: int, http: httpx.AsyncClient) -> None:
        for request in range(requests):
            await stream_one(http, url, request_body(model, index, request, tokens), run)

    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(index, http) for index in range(clients)))
        run.seconds = time.perf_counter() - started
    run.cpu_s = process_cpu_s(server_pid) - cpu_started
    expected = clients * requests * tokens
    if run.tokens != expected:
        raise RuntimeError(f"{clients} clients received {run.tokens} tokens, expected {expected}")
    return run


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", type=checkpoint_folder, help="checkpoint folder with tokenizer.json; default: random tiny"
    )
    parser.add_argument("--clients", type=positive_int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--requests", type=positive_int, default=2, help="streamed completions per client, one after another"
    )
    parser.add_argument("--tokens", type=positive_int, default=64, help="tokens per completion")
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--port", type=int, default=8931)
    parser.add_argument("--threads", type=positive_int, help="torch threads of the server and of the engine alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model or make_model(Path(scratch))
        engine = Engine.from_pretrained(model_dir, max_batch_size=1)
        server = start_server(model_dir, Path(scratch) / "bench.db", args.port, max(args.clients), args.threads)
        base_url = f"http://127.0.0.1:{args.port}"
        try:
            model = httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
            asyncio.run(run_level(base_url, model, 2, 1, 8, server.pid))  # warm-up: first calls stay out of the figures
            run_engine_alone(engine, 1, 8)
            runs: dict[int, list[LevelRun]] = {0: [], **{n: [] for n in args.clients}}
            for _ in range(args.rounds):
                runs[0].append(run_engine_alone(engine, args.requests, args.tokens))
                for clients in args.clients:
                    level = run_level(base_url, model, clients, args.requests, args.tokens, server.pid)
                    runs[clients].append(asyncio.run(level))
        finally:
            server.kill()
            server.wait()

    print(
        f"model {model_dir.name}: {args.requests} x {args.tokens}-token streamed completions per client, "
        f"median of {args.rounds} interleaved rounds; server and clients on {os.cpu_count()} CPUs"
    )
    header = (
        f"{'clients':>7} {'tok/s':>9} {'ratio':>6} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>9} {'ITL p95':>9} "
        f"{'CPU/token':>9}"
    )
    print(header)
    base = statistics.median(r.tokens_per_s for r in runs[args.clients[0]])
    for clients, level in runs.items():
        throughput = statistics.median(r.tokens_per_s for r in level)
        ms = [statistics.median(percentile(getattr(r, k), q) for r in level) * 1000
              for k, q in (("ttft_s", 50), ("ttft_s", 95), ("itl_s", 50), ("itl_s", 95))]  # fmt: skip
        ms.append(statistics.median(r.cpu_ms_per_token for r in level))
        label = clients or "engine"
        print(f"{label:>7} {throughput:>9.1f} {throughput / base:>5.2f}x " + " ".join(f"{v:>7.2f}ms" for v in ms))
    if 1 in runs:
        shares = [api.tokens_per_s / alone.tokens_per_s for api, alone in zip(runs[1], runs[0], strict=True)]
        cpu = [alone.cpu_ms_per_token / api.cpu_ms_per_token for api, alone in zip(runs[1], runs[0], strict=True)]
        print(
            f"1 client / engine alone: {statistics.median(shares):.0%} of its tokens/s, "
            f"{statistics.median(cpu):.0%} of its tokens per CPU second (medians of the rounds' ratios)"
        )


if __name__ == "__main__":
    main()
