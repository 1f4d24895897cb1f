"""The `seekstack` command line, one module per stage of the pipeline; each command parses its arguments, calls
the library and prints. A stage's libraries are imported inside its commands, so `--help` starts fast."""

from __future__ import annotations

from types import FrameType
from typing import NoReturn

from seekstack.interrupts import INTERRUPTED, sigint_handled_by


def _interrupted_loading(signum: int, frame: FrameType | None) -> NoReturn:
    """Ctrl-C while the commands load ends the command as one later does (exit 130), not with the imports' traceback."""
    raise SystemExit(INTERRUPTED)


with sigint_handled_by(_interrupted_loading):
    import importlib
    from collections.abc import Iterator
    from typing import Annotated

    import typer
    from typer.core import TyperCommand
    from typer.models import CommandInfo

    from seekstack.allocator import keep_freed_memory
    from seekstack.cli.common import Command
    from seekstack.cli.notices import one_line_warnings, quiet_third_party_notices

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
    -> train -> sample / generate / chat / serve. Every command keeps large freed tensors in glibc's heap for the next
    forward; SEEKSTACK_KEEP_FREED_MEMORY=0 keeps glibc's own malloc setting."""
    quiet_third_party_notices()
    one_line_warnings()
    keep_freed_memory()  # glibc keeps large freed tensors for the next forward (seekstack/allocator.py)


def _command_infos(typer_app: typer.Typer) -> Iterator[CommandInfo]:
    """Each command registered on `typer_app` and on its groups (data, tokenizer, lora, checkpoint, keys)."""
    yield from typer_app.registered_commands
    for group in typer_app.registered_groups:
        yield from _command_infos(group.typer_instance)


with sigint_handled_by(_interrupted_loading):
    for stage in STAGES:
        importlib.import_module(f"seekstack.cli.{stage}").register(app)
for info in _command_infos(app):  # every command is a common.Command (its usage line: `info [OPTIONS] MODEL`)
    info.cls = Command if info.cls in (None, TyperCommand) else info.cls
    if not issubclass(info.cls, Command):
        raise TypeError(f"{info.cls.__name__} should subclass seekstack.cli.common.Command")
