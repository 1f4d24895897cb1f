"""`seekstack train`, `seekstack plot` and `seekstack sample`: pretraining and looking at its results."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from seekstack.cli.common import (
    CONFIG_KEYS_HEADING,
    Checkpoint,
    fail,
    interrupted_says,
    is_override,
    key_value_command,
    options_named,
    refuse_empty_path,
    refuse_unwritable_config,
    usage_error,
    user_errors,
    warn,
)
from seekstack.train.runs import STEP_DIR

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="The config file as an option (data build's and quantize's spelling)")
]
ResumeFromOpt = Annotated[
    str | None,
    typer.Option(
        metavar="STEP|FOLDER",
        callback=refuse_empty_path,
        help="Continue the run in out_dir, as --resume does, from the checkpoint of this step (40 or step_40: "
        "out_dir/checkpoints/step_40) or this checkpoint folder (another run's: continued in out_dir)",
    ),
]


def train_command(
    config: Annotated[
        str | None,  # a str, as posttrain's ConfigArg: the first override when no file is given
        typer.Argument(help="Training config (YAML/TOML/JSON); defaults otherwise", callback=refuse_empty_path),
    ] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. max_steps=200")] = None,
    config_option: ConfigOpt = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in out_dir from its newest checkpoint, with its saved config")
    ] = False,
    resume_from: ResumeFromOpt = None,
    write_config: Annotated[
        Path | None,
        typer.Option(
            help="Write the resolved config (YAML or JSON by suffix) and exit", callback=refuse_unwritable_config
        ),
    ] = None,
) -> None:
    """Pretrain a model on token shards (from `data tokenize`); run under torchrun for several processes."""
    from seekstack.train.config import TrainConfig
    from seekstack.train.trainer import train

    run_stage(TrainConfig, train, config, overrides, resume, resume_from, write_config, config_option)


def run_stage(
    cls: type,
    run: Callable,
    config: str | Path | None,
    overrides: list[str] | None,
    resume: bool,
    resume_from: str | None,
    write_to: Path | None = None,
    config_option: Path | None = None,
) -> None:
    """Resolve a training stage's config (`cls`: TrainConfig or a post-training subclass) from its file (CONFIG or
    `config_option`, --config) and overrides, then `run(config, resume=)` it, or with `write_to` write the config and
    stop. `resume` (--resume): from the run's newest checkpoint; `resume_from` (--resume-from): from a step number's
    or a folder's checkpoint; both given are refused. An override of a path field left empty (`data=`) is refused
    naming its key, not taken as the field's default."""
    from seekstack.parallel.distributed import is_main_process
    from seekstack.schema import refuse_empty_paths, write_config
    from seekstack.train.config import resolve_train_config
    from seekstack.train.runs import step_dir
    from seekstack.train.trainer import TrainingDiverged

    main = is_main_process()  # under torchrun, rank 0 alone prints the outcome (and `warn` the warnings)
    resumed, step = resume_request(resume, resume_from)
    with user_errors():
        if config is not None and is_override(config):  # only overrides were given
            overrides, config = [str(config), *(overrides or [])], None
        if config is not None and config_option is not None:
            raise usage_error(f"two config files, {config} and --config {config_option}: give one")
        config = config or config_option
        refuse_empty_paths(overrides or [])
        told: list[str] = []  # a resume's warnings, told once it is known to go ahead
        resolved = resolve_train_config(config, overrides or [], resume=resumed, warn=told.append, cls=cls)
        checkpoint = resumed if step is None else step_dir(resolved.out_dir, step)
        tell_once_resumable(resolved.out_dir, checkpoint, told)
        if write_to is not None:
            if main:  # under torchrun every rank resolved the same config: rank 0 writes it, the others exit quietly
                write_config(resolved, write_to)
                typer.echo(f"wrote the config to {write_to}")
            return
        try:
            result = run(resolved, resume=checkpoint)
        except TrainingDiverged as error:
            fail(str(error))
    if main:
        typer.echo(f"trained to step {result.step}; checkpoint: {result.checkpoint}")


def tell_once_resumable(out_dir: str | Path, checkpoint: bool | Path, told: list[str]) -> None:
    """Tell a run's config warnings (`told`, held back while it was resolved) once the checkpoint it resumes from
    (`checkpoint`: True, the newest; a folder; False, a new run) is found: one missing is refused without them, where
    "warning: resuming with max_steps=8" came before the refusal of that resume."""
    from seekstack.train.state import resumed_checkpoint

    if checkpoint:
        resumed_checkpoint(out_dir, checkpoint)
    for line in told:
        warn(line)


def resume_request(resume: bool, resume_from: str | None) -> tuple[bool | Path, int | None]:
    """What --resume and --resume-from ask: (resumed, step), `resumed` True, or --resume-from's checkpoint folder
    (maybe another run's, whose config a fresh out_dir takes), and `step` the step number --resume-from gives, whose
    checkpoint is the run's own; both options given are refused (a usage error)."""
    if resume and resume_from is not None:  # which checkpoint was meant is the user's to say
        raise usage_error(
            f"--resume and --resume-from {resume_from} both given: --resume continues from the run's newest "
            "checkpoint, --resume-from from the one it names; give one"
        )
    if resume_from is None:
        return resume, None
    step = resumed_step(resume_from)
    if step is not None:
        return True, step
    folder = Path(resume_from)
    written_as_path = "/" in resume_from or os.sep in resume_from  # as given: Path drops "./" and a trailing "/"
    if not folder.exists() and not written_as_path:  # a path (a run's pruned step_N) is told as a folder missing
        raise usage_error(
            f"--resume-from {resume_from}: neither a step of the run (40, or step_40 as its listings name it) nor a "
            "checkpoint folder (no such folder); --resume continues from the run's newest checkpoint"
        )
    return folder, None


def resumed_step(given: str) -> int | None:
    """The step --resume-from names: a number (40), or a checkpoint folder's name as a run's listings give it (step_40)
    where no such folder is at hand; None for a checkpoint folder."""
    named = STEP_DIR.fullmatch(given)
    if given.isdecimal() or named and not Path(given).exists():
        return int(named.group(1) if named else given)
    return None


def plot_command(
    runs: Annotated[
        list[Path],
        typer.Argument(help="Training runs' out_dirs (or their metrics.jsonl or train_config.json); several: overlaid"),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            help="PNG (or .svg, .pdf) to write; default RUN/curves.png (an rl run's: RUN/rl_curves.png), for several "
            "runs FIRST_RUN/compared.png (rl runs: FIRST_RUN/rl_compared.png, as rl-plot)"
        ),
    ] = None,
    smooth: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Steps averaged per point of the training curves (losses, MaxVio; validation and learning rate as "
            "logged); default 1 (rl runs: 10, as rl-plot)",
        ),
    ] = None,
    x_axis: Annotated[
        str, typer.Option(help="step, or tokens: the tokens trained, to compare runs of other batch sizes")
    ] = "step",
) -> None:
    """Draw a run's loss, validation bits per byte, learning rate and MaxVio per layer to a PNG, or several runs'
    overlaid, one colour each; rl runs' reward, accuracy, lengths, KL, clipping and entropy as `rl-plot` draws them
    (their loss is GRPO's, no next-token loss)."""
    from seekstack.posttrain.plot import RL_SMOOTH, default_rl_figure, logs_rewards, plot_rl_runs
    from seekstack.train.plot import X_LABELS, plot_run, plot_runs, read_metrics
    from seekstack.train.runs import run_folder

    runs = [run_folder(run) for run in runs]  # a run's metrics.jsonl or train_config.json named: its folder
    if x_axis not in X_LABELS:
        raise typer.BadParameter(f"{x_axis!r}: choose one of {', '.join(X_LABELS)}", param_hint="'--x-axis'")
    with user_errors():
        records = [read_metrics(run) for run in runs]
        rl = [run for run, logged in zip(runs, records, strict=True) if logs_rewards(logged)]
        if rl and len(rl) < len(runs):
            raise ValueError(
                f"{rl[0]} is a `seekstack rl` run, drawn by its rewards, and {len(runs) - len(rl)} of the runs are "
                "not: plot the rl runs together (or with rl-plot), the others apart"
            )
        if rl and x_axis != "step":
            raise ValueError(
                f"--x-axis {x_axis}: {rl[0]} is a `seekstack rl` run, whose curves are drawn by step (as rl-plot draws "
                "them); plot it without --x-axis"
            )
        if rl:  # `seekstack rl`'s steps
            written = plot_rl_runs(runs, out or default_rl_figure(runs), smooth or RL_SMOOTH, records)
        elif len(runs) == 1:
            written = plot_run(runs[0], out, records[0], smooth or 1, x_axis)
        else:
            written = plot_runs(runs, out or runs[0] / "compared.png", records, smooth or 1, x_axis)
    typer.echo(f"wrote {written}")


def sample_command(
    model: Checkpoint,
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            help="Prompt to continue (repeatable); default: a post-training run's held-out conversations or task "
            "questions in the chat template (as report samples them), a pretraining run's first held-out documents' "
            "openings (val.jsonl), or Python prompts for a run on Python code or a checkpoint outside a run"
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to write per continuation")] = 64,
    # its range checked by SamplingParams, as generate's: typer's min let nan through to "should be >= 0"
    temperature: Annotated[float, typer.Option(help="Temperature of the sampled continuation")] = 0.8,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest tokens; 0 (or -1, vLLM's) = all")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the sampled continuation")] = 0,
) -> None:
    """Print a greedy and a sampled continuation of each prompt, generated by the inference engine."""
    from seekstack.cli.generate import StreamedText
    from seekstack.eval.samples import demo_samples, run_prompts

    empty = [number for number, text in enumerate(prompt or (), 1) if not text]
    if empty:  # the engine would number it among the greedy and sampled copies of every prompt
        raise typer.BadParameter(
            f"prompt {empty[0]} of {len(prompt or ())} is empty: give the text to continue", param_hint="'--prompt'"
        )
    with user_errors(), options_named(("max_new_tokens", "temperature", "top_k", "seed")):
        prompts = tuple(prompt) if prompt else run_prompts(model)
        with interrupted_says(" before any sample was printed: the prompts' continuations are generated together"):
            samples = demo_samples(
                model,
                prompts,
                max_new_tokens,
                temperature,
                top_k,
                seed,
                notify=lambda notice: typer.echo(f"note: {notice}", err=True),
            )
    shown = StreamedText()  # as generate writes the model's text: '?' for a character stdout's encoding lacks
    for text, greedy, sampled in samples:
        shown.write(f"----- prompt {text!r}\n[greedy]\n{text}{greedy}\n[sampled, T={temperature}, top-k {top_k}]\n")
        shown.write(f"{text}{sampled}\n\n")


def register(app: typer.Typer) -> None:
    from seekstack.config import ModelConfig
    from seekstack.schema import describe_fields
    from seekstack.train.config import TrainConfig

    keys = describe_fields(TrainConfig)
    epilog = CONFIG_KEYS_HEADING + keys
    keyed = key_value_command((TrainConfig, ""), (ModelConfig, "model."))
    app.command("train", epilog=epilog, cls=keyed)(train_command)
    app.command("plot")(plot_command)
    app.command("sample")(sample_command)
