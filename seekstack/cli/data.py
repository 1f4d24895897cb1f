"""`seekstack data build | tokenize` and `seekstack tokenizer train`: raw text to token shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from seekstack.cli.common import user_errors

data_app = typer.Typer(no_args_is_help=True, help="Corpus stages: clean raw text into train/val splits, tokenize.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Byte-level BPE tokenizer.")


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
    config: Annotated[
        Path | None, typer.Option(help="Cleaning thresholds (YAML/TOML/JSON); see --write-config")
    ] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Fraction of documents held out for validation")] = None,
    write_config: Annotated[Path | None, typer.Option(help="Write the resolved thresholds to this file, exit")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Clean a corpus: quality rules, exact and near-duplicate removal, PII scrubbing, a stable split, a report."""
    from rich.console import Console

    from seekstack.corpus.build import build_corpus, report_table
    from seekstack.corpus.rules import CleaningConfig
    from seekstack.corpus.sources import open_source
    from seekstack.schema import load_config
    from seekstack.schema import write_config as write

    with user_errors():
        overrides = [] if val_fraction is None else [f"val_fraction={val_fraction}"]
        cleaning = load_config(CleaningConfig, config, overrides)
        if write_config is not None:
            write(cleaning, write_config)
            typer.echo(f"wrote the cleaning thresholds to {write_config}")
            return
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
    from seekstack.tokenizer import Tokenizer
    from seekstack.tokens.difficulty import tokenize_buckets
    from seekstack.tokens.shards import tokenize_corpus

    with user_errors():
        encoder = Tokenizer.from_file(tokenizer)
        indexes = [tokenize_corpus(corpus / f"{split}.jsonl", encoder, out, split) for split in ("train", "val")]
        if buckets:
            indexes += tokenize_buckets(corpus / "train.jsonl", encoder, out, "train")
        for index in indexes:
            typer.echo(
                f"{index['split']}: {index['documents']} documents, {index['total_tokens']:,} tokens ({index['dtype']})"
            )


@tokenizer_app.command("train")
def tokenizer_train(
    corpus: Annotated[Path, typer.Option(help="Folder with train.jsonl (from `data build`)")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, special tokens included")] = 4096,
    out: Annotated[Path, typer.Option(help="Folder for tokenizer.json and tokenizer_config.json")] = Path(
        "data/tokenizer"
    ),
) -> None:
    """Train a byte-level BPE tokenizer on the training split."""
    from seekstack.tokenizer import train_tokenizer

    with user_errors():
        texts = (json.loads(line)["text"] for line in (corpus / "train.jsonl").open(encoding="utf-8"))
        trained = train_tokenizer(texts, vocab_size, out)
    typer.echo(f"wrote {out}/tokenizer.json: {trained.vocab_size} tokens")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
    app.add_typer(tokenizer_app, name="tokenizer")
