"""Inference: paged latent cache, sampling, continuous batching engine, MTP speculative decoding.

Names load on first use, so `from seekstack.infer.params import SamplingParams` costs no torch import."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Completion": "seekstack.infer.outputs",
    "Engine": "seekstack.infer.engine",
    "EngineStats": "seekstack.infer.outputs",
    "RequestOutput": "seekstack.infer.outputs",
    "TokenLogprob": "seekstack.infer.outputs",
    "EngineOptions": "seekstack.infer.params",
    "SamplingParams": "seekstack.infer.params",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'seekstack.infer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
