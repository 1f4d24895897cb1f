import json
import warnings
from pathlib import Path

import pytest

from seekstack.posttrain.plot import plot_rl_runs, rl_figure, smoothed
from seekstack.train.plot import means_of


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


def write_run(run, lines):
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def panel(figure, title):
    """The panel titled `title` (with the note of its smoothing, if any, after it)."""
    return next(axis for axis in figure.axes if axis.get_title().removesuffix(means_of(10)) == title)


def test_each_panel_says_how_many_steps_its_points_average_as_plots_titles_do(tmp_path):
    """rl-plot averages 10 steps per point by default, and its titles did not say so ("reward"), where plot's say
    theirs ("loss (nats per token), means of 20 steps"): a point read as one step's value."""
    run = write_run(tmp_path / "run", [{"step": s, "reward": 0.5, "accuracy": 0.5} for s in range(1, 21)])
    titles = [axis.get_title() for axis in rl_figure([run]).axes]
    assert titles[:2] == ["reward, means of 10 steps", "completion length (tokens), means of 10 steps"]
    assert all(title.endswith(", means of 10 steps") for title in titles) and len(titles) == 5
    assert [axis.get_title() for axis in rl_figure([run], smooth=1).axes][0] == "reward"


def test_an_async_run_draws_the_share_of_the_step_spent_waiting_for_rollouts(tmp_path):
    step = {"reward": 0.5, "accuracy": 0.5}
    sync = write_run(tmp_path / "sync", [{"step": s, **step, "generate_share": 0.6} for s in range(1, 4)])
    lines = [{"step": s, **step, "generate_share": 1.5 * s, "wait_share": 0.1} for s in range(1, 4)]
    overlapped = write_run(tmp_path / "async", lines)  # generate_s ran beside the step before: 1.5, 3, 4.5 of it
    figure = rl_figure([sync, overlapped], smooth=1)
    shares = panel(figure, "share of the step spent on rollouts")
    assert [line.get_label() for line in shares.lines] == ["sync: generate_share", "async: wait_share"]
    assert max(max(line.get_ydata()) for line in shares.lines) <= 1


def test_curves_of_few_points_show_markers_and_a_missing_run_names_rl(tmp_path):
    run = write_run(tmp_path / "short", [{"step": s, "reward": 0.5, "accuracy": 0.1 * s} for s in range(1, 4)])
    (accuracy,) = panel(rl_figure([run]), "reward").lines  # 3 steps, smooth=10: one point
    assert list(accuracy.get_ydata()) == pytest.approx([0.2]) and accuracy.get_marker() == "o"
    long = write_run(tmp_path / "long", [{"step": s, "reward": 0.5, "accuracy": 0.5} for s in range(1, 401)])
    assert panel(rl_figure([long]), "reward").lines[0].get_marker() == "None"  # 40 points: a line
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is it the out_dir of a `seekstack rl` run"):
        plot_rl_runs([tmp_path / "empty"], tmp_path / "x.png")


@pytest.mark.parametrize("value", [None, "0.5", True])
def test_a_drawn_quantity_that_is_no_number_is_refused_naming_the_file_and_step_as_plot_does(tmp_path, value):
    """A hand-edited or damaged record's "accuracy": null crashed rl-plot with a bare "TypeError: unsupported operand
    type(s) for +: 'int' and 'NoneType'", where plot names the file and step of its own quantities."""
    lines = [{"step": 1, "reward": 0.5, "accuracy": 0.5}, {"step": 2, "reward": 0.5, "accuracy": value}]
    run = write_run(tmp_path / "run", lines)
    with pytest.raises(ValueError) as refused:
        rl_figure([run])
    expected = f"{run}/metrics.jsonl: the record of step 2 has no number 'accuracy'; mend or delete it"
    assert str(refused.value) == expected


def test_runs_of_the_same_folder_name_are_told_apart_by_their_paths(tmp_path):
    lines = [{"step": s, "reward": 0.5, "accuracy": 0.5} for s in range(1, 4)]
    for arm in ("grpo", "dr_grpo"):
        (tmp_path / arm).mkdir()
    first, second = (write_run(tmp_path / arm / "rl", lines) for arm in ("grpo", "dr_grpo"))
    labels = [line.get_label() for line in panel(rl_figure([first, second]), "reward").lines]
    assert labels == [f"{first}: accuracy", f"{second}: accuracy"]  # was: "rl: accuracy" twice


def test_a_run_given_twice_is_refused_naming_it_as_it_would_draw_two_curves_under_one_name(tmp_path, monkeypatch):
    run = write_run(tmp_path / "r1", [{"step": s, "reward": 0.5, "accuracy": 0.5} for s in range(1, 4)])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"^run {run} is given twice: .* under one name; give each run once$"):
        rl_figure([run, run])
    with pytest.raises(ValueError, match=f"^run r1 is given twice \\(also as {run}\\)"):
        plot_rl_runs([run, Path("r1")], tmp_path / "x.png")


def test_plot_of_an_rl_run_draws_its_rl_curves_not_a_next_token_loss(tmp_path):
    """`seekstack plot RUN` on an rl run drew GRPO's policy loss as 'next-token' loss in nats per token (negative at
    times) beside an empty validation panel; it draws what `rl-plot` draws, to RUN/rl_curves.png."""
    from typer.testing import CliRunner

    from seekstack.cli import app

    lines = [{"step": s, "loss": -0.01, "lm_loss": -0.01, "lr": 1e-4, "reward": 0.5, "accuracy": 0.1 * s}
             for s in range(1, 4)]  # fmt: skip
    run = write_run(tmp_path / "rl", lines)
    result = CliRunner().invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {run / 'rl_curves.png'}"
    assert (run / "rl_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (run / "curves.png").exists()
    pretrain = write_run(tmp_path / "pretrain", [{"step": 1, "loss": 3.0, "lm_loss": 3.0, "lr": 1e-3}])
    assert CliRunner().invoke(app, ["plot", str(pretrain)]).output.strip() == f"wrote {pretrain / 'curves.png'}"


@pytest.mark.parametrize("command", ["rl-plot", "plot"])
def test_plot_of_a_missing_folder_says_so_and_of_a_runs_metrics_file_draws_its_run(tmp_path, command):
    """`rl-plot nothere` said "no metrics.jsonl in nothere" of a folder that is not there, and `rl-plot
    RUN/metrics.jsonl` (the run's file named) said "no metrics.jsonl in RUN/metrics.jsonl"; `plot` alike."""
    from typer.testing import CliRunner

    from seekstack.cli import app

    missing = CliRunner().invoke(app, [command, str(tmp_path / "nothere")])
    assert missing.exit_code == 1 and f"{tmp_path / 'nothere'}: no such folder" in " ".join(missing.output.split())
    (tmp_path / "notes.txt").write_text("not a run\n")
    a_file = CliRunner().invoke(app, [command, str(tmp_path / "notes.txt")])
    assert a_file.exit_code == 1 and f"{tmp_path / 'notes.txt'}: is a file, not a folder: give the out_dir of a " in (
        " ".join(a_file.output.split())
    )
    run = write_run(tmp_path / "rl", [{"step": s, "reward": 0.5, "accuracy": 0.1 * s} for s in range(1, 4)])
    drawn = CliRunner().invoke(app, [command, str(run / "metrics.jsonl")])
    assert drawn.exit_code == 0, drawn.output
    assert drawn.output.strip() == f"wrote {run / 'rl_curves.png'}"
    assert (run / "rl_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("command", ["rl-plot", "plot"])
def test_several_rl_runs_are_drawn_to_rl_compared_leaving_the_first_runs_own_figure(tmp_path, command):
    """`rl-plot A B` drew the comparison over A/rl_curves.png, A's own figure (report's), where `plot A B` of other
    runs writes A/compared.png; several rl runs now go to A/rl_compared.png."""
    from typer.testing import CliRunner

    from seekstack.cli import app

    first, second = (
        write_run(tmp_path / name, [{"step": s, "reward": 0.5, "accuracy": 0.1 * s} for s in range(1, 4)])
        for name in ("a", "b")
    )
    assert CliRunner().invoke(app, [command, str(first)]).output.strip() == f"wrote {first / 'rl_curves.png'}"
    own = (first / "rl_curves.png").read_bytes()
    compared = CliRunner().invoke(app, [command, str(first), str(second)])
    assert compared.output.strip() == f"wrote {first / 'rl_compared.png'}"
    assert (first / "rl_compared.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (first / "rl_curves.png").read_bytes() == own
