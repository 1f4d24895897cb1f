"""The progress line a run prints on stderr: what it tells a user watching a run."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import sys
import termios

import pytest
import torch

from seekstack.train import trainer
from seekstack.train.trainer import ERASE_TO_ROW_END, EtaClock, redrawn_in_place, stderr_columns, train
from tests.train.test_trainer import VOCAB, data_dir, run_config  # noqa: F401 (data_dir: a fixture)

LONG = (
    "step 9/60  loss 6.0589 (total 7.8717)  1,274 tok/s  MFU 37.1%  ETA 00:00:10"
    + "  1 of 2 threads (other processes busy)"
)
SHORT = "step 10/60  loss 6.0301 (total 7.8502)  1,301 tok/s  MFU 37.9%  ETA 00:00:09"


def terminal_rows(output: str, columns: int) -> list[str]:
    """The rows a terminal `columns` wide shows after `output`: text wraps past the last column, a carriage return
    goes back to the start of the cursor's row, ESC[K erases from the cursor to the row's end."""
    rows, row, column = [""], 0, 0
    for piece in output.replace(ERASE_TO_ROW_END, "\0"):
        if piece == "\r":
            column = 0
        elif piece == "\0":
            rows[row] = rows[row][:column]
        else:
            if column == columns:
                row, column = row + 1, 0
                rows += [""] * (row + 1 - len(rows))
            rows[row] = rows[row][:column] + piece + rows[row][column + 1 :]
            column += 1
    return rows


def test_eta_follows_the_pace_of_the_steps_after_the_first_which_pays_for_warm_up():
    """A first step of 60 s (torch.compile) then steps of 1 s: 90 s are left at step 10 of 100, not 621 s."""
    now = iter([0.0, 60.0, *(60.0 + step for step in range(1, 10))])
    clock = EtaClock(step=0, clock=lambda: next(now))
    etas = [clock.eta(step, max_steps=100) for step in range(1, 11)]
    assert etas[0] == pytest.approx(60 * 99)  # one step known: its own pace
    assert etas[1:] == pytest.approx([100 - step for step in range(2, 11)])


def test_a_resumed_runs_eta_counts_the_steps_left_from_its_checkpoint():
    now = iter([100.0, 105.0, 107.0])
    clock = EtaClock(step=40, clock=lambda: next(now))
    assert [clock.eta(41, max_steps=50), clock.eta(42, max_steps=50)] == pytest.approx([45.0, 16.0])


@pytest.mark.parametrize("columns", [200, 80])
def test_a_line_redrawn_in_place_leaves_nothing_of_the_line_before_on_the_terminal(columns):
    """A shorter line showed the end of the longer one before ('...ETA 00:00:09ther processes busy)'), and on a
    terminal narrower than the line each redraw left the line's first row behind."""
    rows = terminal_rows(redrawn_in_place(LONG, columns) + redrawn_in_place(SHORT, columns), columns)
    assert rows == [SHORT]
    (row,) = terminal_rows(redrawn_in_place(LONG, columns), columns)
    assert LONG.startswith(row) and len(row) == min(len(LONG), columns - 1)


def test_the_progress_line_is_cut_to_the_terminal_stderr_shows_on_whatever_stdout_goes_to(monkeypatch):
    """`seekstack train ... | tee log` on a terminal 150 columns wide cut the line at 79 (stdout's width: none)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    with os.fdopen(follower, "w") as terminal, monkeypatch.context() as patched:
        patched.setattr(sys, "stderr", terminal)
        patched.delenv("COLUMNS", raising=False)
        assert stderr_columns() == 150
    os.close(leader)


def test_an_error_during_a_run_on_a_terminal_starts_a_row_of_its_own(data_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    """The error the command prints was glued to the progress line ('ETA 00:00:05error: step 2: loss=...')."""
    logged = []

    def disk_full_at_the_second_step(out_dir, record):
        logged.append(record)
        if len(logged) == 2:
            raise OSError("No space left on device")

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(trainer, "append_metrics", disk_full_at_the_second_step)
    with pytest.raises(OSError, match="No space left"):
        train(run_config(data_dir, tmp_path, max_steps=4, eval_every=0, save_every=0))
    err = capsys.readouterr().err
    assert "\rstep 1/4  loss " in err and err.endswith(ERASE_TO_ROW_END + "\n")


class RewardedWindows:
    """A batch source of token windows whose loss also returns a reward, as RL's does."""

    progress_metrics = ("reward",)
    tokenizer_info = {"vocab_size": VOCAB, "sha256": "synthetic", "bos_id": 0, "eos_id": 1}

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def attach(self, model) -> None:
        pass

    def batch(self, batch_size: int, progress: float) -> torch.Tensor:
        return torch.randint(0, VOCAB, (batch_size, 16), generator=self.generator)

    def loss(self, model, batch: torch.Tensor, mtp_loss_weight: float):
        return model(batch, labels=batch, mtp_loss_weight=mtp_loss_weight), {"reward": 0.25}

    def tokens(self, batch: torch.Tensor) -> tuple[int, int]:
        return batch.numel(), batch.shape[1]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_the_progress_line_shows_the_metrics_a_batch_source_names_beside_the_loss(data_dir, tmp_path, capsys):  # noqa: F811
    """An rl run's line read 'loss 0.0000 (total 0.0000)' at every step: GRPO's loss, ~0 by construction."""
    train(run_config(data_dir, tmp_path, max_steps=1, eval_every=0, save_every=0), source=RewardedWindows())
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step 1/1")]
    assert re.fullmatch(r"step 1/1  loss \d+\.\d{4} \(total \d+\.\d{4}\)  reward 0\.250  [\d,]+ tok/s  .*", line)


def test_a_resumed_run_in_a_log_tells_its_first_step_as_a_new_run_tells_step_1(data_dir, tmp_path, capsys):  # noqa: F811
    """Away from a terminal a line is told every 10th step: a run resumed at step 3 told nothing until step 10, so a
    log showed no sign of it training (with steps of minutes, for many minutes)."""
    given_peak = {"eval_every": 0, "peak_flops": 1e12}  # no matmul probe: a faster test
    train(run_config(data_dir, tmp_path, max_steps=1, save_every=1, **given_peak))
    told = [line.split()[1] for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert told == ["1/1"]
    train(run_config(data_dir, tmp_path, max_steps=3, save_every=0, **given_peak), resume=True)
    told = [line.split()[1] for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert told == ["2/3", "3/3"]
