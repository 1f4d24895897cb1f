"""seekstack: the DeepSeek-V3 stack in plain PyTorch.

The pipeline, one package per stage: corpus (raw text -> clean corpus) -> tokenizer -> tokens (shards, mixture)
-> model -> train (+ parallel) -> infer -> serve, with eval looking at the results. Names below load on first
use, so the command line starts without importing torch."""

from __future__ import annotations

from seekstack.lazy import lazy_attributes

_EXPORTS = {
    "ModelConfig": "seekstack.config",
    "preset": "seekstack.config",
    "ModelOutput": "seekstack.model.transformer",
    "Transformer": "seekstack.model.transformer",
    "load_pretrained": "seekstack.checkpoint",
    "save_pretrained": "seekstack.checkpoint",
    "Tokenizer": "seekstack.tokenizer",
    "__version__": "seekstack.version",
}
__all__ = sorted(name for name in _EXPORTS if not name.startswith("_"))
__getattr__ = lazy_attributes(__name__, _EXPORTS)
