"""Continuations of prompts from a freshly trained model, greedy and sampled: what `make demo` prints.

Generation runs on the inference engine (`seekstack/infer/`), all prompts in one batch.
"""

from __future__ import annotations

from pathlib import Path

from seekstack.checkpoint import load_pretrained
from seekstack.infer.engine import Engine
from seekstack.infer.params import SamplingParams
from seekstack.tokenizer import Tokenizer
from seekstack.train.state import latest_checkpoint

# Prompts end where a token ends: byte-level BPE glues spaces and newlines to the next word or indentation.
DEMO_PROMPTS = ("def fibonacci(n):", "import os\nimport sys\n\n\nclass", "    for line in lines:")


def checkpoint_or_latest(path: str | Path) -> Path:
    """`path` itself if it is a model directory (has config.json), else the newest checkpoint of run `path`."""
    path = Path(path)
    return path if (path / "config.json").is_file() else latest_checkpoint(path)


def demo_samples(
    model_path: str | Path,
    prompts: tuple[str, ...] = DEMO_PROMPTS,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> list[tuple[str, str, str]]:
    """(prompt, greedy continuation, sampled continuation) for each prompt, from a checkpoint or run directory
    holding the tokenizer."""
    path = checkpoint_or_latest(model_path)
    engine = Engine(load_pretrained(path), Tokenizer.from_file(path), max_batch_size=2 * len(prompts))
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    completions = engine.generate([*prompts, *prompts], [greedy] * len(prompts) + [sampled] * len(prompts))
    texts = [completion.text for completion in completions]
    return list(zip(prompts, texts[: len(prompts)], texts[len(prompts) :], strict=True))
