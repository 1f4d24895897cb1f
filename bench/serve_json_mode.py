"""JSON mode's cost: the per-step token mask (llguidance, `seekstack.infer.json_mode`) beside the decode step it
constrains.

1. The mask by vocabulary size: a byte-level BPE trained on ~300 KB of stdlib source (`--small-vocab` tokens, the
   tiny preset's kind), and a synthetic one of `--large-vocab` tokens (DeepSeek-V3's 129,280 by default: the 256
   byte symbols and seeded random merges of existing tokens, up to 16 bytes each, the five special tokens). A JSON
   document (keys, strings, numbers, nesting, unicode) is walked token by token under json_object: per step
   `allowed` (the mask, unpacked to a (V,) bool) and `accept`; median, p95 and slowest microseconds per step, and
   the one-off cost of the token trie (once per tokenizer).
2. The engine: the tiny preset with random weights, `--batch` requests decoding `--tokens` tokens together, free
   text against JSON (a schema of an array of at least `--tokens` strings, so that no reply can finish early and
   both runs decode full batches), seconds per generated token. Ratio = JSON / free: what JSON mode costs a
   decode step at this size.

    python bench/serve_json_mode.py
    python bench/serve_json_mode.py --large-vocab 32000 --tokens 64    # quicker
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from options import positive_int, whole_number
from serve_load import stdlib_tokenizer
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

import seekstack
from seekstack.infer import Engine, SamplingParams
from seekstack.infer.json_mode import JsonFormat
from seekstack.tokenizer import SMALLEST_VOCAB, SPECIAL_TOKENS, Tokenizer

DOCUMENT = {
    "name": "Ada Lovelace", "born": 1815, "ratio": -0.125e3, "languages": ["English", "Français", "日本語"],
    "notes": "Wrote the first published algorithm; \"poetical science\".\nSecond line\ttabbed.",
    "address": {"city": "London", "zip": None, "active": True, "tags": [{"k": "a", "v": 1}, {"k": "b", "v": 2}]},
}  # fmt: skip


def synthetic_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens: the byte symbols, then random merges of existing tokens."""
    rng = random.Random(seed)
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    tokens, merges = list(symbols), []
    while len(vocab) < vocab_size - len(SPECIAL_TOKENS):
        left, right = rng.choice(tokens), rng.choice(tokens[: len(tokens) // 4 + 256])  # short right halves
        if left + right not in vocab and len(left + right) <= 16:
            vocab[left + right] = len(vocab)
            tokens.append(left + right)
            merges.append((left, right))
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(backend, source=f"synthetic {vocab_size}")


def mask_costs(tokenizer: Tokenizer) -> dict[str, float]:
    """Trie build seconds; median, p95 and slowest microseconds of one step (mask, advance) over DOCUMENT's tokens."""
    started = time.perf_counter()
    json_format = JsonFormat(tokenizer)
    build_s = time.perf_counter() - started
    text = json.dumps(DOCUMENT, ensure_ascii=False)  # the one layout JSON mode writes (json_mode.LAYOUT)
    ids, steps = tokenizer.encode(text), []
    constraint = json_format.constraint()
    for token in ids:
        started = time.perf_counter()
        allowed = constraint.allowed(tokenizer.vocab_size)
        constraint.accept(token)
        steps.append(time.perf_counter() - started)
        if not allowed[token]:
            raise SystemExit(f"the mask refused token {token} ({tokenizer.decode([token])!r}) of a valid document")
    if not constraint.complete:
        raise SystemExit("the document was not complete JSON after its last token")
    steps_us = sorted(step * 1e6 for step in steps)
    return {"tokens": len(ids), "build_s": build_s, "p50_us": statistics.median(steps_us),
            "p95_us": steps_us[int(0.95 * (len(steps_us) - 1))], "max_us": steps_us[-1]}  # fmt: skip


def decode_seconds_per_token(engine: Engine, json_format: JsonFormat | None, batch: int, tokens: int) -> float:
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Reply in JSON."}])
    for seed in range(batch):
        constraint = json_format.constraint() if json_format else None
        engine.add_request(prompt, SamplingParams(max_new_tokens=tokens, seed=seed, ignore_eos=True),
                           constraint=constraint)  # fmt: skip
    generated, started = 0, time.perf_counter()
    while engine.has_unfinished():
        generated += sum(len(output.token_ids) for output in engine.step())
    return (time.perf_counter() - started) / generated


def vocabulary_size(text: str) -> int:
    """An argparse type for a tokenizer's size: at least seekstack's smallest, the 256 bytes and the special tokens."""
    return whole_number(text, least=SMALLEST_VOCAB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-vocab", type=vocabulary_size, default=4096)
    parser.add_argument("--large-vocab", type=vocabulary_size, default=129_280)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--tokens", type=positive_int, default=128)
    parser.add_argument("--reps", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    small = stdlib_tokenizer(args.small_vocab, Path(tempfile.mkdtemp()))
    print("JSON mask per step (json_object: mask, unpack to (V,) bool, advance), by vocabulary:")
    for tokenizer in (small, synthetic_tokenizer(args.large_vocab)):
        cost = mask_costs(tokenizer)
        steps = f"p50 {cost['p50_us']:6.1f} us, p95 {cost['p95_us']:6.1f} us, max {cost['max_us']:7.1f} us"
        print(f"  {tokenizer.vocab_size:>7} tokens: {steps} over {cost['tokens']} steps; "
              f"trie built in {cost['build_s']:.2f} s")  # fmt: skip

    torch.manual_seed(0)
    model = seekstack.Transformer(seekstack.preset("tiny", vocab_size=small.vocab_size)).eval()
    engine = Engine(model, small, max_batch_size=args.batch)
    json_format = JsonFormat(small, {"type": "array", "items": {"type": "string"}, "minItems": args.tokens})
    decode_seconds_per_token(engine, None, args.batch, 8)  # warm-up
    free, constrained = [], []
    for _ in range(args.reps):  # alternated, so that load from other processes falls on both
        free.append(decode_seconds_per_token(engine, None, args.batch, args.tokens))
        constrained.append(decode_seconds_per_token(engine, json_format, args.batch, args.tokens))
    free_s, json_s = statistics.median(free), statistics.median(constrained)
    print(f"engine, tiny preset, {args.batch} requests x {args.tokens} tokens, {args.reps} reps, medians: free "
          f"{free_s * 1e3:.3f} ms/token, JSON {json_s * 1e3:.3f} ms/token, ratio {json_s / free_s:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
