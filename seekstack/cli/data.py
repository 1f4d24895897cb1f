"""`seekstack data build | tokenize` and `seekstack tokenizer train`: raw text to token shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from seekstack.cli.common import (
    nothing_written_if_interrupted,
    options_named,
    refuse_empty_path,
    refuse_unwritable_config,
    run_to_checkpoint,
    user_errors,
    warn,
)
from seekstack.cli.generate import thread_count


def _worker_count(workers: int) -> int:
    """--workers: 0 (one per core), else from 1 to this machine's CPUs, as --threads (`thread_count`): a typo's 100000
    started as many processes, and past C's int it failed with OverflowError's traceback."""
    return thread_count(workers) or 0 if workers else 0


data_app = typer.Typer(no_args_is_help=True, help="Corpus stages: clean raw text into train/val splits, tokenize.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Byte-level BPE tokenizer.")


@data_app.command("build")
def data_build(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Folders, .txt/.jsonl/.json/.parquet/.csv/.tsv/.arrow files, saved datasets; default: 'stdlib', "
            "the embedded corpus",
            callback=refuse_empty_path,
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder for train.jsonl, val.jsonl, report.json")] = Path(
        "data/corpus"
    ),
    field: Annotated[
        str, typer.Option(help="Text field of .jsonl/.json, column of .parquet/.csv/.tsv/.arrow and saved datasets")
    ] = "text",
    id_field: Annotated[
        str | None,
        typer.Option(
            help="Field or column of those rows whose value is the document's id (datatrove's id_key); rows without "
            "one keep file:row"
        ),
    ] = None,
    rows_field: Annotated[
        str | None,
        typer.Option(
            help="Key under which each .json/.jsonl input, one JSON object, holds its rows' array (datasets' field=; "
            'SQuAD\'s {"data": [...]}); other inputs are refused'
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Cleaning thresholds (YAML/TOML/JSON); see --write-config")
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            help="Rules per document: auto (detected kind), web (prose/CJK by script), code, zh (CJK); default auto, "
            "or the --config file's"
        ),
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(
            help="Fraction held out for validation (0: none; below 1); at least one document when above 0 and 2 or "
            "more are kept; default 0.01, or the --config file's"
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=0,
            help="Processes for the per-document work, at most the CPUs; 0: one per CPU core",
            callback=_worker_count,
        ),
    ] = 0,
    write_config: Annotated[
        Path | None,
        typer.Option(help="Write the resolved thresholds to this file, exit", callback=refuse_unwritable_config),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Clean a corpus: kind detection, quality rules per kind, exact and near-duplicate removal, PII scrubbing, a
    stable split, a report. Fails, writing nothing, when it would keep less than min_kept_fraction."""
    import os

    from rich.console import Console

    from seekstack.corpus.build import build_corpus, report_table
    from seekstack.corpus.rules import CleaningConfig
    from seekstack.corpus.sources import open_sources
    from seekstack.schema import load_config
    from seekstack.schema import write_config as write

    options = {"val_fraction": val_fraction, "profile": profile}
    given = {name: value for name, value in options.items() if value is not None}
    overrides = [f"{name}={value}" for name, value in given.items()]
    with user_errors(), nothing_written_if_interrupted(out):
        with options_named(given):
            cleaning = load_config(CleaningConfig, config, overrides)
        if write_config is not None:
            write(cleaning, write_config)
            typer.echo(f"wrote the cleaning thresholds to {write_config}")
            return
        [sources] = open_sources(inputs or ["stdlib"], field=field, id_field=id_field, rows_field=rows_field)
        report = build_corpus(sources, out, cleaning, show_progress=progress, workers=workers or os.cpu_count() or 1)
    Console().print(report_table(report))
    typer.echo(f"wrote {out}/train.jsonl, {out}/val.jsonl and {out}/report.json")
    if report.val_documents == 0 and cleaning.val_fraction > 0:  # one kept: holding it out would leave train none
        warn(
            f"{out}/val.jsonl holds no documents: the build kept {report.documents_kept:,} and "
            f"val_fraction={cleaning.val_fraction} held none out (one is, of 2 or more); `seekstack train` evaluates "
            "on val and refuses an empty one: add documents, or train with eval_every=0"
        )


@data_app.command("tokenize")
def data_tokenize(
    corpus: Annotated[Path, typer.Option(help="Folder with train.jsonl and val.jsonl (from `data build`)")],
    tokenizer: Annotated[
        Path,
        typer.Option(
            help="tokenizer.json or its folder (a checkpoint's; a run's out_dir: its newest checkpoint's)",
            callback=run_to_checkpoint,
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder for the token shards and their index")] = Path("data/tokens"),
    buckets: Annotated[
        bool,
        typer.Option(
            help="Also write train_easy/medium/hard by difficulty (zlib ratio, which ranks short documents harder: "
            "easy is long and regular, hard short and dense), for a curriculum"
        ),
    ] = False,
) -> None:
    """Encode the corpus splits into memory-mapped token shards with an index."""
    from seekstack.atomic import atomic_directory, refuse_to_replace
    from seekstack.corpus.sources import counted, require_corpus_file
    from seekstack.tokenizer import Tokenizer
    from seekstack.tokens.difficulty import difficulty_buckets, tokenize_buckets
    from seekstack.tokens.shards import SHARD_FILES, tokenize_corpus

    with user_errors(), nothing_written_if_interrupted(out):
        encoder = Tokenizer.from_file(tokenizer)
        refuse_to_replace(out, SHARD_FILES, inputs=(corpus,))
        _require_training_documents(corpus, "to tokenize")
        require_corpus_file(corpus / "val.jsonl")  # known before the training split is encoded (hours, if large)
        # Scored first: a corpus too small for the buckets fails before any split is written.
        difficulty = difficulty_buckets(corpus / "train.jsonl") if buckets else None
        # Every split together, replacing the folder whole: no split of an earlier corpus is left beside them.
        with atomic_directory(out) as staging:
            # val first: a damaged row of it is named before the hours the training split may take, not after
            val = tokenize_corpus(corpus / "val.jsonl", encoder, staging, "val")
            indexes = [tokenize_corpus(corpus / "train.jsonl", encoder, staging, "train"), val]
            if difficulty is not None:
                indexes += tokenize_buckets(corpus / "train.jsonl", encoder, staging, "train", difficulty=difficulty)
        for index in indexes:
            counts = f"{counted(index['documents'], 'document')}, {counted(index['total_tokens'], 'token')}"
            typer.echo(f"{index['split']}: {counts} ({index['dtype']})")


@data_app.command("quality-train")
def data_quality_train(
    reference: Annotated[
        list[str],
        typer.Option(help="Text to prefer: folders, .txt/.jsonl/.parquet (repeatable)", callback=refuse_empty_path),
    ],
    pool: Annotated[
        list[str],
        typer.Option(
            help="The raw pool to select from (a sample of it is enough; repeatable)", callback=refuse_empty_path
        ),
    ],
    out: Annotated[Path, typer.Option(help="The model file (.npz)")] = Path("data/quality.npz"),
    field: Annotated[str, typer.Option(help="Text field of .jsonl / column of .parquet")] = "text",
    max_documents: Annotated[int, typer.Option(min=1, help="Documents read from each side at most")] = 20_000,
    seed: Annotated[int, typer.Option(help="Seed of the training order")] = 0,
) -> None:
    """Train a quality classifier (logistic regression over hashed word 1-2-grams): reference vs pool."""
    import itertools
    import sys
    from collections import Counter

    from seekstack.corpus.pii import scrub_pii
    from seekstack.corpus.quality import FEW_DOCUMENTS, train_quality_model
    from seekstack.corpus.rules import normalise
    from seekstack.corpus.sources import TextFolder, counted, open_sources

    def texts(specs: list[str], sources: list, option: str) -> list[str]:
        """The documents of `sources` (opened from `specs`) as `data build` writes the rows that `data select` scores:
        blank ones skipped, normalised (HTML references decoded, line ends, NFC) and PII scrubbed, so that the model
        learns the n-grams it will score."""
        scrubbed = (scrub_pii(normalise(doc.text))[0] for doc in itertools.chain.from_iterable(sources))
        # A blank text, which `data build` drops and `data select` so never scores, would teach the empty-text id alone.
        # islice counts to sys.maxsize at most (more raised its ValueError, naming no option): past it, every document
        read = list(itertools.islice((text for text in scrubbed if text.strip()), min(max_documents, sys.maxsize)))
        if not read:
            skipped = sum((source.skipped for source in sources if isinstance(source, TextFolder)), Counter())
            unread = ", ".join(f"{suffix} {count:,}" for suffix, count in skipped.items())
            hint = (
                f". The folders' files of other suffixes were not read ({unread}): a .jsonl, .parquet or .csv file "
                "is read when given itself, e.g. FOLDER/train.jsonl"
            )
            found = f"{option} {' '.join(specs)}: no documents with text"
            raise ValueError(f"{found}; check the paths and --field{hint if skipped else ''}")
        return read

    with user_errors(), nothing_written_if_interrupted(out):
        references, pools = open_sources(reference, pool, field=field)
        positives, negatives = texts(reference, references, "--reference"), texts(pool, pools, "--pool")
        sides = (("--reference", positives), ("--pool", negatives))
        few = [
            f"{option} holds {counted(len(read), 'document')}" for option, read in sides if len(read) < FEW_DOCUMENTS
        ]
        if few:
            warn(
                f"{' and '.join(few)}: a classifier trained on fewer than {FEW_DOCUMENTS} documents a side learns "
                "those documents' words, not the kind of text they stand for; give it hundreds of each"
            )
        train_quality_model(positives, negatives, seed=seed).save(out)
    typer.echo(f"wrote {out}: trained on {len(positives)} reference and {len(negatives)} pool documents")


@data_app.command("select")
def data_select(
    corpus: Annotated[Path, typer.Option(help="Folder with train.jsonl and val.jsonl (from `data build`)")],
    model: Annotated[Path, typer.Option(help="Quality model from `data quality-train`")],
    out: Annotated[Path, typer.Option(help="Folder for the selected train.jsonl, val.jsonl, selection.json")],
    threshold: Annotated[float | None, typer.Option(help="Keep training documents scoring at least this")] = None,
    top_fraction: Annotated[float | None, typer.Option(help="Keep this best-scoring share instead")] = None,
) -> None:
    """Score every document with a quality model and keep the best training documents (val is kept whole)."""
    from seekstack.corpus.quality import QualityModel, select_corpus

    with user_errors(), options_named(), nothing_written_if_interrupted(out):
        if (threshold is None) == (top_fraction is None):  # said in the options' names, before the model loads
            given = "neither given" if threshold is None else "not both"
            raise ValueError(f"choose --threshold SCORE or --top-fraction SHARE: one of them, {given}")
        _require_training_documents(corpus, "to select from")
        summary = select_corpus(QualityModel.load(model), corpus, out, threshold, top_fraction)
    threshold, tied = round(summary["threshold"], 6), summary["at_threshold"]  # rounded as the rows' `quality`
    kept = f"score >= {threshold}"
    if tied["selected"] < tied["documents"]:
        kept = (
            f"score > {threshold}, and the first {tied['selected']:,} of the {tied['documents']:,} scoring "
            f"{threshold}, to keep the top fraction asked for"
        )
    typer.echo(
        f"selected {summary['selected']:,} of {summary['documents']:,} training documents ({kept}); wrote "
        f"{out}/train.jsonl, {out}/val.jsonl and {out}/selection.json"
    )


@tokenizer_app.command("train")
def tokenizer_train(
    corpus: Annotated[Path, typer.Option(help="Folder with train.jsonl (from `data build`)")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, special tokens included")] = 4096,
    out: Annotated[
        Path,
        typer.Option(
            help="Folder for tokenizer.json and tokenizer_config.json; one holding other files (a checkpoint's) is "
            "refused, an earlier tokenizer alone there is replaced"
        ),
    ] = Path("data/tokenizer"),
    split_digits: Annotated[
        int | None,
        typer.Option(
            help="Cut runs of digits into pieces of at most N (1 to 256) before BPE, so no token holds more (GPT-4 "
            "and DeepSeek-V3: 3, nanochat: 2); left out, a run is one piece up to 256 digits, as every other run",
        ),
    ] = None,
) -> None:
    """Train a byte-level BPE tokenizer on the training split."""
    from seekstack.corpus.sources import read_corpus_rows
    from seekstack.tokenizer import train_tokenizer

    with user_errors(), nothing_written_if_interrupted(out):
        _require_training_documents(corpus, "to train a tokenizer on")
        _refuse_a_folder_of_other_files(out)
        texts = (row.text for row in read_corpus_rows(corpus / "train.jsonl"))
        with options_named():
            trained = train_tokenizer(texts, vocab_size, out, split_digits=split_digits)
    typer.echo(f"wrote {trained.source}: {trained.vocab_size} tokens")
    if trained.vocab_size < vocab_size:
        warn(
            f"the corpus yields only {trained.vocab_size} of the {vocab_size} tokens asked for (BPE ran out of pairs "
            f"to merge: the corpus is small); train the model with model.vocab_size={trained.vocab_size}, since a "
            "larger vocabulary has ids that decode to no token"
        )


def _require_training_documents(corpus: Path, purpose: str) -> None:
    """FileNotFoundError or ValueError naming the corpus's train.jsonl, before anything is written, when it is
    missing or holds no document but blank ones: what was made from it would be empty (`purpose`: what it holds none
    for)."""
    from seekstack.corpus.sources import read_corpus_rows

    if corpus.is_file():  # a file of documents, given for the folder `data build` writes them to
        fix = (
            f"give its folder, {corpus.parent}"
            if corpus.name in ("train.jsonl", "val.jsonl")
            else f"build one from it first (`seekstack data build {corpus} --out FOLDER`) and give that folder"
        )
        raise NotADirectoryError(
            f"{corpus}: is a file; --corpus is the folder `seekstack data build` wrote (train.jsonl, val.jsonl): {fix}"
        )
    train = corpus / "train.jsonl"
    build = f"build the corpus from your text first (`seekstack data build TEXT --out {corpus}`)"
    if not train.is_file():
        raise FileNotFoundError(f"{train}: no such file; {build}")
    blank = 0
    for row in read_corpus_rows(train):
        if row.text.strip():
            return
        blank += 1
    raise ValueError(f"{train}: no documents {purpose}{f' ({blank:,}, all blank)' if blank else ''}; {build}")


def _refuse_a_folder_of_other_files(out: Path) -> None:
    """An error, before any training, when the tokenizer's folder is a file or lies under one, or holds files besides
    a tokenizer's: a checkpoint there would keep its weights and get a tokenizer its model was not trained with."""
    from seekstack.atomic import entries_besides, refuse_a_file_in_the_way
    from seekstack.tokenizer import CHAT_TEMPLATE_FILE, CONFIG_FILE, TOKENIZER_FILE, tokenizer_json_path

    folder = tokenizer_json_path(out).parent
    refuse_a_file_in_the_way(folder, f"{TOKENIZER_FILE} and {CONFIG_FILE}")
    others = entries_besides(folder, (TOKENIZER_FILE, CONFIG_FILE, CHAT_TEMPLATE_FILE))  # the last: transformers 5's
    if others:
        raise FileExistsError(
            f"{folder}: holds {others} besides a tokenizer's {TOKENIZER_FILE} and {CONFIG_FILE}, which a new "
            "tokenizer would replace among them (beside a checkpoint's model: a tokenizer it was not trained with); "
            "choose a new or empty folder for --out (nothing was written)"
        )


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
    app.add_typer(tokenizer_app, name="tokenizer")
