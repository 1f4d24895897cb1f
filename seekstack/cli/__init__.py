"""The `seekstack` command line, one module per stage of the pipeline; each command parses its arguments, calls
the library and prints. A stage's libraries are imported inside its commands, so `--help` starts fast."""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

from seekstack.cli.notices import quiet_third_party_notices

# One module per stage, in pipeline order; each has `register(app)` adding its commands.
STAGES = (
    "model",
    "data",
    "train",
    "posttrain",
    "distill",
    "adapters",
    "compress",
    "checkpoint",
    "plan",
    "generate",
    "serve",
    "evaluate",
)

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: full option names and no type tag on every flag
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
)


def _print_version(requested: bool) -> None:
    if requested:
        from seekstack.version import __version__

        typer.echo(f"seekstack {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """seekstack: the DeepSeek-V3 stack in plain PyTorch. Pipeline: data build -> tokenizer train -> data tokenize
    -> train -> sample / generate / chat / serve."""
    quiet_third_party_notices()


for stage in STAGES:
    importlib.import_module(f"seekstack.cli.{stage}").register(app)
