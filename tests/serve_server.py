"""Helpers for the server tests: a tiny random-weight checkpoint with a trained tokenizer, and a live server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from seekstack.checkpoint import save_pretrained
from seekstack.model.transformer import Transformer
from seekstack.tokenizer import train_tokenizer
from tests.conftest import micro_config

SEEKSTACK = str(Path(sys.executable).parent / "seekstack")
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log_path: Path


@contextmanager
def running_server(model_dir: Path, database: Path, *extra: str, timeout_s: float = 60) -> Iterator[LiveServer]:
    """`seekstack serve` in a subprocess on a free port, ready for requests; killed at the end."""
    port = free_port()
    log_path = database.with_suffix(".log")
    log = open(log_path, "w")
    command = [SEEKSTACK, "serve", "--model", str(model_dir), "--port", str(port), "--db", str(database), *extra]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}: {log_path.read_text()}")
            try:
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start in {timeout_s} s: {log_path.read_text()}")
            time.sleep(0.1)
        yield LiveServer(base_url, process, log_path)
    finally:
        process.kill()
        process.wait()
        log.close()
