"""`seekstack plot RUN`: a run's curves from its metrics.jsonl, drawn to one PNG.

Panels: training loss (total, next-token, MTP) with the validation loss (and a distillation's divergence from its
teacher); validation bits per byte; learning rate; MaxVio of each MoE layer; and, for a mixture run, the weight of
each source over training. A curve of few points (a short run, a run of one step) is drawn with markers, so that
one of a single point shows.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from seekstack.atomic import write_atomic  # noqa: E402
from seekstack.config import preset  # noqa: E402
from seekstack.train.config import CONFIG_FILE  # noqa: E402
from seekstack.train.metrics import METRICS_FILE, column, read_metrics_file  # noqa: E402
from seekstack.train.runs import run_holding  # noqa: E402

MARKED_UP_TO = 20  # points of a curve drawn with markers (a line alone shows no single point)


def read_metrics(run_dir: str | Path, command: str = "train") -> list[dict]:
    """The records of `run_dir/metrics.jsonl` (`read_metrics_file`: a damaged line is an error naming it, a last
    line cut short by a stopped run is left out with a warning); a missing file is an error naming the `seekstack
    command` whose run was expected, the run whose checkpoint `run_dir` is, or a run that has logged no step yet."""
    path = Path(run_dir) / METRICS_FILE
    run = run_holding(run_dir)
    if not path.is_file() and run is not None:
        raise FileNotFoundError(
            f"no {METRICS_FILE} in {run_dir}: it is a checkpoint of the run {run}, whose folder holds it: give {run}"
        )
    if not path.is_file() and (Path(run_dir) / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"no {METRICS_FILE} in {run_dir}: the run has logged no step yet (it holds its {CONFIG_FILE}, written at "
            "its start, and appends a line to its metrics at each step); try again once it has trained one"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is it the out_dir of a `seekstack {command}` run?")
    return read_metrics_file(path, on_torn_tail=lambda why: print(f"warning: {why}", file=sys.stderr))


def plot_run(run_dir: str | Path, out_path: str | Path | None = None, records: list[dict] | None = None) -> Path:
    """Draw the run's curves to `out_path` (default `run_dir/curves.png`); return the path written. `records`: the
    run's metrics when the caller has read them (`read_metrics`) already, so a torn last line is told once."""
    out_path = png_path(out_path if out_path is not None else Path(run_dir) / "curves.png")
    records = records if records is not None else read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    if not steps:
        raise ValueError(f"{Path(run_dir) / METRICS_FILE} has no training steps to plot")
    mixed = [r for r in steps if "mix" in r]
    panels = 5 if mixed else 4
    columns = math.ceil(panels / 2)
    figure, axes = plt.subplots(2, columns, figsize=(5 * columns, 7), squeeze=False)
    axes = axes.flatten()
    path = Path(run_dir) / METRICS_FILE
    x = [r["step"] for r in steps]

    axes[0].plot(x, column(steps, "loss", path), label="loss (total)", linewidth=0.8)
    trained = [r for r in steps if "lm_loss" in r]  # a step that trained no labelled token (on-policy) has none
    axes[0].plot([r["step"] for r in trained], column(trained, "lm_loss", path), label="next-token", linewidth=0.8)
    with_mtp = [r for r in steps if "mtp_loss" in r]  # none without MTP modules (older runs logged 0.0)
    if any(r["mtp_loss"] for r in with_mtp):
        axes[0].plot([r["step"] for r in with_mtp], column(with_mtp, "mtp_loss", path), label="MTP", linewidth=0.8)
    if evals:
        axes[0].plot([r["step"] for r in evals], column(evals, "val_loss", path), "o-", label="validation")
    diverged = [r for r in evals if "val_divergence" in r]  # distillation: the student's from its teacher
    if diverged:
        divergence = column(diverged, "val_divergence", path)
        axes[0].plot([r["step"] for r in diverged], divergence, "s--", label="validation divergence")
    _style(axes[0], "loss (nats per token)")

    if evals:
        axes[1].plot([r["step"] for r in evals], column(evals, "val_bpb", path), "o-")
    _style(axes[1], "validation bits per byte")

    axes[2].plot(x, column(steps, "lr", path))
    _style(axes[2], "learning rate")

    layers = sorted({layer for r in steps for layer in r.get("maxvio_per_layer", {})}, key=int)
    main_layers = _main_layer_count(run_dir)
    for layer in layers:
        values = [(r["step"], r["maxvio_per_layer"][layer]) for r in steps if layer in r.get("maxvio_per_layer", {})]
        label = f"layer {layer}" + (" (MTP)" if main_layers is not None and int(layer) >= main_layers else "")
        axes[3].plot(*zip(*values, strict=True), label=label, linewidth=0.8)
    _style(axes[3], "MaxVio per MoE layer (step batch)")

    if mixed:
        sources = dict.fromkeys(source for r in mixed for source in r["mix"])  # a resume may add some
        for source in sources:
            axes[4].plot([r["step"] for r in mixed], [r["mix"].get(source, 0.0) for r in mixed], label=source)
        _style(axes[4], "mixture weight")
    for unused in axes[panels:]:
        unused.set_visible(False)
    for axis in axes[:panels]:  # one step range, with matplotlib's margin past the last step: its point shows whole
        axis.set_xlim(0, x[-1] * (1 + plt.rcParams["axes.xmargin"]))

    figure.suptitle(str(run_dir))
    figure.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    plt.close(figure)
    return out_path


def png_path(path: str | Path) -> Path:
    """`path` as a plot's output: a .png name, so that a slip of `--out` never writes a picture over the run's
    metrics or weights; ValueError naming it otherwise."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {path}: a plot is written as a .png file; name one (e.g. {path.with_suffix('.png')})")
    return path


def _main_layer_count(run_dir: str | Path) -> int | None:
    """num_hidden_layers of the run's model (from its train_config.json), to tell MTP blocks apart; None if unknown."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return preset(saved["model"], **saved.get("model_overrides", {})).num_hidden_layers


def _style(axis: plt.Axes, title: str) -> None:
    axis.set_title(title)
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    for curve in axis.get_lines():
        if len(curve.get_xdata()) <= MARKED_UP_TO and curve.get_marker() == "None":
            curve.set_marker("o")
            curve.set_markersize(3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)
