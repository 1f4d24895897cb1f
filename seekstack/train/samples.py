"""Continuations of prompts from a freshly trained model, greedy or sampled: what `make demo` prints.

A plain loop over one sequence with a dense latent cache; the inference engine (`seekstack/infer/`) is the
fast, batched way to generate.
"""

from __future__ import annotations

from pathlib import Path

import torch

from seekstack.checkpoint import load_pretrained
from seekstack.model.attention import ContiguousLatentCache
from seekstack.model.transformer import Transformer
from seekstack.tokenizer import Tokenizer
from seekstack.train.state import latest_checkpoint

# Prompts end where a token ends: byte-level BPE glues spaces and newlines to the next word or indentation.
DEMO_PROMPTS = ("def fibonacci(n):", "import os\nimport sys\n\n\nclass", "    for line in lines:")


def checkpoint_or_latest(path: str | Path) -> Path:
    """`path` itself if it is a model directory (has config.json), else the newest checkpoint of run `path`."""
    path = Path(path)
    return path if (path / "config.json").is_file() else latest_checkpoint(path)


@torch.inference_mode()
def continue_text(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> str:
    """The text the model writes after `prompt`: argmax when temperature is 0, else sampled from the top_k
    (0 = all) logits / temperature; stops at EOS."""
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    device = next(model.parameters()).device
    cache = ContiguousLatentCache(model.config, 1, len(prompt_ids) + max_new_tokens, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    inputs = torch.tensor([prompt_ids], device=device)
    written: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(inputs, cache=cache).logits[0, -1].float()  # (V,)
        if temperature == 0:
            token = int(logits.argmax())
        else:
            if top_k > 0:
                threshold = logits.topk(min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < threshold, float("-inf"))
            probs = (logits / temperature).softmax(dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        if token == tokenizer.eos_id:
            break
        written.append(token)
        inputs = torch.tensor([[token]], device=device)
    return tokenizer.decode(written)


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
    model = load_pretrained(path).eval()
    tokenizer = Tokenizer.from_file(path)
    return [
        (
            prompt,
            continue_text(model, tokenizer, prompt, max_new_tokens),
            continue_text(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed),
        )
        for prompt in prompts
    ]
