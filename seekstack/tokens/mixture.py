"""A mixture of token splits with scheduled weights: several sources, and the easy-to-hard curriculum.

A schedule gives each source (a split of the data directory: `train`, `train_easy`, a second corpus...) one
weight per phase; phases cut training into equal parts, so {easy: [.7, .2, .1], medium: [.2, .5, .3],
hard: [.1, .3, .6]} is 70/20/10 in the first third, 20/50/30 in the second, 10/30/60 in the last.
Training row n picks its source with a uniform number drawn from a generator seeded by (seed, n), so the
choice depends neither on the batch size nor on what came before: the mixture's state is the number of rows
served plus each source's own window position, and resuming from it continues exactly.
With an `Exp3Mixture` (tokens/bandit.py) in place of the schedule, micro-batch m comes whole from one source drawn
from (seed, m) with the bandit's weights, and `observe` hands each micro-batch's loss back to the bandit; the state
then also holds the micro-batches served and the bandit's.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
from typing import Any

import numpy as np
import torch

from seekstack.tokens.bandit import Exp3Mixture
from seekstack.tokens.shards import TokenWindows

SOURCE_STREAM = 0x5EEC  # keeps the source draws apart from other uses of (seed, n) generators
ARM_STREAM = 0xA4E  # the bandit's per-micro-batch draws


class MixtureSchedule:
    """Per-source weights for each phase of training; a single number is the same weight in every phase."""

    def __init__(self, weights: dict[str, Any]):
        if not weights:
            raise ValueError("a mixture needs at least one source")
        per_phase = {  # a numpy number (a weight computed with numpy) as the Python number it holds
            name: [v.item() if isinstance(v, np.generic) else v for v in (w if isinstance(w, (list, tuple)) else [w])]
            for name, w in weights.items()
        }
        phases = max(len(ws) for ws in per_phase.values())
        for name, ws in per_phase.items():
            if not ws:
                raise ValueError(f"mixture source {name!r} has no weights; give a number, or one per phase")
            if len(ws) not in (1, phases):
                raise ValueError(f"mixture source {name!r} has {len(ws)} weights; give 1 or {phases} (one per phase)")
            if not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in ws
            ):
                raise ValueError(f"mixture source {name!r} has weights {ws}; they must be finite numbers >= 0")
        self.phases = phases
        self.weights = {name: ws * phases if len(ws) == 1 else ws for name, ws in per_phase.items()}
        for phase in range(phases):
            if sum(ws[phase] for ws in self.weights.values()) <= 0:
                raise ValueError(f"mixture phase {phase + 1} of {phases} has no source with a positive weight")

    @property
    def sources(self) -> list[str]:
        return list(self.weights)

    def phase_at(self, progress: float) -> int:
        """The phase in effect at `progress` (fraction of training done, 0 <= progress <= 1)."""
        return min(int(progress * self.phases), self.phases - 1)

    def weights_at(self, progress: float) -> dict[str, float]:
        """Each source's probability at `progress`, summing to 1 (the weights scaled by the largest first, so that
        weights near float's limit, whose sum overflows to inf, keep their ratios)."""
        phase = self.phase_at(progress)
        largest = max(ws[phase] for ws in self.weights.values())
        scaled = {name: ws[phase] / largest for name, ws in self.weights.items()}
        total = sum(scaled.values())
        return {name: weight / total for name, weight in scaled.items()}


def pick(weights: dict[str, float], uniform: float) -> str:
    """The source whose share of [0, 1), cut in the order of `weights`, holds `uniform`."""
    bounds = list(itertools.accumulate(weights.values()))[:-1]
    return list(weights)[bisect.bisect_right(bounds, uniform)]


class MixtureWindows:
    """Training windows drawn from several splits by a `MixtureSchedule` or an `Exp3Mixture`; deterministic from
    the seed, resumable."""

    def __init__(
        self, data_dir: str | os.PathLike, schedule: MixtureSchedule | Exp3Mixture, seq_len: int, seed: int = 0
    ):
        self.schedule, self.seed, self.rows, self.batches = schedule, seed, 0, 0
        self.adaptive = isinstance(schedule, Exp3Mixture)  # learns its weights: wants each micro-batch's loss
        self.step_arms: list[str] = []  # bandit: the source of each micro-batch since the last `observe`
        self.sources = {name: TokenWindows(data_dir, name, seq_len, seed=seed) for name in schedule.sources}
        self.resting: dict[str, dict] = {}  # the saved places of sources this mixture leaves out, for a later one
        first, *others = self.sources.values()
        for other in others:
            if other.index["tokenizer"]["sha256"] != first.index["tokenizer"]["sha256"]:
                raise ValueError(f"{other.index_file} and {first.index_file} were tokenized with different tokenizers")
        self.tokenizer_info: dict = first.index["tokenizer"]

    def batch(self, batch_size: int, progress: float) -> torch.Tensor:
        """The next `batch_size` windows (batch_size, seq_len + 1), sources drawn with the weights at `progress`."""
        weights = self.schedule.weights_at(progress)
        names = list(weights)
        if self.adaptive:  # one source per micro-batch, so that its loss is that source's reward
            arm = pick(weights, np.random.default_rng([self.seed, ARM_STREAM, self.batches]).random())
            self.step_arms.append(arm)
            chosen = [arm] * batch_size
        elif len(names) == 1:
            chosen = names * batch_size
        else:
            rows = range(self.rows, self.rows + batch_size)
            chosen = [pick(weights, np.random.default_rng([self.seed, SOURCE_STREAM, row]).random()) for row in rows]
        self.rows += batch_size
        self.batches += 1
        return torch.cat([self.sources[name].batch(1) for name in chosen])

    def observe(self, losses: list[float]) -> None:
        """Bandit: the training loss of each micro-batch served since the last call, in order (one step's)."""
        if not isinstance(self.schedule, Exp3Mixture):
            raise TypeError("observe() is for a bandit mixture; a fixed schedule learns nothing from the loss")
        self.schedule.update(self.step_arms, losses)
        self.step_arms = []

    def state_dict(self) -> dict:
        """Rows and micro-batches served, each source's position (and those of sources an earlier mixture drew from)
        and the bandit's state: what `batch` continues from."""
        state = {"seed": self.seed, "rows": self.rows, "batches": self.batches, "step_arms": list(self.step_arms)}
        state["sources"] = {**self.resting, **{name: source.state_dict() for name, source in self.sources.items()}}
        if isinstance(self.schedule, Exp3Mixture):
            state["bandit"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`; a source it has no position for (one a resumed run's `mixture` adds, for a
        new phase of training) starts at its first window, as a source that has served no row would. The positions of
        sources it leaves out are kept in its own state, so that a later mixture that draws from them again goes on
        where they were instead of serving their first windows again."""
        if self.adaptive and "bandit" not in state:
            raise ValueError("the saved data state has no bandit state: it was saved by a run with a fixed schedule")
        self.seed, self.rows, self.batches = int(state["seed"]), int(state["rows"]), int(state.get("batches", 0))
        self.step_arms = list(state.get("step_arms", []))
        for name, source in self.sources.items():
            if name in state["sources"]:
                source.load_state_dict(state["sources"][name])
        self.resting = {name: place for name, place in state["sources"].items() if name not in self.sources}
        if isinstance(self.schedule, Exp3Mixture):
            self.schedule.load_state_dict(state["bandit"])
