"""A mixture of token splits with scheduled weights: several sources, and the easy-to-hard curriculum.

A schedule gives each source (a split of the data directory: `train`, `train_easy`, a second corpus...) one
weight per phase; phases cut training into equal parts, so {easy: [.7, .2, .1], medium: [.2, .5, .3],
hard: [.1, .3, .6]} is 70/20/10 in the first third, 20/50/30 in the second, 10/30/60 in the last.
Training row n picks its source with a uniform number drawn from a generator seeded by (seed, n), so the
choice depends neither on the batch size nor on what came before: the mixture's state is the number of rows
served plus each source's own window position, and resuming from it continues exactly.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
from typing import Any

import numpy as np
import torch

from seekstack.tokens.shards import TokenWindows

SOURCE_STREAM = 0x5EEC  # keeps the source draws apart from other uses of (seed, n) generators


class MixtureSchedule:
    """Per-source weights for each phase of training; a single number is the same weight in every phase."""

    def __init__(self, weights: dict[str, Any]):
        if not weights:
            raise ValueError("a mixture needs at least one source")
        per_phase = {name: [w] if isinstance(w, (int, float)) else list(w) for name, w in weights.items()}
        phases = max(len(ws) for ws in per_phase.values())
        for name, ws in per_phase.items():
            if len(ws) not in (1, phases):
                raise ValueError(f"mixture source {name!r} has {len(ws)} weights; give 1 or {phases} (one per phase)")
            if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in ws):
                raise ValueError(f"mixture source {name!r} has weights {ws}; they must be numbers >= 0")
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
        """Each source's probability at `progress`, summing to 1."""
        phase = self.phase_at(progress)
        total = sum(ws[phase] for ws in self.weights.values())
        return {name: ws[phase] / total for name, ws in self.weights.items()}


class MixtureWindows:
    """Training windows drawn from several splits by a `MixtureSchedule`; deterministic from the seed, resumable."""

    def __init__(self, data_dir: str | os.PathLike, schedule: MixtureSchedule, seq_len: int, seed: int = 0):
        self.schedule, self.seed, self.rows = schedule, seed, 0
        self.sources = {name: TokenWindows(data_dir, name, seq_len, seed=seed) for name in schedule.sources}
        first, *others = self.sources.values()
        for other in others:
            if other.index["tokenizer"]["sha256"] != first.index["tokenizer"]["sha256"]:
                raise ValueError(f"{other.index_file} and {first.index_file} were tokenized with different tokenizers")
        self.tokenizer_info: dict = first.index["tokenizer"]
        self.last_batch_rows = dict.fromkeys(self.sources, 0)  # rows each source gave to the last batch

    def batch(self, batch_size: int, progress: float) -> torch.Tensor:
        """The next `batch_size` windows (batch_size, seq_len + 1), sources drawn with the weights at `progress`."""
        weights = self.schedule.weights_at(progress)
        names = list(weights)
        if len(names) == 1:
            chosen = names * batch_size
        else:
            bounds = list(itertools.accumulate(weights.values()))[:-1]
            rows = range(self.rows, self.rows + batch_size)
            draws = [np.random.default_rng([self.seed, SOURCE_STREAM, row]).random() for row in rows]
            chosen = [names[bisect.bisect_right(bounds, u)] for u in draws]
        self.rows += batch_size
        self.last_batch_rows = {name: chosen.count(name) for name in names}
        return torch.cat([self.sources[name].batch(1) for name in chosen])

    def state_dict(self) -> dict:
        """Rows served and each source's position: what `batch` continues from."""
        return {"seed": self.seed, "rows": self.rows, "sources": {n: s.state_dict() for n, s in self.sources.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()` of a mixture over the same sources."""
        missing = set(self.sources) - set(state["sources"])
        if missing:
            raise ValueError(f"the saved data state has no position for mixture sources {sorted(missing)}")
        self.seed, self.rows = int(state["seed"]), int(state["rows"])
        for name, source in self.sources.items():
            source.load_state_dict(state["sources"][name])
