"""`seekstack rl-plot RUN...`: the curves of one or more `seekstack rl` runs, overlaid, in one PNG.

Panels: accuracy (the correctness reward) and the format reward; completion length of correct and of incorrect
answers; KL to the reference and the clipped fraction; entropy; the share of each step spent on rollouts: generating
them, or with async_rollouts waiting for them (`wait_share`: its `generate_share` compares the rollout, which ran
beside the step before, with this step and passes 1 when rollouts take longer than training).
Each point is the mean over a window of steps (`smooth`), since one step's batch is small, as each panel's title
says; a curve of few points is drawn with markers, so that one of a single point shows.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from seekstack.train.metrics import METRICS_FILE, column  # noqa: E402
from seekstack.train.plot import (  # noqa: E402
    MARKED_UP_TO,
    figure_path,
    means_of,
    read_metrics,
    require_each_run_once,
    run_names,
    save_figure,
    smoothed,
)

PANELS = (
    ("reward", ("accuracy", "reward_format")),
    ("completion length (tokens)", ("completion_length_correct", "completion_length_incorrect")),
    ("KL, clipped fraction", ("kl", "clip_fraction")),
    ("entropy (nats)", ("entropy",)),
    ("share of the step spent on rollouts", ("generate_share", "wait_share")),
)
# A run that logs a pair's second quantity draws it instead of the first: with async_rollouts, the rollouts that
# sampled a step's batch ran beside the step before, and the share of the step is its wait for them.
INSTEAD = {"generate_share": "wait_share"}
RL_SMOOTH = 10  # steps averaged per point by default: one step's batch is small


def logs_rewards(records: list[dict]) -> bool:
    """Whether a run's metrics `records` are a `seekstack rl` run's, drawn by their rewards (its loss is GRPO's, ~0 by
    construction): a step logged a reward. What `plot` and `report` both tell such a run by, whatever its
    train_config.json holds (none, or one written by hand)."""
    return any("reward" in record for record in records)


def default_rl_figure(run_dirs: list[Path]) -> Path:
    """Where rl-plot (and plot of rl runs) draws by default: RUN/rl_curves.png, several runs FIRST_RUN/rl_compared.png
    (as plot draws several to FIRST_RUN/compared.png), which leaves the first run's own figure (report's) alone."""
    return run_dirs[0] / ("rl_curves.png" if len(run_dirs) == 1 else "rl_compared.png")


def plot_rl_runs(
    run_dirs: list[Path], out_path: Path, smooth: int = RL_SMOOTH, records: list[list[dict]] | None = None
) -> Path:
    """Draw the runs' curves to `out_path` (a .png, .svg or .pdf); return it. `records`: each run's metrics when the
    caller has read them (`read_metrics`) already, so a torn last line is told once."""
    out_path = figure_path(out_path)
    figure = rl_figure(run_dirs, smooth, records)
    save_figure(figure, out_path, dpi=90)
    plt.close(figure)
    return out_path


def rl_figure(run_dirs: list[Path], smooth: int = RL_SMOOTH, records: list[list[dict]] | None = None) -> Figure:
    """The runs' curves, one panel of PANELS each, each point the mean of `smooth` steps; `records` as
    `plot_rl_runs` takes them."""
    require_each_run_once(run_dirs)
    logged = records if records is not None else [read_metrics(run_dir, command="rl") for run_dir in run_dirs]
    runs = [
        (name, _rl_records(run_dir, run_records))
        for name, run_dir, run_records in zip(run_names(run_dirs), run_dirs, logged, strict=True)
    ]
    figure, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for name, records in runs:
        for axis, (title, keys) in zip(axes, PANELS, strict=True):
            for key in _drawn(keys, records):
                steps, values = smoothed(records, key, smooth)
                if steps:
                    marker = "o" if len(steps) <= MARKED_UP_TO else None
                    axis.plot(steps, values, marker=marker, markersize=3, label=f"{name}: {key}")
            axis.set_title(title + means_of(smooth))  # as plot's titles say theirs
            axis.set_xlabel("step")
    for axis in axes:
        if axis.get_legend_handles_labels()[0]:  # a panel whose quantities no run logged stays empty, unlabelled
            axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _rl_records(run_dir: Path, logged: list[dict]) -> list[dict]:
    """The step records (those with a reward) of the run's metrics `logged`; an error naming the run when it has
    none, and one naming the step of a record whose value of a drawn quantity is no number (`column`, as plot's)."""
    records = [r for r in logged if "reward" in r]
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no reward: is it the out_dir of a `seekstack rl` run?")
    for key in (key for _, keys in PANELS for key in keys):
        column([r for r in records if key in r], key, Path(run_dir) / METRICS_FILE)
    return records


def _drawn(keys: tuple[str, ...], records: list[dict]) -> list[str]:
    """The panel's `keys` this run draws: of a pair in INSTEAD, the second when the run logged it."""
    logged = {key for record in records for key in record}
    return [key for key in keys if not (key in INSTEAD and INSTEAD[key] in logged)]
