"""Inference: paged latent cache, sampling, continuous batching engine, MTP speculative decoding.

Names load on first use, so `from seekstack.infer.params import SamplingParams` costs no torch import."""

from __future__ import annotations

from seekstack.lazy import lazy_attributes

_EXPORTS = {
    "Completion": "seekstack.infer.outputs",
    "CompletionOutput": "seekstack.infer.outputs",
    "Engine": "seekstack.infer.engine",
    "EngineStats": "seekstack.infer.outputs",
    "Logprob": "seekstack.infer.outputs",
    "RequestOutput": "seekstack.infer.outputs",
    "TokenLogprob": "seekstack.infer.outputs",
    "EngineOptions": "seekstack.infer.params",
    "LoRARequest": "seekstack.infer.params",
    "SamplingParams": "seekstack.infer.params",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_attributes(__name__, _EXPORTS)
