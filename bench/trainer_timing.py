"""Seconds per optimizer step of a Hugging Face `Trainer` (TRL's trainers are ones), for the benches that time a
peer's training loop beside ours."""

from __future__ import annotations

import time
from typing import Any


def record_step_seconds(trainer: Any) -> list[float]:
    """A list that fills with each step's wall time while `trainer.train()` runs (a callback from step begin to end)."""
    from transformers import TrainerCallback

    step_s: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            step_s.append(time.perf_counter() - self.started)

    trainer.add_callback(StepTimer())
    return step_s
