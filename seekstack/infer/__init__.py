"""Inference: paged latent cache, sampling, continuous batching engine, MTP speculative decoding."""

from seekstack.infer.engine import Completion, Engine, EngineStats, RequestOutput, TokenLogprob
from seekstack.infer.sampling import SamplingParams

__all__ = ["Completion", "Engine", "EngineStats", "RequestOutput", "SamplingParams", "TokenLogprob"]
