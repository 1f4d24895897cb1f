"""`seekstack sft`, `seekstack rl`, `seekstack pass-at-k` and `seekstack traces`: reasoning post-training on
verifiable tasks."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from seekstack.cli.common import (
    CONFIG_KEYS_HEADING,
    interrupted_says,
    key_value_command,
    nothing_written_if_interrupted,
    options_named,
    refuse_empty_path,
    refuse_unwritable_config,
    run_to_checkpoint,
    size,
    user_errors,
)
from seekstack.cli.train import ConfigOpt, ResumeFromOpt, run_stage

if TYPE_CHECKING:
    from seekstack.infer import Engine
    from seekstack.posttrain.tasks import Problem, Task

# a str, not a Path: when no file is given it is the first key=value override, which Path would change
# (data_dir=s3://b/x read as data_dir=s3:/b/x)
ConfigArg = Annotated[
    str | None,
    typer.Argument(help="Config file (YAML/TOML/JSON); defaults otherwise", callback=refuse_empty_path),
]
OverridesArg = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. init_from=DIR")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue the run in out_dir from its newest checkpoint")]
WriteConfigOpt = Annotated[
    Path | None,
    typer.Option(help="Write the resolved config (YAML/JSON by suffix) and exit", callback=refuse_unwritable_config),
]
DifficultyOpt = Annotated[
    int | None, typer.Option(min=1, help="The task's knob (digits, numbers), at least 1; default: its own")
]
MaxNewTokensOpt = Annotated[int, typer.Option(min=1, help="Most tokens of each completion")]


def _sampling_temperature(value: float) -> float:
    """--temperature checked before anything loads, as the engine's SamplingParams checks it: naming the value at
    fault, nan and inf too (typer's own range named none, and let nan through)."""
    from seekstack.infer import SamplingParams

    with options_named():
        SamplingParams(temperature=value)
    return value


TemperatureOpt = Annotated[
    float,
    typer.Option(callback=_sampling_temperature, help="Temperature of the sampled completions; 0 = greedy"),
]
SeedOpt = Annotated[int, typer.Option(help="Seed of the problems drawn and of the sampling")]
TASK_HELP = (
    "addition | subtraction | multiplication | countdown, or your own as module:Class (on PYTHONPATH) or a file of "
    'problems.jsonl ({"question": ..., "answer": ...} a line)'
)
SAMPLING_BATCH = 256  # pass-at-k and traces: completions decoded together at most


def stage_command(stage: Callable[[], tuple[type, Callable]], summary: str) -> Callable[..., None]:
    """A command that runs the training stage `stage()` gives (its config class and run function, imported as the
    command runs) from a config file and key=value overrides, as `run_stage` does; `summary` is its help."""

    def command(
        config: ConfigArg = None,
        overrides: OverridesArg = None,
        config_option: ConfigOpt = None,
        resume: ResumeOpt = False,
        resume_from: ResumeFromOpt = None,
        write_config: WriteConfigOpt = None,
    ) -> None:
        cls, run = stage()
        run_stage(cls, run, config, overrides, resume, resume_from, write_config, config_option)

    command.__doc__ = summary
    return command


def _sft_stage() -> tuple[type, Callable]:
    from seekstack.posttrain.config import SFTConfig
    from seekstack.posttrain.sft import run_sft

    return SFTConfig, run_sft


def _rl_stage() -> tuple[type, Callable]:
    from seekstack.posttrain.config import GRPOConfig
    from seekstack.posttrain.rl import run_rl

    return GRPOConfig, run_rl


sft_command = stage_command(
    _sft_stage,
    """Chat SFT from any checkpoint on JSONL conversations (`data`), by default on generated R1-format traces of
    `task`; the loss counts the assistant's tokens only.""",
)
rl_command = stage_command(
    _rl_stage,
    """GRPO on a verifiable task: G completions per prompt sampled by the inference engine from the policy being
    trained, rule-based rewards (correctness, format), loss_type grpo | dr_grpo | dapo.""",
)


def pass_at_k_command(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="Checkpoint directories with their tokenizers, or runs' out_dirs",
            callback=run_to_checkpoint,
            metavar="CHECKPOINTS...",
        ),
    ],
    task: Annotated[str, typer.Option(help=TASK_HELP)] = "addition",
    difficulty: DifficultyOpt = None,
    problems: Annotated[int, typer.Option(min=1, help="Held-out problems")] = 100,
    samples: Annotated[int, typer.Option(min=1, help="Samples per problem (k of pass@k)")] = 8,
    max_new_tokens: MaxNewTokensOpt = 64,
    temperature: TemperatureOpt = 1.0,
    seed: SeedOpt = 0,
) -> None:
    """Held-out pass@1, pass@k, greedy accuracy and format rate of each model on a task, one JSON line each, then
    (for several models) the same as a table."""
    from seekstack.checkpoint import read_config
    from seekstack.posttrain.config import require_task
    from seekstack.posttrain.evaluate import evaluate_task, heldout_problems

    rows = []
    with user_errors():
        for model in models:  # every model there before the first is scored (minutes) rather than after
            read_config(model)
        for model in models:
            before = "the lines above score the models before it" if rows else "no model was scored"
            with interrupted_says(f" while scoring {model}: {before}"), options_named():
                # options_named: a difficulty whose prompts pass the context names --difficulty
                sampled_task = require_task(task, difficulty=difficulty)
                with _problems_asked():
                    scored = heldout_problems(sampled_task, problems, seed)
                engine = _sampling_engine(model, problems, samples, max_new_tokens, sampled_task, scored)
                scores = evaluate_task(engine, sampled_task, problems, samples, max_new_tokens, temperature, seed)
            rows.append({"model": str(model), "task": task, **scores})
            typer.echo(json.dumps(rows[-1]))
    if len(rows) > 1:
        names = [name for name in rows[0] if name not in ("model", "task")]
        width = max(len(row["model"]) for row in rows)
        typer.echo(f"{'model':{width}s}  " + "  ".join(f"{name:>8s}" for name in names))
        for row in rows:
            typer.echo(f"{row['model']:{width}s}  " + "  ".join(f"{row[name]:8.3f}" for name in names))


def traces_command(
    model: Annotated[
        Path,
        typer.Argument(
            help="The teacher: a checkpoint directory with its tokenizer, or a run's out_dir",
            callback=run_to_checkpoint,
            metavar="CHECKPOINT",
        ),
    ],
    out: Annotated[Path, typer.Option(help="JSONL of verified conversations, for `seekstack sft data=OUT`")],
    task: Annotated[str, typer.Option(help=TASK_HELP)] = "addition",
    difficulty: DifficultyOpt = None,
    problems: Annotated[
        int, typer.Option("--problems", "--prompts", min=1, help="Distinct training problems to sample traces on")
    ] = 1000,
    samples: Annotated[int, typer.Option(min=1, help="Traces sampled per problem")] = 4,
    max_new_tokens: MaxNewTokensOpt = 64,
    temperature: TemperatureOpt = 1.0,
    seed: SeedOpt = 0,
) -> None:
    """R1-distill data: the teacher's traces on training problems, kept only when verified correct (rejection
    sampling); then `seekstack sft data=OUT init_from=STUDENT` trains a student on them."""
    from seekstack.atomic import refuse_a_file_in_the_way
    from seekstack.posttrain.config import require_task
    from seekstack.posttrain.conversations import write_conversations
    from seekstack.posttrain.distill import trace_problems, verified_traces

    with user_errors(), nothing_written_if_interrupted(out):
        if out.is_dir():
            raise ValueError(f"--out {out}: a folder; traces are written to a JSONL file")
        refuse_a_file_in_the_way(out.parent, out.name)  # before the minutes of sampling, not when they are written
        with options_named():
            sampled_task = require_task(task, difficulty=difficulty)
            with _problems_asked():
                sampled = trace_problems(sampled_task, problems, seed)
            engine = _sampling_engine(model, min(problems, 64), samples, max_new_tokens, sampled_task, sampled)
            traces = verified_traces(engine, sampled_task, problems, samples, max_new_tokens, temperature, seed)
        if not traces.conversations:
            raise ValueError(
                f"{model}: none of {traces.sampled} traces verified ({_why_no_trace(model, task)}); nothing to write "
                f"to {out}"
            )
        write_conversations(traces.conversations, out)
    summary = {"out": str(out), "kept": len(traces.conversations), "sampled": traces.sampled}
    summary |= {"accept_rate": traces.accept_rate, "prompts": traces.prompts, "prompts_solved": traces.prompts_solved}
    summary |= {"solved_rate": traces.solved_rate}
    typer.echo(json.dumps(summary))


@contextlib.contextmanager
def _problems_asked() -> Iterator[None]:
    """A task with fewer distinct problems than --problems asks for: a ConfigError naming the field problems, which
    options_named says as the option ("Invalid value for '--problems': ...", exit 2)."""
    from seekstack.config import ConfigError
    from seekstack.posttrain.tasks.base import TooFewProblems

    try:
        yield
    except TooFewProblems as error:
        raise ConfigError(f": {error}", field="problems") from None


def _why_no_trace(model: Path, task: str) -> str:
    """What to change when teacher `model` verified no trace: a base model writes no R1 answer format at all."""
    from seekstack.infer.chat import base_model_reason
    from seekstack.posttrain.tasks.problems_file import is_problems_file

    reason = base_model_reason(model, model)
    if reason:
        return (
            f"it looks like a base model with no chat training, {reason}, which seldom writes the <think>...</think> "
            f"answer format: train the teacher on the task first (`seekstack sft task={task} init_from={model}`, "
            "then `seekstack rl`)"
        )
    lower_difficulty = "" if is_problems_file(task) else ", a lower --difficulty"  # a file's problems are as written
    return f"more --samples{lower_difficulty} or a teacher trained further on the task may solve some"


def _sampling_engine(
    model: Path, prompts_at_once: int, samples: int, max_new_tokens: int, task: Task, problems: list[Problem]
) -> Engine:
    """An engine for `samples` completions of each of `prompts_at_once` prompts of `problems` at a time, of up to
    `max_new_tokens` tokens, each request holding the longest prompt and its completion within the model's context
    (`rollout_length`: a ConfigError naming difficulty or max_new_tokens where they do not fit), decoding at most
    SAMPLING_BATCH of them at a time (the rest queue: a cache for all at once can outgrow the memory); a ConfigError
    naming samples where the rollout's token ids alone pass the machine's free memory."""
    from seekstack.checkpoint import read_config
    from seekstack.config import ConfigError
    from seekstack.infer import Engine
    from seekstack.infer.cache import free_memory
    from seekstack.posttrain.rollout import rollout_length, task_prompts
    from seekstack.schema import counted
    from seekstack.tokenizer import Tokenizer

    context = read_config(model).max_position_embeddings
    prompts = task_prompts(Tokenizer.from_file(model), problems)
    limit = f"the context of {model} (max_position_embeddings)"
    length = rollout_length(task, problems, prompts, max_new_tokens, context, limit)
    sequences = prompts_at_once * samples
    held, free = 8 * sequences * length, free_memory("cpu")  # the rollout's (N, L) int64 prompt + completion ids
    if held > free:
        raise ConfigError(
            f"has value {samples}: {counted(prompts_at_once, 'prompt')} x {samples:,} completions of up to {length} "
            f"tokens hold {size(held)} of token ids at once, more than this machine's {size(free)} free; ask for fewer",
            field="samples",
        )
    max_batch_size = min(sequences, SAMPLING_BATCH)
    return Engine.from_pretrained(model, max_batch_size=max_batch_size, max_model_len=length)


def rl_plot_command(
    runs: Annotated[list[Path], typer.Argument(help="Out_dirs of `seekstack rl` runs, overlaid")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="PNG, .svg or .pdf to write; default RUN/rl_curves.png, for several FIRST_RUN/rl_compared.png"
        ),
    ] = None,
    smooth: Annotated[int, typer.Option(min=1, help="Steps averaged per point")] = 10,
) -> None:
    """Draw RL runs' accuracy and format reward, lengths of correct and incorrect answers, KL and clipping,
    entropy and generation share to a PNG."""
    from seekstack.posttrain.plot import default_rl_figure, plot_rl_runs
    from seekstack.train.runs import run_folder

    runs = [run_folder(run) for run in runs]  # a run's metrics.jsonl or train_config.json named: its folder
    with user_errors():
        written = plot_rl_runs(runs, out or default_rl_figure(runs), smooth)
    typer.echo(f"wrote {written}")


def register(app: typer.Typer) -> None:
    from seekstack.config import ModelConfig
    from seekstack.posttrain.config import GRPOConfig, SFTConfig
    from seekstack.schema import describe_fields

    for name, command, cls in (("sft", sft_command, SFTConfig), ("rl", rl_command, GRPOConfig)):
        keyed = key_value_command((cls, ""), (ModelConfig, "model."))
        app.command(name, epilog=CONFIG_KEYS_HEADING + describe_fields(cls), cls=keyed)(command)
    app.command("pass-at-k")(pass_at_k_command)
    app.command("traces")(traces_command)
    app.command("rl-plot")(rl_plot_command)
