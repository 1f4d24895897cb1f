"""`seekstack checkpoint export`: a training checkpoint's model as a plain Hugging Face-format folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from seekstack.cli.common import nothing_written_if_interrupted, run_to_checkpoint, user_errors

checkpoint_app = typer.Typer(no_args_is_help=True, help="Training checkpoints: export the model they hold.")


@checkpoint_app.command("export")
def export_command(
    source: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint folder (checkpoints/step_N) or a run's out_dir (or its train_config.json)",
            callback=run_to_checkpoint,
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder to write: config.json, safetensors, tokenizer files")],
) -> None:
    """Write the model of a training checkpoint (the newest of a run) without its training state, for
    transformers, generate/serve, or another run's init_from=."""
    from seekstack.train.state import export_checkpoint

    with user_errors(), nothing_written_if_interrupted(out):  # a model's gigabytes copied: Ctrl-C leaves no half folder
        written = export_checkpoint(source, out)
    typer.echo(f"wrote {written}")


def register(app: typer.Typer) -> None:
    app.add_typer(checkpoint_app, name="checkpoint")
