"""The progress line a run prints on stderr: what it tells a user watching a run."""

from __future__ import annotations

import pytest

from seekstack.train import trainer
from seekstack.train.trainer import EtaClock


def test_eta_follows_the_pace_of_the_steps_after_the_first_which_pays_for_warm_up(monkeypatch):
    """A first step of 60 s (torch.compile) then steps of 1 s: 90 s are left at step 10 of 100, not 621 s."""
    now = iter([0.0, 60.0, *(60.0 + step for step in range(1, 10))])
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: next(now))
    clock = EtaClock(step=0)
    etas = [clock.eta(step, max_steps=100) for step in range(1, 11)]
    assert etas[0] == pytest.approx(60 * 99)  # one step known: its own pace
    assert etas[1:] == pytest.approx([100 - step for step in range(2, 11)])


def test_a_resumed_runs_eta_counts_the_steps_left_from_its_checkpoint(monkeypatch):
    now = iter([100.0, 105.0, 107.0])
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: next(now))
    clock = EtaClock(step=40)
    assert [clock.eta(41, max_steps=50), clock.eta(42, max_steps=50)] == pytest.approx([45.0, 16.0])
