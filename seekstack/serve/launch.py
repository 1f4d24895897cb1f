"""Building and running the server for `seekstack serve`: engine, database, app, uvicorn."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

import uvicorn
from fastapi import FastAPI
from uvicorn.config import LOGGING_CONFIG, STARTUP_FAILURE

from seekstack.adapters.registry import refuse_adapters_past_capacity
from seekstack.infer.engine import Engine, checkpoint_files
from seekstack.infer.json_mode import grammar_tokenizer_of
from seekstack.infer.params import EngineOptions
from seekstack.infer.placement import disk_parts_note, runtime_device
from seekstack.schema import ConfigError, option_name
from seekstack.serve.access import DEFAULT_MAX_BODY_BYTES
from seekstack.serve.app import CUT_OFF, create_app
from seekstack.serve.database import default_database_location, open_database
from seekstack.serve.keys import KeyStore
from seekstack.serve.moderation import Policy
from seekstack.serve.reasoning import check_reasoning_parser

log = logging.getLogger("seekstack.serve")


@dataclass
class ServeOptions:
    """Everything `seekstack serve` takes besides the model directory."""

    host: str = "127.0.0.1"
    port: int = 8000
    database: str = field(default_factory=default_database_location)  # SQLite path or postgresql:// URL
    tokenizer: Path | None = None
    served_model_name: str | None = None
    engine: EngineOptions = field(default_factory=EngineOptions)
    adapters: dict[str, Path] = field(default_factory=dict)  # LoRA adapters by model name (seekstack.adapters)
    max_loras: int | None = None  # adapters served at once (vLLM's); None: 8, or the adapters given where more
    max_lora_rank: int | None = None  # their largest rank (vLLM's); None: 16, or the largest given where more
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413
    moderation_policy: Path | None = None  # content-safety policy file (seekstack.serve.moderation)
    cors_origins: tuple[str, ...] = ()  # web origins whose pages may call the API from a browser
    reasoning_parser: str | None = None  # "deepseek_r1": chat replies' reasoning in reasoning_content
    chat_page: bool = True  # the chat page at /
    log_requests: bool = False  # a log line as each generation request is received and finishes (vLLM's default: off)
    log_stats: bool = True  # the engine's throughput in the log every 10 s of work


def build_server(
    model_dir: str | os.PathLike, options: ServeOptions, before_loading: Callable[[], None] = lambda: None
) -> tuple[FastAPI, str]:
    """The app for `model_dir` and a line telling the user where it listens and whether keys are required;
    `before_loading` runs once every option is checked, before the weights load (the CLI's dtype note, which came
    before a policy file's usage error)."""
    check_listenable(options.host, options.port)  # before the weights load
    check_reasoning_parser(options.reasoning_parser)
    check_cors_origins(options.cors_origins)
    # the checkpoint's files, its tokenizer loaded, before the database is opened: a failed start would leave a new one
    config, tokenizer = checkpoint_files(Path(model_dir), options.tokenizer)
    device = runtime_device(options.engine.device)
    with capacity_named_as_its_options():  # before the weights, as --max-loras is
        adapters = refuse_adapters_past_capacity(
            config, options.adapters, options.max_loras, options.max_lora_rank, device, options.engine.device_map
        )
    database = open_database(options.database)
    open_access = not KeyStore(database).any_keys()
    if open_access and not _is_loopback(options.host):
        raise ValueError(
            f"no API keys in {database.location}: refusing to serve without authentication on {options.host}; "
            "create one with `seekstack keys create --name NAME` or serve on 127.0.0.1"
        )
    policy = load_policy(options.moderation_policy) if options.moderation_policy else None  # before weights load
    if policy is not None:
        warn_of_unknown_scopes(policy, options.moderation_policy, KeyStore(database))
    before_loading()
    with capacity_named_as_its_options():  # once the weights have loaded, in their dtype, in the memory they left
        engine = Engine.from_pretrained(
            model_dir, tokenizer=tokenizer, adapters=adapters, max_loras=options.max_loras,
            max_lora_rank=options.max_lora_rank, **options.engine.engine_kwargs(model_dir),
        )  # fmt: skip
    note = disk_parts_note(options.engine.device_map, engine.model)
    if note is not None:  # as generate and chat say it
        print(note, file=sys.stderr)
    check_cache_holds_context(engine, options.engine)
    grammar_tokenizer_of(engine.tokenizer)  # JSON mode's token trie, now rather than at the first JSON request
    app = create_app(engine, database, options.served_model_name, options.max_body_bytes, policy, options.cors_origins,
                     options.reasoning_parser, options.chat_page, options.log_requests, options.log_stats)  # fmt: skip
    name = app.state.server.model_name
    if name in options.adapters:
        raise ValueError(f"--adapter {name}=...: the name is the base model's; give the adapter another name")
    if options.adapters:
        name += " with adapters " + ", ".join(repr(adapter) for adapter in options.adapters)
    access = (
        "OPEN: no API keys configured, anyone on this machine can use it"
        if open_access
        else f"API keys required (from {database.location})"
    )
    page = " (chat page at /)" if options.chat_page else ""
    host = f"[{options.host}]" if ":" in options.host else options.host  # an IPv6 address, as a URL writes it
    address = f"http://{host}:{options.port}"
    if options.port == 0:  # the system picks a free port as uvicorn listens, after this line; uvicorn's line names it
        address = f'http://{host} (a free port: see "Uvicorn running on" below)'
    return app, f"serving {name!r} on {address}{page}; {access}"


@contextmanager
def capacity_named_as_its_options() -> Iterator[None]:
    """The adapters' capacity refused (a ConfigError of max_loras or max_lora_rank, the engine's keywords) as a
    ValueError naming the option (--max-loras, --max-lora-rank)."""
    try:
        yield
    except ConfigError as error:
        if error.field not in ("max_loras", "max_lora_rank"):
            raise
        raise ValueError(error.naming(option_name(error.field))) from None


def load_policy(path: Path) -> Policy:
    """The content-safety policy in `path`; a ConfigError of field moderation_policy (`--moderation-policy` on the
    command line, a usage error as any other option's bad value) saying what in the file is wrong."""
    try:
        return Policy.load(path)
    except ConfigError as error:
        raise ConfigError(f": {error}", field="moderation_policy") from None


def warn_of_unknown_scopes(policy: Policy, path: Path, store: KeyStore) -> None:
    """Log the plans and keys the policy file at `path` names that `store`'s database does not have (it may gain
    them later): a misspelled one leaves its keys under every category, with no other sign."""
    known = {"plan": {plan.name for plan in store.plans()}, "key": {key.name for key in store.list()}}
    for kind, scopes in (("plan", policy.plans), ("key", policy.keys)):
        for name in sorted(set(scopes) - known[kind]):
            log.warning("%s: %ss.%s: no %s %r in the database %s (yet), so this entry applies to no key", path, kind,
                        name, kind, name, store.database.location)  # fmt: skip


def check_cors_origins(origins: tuple[str, ...]) -> None:
    """ValueError naming --cors-origin for a value unlike the `Origin` a browser sends (scheme://host[:port] in lower
    case, no path or trailing slash): CORS would refuse every page of the origin meant, with no sign on the server."""
    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and (not parts.netloc or origin != f"{parts.scheme}://{parts.netloc.lower()}"):
            raise ValueError(
                f"--cors-origin {origin!r}: not a web origin as browsers send it; give scheme://host[:port] in lower "
                "case, e.g. https://app.example (no path, no trailing slash), or * for any"
            )


def check_listenable(host: str, port: int) -> None:
    """ValueError naming --port when it is out of range, --host when it does not resolve, and --port when
    `host`:`port` cannot be listened on (another server there, a privileged port), found by binding it once as
    uvicorn will."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: must be between 0 and 65535")
    family, kind, address = _resolved(host, port)
    try:
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
            probe.bind(address)
    except OSError as error:
        raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({error.strerror or error})") from None


def _resolved(host: str, port: int) -> tuple[socket.AddressFamily, socket.SocketKind, tuple]:
    """The family, socket kind and address uvicorn listens on for `host`:`port`; ValueError naming --host when
    `host` is neither an address nor a name this machine resolves."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ValueError(
            f"--host {host}: not an address or a host name this machine resolves ({error.strerror})"
        ) from None
    return family, kind, address


def check_cache_holds_context(engine: Engine, options: EngineOptions) -> None:
    """ValueError naming --max-model-len and --kv-cache-memory when the latent cache cannot hold one request of
    max_model_len tokens, as vLLM refuses to start: the server would answer every call without max_tokens with 400."""
    longest = engine.longest_cached_request
    if engine.max_model_len <= longest:
        return
    context = (
        f"--max-model-len {options.max_model_len}"
        if options.max_model_len
        else f"max_model_len {engine.max_model_len} (the model's context; --max-model-len)"
    )
    budget = (
        f"--kv-cache-memory {options.kv_cache_memory}"
        if options.kv_cache_memory
        else "the cache (half the free device memory; --kv-cache-memory)"
    )
    raise ValueError(
        f"{context} is more than the latent cache holds: {budget} holds {engine.cache.num_blocks - 1} blocks of "
        f"{engine.cache.block_size} tokens, requests of at most {longest} tokens; lower --max-model-len to {longest} "
        "or raise --kv-cache-memory"
    )


# uvicorn's logging, which also writes the server's own lines (seekstack.serve) from INFO on, as uvicorn's: request and
# stats lines, warnings; uvicorn's own from INFO on too (log_level): its start and, as SIGTERM stops it, "Shutting down"
# and "Waiting for connections to close", as vLLM's log has them; no line per HTTP request (access_log)
LOG_CONFIG = {
    **LOGGING_CONFIG,
    "loggers": {**LOGGING_CONFIG["loggers"], log.name: {"handlers": ["default"], "level": "INFO", "propagate": False}},
}


def run_server(app: FastAPI, host: str, port: int, shutdown_timeout_s: float, keep_alive_s: float) -> None:
    """Serve `app` with uvicorn until SIGTERM or Ctrl-C, which let the requests running finish for up to
    `shutdown_timeout_s` seconds, then cut them off (as a second Ctrl-C does at once): the ledger records those as the
    server's failures (app.SERVER_STOPPED) and their rate-limit charges are settled. An idle connection is closed
    after `keep_alive_s` seconds."""
    config = uvicorn.Config(
        app, host=host, port=port, log_config=LOG_CONFIG, log_level="info", access_log=False,
        timeout_graceful_shutdown=shutdown_timeout_s, timeout_keep_alive=keep_alive_s,
    )  # fmt: skip
    server = QuietCutOffs(config)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


class QuietCutOffs(uvicorn.Server):
    """uvicorn's server, which, once stopping, logs one line for each request it cuts off (past the shutdown timeout,
    or at a second Ctrl-C), not its cancellation's traceback, and nothing for the application shutdown a forced exit
    skips. A second Ctrl-C sets the app's `Server.stop_now`: its shutdown then waits no longer, not even for an engine
    step in progress (a compile's, minutes)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        logging.getLogger("uvicorn.error").addFilter(cut_off_in_one_line)
        if self.force_exit:
            self.config.app.state.server.stop_now.set()


def cut_off_in_one_line(record: logging.LogRecord) -> bool:
    """A log filter for a stopping server: the traceback of a request's cancellation becomes one line, a warning as
    app's for a request cut off before its response began; the lifespan's (a traceback as text, ending with the
    cancellation) is dropped."""
    if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
        record.msg, record.args, record.exc_info, record.exc_text = CUT_OFF, (), None, None
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True
    return not record.getMessage().rstrip().endswith("CancelledError")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
