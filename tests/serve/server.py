"""Helpers for the server tests: a tiny random-weight checkpoint with a trained tokenizer, a live server, and an app
served in process."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from seekstack.checkpoint import save_pretrained
from seekstack.model.transformer import Transformer
from seekstack.tokenizer import train_tokenizer
from tests.conftest import micro_config
from tests.support import free_port

SEEKSTACK = str(Path(sys.executable).parent / "seekstack")
INSTALL_SCRIPT = Path(__file__).parents[2] / "scripts" / "install_test_deps.sh"
TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Hello, world! How are you today? I am fine, thank you. " * 4,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 4,
]


def make_model_dir(directory: Path, max_position_embeddings: int = 256) -> Path:
    """A DeepSeek-V3-shaped checkpoint with random weights and a byte-level BPE tokenizer trained on a few lines."""
    tokenizer = train_tokenizer(TEXTS, vocab_size=320, out_path=directory / "tokenizer")
    torch.manual_seed(0)
    config = micro_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=max_position_embeddings)
    save_pretrained(Transformer(config), directory / "model")  # replaces the folder: the tokenizer comes after
    for path in (directory / "tokenizer").iterdir():
        shutil.copy(path, directory / "model" / path.name)
    return directory / "model"


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log_path: Path


@contextmanager
def running_server(model_dir: Path, database: Path | str, *extra: str, timeout_s: float = 300) -> Iterator[LiveServer]:
    """`seekstack serve` in a subprocess on a free port, ready for requests; killed at the end. `timeout_s` bounds
    only a server that never answers: on a busy 2-core machine (load ~20) a healthy one took 105-108 s to start."""
    port = free_port()
    log_path = model_dir.parent / f"server-{port}.log"
    command = [SEEKSTACK, "serve", "--model", str(model_dir), "--port", str(port), "--db", str(database), *extra]
    with open(log_path, "w") as log:
        server = LiveServer(f"http://127.0.0.1:{port}", subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT),
                            log_path)  # fmt: skip
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if server.process.poll() is not None:
                    raise RuntimeError(f"server exited with {server.process.returncode}: {log_path.read_text()}")
                try:
                    if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start in {timeout_s} s: {log_path.read_text()}")
                time.sleep(0.1)
            yield server
        finally:
            server.process.kill()
            server.process.wait()


@asynccontextmanager
async def serving(app) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `app` addressed to localhost, with the app's engine thread running."""
    app.state.server.bridge.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost:8000", timeout=60) as client:
            yield client
    finally:
        app.state.server.bridge.stop()


def run(app, scenario) -> object:
    """`scenario(client)` against `app` (in process, `serving`), to its end."""

    async def main():
        async with serving(app) as client:
            return await scenario(client)

    return asyncio.run(main())


def with_openai(engine, tmp_path: Path, scenario, **app_options) -> object:
    """`scenario(api)` with an `openai.AsyncOpenAI` client of a fresh app on `engine` (`create_app`'s options)."""
    import openai

    from seekstack.serve.app import create_app
    from seekstack.serve.database import open_database

    app = create_app(engine, open_database(tmp_path / "db"), **app_options)

    async def main():
        async with serving(app):  # the engine thread runs
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost:8000")
            api = openai.AsyncOpenAI(base_url="http://localhost:8000/v1", api_key="open", http_client=http,
                                     max_retries=0, timeout=60)  # fmt: skip
            return await scenario(api)

    return asyncio.run(main())


def error_of(response: httpx.Response, status: int) -> dict:
    """The OpenAI-shaped error of a response that has `status`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def postgres_bin_dir() -> Path | None:
    """Where Debian's `postgresql` package put initdb and pg_ctl, if it is installed."""
    initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return initdb[-1].parent if initdb and shutil.which("runuser") else None


@contextmanager
def postgres_cluster(bin_dir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL server on a Unix socket, run as user postgres when we are root; yields its URL."""
    directory = Path(tempfile.mkdtemp(prefix="seekstack-pg-"))  # not under pytest's 0700 root-only folders
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(directory, "postgres")
    data, port = directory / "data", free_port()
    subprocess.run([*as_postgres, bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "seekstack", "--no-sync"],
                   check=True, capture_output=True)  # fmt: skip
    settings = f"-p {port} -k {directory} -c listen_addresses='' -c fsync=off"
    pg_ctl = [*as_postgres, bin_dir / "pg_ctl", "-D", data, "-w", "-l", directory / "server.log"]
    subprocess.run([*pg_ctl, "-o", settings, "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://seekstack@/postgres?host={directory}&port={port}"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def postgres_or_skip() -> Iterator[str]:
    """A PostgreSQL server's URL; scripts/install_test_deps.sh installs PostgreSQL if missing, else the test skips."""
    if postgres_bin_dir() is None:
        install_test_packages()
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed and could not be installed")
    with postgres_cluster(bin_dir) as url:
        yield url


def new_postgres_database(server_url: str) -> str:
    """A URL to a new, empty database on the server at `server_url`."""
    import psycopg

    name = f"seekstack_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return server_url.replace("/postgres?", f"/{name}?")


def install_test_packages() -> None:
    """Run scripts/install_test_deps.sh (chromium, chromium-driver, postgresql); it says why when it cannot."""
    subprocess.run([str(INSTALL_SCRIPT)], check=False, timeout=900)
