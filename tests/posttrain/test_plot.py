import json
import warnings

import pytest

from seekstack.posttrain.plot import plot_rl_runs, smoothed


def test_smoothing_averages_windows_of_steps_that_have_the_key():
    records = [{"step": s, "kl": float(s)} for s in range(1, 6)] + [{"step": 6}]
    assert smoothed(records, "kl", 2) == ([2, 4, 5], [1.5, 3.5, 5.0])


def test_rl_runs_are_drawn_and_other_runs_refused(tmp_path):
    run = tmp_path / "rl"
    run.mkdir()
    lines = [{"step": s, "reward": 0.1 * s, "accuracy": 0.1 * s, "kl": 0.0, "entropy": 1.0} for s in range(1, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "No artists with labels" for the panels this run has nothing on
        written = plot_rl_runs([run], tmp_path / "curves.png", smooth=1)
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pretrain = tmp_path / "pretrain"
    pretrain.mkdir()
    (pretrain / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    with pytest.raises(ValueError, match="no reward"):
        plot_rl_runs([pretrain], tmp_path / "x.png")
