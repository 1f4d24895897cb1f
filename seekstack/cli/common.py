"""What every command shares: turning library errors into one-line messages, and the number formats."""

from __future__ import annotations

import inspect
import json
import os
import re
import textwrap
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand

from seekstack.checkpoint.folder import CheckpointError
from seekstack.config import PRESETS, ModelConfig, preset
from seekstack.extras import MissingExtra
from seekstack.interrupts import INTERRUPTED
from seekstack.parallel.launch import launch_rank
from seekstack.schema import ConfigError, option_name, settable_fields, shown_value, unwritable_config, url_refusal
from seekstack.train.runs import passed_over, run_checkpoint, run_folder

try:
    from typer._click.exceptions import BadParameter, NoSuchOption, UsageError  # newer typer: its own click
    from typer._click.globals import get_current_context
except ImportError:
    from click import BadParameter, NoSuchOption, UsageError, get_current_context

RUNS_GIVEN = "runs_given"  # ctx.meta key: each resolved checkpoint -> the run's out_dir the user named


def run_to_checkpoint(ctx: typer.Context, value: str | Path | list | None) -> str | Path | list | None:
    """Argument callback: a run's out_dir (`checkpoints/step_N` inside, no config.json), or its train_config.json or
    metrics.jsonl (`run_folder`), stands for its newest checkpoint, named on stderr (by rank 0 alone under torchrun:
    `lora train`'s BASE) and its out_dir recorded in ctx.meta[RUNS_GIVEN]; a checkpoint folder, a preset or anything
    else passes through unchanged."""
    if isinstance(value, list):
        return [run_to_checkpoint(ctx, item) for item in value]
    if value is None or (Path(value) / "config.json").is_file():
        return value
    run = run_folder(value)
    try:
        newest = run_checkpoint(run)
    except (FileNotFoundError, CheckpointError) as error:
        raise typer.BadParameter(str(error)) from None
    if newest is None:
        return value
    if launch_rank() == 0:
        typer.echo(f"{value}: using the run's newest checkpoint, {newest}{passed_over(newest)}", err=True)
    ctx.meta.setdefault(RUNS_GIVEN, {})[str(newest)] = run
    return str(newest) if isinstance(value, str) else newest


def run_given(ctx: typer.Context, checkpoint: str | Path) -> Path | None:
    """The run's out_dir the user named, when `run_to_checkpoint` resolved it to `checkpoint`; else None."""
    return ctx.meta.get(RUNS_GIVEN, {}).get(str(checkpoint))


Model = Annotated[
    str,
    typer.Argument(
        help=f"A preset ({', '.join(PRESETS)}), a checkpoint directory or a run's out_dir", callback=run_to_checkpoint
    ),
]

Checkpoint = Annotated[
    Path,
    typer.Argument(
        help="A checkpoint directory with its tokenizer, or a run's out_dir",
        callback=run_to_checkpoint,
        metavar="CHECKPOINT",
    ),
]


@contextmanager
def user_errors(as_json: bool = False) -> Iterator[None]:
    """Turn configuration, checkpoint, file and missing-extra errors into a one-line message and exit code 1 (JSON if
    asked); a usage error (exit 2) is told in JSON too when asked."""
    try:
        yield
    except BrokenPipeError:  # stdout's reader has gone (`| head` read its lines): click ends the command quietly
        raise
    except UsageError as error:  # an option's value the library refused (`options_named`): as the parser's own
        if as_json:
            fail(error.format_message(), as_json=True, code=error.exit_code)
        raise
    except ConfigError as error:  # the configuration: every rank of a torchrun meets it alike
        fail(str(error), as_json)
    except (OSError, ValueError, MissingExtra) as error:  # a file, a checkpoint, a package: possibly this rank's own
        # an error naming a Python parameter as its way out names the command's option instead (`for_command`)
        fail(getattr(error, "for_command", str(error)), as_json, every_rank=True)


@contextmanager
def interrupted_says(what: str, as_json: bool = False) -> Iterator[None]:
    """Ctrl-C inside says so and `what` it left ("interrupted (Ctrl-C): nothing was written to OUT"), exit 130:
    typer's own exit 130 says nothing."""
    try:
        yield
    except KeyboardInterrupt:
        fail(f"interrupted (Ctrl-C){what}", as_json, code=INTERRUPTED)


def nothing_written_if_interrupted(out: Path, as_json: bool = False) -> AbstractContextManager[None]:
    """`interrupted_says` of a command's minutes of measuring or calibrating before it writes `out` whole
    (atomically): that nothing was written."""
    return interrupted_says(f": nothing was written to {out}", as_json)


@contextmanager
def options_named(options: Collection[str] | None = None) -> Iterator[None]:
    """Settings built from a command's options: their errors are usage errors (exit 2) naming the option, as the
    parser's own are ("Invalid value for '--top-p'"), not the field (top_p, or stop.0 inside the option's value).

    `options`: the fields the options set, where the others come from a --config file and keep their field's name;
    None: every field is an option's."""
    try:
        yield
    except ConfigError as error:
        field = error.field.split(".")[0] if error.field else None
        if field is None or (options is not None and field not in options):
            raise
        option = option_name(field)
        problem = error.problem.removeprefix(": ")  # said after the option's name and a colon, as ": pattern ..."
        raise BadParameter(problem, get_current_context(silent=True), param_hint=f"'{option}'") from None


def fail(message: str, as_json: bool = False, every_rank: bool = False, code: int = 1) -> NoReturn:
    """Print `message` as the command's error and exit with `code` (2: a command-line mistake). Under torchrun the
    first rank of each machine (LOCAL_RANK 0: on one machine rank 0) prints it, into the log its machine's user reads
    (a config file of one node's own fails there alone), and the other ranks, which meet the same error, exit
    quietly; with `every_rank` (an error that may be one rank's own: its file, its disk) they print it too. A rank
    started by hand, without LOCAL_RANK, prints it: its output is its own, and no other rank may meet the error. A
    rank but 0 names itself."""
    rank = launch_rank()
    if rank == 0 or every_rank or os.environ.get("LOCAL_RANK", "0") == "0":
        where = "" if rank == 0 else f" (rank {rank})"
        if as_json:
            typer.echo(json.dumps({"error": {"message": message}}))
        else:
            typer.echo(f"error{where}: {message}", err=True)
    raise typer.Exit(code=code)


def refuse_empty_path(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
    """A path's value (or each of several) unless it is "", which typer reads as Path("."), the current folder, which a
    command would read or write into (`--out "$OUT"`, the variable unset): a usage error naming the parameter. `Command`
    checks each Path, checkpoint and preset so; a path typed str (also a step, 'stdlib', a key=value) takes it as its
    callback."""
    if "" in value if isinstance(value, (list, tuple)) else value == "":
        raise BadParameter("an empty path (a shell variable left unset?): give a file or folder", ctx, param)
    return value


def refuse_unwritable_config(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """--write-config's file, refused (a usage error) before the config is resolved unless its suffix is one
    `write_config` writes."""
    unwritable = unwritable_config(value) if value is not None else None
    if unwritable is not None:
        raise BadParameter(unwritable, ctx, param)
    return value


def _processed_as_path(param: Any, process_value: Callable[[Any, Any], Any], ctx: typer.Context, value: Any) -> Any:
    """`refuse_empty_path`, and a URL refused (`url_refusal`) as given, before Path collapses its "//"."""
    for given in value if isinstance(value, (list, tuple)) else [value]:
        refused = url_refusal(given) if given is not None else None
        if refused is not None:
            raise BadParameter(refused, ctx, param)
    return process_value(ctx, refuse_empty_path(ctx, param, value))


def is_override(argument: str | Path) -> bool:
    """Whether a command's positional `argument` is a key=value override rather than a path (`seekstack train`'s
    config, `lora train`'s BASE and DATA): an "=" that no folder name holds (a sweep's `runs/lr=1e-3/run.yaml` is a
    config file), in no file that exists."""
    key, sep, _ = str(argument).partition("=")
    return bool(sep) and "/" not in key and os.sep not in key and not Path(argument).exists()


def usage_error(message: str) -> UsageError:
    """A command-line mistake in the options given together (exit 2, as click's "Missing option")."""
    return UsageError(message, get_current_context(silent=True))


class Command(TyperCommand):
    """A seekstack command (`cli/__init__.py` makes each one of these): its usage line names the positional arguments
    as click and README write them, `seekstack info [OPTIONS] MODEL`, `[PROMPT]`, `[INPUTS]...`, where typer 0.27
    and later write the parameter's own name braced (`{model}`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # an argument's errors and --help's Arguments name it as the usage line does: "Missing argument 'MODEL'"
        for param in self.params:
            if param.param_type_name == "argument" and param.metavar is None:
                param.metavar = (param.name or "").upper() + "..." * (param.nargs != 1)
            described = param.type_descriptor  # a Path, Paths, or a checkpoint or preset (`Model`, a str)
            if param.param_type_name == "argument" and described.annotation in (str, list[str], list[Path]):
                # typer writes the annotation beside it ("CONFIG <str>", "OVERRIDES... <list[str]>", "RUNS...
                # <list[Path]>"), which tells a user nothing: its help says what it takes (a file, a preset,
                # key=value, folders), as in click's --help
                param.display_type_rich = lambda ctx: None
            elif param.param_type_name == "option" and described.is_list and param.metavar is None:
                # a repeatable option takes one value each time it is given: its element's label ("--prompt <str>"),
                # where typer writes the annotation ("--prompt <list[str]>")
                param.metavar = f"<{described.annotation.__args__[0].__name__.lower()}>"
            callback = described.parameter_info.callback  # refuse_empty_path's: a path typed str (data build's inputs)
            if described.annotation in (Path, list[Path]) or callback in (run_to_checkpoint, refuse_empty_path):
                # checked as given, before typer reads it: after eager --help, as click checks every value
                param.process_value = partial(_processed_as_path, param, param.process_value)

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        """typer's refusal of a value outside its option's type or range names the value too, as click's and
        argparse's do: "Invalid value for '--max-documents': has value 0: input should be greater than or equal to 1",
        not "Input should be ..." alone. A value longer than SHOWN_VALUE_CHARS, there or in a callback's "has value
        1000: ...", is cut by `shown_value` (a 3,000-digit --max-new-tokens filled the terminal)."""
        try:
            return super().parse_args(ctx, args)
        except BadParameter as error:
            cause = error.__cause__  # the pydantic ValidationError of typer's check, which lists the value
            invalid = cause.errors() if hasattr(cause, "errors") else []
            if invalid:
                message = error.message
                error.message = f"has value {shown_value(invalid[0]['input'], str)}: {message[:1].lower()}{message[1:]}"
            else:
                error.message = re.sub(
                    r"^has value (\S+):", lambda m: f"has value {shown_value(m[1], str)}:", error.message
                )
            raise

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                pieces.extend(param.get_usage_pieces(ctx))
            else:  # click's form: MODEL, [PROMPT], RUNS..., [INPUTS]...
                name = param.metavar.removesuffix("...")
                pieces.append((name if param.required else f"[{name}]") + "..." * (param.nargs != 1))
        return pieces

    def get_short_help_str(self, limit: int = 45) -> str:
        """The line `seekstack --help` lists the command by, as click makes it: its help's first sentence (of the
        first paragraph of what --help shows, up to a \\f), ended by a period before a word not in lowercase or the
        paragraph's end (typer's click ends it at any word ending in a period, "e.g." too), shortened to `limit` with
        "..." (an abbreviation before it left out, not "e.g...."), and a deprecated command's label."""
        if self.short_help or not self.help:
            return super().get_short_help_str(limit)
        words = inspect.cleandoc(self.help).partition("\f")[0].split("\n\n")[0].split()
        if words[:1] == ["\b"]:  # click's no-rewrap marker
            words = words[1:]
        text = re.split(r"(?<=\.) (?![a-z])", " ".join(words), maxsplit=1)[0]
        if len(text) > limit:
            kept = textwrap.shorten(text, limit - len("..."), placeholder="", break_on_hyphens=False).split()
            while kept and kept[-1].endswith("."):  # "e.g." followed by "..." would read as four dots
                kept.pop()
            text = " ".join(kept).rstrip(",;:") + "..."
        if self.deprecated:  # click's label
            text += f" (DEPRECATED: {self.deprecated})" if isinstance(self.deprecated, str) else " (DEPRECATED)"
        return text


class JsonErrorsCommand(Command):
    """A command whose --json reports command-line mistakes (a bad value, a missing option) as JSON too, as its
    other errors are, with the exit code they have without --json (2)."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        json_asked = "--json" in args
        try:
            return super().parse_args(ctx, args)
        except UsageError as error:
            if json_asked:
                fail(error.format_message(), as_json=True, code=error.exit_code)
            raise


# What a training command's --help says before its config keys
CONFIG_KEYS_HEADING = (
    "Config keys (file or key=value; model.FIELD=VALUE, in a file model_overrides: {FIELD: VALUE}, sets a ModelConfig "
    "field):\n\n"
)


def key_value_command(*configs: tuple[type, str]) -> type[Command]:
    """The command class of a stage set by key=value arguments (`configs`: each config dataclass with the prefix its
    keys take, "" or "model."): an option spelt as a key (--max-steps, --max_steps, as HF's Trainer takes them) and
    close to none of the command's options is refused as any unknown option is (exit 2), saying the key=value to
    write instead."""
    keys: dict[str, str] = {}
    for cls, prefix in configs:
        for name in settable_fields(cls):
            keys.setdefault(name, prefix + name)

    class KeyValueCommand(Command):
        def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
            try:
                return super().parse_args(ctx, args)
            except NoSuchOption as error:
                key = keys.get(error.option_name.lstrip("-").replace("-", "_"))
                # a near miss of an option (lora train --out-dir: --out); --help is offered for any short name (--lr)
                if key is None or set(error.possibilities) - {"--help"}:
                    raise
                message = f"No such option: {error.option_name}; settings are key=value arguments: {key}=VALUE"
                raise NoSuchOption(error.option_name, message, ctx=ctx) from None

    return KeyValueCommand


def warn(message: str) -> None:
    """Print `message` as a warning on stderr; under torchrun rank 0 alone prints it (every rank resolves the same
    config and meets the same warnings), as it alone prints the outcome."""
    if launch_rank() == 0:
        typer.echo(f"warning: {message}", err=True)


def model_config(model: str) -> ModelConfig:
    """A preset by name, or the config of the model a checkpoint directory loads as (its config.json, with the MTP
    layers and the MoE layout its weights hold: `loaded_config`, whose CheckpointError each rank says); neither: a
    ConfigError naming the presets and what the checkpoint reader says of the path (a Hub repository's name: to
    download it first), a name every rank of a torchrun reads alike, so said once (`user_errors`)."""
    if model in PRESETS:
        return preset(model)
    from seekstack.checkpoint.load import loaded_config

    try:
        return loaded_config(model)
    except CheckpointError as error:
        if Path(model).exists():
            raise
        raise ConfigError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint: {error}") from None


def count(n: int) -> str:
    if n < 1000:
        return str(n)
    return f"{_scaled(n, 1000, ['', 'K', 'M', 'B', 'T'])} ({n:,})"


def flops(n: int) -> str:
    return f"{_scaled(n, 1000, [' ', ' K', ' M', ' G', ' T'])}FLOP"


def size(n: int) -> str:
    return f"{n:,} B" if n < 1024 else f"{_scaled(n, 1024, ['', ' Ki', ' Mi', ' Gi', ' Ti'])}B ({n:,} B)"


def _scaled(n: float, base: int, units: list[str]) -> str:
    """n in the largest unit it reaches, with two decimals: 671.03B, 68.62 Ki."""
    unit = 0
    while n >= base and unit < len(units) - 1:
        n, unit = n / base, unit + 1
    return f"{n:.2f}{units[unit]}"
