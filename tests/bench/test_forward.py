"""bench/forward.py's parity column: ours against transformers in ours' own dtype."""

import sys

import torch
from torch import nn

import seekstack
from tests.bench.support import BENCH

sys.path.insert(0, str(BENCH))  # its siblings (machine.py), as when run
from bench.forward import Contender, Setting, benchmark  # noqa: E402


def constant_logits(name: str, offset: float, dtype: torch.dtype, vocab: int) -> Contender:
    """A stand-in model whose logits are `offset` everywhere, in `dtype`."""
    return Contender(name, nn.Identity(), lambda ids: torch.full((*ids.shape, vocab), offset, dtype=dtype), dtype)


def test_parity_column_compares_ours_with_transformers_in_ours_dtype_only():
    config = seekstack.preset("tiny")
    vocab = config.vocab_size
    theirs = {
        "eager+sdpa": constant_logits("eager+sdpa", 1e-5, torch.float32, vocab),
        "eager+sdpa bf16": constant_logits("eager+sdpa bf16", 0.099, torch.bfloat16, vocab),
    }
    ours = constant_logits("ours", 0.0, torch.float32, vocab)
    setting = Setting("tiny", config, ours, theirs, default="eager+sdpa")
    row = benchmark(setting, seq_len=4, batch=1, reps=1, warmup=1, clock="wall")
    assert row["max_difference"] == torch.tensor(1e-5).item()
