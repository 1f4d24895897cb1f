"""The `seekstack` command line. Each command parses its arguments, calls the library and prints."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, NoReturn

import torch
import typer
from rich.console import Console
from rich.table import Table

from seekstack.accounting import (
    forward_flops_per_token,
    kv_cache_bytes_per_token,
    main_parameters,
    mtp_checkpoint_parameters,
    mtp_parameters,
    training_flops_per_token,
)
from seekstack.checkpoint import CheckpointError, load_pretrained
from seekstack.config import PRESETS, ConfigError, ModelConfig, preset
from seekstack.data.build import build_corpus, report_table
from seekstack.data.difficulty import tokenize_buckets
from seekstack.data.rules import CleaningConfig, CleaningConfigError
from seekstack.data.shards import tokenize_corpus
from seekstack.data.sources import DataSourceError, open_source
from seekstack.infer.chat import HELP, ChatSession, run_chat
from seekstack.infer.engine import Engine, completion_record
from seekstack.infer.sampling import SamplingParams
from seekstack.model.transformer import Transformer
from seekstack.serve.database import Database, default_database_location, open_database
from seekstack.serve.keys import KeyStore
from seekstack.serve.launch import ServeOptions, build_server, run_server
from seekstack.serve.ledger import Ledger, parse_day
from seekstack.tokenizer import Tokenizer, train_tokenizer
from seekstack.train.config import load_train_config
from seekstack.train.plot import plot_run
from seekstack.train.samples import DEMO_PROMPTS, demo_samples
from seekstack.train.trainer import TrainingDiverged, train

app = typer.Typer(no_args_is_help=True, add_completion=False)

Model = Annotated[str, typer.Argument(help=f"A preset ({', '.join(PRESETS)}) or a checkpoint directory.")]


def _print_version(requested: bool) -> None:
    if requested:
        typer.echo(f"seekstack {version('seekstack')}")
        raise typer.Exit()


@app.callback()
def main(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """seekstack: the DeepSeek-V3 stack in plain PyTorch."""


@app.command()
def info(
    model: Model,
    context: Annotated[int, typer.Option(min=1, help="Keys each token attends to, for the FLOPs per token.")] = 4096,
) -> None:
    """Parameters, activated parameters, FLOPs and KV-cache bytes per token, and the architecture."""
    with _user_errors():
        config = _config(model)
    main_params = main_parameters(config)
    cache = kv_cache_bytes_per_token(config, torch.bfloat16)
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    experts = f"{config.n_routed_experts} / {config.num_experts_per_tok} / {config.n_shared_experts or 0}"
    table = Table(title=f"{model} ({config.model_type})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [
        ("layers", f"{config.num_hidden_layers} ({config.num_hidden_layers - moe_layers} dense, {moe_layers} MoE)"),
        ("hidden size", str(config.hidden_size)),
        ("attention heads", str(config.num_attention_heads)),
        ("q / kv LoRA rank", f"{config.q_lora_rank or 'none'} / {config.kv_lora_rank}"),
        ("head dims nope / rope / v", f"{config.qk_nope_head_dim} / {config.qk_rope_head_dim} / {config.v_head_dim}"),
        ("experts routed / per token / shared", experts if config.n_routed_experts else "none (dense)"),
        ("expert width", str(config.moe_intermediate_size)),
        ("MTP depths", str(config.num_nextn_predict_layers)),
        ("vocabulary", f"{config.vocab_size:,}"),
        ("params, main model", _count(main_params.total)),
        ("params, MTP as stored", _count(mtp_checkpoint_parameters(config))),
        ("activated per token (head, no emb.)", _count(main_params.activated)),
        (f"forward FLOPs/token, context {context}", _flops(forward_flops_per_token(config, context))),
        (f"training FLOPs/token, seq {context}", _flops(training_flops_per_token(config, context))),
        ("KV cache/token bf16, MLA latent", _bytes(cache.latent)),
        ("KV cache/token bf16, plain MHA", _bytes(cache.mha)),
        ("KV cache MHA / latent", f"{cache.ratio:.1f}x"),
    ]
    for row in rows:
        table.add_row(*row)
    Console(markup=False).print(table)


@app.command()
def forward(
    model: Model,
    seq_len: Annotated[int, typer.Option(min=1, help="Tokens per sequence.")] = 64,
    batch: Annotated[int, typer.Option(min=1, help="Sequences in the batch.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the random weights (presets) and token ids.")] = 0,
) -> None:
    """One forward pass on random tokens: logits shape, losses, expert load per MoE layer, time taken."""
    torch.manual_seed(seed)
    with _user_errors():
        config = _config(model)
        _require_memory(model, config)
        network = Transformer(config) if model in PRESETS else load_pretrained(model)
    network.eval()
    input_ids = torch.randint(config.vocab_size, (batch, seq_len))
    start = time.perf_counter()
    with torch.inference_mode():
        output = network(input_ids, labels=input_ids)
    elapsed = time.perf_counter() - start

    console = Console(markup=False)  # paths may hold [brackets]
    console.print(f"{model}: {_count(sum(p.numel() for p in network.parameters()))} parameters")
    console.print(f"logits shape: {tuple(output.logits.shape)}")
    mtp_loss = "n/a (needs seq-len >= 3)" if output.mtp_loss is None else f"{output.mtp_loss.item():.4f}"
    console.print(f"lm loss: {output.lm_loss.item():.4f}, mtp loss: {mtp_loss}")
    console.print(f"uniform guess: ln V = {math.log(config.vocab_size):.4f}")
    if output.expert_load is not None:
        table = Table(title="expert load (tokens per routed expert)")
        table.add_column("layer", justify="right")
        table.add_column("max / mean", justify="right")
        table.add_column("tokens per expert")
        for layer_idx, load in zip(network.moe_layer_ids, output.expert_load, strict=False):
            label = f"{layer_idx} (MTP)" if layer_idx >= config.num_hidden_layers else str(layer_idx)
            table.add_row(label, f"{(load.max() / load.float().mean()).item():.2f}", " ".join(map(str, load.tolist())))
        console.print(table)
    console.print(f"forward took {elapsed * 1000:.1f} ms (batch {batch} x {seq_len} tokens on {input_ids.device})")


data_app = typer.Typer(no_args_is_help=True, help="Corpus stages: clean raw text into train/val splits.")
app.add_typer(data_app, name="data")


@data_app.command("build")
def data_build(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Folders, .txt/.jsonl/.parquet files, saved datasets; default: 'stdlib', the embedded corpus"
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder for train.jsonl, val.jsonl, report.json")] = Path(
        "data/corpus"
    ),
    field: Annotated[str, typer.Option(help="Text field of .jsonl / column of .parquet and saved datasets")] = "text",
    config: Annotated[Path | None, typer.Option(help="Cleaning thresholds (YAML); see --write-config")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Fraction of documents held out for validation")] = None,
    write_config: Annotated[Path | None, typer.Option(help="Write the default thresholds as YAML, exit")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Clean a corpus: quality rules, exact and near-duplicate removal, PII scrubbing, a stable split, a report."""
    with _user_errors():
        if write_config is not None:
            CleaningConfig().to_yaml(write_config)
            typer.echo(f"wrote the default cleaning thresholds to {write_config}")
            return
        cleaning = CleaningConfig.from_yaml(config) if config is not None else CleaningConfig()
        if val_fraction is not None:
            cleaning = dataclasses.replace(cleaning, val_fraction=val_fraction)
        sources = [open_source(spec, field) for spec in inputs or ["stdlib"]]
        report = build_corpus(sources, out, cleaning, show_progress=progress)
    Console().print(report_table(report))
    typer.echo(f"wrote {out}/train.jsonl, {out}/val.jsonl and {out}/report.json")


@data_app.command("tokenize")
def data_tokenize(
    corpus: Annotated[Path, typer.Option(help="Folder with train.jsonl and val.jsonl (from `data build`)")],
    tokenizer: Annotated[Path, typer.Option(help="tokenizer.json or its folder")],
    out: Annotated[Path, typer.Option(help="Folder for the token shards and their index")] = Path("data/tokens"),
    buckets: Annotated[
        bool, typer.Option(help="Also write train_easy/medium/hard by difficulty (zlib ratio), for a curriculum")
    ] = False,
) -> None:
    """Encode the corpus splits into memory-mapped token shards with an index."""
    with _user_errors():
        encoder = Tokenizer.from_file(tokenizer)
        indexes = [tokenize_corpus(corpus / f"{split}.jsonl", encoder, out, split) for split in ("train", "val")]
        if buckets:
            indexes += tokenize_buckets(corpus / "train.jsonl", encoder, out, "train")
        for index in indexes:
            typer.echo(
                f"{index['split']}: {index['documents']} documents, {index['total_tokens']:,} tokens ({index['dtype']})"
            )


tokenizer_app = typer.Typer(no_args_is_help=True, help="Byte-level BPE tokenizer.")
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train(
    corpus: Annotated[Path, typer.Option(help="Folder with train.jsonl (from `data build`)")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, special tokens included")] = 4096,
    out: Annotated[Path, typer.Option(help="Folder for tokenizer.json and tokenizer_config.json")] = Path(
        "data/tokenizer"
    ),
) -> None:
    """Train a byte-level BPE tokenizer on the training split."""
    with _user_errors():
        texts = (json.loads(line)["text"] for line in (corpus / "train.jsonl").open(encoding="utf-8"))
        trained = train_tokenizer(texts, vocab_size, out)
    typer.echo(f"wrote {out}/tokenizer.json: {trained.vocab_size} tokens")


@app.command("train")
def train_command(
    config: Annotated[Path | None, typer.Argument(help="Training config (YAML/TOML/JSON); defaults otherwise")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. max_steps=200")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in out_dir")] = False,
) -> None:
    """Pretrain a model on token shards (from `data tokenize`); run under torchrun for several processes."""
    with _user_errors():
        if config is not None and "=" in str(config):  # only overrides were given
            overrides, config = [str(config), *(overrides or [])], None
        result = train(load_train_config(config, overrides or []), resume=resume)
    typer.echo(f"trained to step {result.step}; checkpoint: {result.checkpoint}")


ModelDir = Annotated[Path, typer.Option("--model", help="Checkpoint folder: config.json, safetensors, tokenizer.json")]
TokenizerPath = Annotated[Path | None, typer.Option(help="tokenizer.json or its folder, if the model folder has none")]
MaxNewTokens = Annotated[int, typer.Option(help="Most tokens to generate")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy")]
TopK = Annotated[int, typer.Option(help="Sample among the k likeliest tokens; 0 = off")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling: the smallest set with this much probability")]
Seed = Annotated[int | None, typer.Option(help="Seed of the sampling; the same seed gives the same text")]
Speculative = Annotated[bool, typer.Option(help="MTP speculative decoding (the model needs an MTP module)")]
DraftTokens = Annotated[
    int, typer.Option(min=1, help="With --speculative: tokens the MTP module drafts per step (past 1 it drafts again)")
]
Compile = Annotated[
    bool, typer.Option(help="Decode with torch.compile: a first step of ~15-30 s compiling, then ~2x faster steps")
]
Threads = Annotated[int | None, typer.Option(min=1, help="torch threads; 1 is fastest for small models on a busy CPU")]


@app.command("generate")
def generate_command(
    prompt: Annotated[str, typer.Argument(help="Text to continue")],
    model: ModelDir,
    tokenizer: TokenizerPath = None,
    max_new_tokens: MaxNewTokens = 128,
    temperature: Temperature = 1.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: Annotated[float, typer.Option(help="Drop tokens less likely than min-p x the likeliest")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages tokens already seen")] = 1.0,
    presence_penalty: Annotated[float, typer.Option(help="OpenAI presence penalty, -2..2")] = 0.0,
    frequency_penalty: Annotated[float, typer.Option(help="OpenAI frequency penalty, -2..2")] = 0.0,
    seed: Seed = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop before this text (repeatable)")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Keep going past the end-of-sequence token")] = False,
    top_logprobs: Annotated[int, typer.Option(help="With --json: log-probabilities of this many alternatives")] = 0,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt as a user turn of the chat template")] = False,
    speculative: Speculative = False,
    draft_tokens: DraftTokens = 3,
    compile: Compile = False,
    threads: Threads = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with tokens and timings")] = False,
) -> None:
    """Continue PROMPT with a checkpoint, streaming the text (or, with --json, a machine-readable result)."""
    with _user_errors():
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, seed=seed, stop=tuple(stop or ()), ignore_eos=ignore_eos,
            logprobs=as_json and top_logprobs > 0, top_logprobs=top_logprobs,
        ).validate()  # fmt: skip
        if threads:
            torch.set_num_threads(threads)
        engine = Engine.from_pretrained(
            model, tokenizer=tokenizer, max_batch_size=1, speculative=speculative, draft_tokens=draft_tokens,
            compile=compile,
        )  # fmt: skip
        encoder = engine.tokenizer
        prompt_ids = encoder.encode_chat([{"role": "user", "content": prompt}]) if chat else encoder.encode(prompt)
        if as_json:
            typer.echo(json.dumps(completion_record(engine, engine.generate([prompt_ids], params)[0]), indent=2))
            return
        for output in engine.stream(prompt_ids, params):
            typer.echo(output.text, nl=False)
    typer.echo()


@app.command("chat")
def chat_command(
    model: ModelDir,
    tokenizer: TokenizerPath = None,
    system: Annotated[str | None, typer.Option(help="System prompt")] = None,
    max_new_tokens: MaxNewTokens = 512,
    temperature: Temperature = 0.7,
    top_k: TopK = 0,
    top_p: TopP = 0.95,
    seed: Seed = None,
    speculative: Speculative = False,
    draft_tokens: DraftTokens = 3,
    compile: Compile = False,
    threads: Threads = None,
) -> None:
    """Chat in the terminal with streamed replies; /reset, /system TEXT, /quit."""
    with _user_errors():
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        ).validate()
        if threads:
            torch.set_num_threads(threads)
        engine = Engine.from_pretrained(
            model, tokenizer=tokenizer, max_batch_size=1, speculative=speculative, draft_tokens=draft_tokens,
            compile=compile,
        )  # fmt: skip
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"{engine.model_name}: {HELP}")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    run_chat(ChatSession(engine, params, system), sys.stdin, write, prompt="> " if interactive else "")


@app.command("plot")
def plot_command(
    run: Annotated[Path, typer.Argument(help="A training run's out_dir (holds metrics.jsonl)")],
    out: Annotated[Path | None, typer.Option(help="PNG to write; default RUN/curves.png")] = None,
) -> None:
    """Draw a run's loss, validation bits per byte, learning rate and MaxVio per layer to a PNG."""
    with _user_errors():
        written = plot_run(run, out)
    typer.echo(f"wrote {written}")


@app.command("sample")
def sample_command(
    model: Annotated[Path, typer.Argument(help="A checkpoint directory with its tokenizer, or a run's out_dir")],
    prompt: Annotated[list[str] | None, typer.Option(help="Prompt to continue (repeatable); default: Python")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to write per continuation")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="Temperature of the sampled continuation")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0, help="Sample among the k likeliest tokens; 0 = all")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the sampled continuation")] = 0,
) -> None:
    """Print a greedy and a sampled continuation of each prompt, generated by the inference engine."""
    with _user_errors():
        prompts = tuple(prompt) if prompt else DEMO_PROMPTS
        samples = demo_samples(model, prompts, max_new_tokens, temperature, top_k, seed)
    for text, greedy, sampled in samples:
        typer.echo(f"----- prompt {text!r}\n[greedy]\n{text}{greedy}\n[sampled, T={temperature}, top-k {top_k}]")
        typer.echo(f"{text}{sampled}\n")


DatabaseOption = Annotated[
    str | None,
    typer.Option("--db", help="Keys and usage: SQLite file or postgresql:// URL; default $SEEKSTACK_DB, seekstack.db"),
]


@app.command("serve")
def serve_command(
    model: Annotated[Path, typer.Option(help="Checkpoint directory (with tokenizer.json unless --tokenizer)")],
    host: Annotated[str, typer.Option(help="Address to listen on; without API keys only loopback is allowed")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    db: DatabaseOption = None,
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizer.json or its folder, if not in --model")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Model id in the API; default the folder name")] = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Requests decoded together")] = 16,
    max_model_len: Annotated[int | None, typer.Option(min=1, help="Prompt + completion tokens per request")] = None,
    speculative: Speculative = False,
    draft_tokens: DraftTokens = 3,
    compile: Compile = False,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
) -> None:
    """Serve a checkpoint over an OpenAI-compatible API (/v1/chat/completions, /v1/completions), chat page at /."""
    with _user_errors():
        options = ServeOptions(
            host, port, db or default_database_location(), tokenizer, served_model_name, max_batch_size, max_model_len,
            speculative, draft_tokens, dtype, compile,
        )  # fmt: skip
        server_app, summary = build_server(model, options)
    typer.echo(summary)
    run_server(server_app, host, port)


keys_app = typer.Typer(no_args_is_help=True, help="API keys and price plans of `seekstack serve`.")
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who the key is for; names it in `keys list` and `usage`")],
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute; default unlimited")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Prompt + completion tokens per minute")] = None,
    plan: Annotated[str, typer.Option(help="Price plan (see `keys plan`)")] = "default",
    admin: Annotated[bool, typer.Option(help="May read everyone's usage at /v1/admin/usage")] = False,
    db: DatabaseOption = None,
) -> None:
    """Create an API key and print it: it is shown this once and stored only as a hash."""
    with _user_errors():
        key = KeyStore(_database(db)).create(name, plan=plan, rpm=rpm, tpm=tpm, admin=admin)
    typer.echo(key)
    typer.echo(f"created key {name!r}; copy it now, it cannot be shown again", err=True)


@keys_app.command("list")
def keys_list(db: DatabaseOption = None) -> None:
    """All keys (by name and first characters), their plan, limits and state."""
    with _user_errors():
        keys = KeyStore(_database(db)).list()
    table = Table(title="API keys")
    for column in ("name", "key", "plan", "rpm", "tpm", "admin", "created (UTC)", "state"):
        table.add_column(column)
    for key in keys:
        state = "active" if key.revoked_at is None else f"revoked {_utc(key.revoked_at)}"
        limits = [str(limit) if limit else "-" for limit in (key.rpm, key.tpm)]
        admin = "yes" if key.admin else ""
        table.add_row(key.name, key.prefix + "...", key.plan, *limits, admin, _utc(key.created_at), state)
    Console(markup=False).print(table)


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="Name of the key")], db: DatabaseOption = None) -> None:
    """Revoke a key; the server refuses it from the next request on."""
    with _user_errors():
        KeyStore(_database(db)).revoke(name)
    typer.echo(f"revoked key {name!r}")


@keys_app.command("plan")
def keys_plan(
    name: Annotated[str | None, typer.Argument(help="Plan to create or change; none: list the plans")] = None,
    prompt_price: Annotated[float | None, typer.Option(min=0, help="Price per 1k prompt tokens")] = None,
    completion_price: Annotated[float | None, typer.Option(min=0, help="Price per 1k completion tokens")] = None,
    db: DatabaseOption = None,
) -> None:
    """Set a plan's prices per 1k tokens (new usage is billed at them), or list the plans."""
    with _user_errors():
        store = KeyStore(_database(db))
        if name is not None:
            current = next((plan for plan in store.plans() if plan.name == name), None)
            if current is None and (prompt_price is None or completion_price is None):
                _fail(f"new plan {name!r} needs both --prompt-price and --completion-price")
            store.set_plan(
                name,
                current.prompt_per_1k if prompt_price is None else prompt_price,
                current.completion_per_1k if completion_price is None else completion_price,
            )
        plans = store.plans()
    for plan in plans:
        typer.echo(f"{plan.name}: {plan.prompt_per_1k:g} / {plan.completion_per_1k:g} per 1k prompt / output tokens")


@app.command("usage")
def usage_command(
    key: Annotated[str | None, typer.Option(help="Only this key (by name)")] = None,
    since: Annotated[str | None, typer.Option(help="From this UTC day on, YYYY-MM-DD")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, as GET /v1/admin/usage returns")] = False,
    db: DatabaseOption = None,
) -> None:
    """Requests, tokens and cost per key and day, from the server's usage ledger."""
    with _user_errors():
        days = Ledger(_database(db)).daily(key, parse_day(since) if since else None)
    if as_json:
        typer.echo(json.dumps([day.to_dict() for day in days], indent=2))
        return
    table = Table(title="usage per key and day (UTC)")
    for column in ("day", "key", "requests", "prompt tokens", "completion tokens", "cost"):
        table.add_column(column, justify="left" if column in ("day", "key") else "right")
    for day in days:
        table.add_row(
            day.day, day.key_name or "(open)", str(day.requests), f"{day.prompt_tokens:,}",
            f"{day.completion_tokens:,}", f"{day.cost:.6f}",
        )  # fmt: skip
    table.add_row("total", "", str(sum(d.requests for d in days)), "", "", f"{sum(d.cost for d in days):.6f}")
    Console(markup=False).print(table)


def _config(model: str) -> ModelConfig:
    """A preset by name, or the config.json of a checkpoint directory."""
    if model in PRESETS:
        return preset(model)
    if Path(model).is_dir():
        return ModelConfig.from_json(Path(model) / "config.json")
    _fail(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing checkpoint directory")


def _require_memory(model: str, config: ModelConfig) -> None:
    """Refuse, with the numbers, to build a model whose float32 weights exceed this machine's memory."""
    if not hasattr(os, "sysconf"):
        return
    needed = 4 * (main_parameters(config).total + mtp_parameters(config).total)
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        _fail(f"{model} needs {_bytes(needed)} for its float32 weights; this machine has {_bytes(available)}")


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn configuration and checkpoint errors into a one-line message and exit code 1."""
    try:
        yield
    except (
        ConfigError,
        CheckpointError,
        DataSourceError,
        CleaningConfigError,
        TrainingDiverged,
        OSError,
        ValueError,
    ) as error:
        _fail(str(error))


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


def _count(n: int) -> str:
    if n < 1000:
        return str(n)
    return f"{_scaled(n, 1000, ['', 'K', 'M', 'B', 'T'])} ({n:,})"


def _flops(n: int) -> str:
    return f"{_scaled(n, 1000, [' ', ' K', ' M', ' G', ' T'])}FLOP"


def _bytes(n: int) -> str:
    return f"{n:,} B" if n < 1024 else f"{_scaled(n, 1024, ['', ' Ki', ' Mi', ' Gi', ' Ti'])}B ({n:,} B)"


def _database(location: str | None) -> Database:
    return open_database(location or default_database_location())


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(timestamp))


def _scaled(n: float, base: int, units: list[str]) -> str:
    """n in the largest unit it reaches, with two decimals: 671.03B, 68.62 Ki."""
    unit = 0
    while n >= base and unit < len(units) - 1:
        n, unit = n / base, unit + 1
    return f"{n:.2f}{units[unit]}"


if __name__ == "__main__":  # python -m seekstack.cli, torchrun -m seekstack.cli
    app()
