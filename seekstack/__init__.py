"""seekstack: the DeepSeek-V3 stack in plain PyTorch.

The pipeline, one package per stage: corpus (raw text -> clean corpus) -> tokenizer -> tokens (shards, mixture)
-> model -> train (+ parallel) -> infer -> serve, with eval looking at the results. Names below load on first
use, so the command line starts without importing torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "seekstack.config",
    "preset": "seekstack.config",
    "ModelOutput": "seekstack.model.transformer",
    "Transformer": "seekstack.model.transformer",
    "load_pretrained": "seekstack.checkpoint",
    "save_pretrained": "seekstack.checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'seekstack' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
