"""`seekstack lora train` and `seekstack lora merge`: LoRA domain adapters on a frozen base (seekstack/adapters)."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Annotated

import typer

from seekstack.cli.common import (
    fail,
    is_override,
    key_value_command,
    nothing_written_if_interrupted,
    refuse_empty_path,
    run_to_checkpoint,
    user_errors,
)

lora_app = typer.Typer(no_args_is_help=True, help="LoRA adapters (peft format): train on your text, merge.")


def train_command(
    base: Annotated[
        str | None,
        typer.Argument(
            help="Base checkpoint folder (config.json, safetensors) or a run's out_dir", callback=run_to_checkpoint
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Argument(
            callback=refuse_empty_path,
            help="Token shards (from `data tokenize`); or text (a file, a folder of text files, .jsonl of "
            '{"text"}, .parquet), tokenized into --out/data; or chat conversations (.jsonl of {"messages"}, of '
            '{"prompt", "completion"} lists of messages or of TRL\'s from/value {"conversations"}; or .json of JSON '
            "Lines, as datasets' to_json writes, or of one JSON array, as json.dump writes; .gz, .bz2, .xz or .zst "
            'of either too), 5% of them held out for val_loss while eval_every > 0; or TRL\'s {"prompt", '
            '"completion"} of text, read alike with no chat template, the loss on the completion only',
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value: training keys (see `seekstack train --help`) and lora.rank/alpha/dropout/..."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Adapter folder: the run (metrics, checkpoints) and the adapter files")] = (
        Path("runs/adapter")
    ),
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its newest checkpoint")] = False,
    resume_from: Annotated[
        str | None,
        typer.Option(
            metavar="STEP|FOLDER",
            callback=refuse_empty_path,
            help="Continue the run in --out, as --resume does, from the checkpoint of this step (40 or step_40: "
            "--out/checkpoints/step_40) or this checkpoint folder (another run's: continued in an --out holding no "
            "run yet)",
        ),
    ] = None,
) -> None:
    """Train a LoRA adapter on a frozen base with the pretraining trainer; writes adapter_config.json and
    adapter_model.safetensors (peft's format) into --out."""
    from seekstack.adapters.training import lora_train_config, train_adapter, undone_if_refused
    from seekstack.cli.train import resume_request, tell_once_resumable
    from seekstack.parallel.distributed import is_main_process
    from seekstack.train.config import CONFIG_FILE as TRAIN_CONFIG_FILE
    from seekstack.train.runs import step_dir
    from seekstack.train.trainer import TrainingDiverged

    resumed, step = resume_request(resume, resume_from)
    continued_elsewhere = isinstance(resumed, Path) and not (out / TRAIN_CONFIG_FILE).is_file()
    with user_errors(), undone_if_refused(out) if continued_elsewhere or not resumed else contextlib.nullcontext():
        checkpoint = step_dir(out, step) if step is not None else resumed
        (base, data), overrides = _paths_and_overrides([a for a in (base, data, *(overrides or [])) if a is not None])
        told: list[str] = []  # a resume's warnings, told once it is known to go ahead
        run = lora_train_config(base, data, out, overrides, checkpoint, told.append)
        tell_once_resumable(out, checkpoint, told)
        try:
            result = train_adapter(*run, checkpoint)
        except TrainingDiverged as error:
            fail(str(error))
    if is_main_process():  # under torchrun, rank 0 alone tells the outcome, as `seekstack train` does
        typer.echo(f"trained to step {result.step}; adapter: {out} (checkpoint {result.checkpoint})")


def merge_command(
    base: Annotated[Path, typer.Argument(help="Base checkpoint folder or a run's out_dir", callback=run_to_checkpoint)],
    adapter: Annotated[Path, typer.Argument(help="Adapter folder (adapter_config.json, adapter_model.safetensors)")],
    out: Annotated[Path, typer.Option(help="Folder for the merged checkpoint")],
) -> None:
    """Fold the adapter into the base's weights and write a plain checkpoint (loads anywhere the base loads)."""
    from seekstack.adapters.files import merge_adapter

    with user_errors(), nothing_written_if_interrupted(out):  # the merged folder appears whole (`merge_adapter`)
        written = merge_adapter(base, adapter, out)
    typer.echo(f"wrote {written}")


def _paths_and_overrides(arguments: list[str]) -> tuple[tuple[str | None, str | None], list[str]]:
    """(BASE, DATA) and the overrides from `lora train`'s positionals: BASE and DATA are those before the first
    `key=value`, told from a path as `seekstack train` tells its config from one (`is_override`: `max-steps=3` is a
    misspelt key, an existing `shards=v2` a path) (`--resume` needs neither, so its overrides may come first)."""
    paths = list(itertools.takewhile(lambda argument: not is_override(argument), arguments))
    if len(paths) > 2:
        raise ValueError(
            f"{paths[2]}: neither BASE nor DATA (given as {paths[0]} and {paths[1]}) nor a key=value override; "
            "write `seekstack lora train BASE DATA key=value ...`"
        )
    base, data = [*paths, None, None][:2]
    return (base, data), arguments[len(paths) :]


def register(app: typer.Typer) -> None:
    from seekstack.adapters.config import LORA_DEFAULTS, AdapterConfig
    from seekstack.schema import describe_fields
    from seekstack.train.config import TrainConfig

    epilog = (
        f"Training keys a LoRA run sets apart from `seekstack train`'s defaults: {' '.join(LORA_DEFAULTS)}\n\n"
        "Adapter keys (lora.FIELD=VALUE):\n\n" + describe_fields(AdapterConfig)
    )
    keyed = key_value_command((TrainConfig, ""), (AdapterConfig, "lora."))
    lora_app.command("train", epilog=epilog, cls=keyed)(train_command)
    lora_app.command("merge")(merge_command)
    app.add_typer(lora_app, name="lora")
