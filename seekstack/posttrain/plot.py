"""`seekstack rl-plot RUN...`: the curves of one or more `seekstack rl` runs, overlaid, in one PNG.

Panels: accuracy (the correctness reward) and the format reward; completion length of correct and of incorrect
answers; KL to the reference and the clipped fraction; entropy; the share of each step spent generating.
Each point is the mean over a window of steps (`smooth`), since one step's batch is small.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from seekstack.atomic import write_atomic  # noqa: E402
from seekstack.train.plot import png_path, read_metrics  # noqa: E402

PANELS = (
    ("reward", ("accuracy", "reward_format")),
    ("completion length (tokens)", ("completion_length_correct", "completion_length_incorrect")),
    ("KL, clipped fraction", ("kl", "clip_fraction")),
    ("entropy (nats)", ("entropy",)),
    ("share of the step generating", ("generate_share",)),
)


def smoothed(records: list[dict], key: str, window: int) -> tuple[list[int], list[float]]:
    """(steps, means) of `key` over consecutive windows of `window` steps that have it."""
    points = [(r["step"], r[key]) for r in records if key in r]
    steps, means = [], []
    for start in range(0, len(points), window):
        chunk = points[start : start + window]
        steps.append(chunk[-1][0])
        means.append(sum(value for _, value in chunk) / len(chunk))
    return steps, means


def plot_rl_runs(run_dirs: list[Path], out_path: Path, smooth: int = 10) -> Path:
    """Draw the runs' curves to `out_path` (a .png); return it."""
    out_path = png_path(out_path)
    figure, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for run_dir in run_dirs:
        records = [r for r in read_metrics(run_dir) if "reward" in r]
        if not records:
            raise ValueError(f"{run_dir}/metrics.jsonl has no reward: is it the out_dir of a `seekstack rl` run?")
        for axis, (title, keys) in zip(axes, PANELS, strict=True):
            for key in keys:
                steps, values = smoothed(records, key, smooth)
                if steps:
                    axis.plot(steps, values, label=f"{Path(run_dir).name}: {key}")
            axis.set_title(title)
            axis.set_xlabel("step")
    for axis in axes:
        if axis.get_legend_handles_labels()[0]:  # a panel whose quantities no run logged stays empty, unlabelled
            axis.legend(fontsize=7)
    figure.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_path, lambda temporary: figure.savefig(temporary, dpi=90, format="png"))
    plt.close(figure)
    return out_path
