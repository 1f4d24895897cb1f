"""The schedules of training as pure functions of the optimizer step: the learning rate, and the progress that the
mixture's phases and the MTP loss weight follow. Resuming needs only the step number (and, when a resumed run was
given another `max_steps`, the anchors its schedules continue from)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from seekstack.schema import check
from seekstack.train.config import TrainConfig


@dataclass(frozen=True)
class LrAnchor:
    """A resumed run was given more steps at `step`, where the rate was `lr`: from there the decay runs from
    `lr` to min_lr over the steps left, instead of restarting higher up the longer schedule."""

    step: int
    lr: float


def learning_rate(step: int, config: TrainConfig, anchor: LrAnchor | None = None) -> float:
    """The rate for optimizer step `step` (0-based): linear warmup, then cosine or warmup-stable-decay to min_lr at the
    last step (max_steps - 1; wsd_decay_fraction=0: no decay)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if anchor is not None and step >= anchor.step:
        return _decay_from(anchor, step, config)
    if config.schedule == "cosine":
        progress = _decay_progress(step, config.warmup_steps, config)
        return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))
    # WSD (MiniCPM, Hu et al. 2024): hold the peak, then decay linearly over the last wsd_decay_fraction of steps,
    # those after the warmup at most (as torchtitan shortens it), so the rate never drops from the peak in one step,
    # and after the first step without warmup, so some step trains at the peak (a 1-step run: lr, as nanoGPT's);
    # none for a fraction of 0: a stable phase to extend (--resume with more steps) or decay from later.
    after_peak = config.max_steps - max(config.warmup_steps, 1)
    decay_steps = min(round(config.max_steps * config.wsd_decay_fraction), after_peak)
    decay_start = config.max_steps - decay_steps
    if step < decay_start or decay_steps <= 0:
        return config.lr
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return config.lr + (config.min_lr - config.lr) * progress


@dataclass(frozen=True)
class ProgressAnchor:
    """A resumed run was given another `max_steps` at `step`, when `progress` of training was done: from there
    progress runs on to 1 over the steps left, so the mixture's phases and the MTP weight never go back."""

    step: int
    progress: float


def training_progress(step: int, config: TrainConfig, anchor: ProgressAnchor | None = None) -> float:
    """The fraction of training done before optimizer step `step` (0-based), which the mixture's phases and the MTP
    loss weight follow: step / max_steps, or from an anchor, its progress stretched over the steps left."""
    if anchor is None:
        return step / config.max_steps
    span = max(config.max_steps - anchor.step, 1)
    return anchor.progress + (1 - anchor.progress) * min((step - anchor.step) / span, 1.0)


def mtp_weight_at(progress: float, config: TrainConfig) -> float:
    """lambda = `mtp_loss_weight` for the first `mtp_switch_fraction` of training, then `mtp_loss_weight_late`
    (0.3, then 0.1 in DeepSeek-V3 §4.2)."""
    early = progress < config.mtp_switch_fraction
    return config.mtp_loss_weight if early else config.mtp_loss_weight_late


def _decay_from(anchor: LrAnchor, step: int, config: TrainConfig) -> float:
    """The schedule's decay shape, started at the anchor's rate and stretched over the steps left."""
    progress = _decay_progress(step, anchor.step, config)
    if config.schedule == "cosine":
        return config.min_lr + 0.5 * (anchor.lr - config.min_lr) * (1 + math.cos(math.pi * progress))
    return anchor.lr + (config.min_lr - anchor.lr) * progress


def _decay_progress(step: int, start: int, config: TrainConfig) -> float:
    """How far `step` is along a decay from step `start` (0: its peak rate) to the last step, max_steps - 1 (1:
    min_lr); 1 from the last step on, but for a 1-step run's step 0: it trains at the peak (as nanoGPT's get_lr
    gives step 0), not at min_lr."""
    span = config.max_steps - 1 - start
    if span <= 0:
        return 0.0 if step == 0 else 1.0
    return min((step - start) / span, 1.0)


def resumed_lr_anchor(train_state: dict[str, Any], config: TrainConfig) -> LrAnchor | None:
    """The anchor a resumed run continues from: the saved one, or a new one at the resume step when `max_steps`
    grew past a point where the old schedule had already begun to decay (so the rate does not jump up)."""
    saved = train_state.get("lr_anchor")
    anchor = LrAnchor(**saved) if saved else None
    old = check(TrainConfig, train_state["config"])
    step = int(train_state["step"])
    if old.max_steps == config.max_steps or step < config.warmup_steps:
        return anchor if anchor is None else LrAnchor(anchor.step, _rate_at_new_peak(anchor.lr, old, config))
    # the rate of the next step; a run that had finished goes on from the rate of its last step (min_lr, or a rate
    # short of lr where its warmup_steps was not below max_steps: its schedule has no rate past the end)
    rate = learning_rate(min(step, old.max_steps - 1), old, anchor)
    if config.schedule == "wsd" and rate == old.lr and anchor is None:
        return None  # still on the plateau: the longer schedule simply holds it longer
    return LrAnchor(step, _rate_at_new_peak(rate, old, config))


def _rate_at_new_peak(rate: float, old: TrainConfig, config: TrainConfig) -> float:
    """`rate`, reached between `old`'s min_lr and lr, at the same place between min_lr and a resumed run's new `lr`
    (as the schedule without an anchor gives it); the same rate when lr is unchanged."""
    if config.lr == old.lr:
        return rate
    share = (rate - old.min_lr) / (old.lr - old.min_lr) if old.lr > old.min_lr else 1.0
    return config.min_lr + share * (config.lr - config.min_lr)


def resumed_progress_anchor(train_state: dict[str, Any], config: TrainConfig) -> ProgressAnchor | None:
    """The progress anchor a resumed run continues from: the saved one, or a new one at the resume step, holding the
    progress the run had reached, when `max_steps` changed."""
    saved = train_state.get("progress_anchor")
    anchor = ProgressAnchor(**saved) if saved else None
    old = check(TrainConfig, train_state["config"])
    if old.max_steps == config.max_steps:
        return anchor
    step = int(train_state["step"])
    return ProgressAnchor(step, training_progress(step, old, anchor))
