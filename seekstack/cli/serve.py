"""`seekstack serve`, `seekstack keys` and `seekstack usage`: the model as a service, its keys and its bill."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from seekstack.cli.common import (
    Command,
    JsonErrorsCommand,
    NoSuchOption,
    fail,
    options_named,
    refuse_empty_path,
    run_given,
    run_to_checkpoint,
    user_errors,
)
from seekstack.cli.generate import (
    AdaptiveDrafts,
    Device,
    DeviceMap,
    DraftTokens,
    DraftVocab,
    Dtype,
    KvCacheMemory,
    OffloadDir,
    Speculative,
    Threads,
    refuse_drafting_without_speculation,
    tell_dtype,
)
from seekstack.infer.params import EngineOptions
from seekstack.schema import shown_value
from seekstack.serve.keys import MAX_LIMIT
from seekstack.train.runs import run_holding

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import JustifyMethod, Table

    from seekstack.serve.database import Database
    from seekstack.serve.keys import ApiKey, KeyStore


def refuse_empty_database(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    """--db's `refuse_empty_path` under a name of its own: `Command` checks the value of an option with that callback
    as a local path, and --db takes a postgresql:// URL too."""
    return refuse_empty_path(ctx, param, value)


USAGE_NAMES_FOLDED_TO = 16  # the narrowest a usage table folds names to; narrower: a block per row
DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Keys and usage: SQLite file or postgresql:// URL; default $SEEKSTACK_DB, seekstack.db",
        callback=refuse_empty_database,
    ),
]
# How long SIGTERM or Ctrl-C lets requests in flight finish before cutting them off: within the 30 s Kubernetes
# waits after SIGTERM before SIGKILL, with time left to write the rows of those cut off
DEFAULT_SHUTDOWN_TIMEOUT_S = 20.0
DEFAULT_KEEP_ALIVE_S = 5.0  # uvicorn's and vLLM's
keys_app = typer.Typer(no_args_is_help=True, help="API keys and price plans of `seekstack serve`.")
# vLLM's options whose work seekstack does otherwise: what to do instead, said in their refusal
VLLM_OPTIONS_DONE_OTHERWISE = {
    "--api-key": "keys live in the --db database: `seekstack keys create --name NAME` prints one, and once a key "
    "exists every request needs one (Authorization: Bearer KEY)",
    "--allowed-origins": "give each origin whose pages may call the server with --cors-origin ORIGIN (repeatable)",
    "--enable-auto-tool-choice": "tool calling is always on: a chat's tools and tool_choice are served in "
    "DeepSeek-V3's tool-call format; drop the option",
    "--tool-call-parser": "the tool-call parser is always DeepSeek-V3's (vLLM's deepseek_v3), on without an option; "
    "drop the option",
    "--generation-config": "the checkpoint's generation_config.json always gives the sampling fields a request leaves "
    "unset their defaults, as vLLM's auto; drop the option",
    "--enable-request-id-headers": "every response carries an X-Request-Id header; drop the option",
    "--enable-lora": "adapters are always on: give each with --adapter NAME=DIR (vLLM's --lora-modules) or POST "
    "/v1/load_lora_adapter; drop the option",
    "--max-cpu-loras": "every loaded adapter stays on the model's device, up to --max-loras; none wait in a CPU "
    "cache: drop the option",
    "--lora-dtype": "adapters are served in the model's dtype (--dtype); drop the option",
    "--fully-sharded-loras": "serve runs in one process without tensor parallelism (--device-map places whole "
    "layers), so adapters are not sharded; drop the option",
}

VLLM_LORA_MODULE_KEYS = {"name", "path", "base_model_name"}  # vLLM's --lora-modules JSON form


class ServeCommand(Command):
    """`seekstack serve`, whose refusal of a vLLM option it has no such option for says what to do instead, and which
    reads vLLM's `--lora-modules A=X B=Y` (several values after the flag) as the flag before each."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        spread: list[str] = []
        in_modules = False  # after --lora-modules: serve takes no argument but options, so a word there is a module
        for arg in args:
            if arg.startswith("-"):
                in_modules = arg == "--lora-modules"
            elif in_modules and spread[-1] != "--lora-modules":
                spread.append("--lora-modules")
            spread.append(arg)
        try:
            return super().parse_args(ctx, spread)
        except NoSuchOption as error:
            instead = VLLM_OPTIONS_DONE_OTHERWISE.get(error.option_name)
            if instead is None:
                raise
            message = f"No such option: {error.option_name} (vLLM's); {instead}"
            raise NoSuchOption(error.option_name, message, ctx=ctx) from None


def _run_name(ctx: typer.Context, model: Path) -> str | None:
    """The name of the run whose newest checkpoint `model` is, if the user named a run (its out_dir or its checkpoints/
    folder): an id that stays as the run trains on (its checkpoint's folder, step_N, does not), its out_dir's name
    whichever the user gave (not "checkpoints", which every run has)."""
    return run_holding(model).resolve().name if run_given(ctx, model) else None


def serve_command(
    ctx: typer.Context,
    model: Annotated[
        Path,
        typer.Option(
            help="Checkpoint directory (with tokenizer.json unless --tokenizer) or a run's out_dir (its newest)",
            callback=run_to_checkpoint,
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on; without API keys only loopback is allowed")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    db: DatabaseOption = None,
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizer.json or its folder, if not in --model")] = None,
    served_model_name: Annotated[
        str | None,
        typer.Option(help="Model id in the API, not blank; default the folder's name (a run out_dir's own name)"),
    ] = None,
    max_batch_size: Annotated[
        int,
        typer.Option(
            "--max-batch-size",
            "--max-num-seqs",
            min=1,
            help="Requests decoded together (vLLM's --max-num-seqs); more wait",
        ),
    ] = EngineOptions.max_batch_size,
    max_model_len: Annotated[
        int | None,
        typer.Option(min=1, help="Prompt + completion tokens per request; default the model's context"),
    ] = None,
    speculative: Speculative = EngineOptions.speculative,
    draft_tokens: DraftTokens = EngineOptions.draft_tokens,
    adaptive_drafts: AdaptiveDrafts = EngineOptions.adaptive_drafts,
    draft_vocab: DraftVocab = EngineOptions.draft_vocab,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile/--no-compile",
            help="Decode steps through torch.compile from the first step (~2x faster steps after ~5-60 s compiling); "
            "off by default, unlike generate and chat: a compile while serving would stall every stream",
        ),
    ] = False,
    dtype: Dtype = EngineOptions.dtype,
    device: Device = EngineOptions.device,
    kv_cache_memory: KvCacheMemory = None,
    device_map: DeviceMap = None,
    offload_dir: OffloadDir = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            "--lora-modules",
            help='NAME=DIR (or vLLM\'s JSON form, {"name": NAME, "path": DIR}): a LoRA adapter folder served as '
            "model NAME (repeatable; one batch for all; vLLM's --lora-modules)",
        ),
    ] = None,
    max_loras: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="LoRA adapters served at once, as vLLM's (a load past it is refused); default 8, or the --adapter "
            "folders given where more",
        ),
    ] = None,
    max_lora_rank: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="The largest LoRA rank served, as vLLM's (a load past it is refused); default 16, or the largest "
            "--adapter rank where more",
        ),
    ] = None,
    max_body_bytes: Annotated[
        int | None, typer.Option(min=1, help="Larger request bodies are refused with 413; default 4 MiB")
    ] = None,
    threads: Threads = None,
    moderation_policy: Annotated[
        Path | None, typer.Option(help="Content-safety policy (.yaml/.toml/.json): categories, terms, actions")
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(help="A web origin whose pages may call the API (repeatable), e.g. https://x.org"),
    ] = None,
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds SIGTERM or Ctrl-C lets requests in flight finish; those still running then are cut off (503, "
            "not charged), as a second Ctrl-C cuts them at once",
        ),
    ] = DEFAULT_SHUTDOWN_TIMEOUT_S,
    timeout_keep_alive: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds an idle connection is kept open for the next request (as vLLM's): above a load balancer's "
            "idle timeout, lest it reuse a connection the server has just closed (502)",
        ),
    ] = DEFAULT_KEEP_ALIVE_S,
    reasoning_parser: Annotated[
        str | None,
        typer.Option(
            help="deepseek_r1: chat replies in the R1 format (<think> ... </think> answer, from `seekstack sft "
            "task=...` or `seekstack rl`) answer with the reasoning in message.reasoning_content, as vLLM's flag"
        ),
    ] = None,
    chat_page: Annotated[
        bool, typer.Option(help="The chat page at / (off: / answers 404, as llama-server's --no-webui)")
    ] = True,
    enable_log_requests: Annotated[
        bool,
        typer.Option(
            "--enable-log-requests/--disable-log-requests",
            help="Log a line as each generation request is received (id, model, tokens) and finishes (status, tokens, "
            "seconds), as vLLM's",
        ),
    ] = False,
    disable_log_stats: Annotated[
        bool,
        typer.Option(
            "--disable-log-stats",
            help="No stats line (throughput, requests running and waiting, cache usage) every 10 s of work, as vLLM's",
        ),
    ] = False,
) -> None:
    """Serve a checkpoint over an OpenAI-compatible API (/v1/chat/completions, /v1/completions), chat page at /."""
    from seekstack.serve.database import default_database_location
    from seekstack.serve.launch import ServeOptions, build_server, check_listenable, run_server

    with user_errors():
        if threads is not None:  # from 1 to the CPUs (`thread_count`)
            import torch

            torch.set_num_threads(threads)
        with options_named():
            engine = EngineOptions(
                max_batch_size=max_batch_size, max_model_len=max_model_len, speculative=speculative,
                draft_tokens=draft_tokens, adaptive_drafts=adaptive_drafts, draft_vocab=draft_vocab, compile=compile,
                dtype=dtype, device=device, kv_cache_memory=kv_cache_memory, device_map=device_map,
                offload_dir=offload_dir,
            ).validate()  # fmt: skip
        refuse_drafting_without_speculation(ctx)
        if served_model_name is not None and not served_model_name.strip():
            raise typer.BadParameter(
                f"{served_model_name!r}, a blank model id (a shell variable left unset?): give the id requests name as "
                "their model, or leave the option out to serve under the folder's name",
                ctx,
                param_hint="'--served-model-name'",
            )
        check_listenable(host, port)  # before the dtype note and the weights
        adapters = _named_adapters(adapter or [])
        if max_loras is not None and len(adapters) > max_loras:  # the engine's refusal names its keywords, not these
            raise typer.BadParameter(
                f"{max_loras} is fewer than the {len(adapters)} --adapter folders given "
                f"({shown_value(', '.join(adapters), str)}), "
                f"each served from the start: give --max-loras {len(adapters)} or more, or fewer --adapter",
                ctx,
                param_hint="'--max-loras'",
            )
        options = ServeOptions(
            host=host, port=port, database=db or default_database_location(), tokenizer=tokenizer,
            served_model_name=served_model_name or _run_name(ctx, model), engine=engine,
            adapters=adapters, max_loras=max_loras, max_lora_rank=max_lora_rank,
            moderation_policy=moderation_policy, cors_origins=tuple(cors_origin or ()),
            reasoning_parser=reasoning_parser, chat_page=chat_page, log_requests=enable_log_requests,
            log_stats=not disable_log_stats,
        )  # fmt: skip
        if max_body_bytes is not None:
            options.max_body_bytes = max_body_bytes
        with options_named({"moderation_policy"}):  # a policy file's errors, as --kv-cache-memory's
            server_app, summary = build_server(model, options, before_loading=lambda: tell_dtype(engine, model))
    typer.echo(summary)
    run_server(server_app, host, port, shutdown_timeout, timeout_keep_alive)


def _named_adapters(values: list[str]) -> dict[str, Path]:
    """`--adapter NAME=DIR` values, or vLLM's `{"name": NAME, "path": DIR}` (its base_model_name taken without effect:
    an adapter's parent is the model served), as {NAME: DIR}; ValueError for a malformed or repeated name."""
    adapters: dict[str, Path] = {}
    for value in values:
        if value.lstrip().startswith("{"):  # vLLM's JSON form
            try:
                module = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"--adapter {shown_value(value)}: not JSON ({error})") from None
            name, folder = module.get("name"), module.get("path")
            if not (isinstance(name, str) and isinstance(folder, str)) or set(module) - VLLM_LORA_MODULE_KEYS:
                raise ValueError(
                    f'--adapter {shown_value(value)}: expected {{"name": NAME, "path": DIR}} (vLLM\'s form; its '
                    "base_model_name is taken too)"
                )
        else:
            name, equals, folder = value.partition("=")
            if not equals:
                raise ValueError(f"--adapter {value!r}: expected NAME=DIR, e.g. --adapter legal=runs/legal")
        if not name.strip() or not folder.strip():  # either form: legal=, {"name": "legal", "path": ""}
            blank = "name" if not name.strip() else "folder"
            raise ValueError(
                f"--adapter {shown_value(value)}: the adapter's {blank} is blank (a shell variable left unset?); give "
                'NAME=DIR, e.g. --adapter legal=runs/legal, or vLLM\'s {"name": NAME, "path": DIR}'
            )
        if name in adapters:
            raise ValueError(f"--adapter {name}=...: the name is given twice")
        adapters[name] = Path(folder)
    return adapters


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who the key is for; names it in `keys list` and `usage`")],
    rpm: Annotated[
        int | None, typer.Option(min=1, max=MAX_LIMIT, help="Requests per minute; default unlimited")
    ] = None,
    tpm: Annotated[
        int | None, typer.Option(min=1, max=MAX_LIMIT, help="Prompt + completion tokens per minute; default unlimited")
    ] = None,
    plan: Annotated[str, typer.Option(help="Price plan (see `keys plan`)")] = "default",
    admin: Annotated[bool, typer.Option(help="May read everyone's usage at /v1/admin/usage")] = False,
    model: Annotated[
        list[str] | None, typer.Option(help="A model (or adapter) the key may use (repeatable); default all")
    ] = None,
    expires_in: Annotated[
        str | None, typer.Option(help="Refused from this long after now on: 30s, 15m, 12h, 90d; default never")
    ] = None,
    max_budget: Annotated[
        float | None, typer.Option(help="Refused once its name's usage has cost this much (> 0); default no budget")
    ] = None,
    budget_duration: Annotated[
        str | None, typer.Option(help="The budget is of the usage of this last while (30d, 12h); default all of it")
    ] = None,
    db: DatabaseOption = None,
) -> None:
    """Create an API key and print it: it is shown this once and stored only as a hash. A name whose keys are all
    revoked may be used again."""
    from seekstack.serve.keys import Budget, KeyStore, parse_duration

    with user_errors():
        models = tuple(model) if model else None
        expires_at = None if expires_in is None else time.time() + parse_duration(expires_in, "--expires-in")
        if budget_duration is not None and max_budget is None:
            fail("--budget-duration is the period of a budget: give --max-budget too")
        period_s = None if budget_duration is None else parse_duration(budget_duration, "--budget-duration")
        budget = None if max_budget is None else Budget(max_budget, period_s)
        store = KeyStore(_database(db))
        key = store.create(name, plan=plan, rpm=rpm, tpm=tpm, admin=admin, models=models, expires_at=expires_at,
                           budget=budget)  # fmt: skip
    _show_new_key(store, key, f"created key {name!r}")


@keys_app.command("list", cls=JsonErrorsCommand)
def keys_list(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON, a record per key (times in Unix seconds)")
    ] = False,
    db: DatabaseOption = None,
) -> None:
    """All keys (by name and first characters), their plan, limits, models and state: a table, one line per key, where
    the terminal is wide enough for it, else a block per key whose lines wrap between words; or JSON."""
    from rich.console import Console
    from rich.table import Table

    from seekstack.serve.keys import KeyStore

    with user_errors(as_json):
        keys = KeyStore(_database(db, existing=True)).list()
    if as_json:
        typer.echo(json.dumps([key.to_dict() for key in keys], indent=2))
        return
    table = Table(title="API keys")
    budgets = any(key.budget for key in keys)  # a column for them where a key has one
    columns = ("name", "key", "plan", "rpm", "tpm", *(["budget"] if budgets else []), "models", "admin",
               "created (UTC)", "state")  # fmt: skip
    for column in columns:
        _add_column(table, column, whole=column in ("key", "rpm", "tpm", "admin"))
    for key in keys:
        limits = [str(limit) if limit else "-" for limit in (key.rpm, key.tpm)]
        admin = "yes" if key.admin else ""
        row = (key.name, _listed_prefix(key), key.plan, *limits, *([_budget(key)] if budgets else []), _models(key),
               admin, _utc(key.created_at), _state(key))  # fmt: skip
        table.add_row(*row)
    console = Console(markup=False)
    if _table_width(console, table, folded_to=None) <= console.width:
        console.print(table)
        return
    # Nine columns fold the words of dates, plans and headers in 80 columns ('defa/ult', 'crea/ted'): a block per key,
    # its lines wrapped between words, instead
    typer.echo("API keys (times in UTC)")
    for key in keys:
        _echo_block(f"{key.name}  {_listed_prefix(key)}  {_state(key)}",
                    f"{_terms(key)}; created {_utc(key.created_at)}", width=console.width)  # fmt: skip


def _table_width(console: Console, table: Table, folded_to: int | None) -> int:
    """The columns `table` needs on one line, its folding columns (names) each `folded_to` wide where wider (None: not
    folded). Rich squeezes a table into the terminal however narrow, down to folding columns of no width at all (80
    columns showed a usage table of two models with neither key nor model): a table wider than this is not printed."""
    from rich.measure import Measurement

    unbounded = console.options.update_width(2**16)  # measured against the terminal, a table never exceeds it
    width = console.measure(table, options=unbounded).maximum
    for column in table.columns:
        if folded_to is not None and column.overflow == "fold":
            widest = max(Measurement.get(console, unbounded, text).maximum for text in (column.header, *column.cells))
            width -= max(widest - folded_to, 0)
    return width


def _echo_block(head: str, *details: str, width: int) -> None:
    """One table row as a block: its `head` line, then its `details` lines indented, each wrapped between words to
    `width` (`analytics-team` is one word, not two)."""
    for line, indent in ((head, ""), *((detail, "    ") for detail in details)):
        typer.echo(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False))


def _listed_prefix(key: ApiKey) -> str:
    """The first characters of `key`, as `keys list` shows it."""
    return key.prefix + "..."


def _state(key: ApiKey) -> str:
    """`active` (and when it expires, if it does), `expired` when it has, or when `key` was revoked."""
    if key.revoked_at is not None:
        return f"revoked {_utc(key.revoked_at)}"
    if key.expires_at is None:
        return "active"
    return f"{'expired' if key.expired(time.time()) else 'active, expires'} {_utc(key.expires_at)}"


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="Name of the key")], db: DatabaseOption = None) -> None:
    """Revoke a key; the server refuses it from the next request on."""
    from seekstack.serve.keys import KeyStore

    with user_errors():
        KeyStore(_database(db, existing=True)).revoke(name)
    typer.echo(f"revoked key {name!r}")


@keys_app.command("rotate")
def keys_rotate(name: Annotated[str, typer.Argument(help="Name of the key")], db: DatabaseOption = None) -> None:
    """Replace a key (one that leaked): revoke it and print a new one under its name, with its plan, limits, models
    and admin flag; its usage, old and new, shows under the name."""
    from seekstack.serve.keys import KeyStore

    with user_errors():
        store = KeyStore(_database(db, existing=True))
        key = store.rotate(name)
    _show_new_key(store, key, f"rotated key {name!r}: the old one is revoked")


def _show_new_key(store: KeyStore, key: str, done: str) -> None:
    """Print a new key alone on stdout (for scripts), and on stderr what was done, that it is shown only now, and
    its plan, limits, models, admin flag and expiry."""
    typer.echo(key)
    typer.echo(f"{done}; copy it now, it cannot be shown again", err=True)
    new = store.verify(key)
    typer.echo(_terms(new) + ("" if new.expires_at is None else f"; {_state(new)} UTC"), err=True)


def _terms(key: ApiKey) -> str:
    """`key`'s plan, limits, models, admin flag and budget in one line, as a new key's summary and `keys list` show
    them."""
    rpm, tpm = ("unlimited" if limit is None else str(limit) for limit in (key.rpm, key.tpm))
    admin = "yes" if key.admin else "no"
    budget = "" if key.budget is None else f", budget {_budget(key)}"
    return f"plan {key.plan!r}, rpm {rpm}, tpm {tpm}, models {_models(key)}, admin {admin}{budget}"


def _budget(key: ApiKey) -> str:
    """`key`'s budget as `keys list` shows it: `10`, `10 per 30d`, or `-` for none."""
    from seekstack.serve.keys import format_amount, format_duration

    if key.budget is None:
        return "-"
    period = "" if key.budget.period_s is None else f" per {format_duration(key.budget.period_s)}"
    return f"{format_amount(key.budget.amount)}{period}"


def _models(key: ApiKey) -> str:
    """The models `key` may use, as `keys list` and a new key's summary show them."""
    return "all" if key.models is None else ", ".join(key.models)


@keys_app.command("plan")
def keys_plan(
    name: Annotated[str | None, typer.Argument(help="Plan to create or change; none: list the plans")] = None,
    prompt_price: Annotated[float | None, typer.Option(help="Price per 1k prompt tokens (finite, >= 0)")] = None,
    completion_price: Annotated[
        float | None, typer.Option(help="Price per 1k completion tokens (finite, >= 0)")
    ] = None,
    cached_prompt_price: Annotated[
        float | None,
        typer.Option(help="Price per 1k prompt tokens read from the prefix cache (finite, >= 0); default prompt"),
    ] = None,
    db: DatabaseOption = None,
) -> None:
    """Set a plan's prices per 1k tokens (requests that come after are billed at them; those under way keep the
    prices they came with), or list the plans."""
    from seekstack.serve.keys import KeyStore, format_amount

    with user_errors():
        if name is None and (prompt_price, completion_price, cached_prompt_price) != (None, None, None):
            fail("prices are set on a plan: name it, e.g. `seekstack keys plan pro --prompt-price 0.5 ...`")
        store = KeyStore(_database(db, existing=name is None))
        if name is not None:
            current = next((plan for plan in store.plans() if plan.name == name), None)
            if current is None and (prompt_price is None or completion_price is None):
                fail(f"new plan {name!r} needs both --prompt-price and --completion-price")
            store.set_plan(
                name,
                current.prompt_per_1k if prompt_price is None else prompt_price,
                current.completion_per_1k if completion_price is None else completion_price,
                current.cached_prompt_per_1k if cached_prompt_price is None and current else cached_prompt_price,
            )
        plans = store.plans()
    for plan in plans:
        prompt, completion = format_amount(plan.prompt_per_1k), format_amount(plan.completion_per_1k)
        cached = plan.cached_prompt_per_1k
        cached_note = "" if cached is None else f" ({format_amount(cached)} for cached prompt tokens)"
        typer.echo(f"{plan.name}: {prompt} / {completion} per 1k prompt / output tokens{cached_note}")


def usage_command(
    key: Annotated[str | None, typer.Option(help="Only this key (by name)")] = None,
    since: Annotated[str | None, typer.Option(help="From this UTC day on, YYYY-MM-DD")] = None,
    until: Annotated[str | None, typer.Option(help="To this UTC day, itself included, YYYY-MM-DD")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model (the base or a LoRA adapter, by name)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, as GET /v1/admin/usage returns")] = False,
    db: DatabaseOption = None,
) -> None:
    """Requests, tokens (prompt, of them cached, completion) and cost per key, day and model (the base or an adapter),
    from the server's usage ledger."""
    from rich.console import Console
    from rich.table import Table

    from seekstack.serve.keys import KeyStore, format_cost
    from seekstack.serve.ledger import Ledger, parse_day, total_cost

    with user_errors(as_json):
        database = _database(db, existing=True)
        ledger = Ledger(database)
        days = ledger.daily(key, parse_day(since) if since else None, model, parse_day(until) if until else None)
        if key is not None and not days and not KeyStore(database).knows(key) and not ledger.knows(key):
            fail(f"no key named {key!r} in {database.location}, and no usage recorded for one; "
                 "`seekstack keys list` shows the keys", as_json)  # fmt: skip
        if (key is not None or model is not None) and not days and not as_json:  # a table of zeros would say less
            typer.echo(
                "no usage recorded"
                + (f" for key {key!r}" if key is not None else "")
                + (f" {'of' if key is not None else 'for'} model {model!r}" if model is not None else "")
                + (f" since {since}" if since else "")
                + (f" until {until}" if until else "")
            )
            return
    if as_json:
        typer.echo(json.dumps([day.to_dict() for day in days], indent=2))
        return
    by_model = len({day.model for day in days}) > 1  # a column for it where adapters served too (--json always has it)
    title = "usage per key, day (UTC) and model" if by_model else "usage per key and day (UTC)"
    table = Table(title=title + (f" of model {model}" if model else ""))
    _add_column(table, "day", whole=True)
    _add_column(table, "key")
    if by_model:
        _add_column(table, "model")
    # a column for the prompt tokens read from the prefix cache where there are some: a plan's cached price bills them
    cached = any(day.cached_tokens for day in days)
    numbers = ("requests", "failed\n(5xx,\nfree)", "prompt\ntokens", *(["of them\ncached"] if cached else []),
               "completion\ntokens", "cost")  # fmt: skip
    for header in numbers:
        _add_column(table, header, whole=True, justify="right")
    rows = [
        (day.day, day.key_name or "(open)", *([day.model] if by_model else []), str(day.requests), str(day.failed),
         f"{day.prompt_tokens:,}", *([f"{day.cached_tokens:,}"] if cached else []), f"{day.completion_tokens:,}",
         format_cost(day.cost))
        for day in days
    ]  # fmt: skip
    rows.append((
        "total", "", *([""] if by_model else []), str(sum(d.requests for d in days)), str(sum(d.failed for d in days)),
        f"{sum(d.prompt_tokens for d in days):,}", *([f"{sum(d.cached_tokens for d in days):,}"] if cached else []),
        f"{sum(d.completion_tokens for d in days):,}", format_cost(total_cost(days)),
    ))  # fmt: skip
    for row in rows:
        table.add_row(*row)
    console = Console(markup=False)
    if _table_width(console, table, folded_to=USAGE_NAMES_FOLDED_TO) <= console.width:
        console.print(table)
        return
    # too narrow for the numbers whole beside the names folded: a block per row, its names on its first line
    typer.echo(table.title)
    for row in rows:
        names, values = row[: -len(numbers)], row[-len(numbers) :]
        terms = ", ".join(f"{' '.join(header.split())} {value}" for header, value in zip(numbers, values, strict=True))
        _echo_block("  ".join(name for name in names if name), terms, width=console.width)


def _add_column(table: Table, header: str, whole: bool = False, justify: JustifyMethod = "left") -> None:
    """A column of a table the terminal's width may squeeze: a `whole` one (a number, a day, a key's prefix) does not
    wrap, and the others are squeezed first, their text folding onto more lines rather than cut with an ellipsis (an
    80-column terminal showed tpm 200000 as '2000…' and each day as '2026-12-…')."""
    table.add_column(header, justify=justify, no_wrap=whole, overflow="ellipsis" if whole else "fold")


def _database(location: str | None, existing: bool = False) -> Database:
    """The keys-and-usage database; `existing`: for commands that only read it, a SQLite file that is not there is
    an error rather than a new empty database."""
    from seekstack.serve.database import default_database_location, open_database

    return open_database(location or default_database_location(), create=not existing)


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(timestamp))


def register(app: typer.Typer) -> None:
    app.command("serve", cls=ServeCommand)(serve_command)
    app.add_typer(keys_app, name="keys")
    app.command("usage", cls=JsonErrorsCommand)(usage_command)
