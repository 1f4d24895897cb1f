"""Learning rate as a pure function of the optimizer step, so resuming needs only the step number."""

from __future__ import annotations

import math

from seekstack.train.config import TrainConfig


def learning_rate(step: int, config: TrainConfig) -> float:
    """The rate for optimizer step `step` (0-based): linear warmup, then cosine or warmup-stable-decay to min_lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "cosine":
        span = max(config.max_steps - config.warmup_steps, 1)
        progress = min((step - config.warmup_steps) / span, 1.0)
        return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))
    # WSD (MiniCPM, Hu et al. 2024): hold the peak, then decay linearly over the last wsd_decay_fraction of steps.
    decay_steps = max(round(config.max_steps * config.wsd_decay_fraction), 1)
    decay_start = config.max_steps - decay_steps
    if step < decay_start:
        return config.lr
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return config.lr + (config.min_lr - config.lr) * progress
