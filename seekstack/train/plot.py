"""`seekstack plot RUN...`: a run's curves from its metrics.jsonl, drawn to one PNG, or several runs' overlaid.

Panels: training loss (total, next-token, MTP; a distillation's divergence from its teacher and feature distance)
with the validation loss (and a distillation's validation divergence); validation bits per byte; learning rate;
MaxVio of each MoE layer; and, for a mixture run, the weight of each source over training. A curve of few points (a
short run, a run of one step) is drawn with markers, so that one of a single point shows.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from seekstack.atomic import write_atomic  # noqa: E402
from seekstack.checkpoint.keys import CONFIG_FILE as MODEL_CONFIG_FILE  # noqa: E402
from seekstack.config import PRESETS, preset  # noqa: E402
from seekstack.schema import ConfigError  # noqa: E402
from seekstack.train.config import CONFIG_FILE  # noqa: E402
from seekstack.train.metrics import METRICS_FILE, column, read_metrics_file, replayed, step_tokens  # noqa: E402
from seekstack.train.runs import run_holding  # noqa: E402

X_LABELS = {"step": "step", "tokens": "tokens trained"}  # the x axes a plot draws on, and their labels
MARKED_UP_TO = 20  # points of a curve drawn with markers (a line alone shows no single point)
FIGURE_FORMATS = ("png", "svg", "pdf")  # what --out may name: matplotlib's raster and vector formats


def read_metrics(run_dir: str | Path, command: str = "train") -> list[dict]:
    """The records of `run_dir/metrics.jsonl` (`read_metrics_file`: a damaged line is an error naming it, a last
    line cut short by a stopped run is left out with a warning); a missing file is an error naming the `seekstack
    command` whose run was expected, the run whose checkpoint `run_dir` is, or a run that has logged no step yet; a
    missing folder, or a file, is an error saying so. A log whose steps were logged again (a run resumed by a seekstack
    that did not drop the steps logged after the checkpoint it resumed from, or logs joined by hand) is replayed as
    `--resume` keeps it (`replayed`): a step's record drops those logged for its step and past it, so that no curve
    draws a step twice or runs back nor the report counts a step twice."""
    if not Path(run_dir).exists():
        raise FileNotFoundError(f"{run_dir}: no such folder")
    if not Path(run_dir).is_dir():
        raise NotADirectoryError(
            f"{run_dir}: is a file, not a folder: give the out_dir of a `seekstack {command}` run (or its "
            f"{METRICS_FILE})"
        )
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
    return replayed(read_metrics_file(path, on_torn_tail=lambda why: print(f"warning: {why}", file=sys.stderr)))


def plot_run(
    run_dir: str | Path,
    out_path: str | Path | None = None,
    records: list[dict] | None = None,
    smooth: int = 1,
    x_axis: str = "step",
) -> Path:
    """Draw the run's curves to `out_path` (default `run_dir/curves.png`); return the path written. `records`: the
    run's metrics when the caller has read them (`read_metrics`) already, so a torn last line is told once. `smooth`:
    steps averaged per point of the training curves (losses, MaxVio); `x_axis`: "step", or "tokens" trained."""
    out_path = figure_path(out_path if out_path is not None else Path(run_dir) / "curves.png")
    records = records if records is not None else read_metrics(run_dir)
    records = on_x_axis(records, x_axis, Path(run_dir) / METRICS_FILE)
    steps = _training_steps(records, Path(run_dir) / METRICS_FILE)
    evals = [r for r in records if "val_loss" in r]
    mixed = [r for r in steps if "mix" in r]
    panels = 5 if mixed else 4
    columns = math.ceil(panels / 2)
    figure, axes = plt.subplots(2, columns, figsize=(5 * columns, 7), squeeze=False)
    axes = axes.flatten()
    path = Path(run_dir) / METRICS_FILE
    x = [r["step"] for r in steps]

    axes[0].plot(*_curve(steps, "loss", path, smooth), label="loss (total)", linewidth=0.8)
    # a step that trained no labelled token (on-policy) has no lm_loss
    axes[0].plot(*_curve(steps, "lm_loss", path, smooth), label="next-token", linewidth=0.8)
    # the loss's other terms, where logged: MTP's (none without MTP modules; older runs logged 0.0), a distillation's
    # divergence from its teacher and feature distance
    for key, label in (("mtp_loss", "MTP"), ("divergence", "divergence"), ("feature_distance", "feature distance")):
        logged = [r for r in steps if key in r]
        if any(r[key] for r in logged):
            axes[0].plot(*_curve(logged, key, path, smooth), label=label, linewidth=0.8)
    if evals:
        axes[0].plot([r["step"] for r in evals], column(evals, "val_loss", path), "o-", label="validation")
    diverged = [r for r in evals if "val_divergence" in r]  # distillation: the student's from its teacher
    if diverged:
        divergence = column(diverged, "val_divergence", path)
        axes[0].plot([r["step"] for r in diverged], divergence, "s--", label="validation divergence")
    _style(axes[0], "loss (nats per token)" + means_of(smooth))

    if evals:
        axes[1].plot([r["step"] for r in evals], column(evals, "val_bpb", path), "o-")
    _style(axes[1], "validation bits per byte")

    axes[2].plot(x, column(steps, "lr", path))
    _style(axes[2], "learning rate")

    layers = sorted({layer for r in steps for layer in r.get("maxvio_per_layer", {})}, key=int)
    main_layers = _main_layer_count(run_dir)
    for layer in layers:
        values = [
            {"step": r["step"], "maxvio": r["maxvio_per_layer"][layer]}
            for r in steps
            if layer in r.get("maxvio_per_layer", {})
        ]
        label = f"layer {layer}" + (" (MTP)" if main_layers is not None and int(layer) >= main_layers else "")
        axes[3].plot(*smoothed(values, "maxvio", smooth), label=label, linewidth=0.8)
    _style(axes[3], "MaxVio per MoE layer (step batch)" + means_of(smooth))

    if mixed:
        sources = dict.fromkeys(source for r in mixed for source in r["mix"])  # a resume may add some
        for source in sources:
            axes[4].plot([r["step"] for r in mixed], [r["mix"].get(source, 0.0) for r in mixed], label=source)
        _style(axes[4], "mixture weight")
    for unused in axes[panels:]:
        unused.set_visible(False)
    for axis in axes[:panels]:
        axis.set_xlabel(X_LABELS[x_axis])
    return _write(figure, axes[:panels], x[-1], str(run_dir), out_path)


def plot_runs(
    run_dirs: list[Path], out_path: str | Path, records: list[list[dict]], smooth: int = 1, x_axis: str = "step"
) -> Path:
    """Several runs' curves overlaid in one PNG, one colour per run, as wandb and TensorBoard compare runs: next-token
    loss with the validation loss as points, validation bits per byte, learning rate, MaxVio (the mean over MoE
    layers); return the path written. `records`: each run's metrics (`read_metrics`); `smooth` and `x_axis` as
    `plot_run`'s (runs of other batch sizes compare by tokens)."""
    require_each_run_once(run_dirs)
    out_path = figure_path(out_path)
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False)
    axes = axes.flatten()
    last_step = 0
    for index, (name, run_dir, logged) in enumerate(zip(run_names(run_dirs), run_dirs, records, strict=True)):
        path = Path(run_dir) / METRICS_FILE
        logged = on_x_axis(logged, x_axis, path)
        steps = _training_steps(logged, path)
        evals = [r for r in logged if "val_loss" in r]
        curves = (  # (panel, records, key, points averaged, style, label)
            (axes[0], steps, "lm_loss", smooth, "-", name),
            (axes[0], evals, "val_loss", 1, "o--", f"{name} (validation)"),
            (axes[1], evals, "val_bpb", 1, "o-", name), (axes[2], steps, "lr", 1, "-", name),
            (axes[3], steps, "maxvio", smooth, "-", name),
        )  # fmt: skip
        for axis, rows, key, window, style, label in curves:
            x, y = _curve(rows, key, path, window)  # a step that trained no labelled token has no lm_loss
            if x:
                axis.plot(x, y, style, color=f"C{index % 10}", linewidth=0.8, label=label)
        last_step = max(last_step, steps[-1]["step"])
    titles = (
        "next-token loss (nats per token)" + means_of(smooth),
        "validation bits per byte",
        "learning rate",
        "MaxVio (mean of MoE layers)" + means_of(smooth),
    )
    for axis, title in zip(axes, titles, strict=True):
        _style(axis, title)
        axis.set_xlabel(X_LABELS[x_axis])
    return _write(figure, axes, last_step, ", ".join(run_names(run_dirs)), out_path)


def require_each_run_once(run_dirs: list[Path]) -> None:
    """ValueError naming a run given twice (its folder, however written): its curves would be drawn over each
    other under one name."""
    given: dict[Path, Path] = {}
    for run_dir in map(Path, run_dirs):
        earlier = given.setdefault(run_dir.resolve(), run_dir)
        if earlier is not run_dir:
            also = f" (also as {earlier})" if str(earlier) != str(run_dir) else ""
            raise ValueError(
                f"run {run_dir} is given twice{also}: its curves would be drawn over each other under one name; give "
                "each run once"
            )


def run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's name in the legends: its folder's name (`.` or `..` given: the folder it stands for, not a link's
    target; the root, which has none: its anchor, '/'), or its path as given when two runs share that name (runs/a/rl
    and runs/b/rl)."""
    folders = [Path(os.path.abspath(run_dir)) for run_dir in run_dirs]
    names = [folder.name or folder.anchor for folder in folders]
    return names if len(set(names)) == len(names) else [str(run_dir) for run_dir in run_dirs]


def on_x_axis(records: list[dict], x_axis: str, path: Path) -> list[dict]:
    """`records` as drawn on `x_axis` (X_LABELS): as logged on "step"; on "tokens", each `step` replaced by the
    tokens trained up to it (`step_tokens`, summed: the report's count), a step without tokens_per_s and step_s
    named with `path`."""
    if x_axis == "step":
        return records
    steps = [r for r in records if "loss" in r]
    for key in ("tokens_per_s", "step_s"):
        column(steps, key, path)
    trained_by, total = {}, 0
    for record in steps:
        total += step_tokens(record)
        trained_by[record["step"]] = total
    missing = [step for step in range(1, max(trained_by, default=0) + 1) if step not in trained_by]
    if missing:  # the tokens of the steps after them would be drawn short of those trained
        raise ValueError(
            f"{path}: --x-axis tokens counts the tokens trained from step 1, and it holds no record of "
            f"{steps_text(missing)} (a run resumed from another run's checkpoint logs only its own steps); plot it by "
            "step"
        )
    return [{**record, "step": trained_by[record["step"]]} for record in records if record["step"] in trained_by]


def steps_text(steps: list[int]) -> str:
    """Step numbers as runs of consecutive ones: 'step 3', 'steps 1-2, 5'."""
    runs = [[step for _, step in run] for _, run in itertools.groupby(enumerate(steps), lambda pair: pair[1] - pair[0])]
    text = ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
    return f"step {text}" if len(steps) == 1 else f"steps {text}"


def smoothed(records: list[dict], key: str, window: int) -> tuple[list[int], list[float]]:
    """(steps, means) of `key` over consecutive windows of `window` steps that have it."""
    points = [(r["step"], r[key]) for r in records if key in r]
    steps, means = [], []
    for start in range(0, len(points), window):
        chunk = points[start : start + window]
        steps.append(chunk[-1][0])
        means.append(sum(value for _, value in chunk) / len(chunk))
    return steps, means


def _curve(records: list[dict], key: str, path: Path, window: int) -> tuple[list[int], list[float]]:
    """`smoothed` of the records that have `key`, each a number (`column`'s error naming `path` and the step)."""
    having = [r for r in records if key in r]
    column(having, key, path)
    return smoothed(having, key, window)


def means_of(window: int) -> str:
    """A panel title's note of its training curves' smoothing."""
    return f", means of {window} steps" if window > 1 else ""


def _training_steps(records: list[dict], path: Path) -> list[dict]:
    """The step records (those with a loss) of metrics file `path`; ValueError naming it when there are none."""
    steps = [r for r in records if "loss" in r]
    if not steps:
        raise ValueError(f"{path} has no training steps to plot")
    return steps


def _write(figure: plt.Figure, axes: list[plt.Axes], last_step: int, title: str, out_path: Path) -> Path:
    """Give the panels `axes` one step range, title the figure, write it to `out_path` and close it."""
    for axis in axes:  # with matplotlib's margin past the last step: its point shows whole
        axis.set_xlim(0, last_step * (1 + plt.rcParams["axes.xmargin"]))
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, out_path, dpi=100)
    plt.close(figure)
    return out_path


def figure_path(path: str | Path) -> Path:
    """`path` as a plot's output: a name of a FIGURE_FORMATS suffix, whose format it is written in (as matplotlib's
    savefig takes it), so that a slip of `--out` never writes a picture over the run's metrics or weights; ValueError
    naming it otherwise."""
    path = Path(path)
    if figure_format(path) not in FIGURE_FORMATS:
        example = path / "curves.png" if path.is_dir() else path.with_suffix(".png")  # a folder: a file in it
        raise ValueError(f"--out {path}: a plot is written as a .png, .svg or .pdf file; name one (e.g. {example})")
    return path


def figure_format(path: Path) -> str:
    """The format `figure_path`'s `path` is written in: its suffix's."""
    return path.suffix.lower().removeprefix(".")


def save_figure(figure: plt.Figure, path: str | Path, dpi: int) -> None:
    """Write `figure` to `path` in its suffix's format (`figure_format`), whole or not at all (`write_atomic`, which
    makes the folders and refuses a file in their way): a command stopped (Ctrl-C) or refused by a full disk
    mid-write leaves no cut picture."""
    path = Path(path)
    write_atomic(path, lambda temporary: figure.savefig(temporary, dpi=dpi, format=figure_format(path)))


def _main_layer_count(run_dir: str | Path) -> int | None:
    """num_hidden_layers of the run's model, to tell MTP blocks apart: of the checkpoint it started from (its
    train_config.json's init_from, relative to the run: sft, rl, distill, lora train), else of its preset and
    model_overrides; None if unknown (no train_config.json, one naming no preset, a starting checkpoint moved since).
    ValueError naming the file and the field for a preset this seekstack has not, or model_overrides it refuses."""
    path = Path(run_dir) / CONFIG_FILE
    remedy = "restore it, or delete it to plot without the run's settings"
    saved = json_object(path, remedy)
    if not saved.get("init_from"):
        if not saved.get("model"):  # one written by hand ({}) that names no preset
            return None
        model, overrides = saved["model"], saved.get("model_overrides", {})
        if not isinstance(model, str) or model not in PRESETS:  # a newer seekstack's preset, or a typo
            raise ValueError(
                f"{path}: field 'model' is {json.dumps(model)[:40]}, no preset of this seekstack ("
                f"{', '.join(sorted(PRESETS))}); {remedy}"
            )
        if not isinstance(overrides, dict):
            raise ValueError(
                f"{path}: field 'model_overrides' is {json.dumps(overrides)[:40]}, not an object; {remedy}"
            )
        try:
            return preset(model, **overrides).num_hidden_layers
        except ConfigError as error:  # an override that is no ModelConfig field, or a value it refuses
            raise ValueError(f"{path}: field 'model_overrides': {error}; {remedy}") from None
    start = Path(run_dir) / saved["init_from"] / MODEL_CONFIG_FILE
    return json.loads(start.read_text(encoding="utf-8"))["num_hidden_layers"] if start.is_file() else None


def json_object(path: Path, remedy: str) -> dict[str, Any]:
    """The JSON object in `path` ({} when there is no such file); ValueError naming the file, and `remedy`, when
    it is not valid JSON or not an object."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_bytes())
    except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError for binary garbage
        raise ValueError(f"{path}: not valid JSON ({error}); the file is truncated or damaged: {remedy}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds {json.dumps(value)[:40]}, not a JSON object; {remedy}")
    return value


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
