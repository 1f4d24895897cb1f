"""`seekstack report RUN`: one Markdown page for a training run, with its PNGs beside it (report card after
nanochat's): environment, data, tokenizer, model size and FLOPs, training curves, speed, evaluation, samples.

An `rl` run is reported by its rewards, accuracy and completion lengths (GRPO's loss is ~0 by construction), and a
run on a post-training task (`rl`, `sft`/`distill task=`) is sampled on the task's held-out questions in the chat
template, and one on a conversations file (`sft`/`distill data=`) on its held-out conversations (sft's val_data or
val_fraction), else the file's first, each answered where its last assistant turn starts; other runs continue the
demo's code prompts."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import seekstack
from seekstack import accounting
from seekstack.atomic import refuse_a_file_in_the_way, write_atomic
from seekstack.checkpoint import CheckpointError, read_config
from seekstack.config import ModelConfig
from seekstack.posttrain.conversations import Conversation, held_out_conversations, read_conversations
from seekstack.posttrain.plot import logs_rewards, plot_rl_runs
from seekstack.posttrain.tasks import Task, make_task
from seekstack.schema import ConfigError, load_config, option_name
from seekstack.train.config import CONFIG_FILE
from seekstack.train.metrics import METRICS_FILE, column, step_tokens
from seekstack.train.mfu import flops_text
from seekstack.train.plot import json_object, plot_run, read_metrics, steps_text
from seekstack.train.runs import TRAIN_STATE_FILE, checkpoint_dir, list_checkpoints

REPORT_FILE = "report.md"
PAGE_SUFFIXES = (".md", ".markdown", ".html", ".txt")  # an --out named so asks for a file, not a folder
RL_WINDOW = 10  # at most this many first and last steps averaged (a step's batch is small), as `rl-plot` smooths
# the per-step counts of the tokens a batch source's loss is on, and how the report names them, the first a run logs
# every step: distill's on conversations, the answers' tokens it scored (the student's own on-policy, which have no
# labels); sft's labelled assistant tokens (and an earlier distill's, which logged no answer_tokens); rl's sampled
# completions (each with its EOS)
LOSS_TOKEN_COUNTS = {
    "answer_tokens": "answer tokens scored: the reference's, or on-policy the student's own",
    "assistant_tokens": "labelled assistant tokens",
    "completion_tokens": "sampled completion tokens",
}
REPORT_ATTEMPTS = 3  # pages begun again when a run still training deletes the checkpoint one describes
SAMPLE_QUESTIONS = 4  # a task's held-out questions, or a conversations file's first, a run answers in the report
EVAL_RESULTS = Path("eval") / "results.json"  # where `seekstack eval RUN` writes by default
EVAL_OPTIONS = (  # as results.json has them
    "tasks", "corpus", "backend", "batch_size", "limit", "per_module", "device", "num_fewshot", "apply_chat_template",
    "fewshot_as_multiturn", "system_instruction", "include_path", "dtype", "difficulty", "seed", "gen_kwargs",
)  # fmt: skip


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, samples: bool = True) -> Path:
    """Write `out_dir/report.md` (default: the run's folder) and curves.png; return the Markdown's path. A run stopped
    before its first complete save is reported by its data and curves, its Model section saying why there is no more.
    A run still training may save a newer checkpoint and delete the one the page describes (`keep_checkpoints`)
    while the page is written: it is written again, of the newer one."""
    run_dir = Path(run_dir)
    if out_dir is not None:  # RUN itself is a run's folder, or named as no run by read_metrics
        refuse_a_file_in_the_way(out_dir, f"{REPORT_FILE} and its PNGs")
        _refuse_a_page_name(Path(out_dir))
    for _ in range(REPORT_ATTEMPTS - 1):
        checkpoint = _newest_checkpoint(run_dir)
        try:
            return _write_page(run_dir, out_dir, samples, checkpoint)
        except (OSError, ValueError):  # a missing file, a checkpoint that does not load
            if checkpoint is None or (checkpoint / TRAIN_STATE_FILE).is_file():
                raise  # not a checkpoint the run deleted meanwhile
    return _write_page(run_dir, out_dir, samples, _newest_checkpoint(run_dir))


def _refuse_a_page_name(out_dir: Path) -> None:
    """ValueError for an out_dir named as a document (--out notes.md) that is no folder yet: it became a folder
    notes.md/ holding report.md. The page's PNGs have fixed names, so a page written as notes.md would overwrite
    another page's curves.png beside it: a folder is asked for instead."""
    if out_dir.suffix.lower() in PAGE_SUFFIXES and not out_dir.is_dir():
        raise ValueError(
            f"--out {out_dir}: names a {out_dir.suffix} file, but --out is the folder {REPORT_FILE} and its PNGs "
            f"(curves.png) are written into; give a folder, e.g. --out {out_dir.with_suffix('')} (nothing was written)"
        )


def _newest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def _write_page(run_dir: Path, out_dir: str | Path | None, samples: bool, checkpoint: Path | None) -> Path:
    """`write_report`'s page, of the run's newest `checkpoint` and its metrics (read after it was found: they hold
    its steps, which a run logs before it saves them)."""
    train_config = json_object(run_dir / CONFIG_FILE, "restore it, or delete it to report without the run's settings")
    records = read_metrics(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)  # once RUN is a run: a mistyped one leaves no empty folder behind
    newest = f"newest checkpoint `{checkpoint}`" if checkpoint is not None else "no complete checkpoint"
    sections = [
        f"# Run report: `{run_dir}`\n\nWritten {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from the run's files; {newest}.",
        _environment(),
        _data(run_dir, train_config),
        _model(run_dir, checkpoint, train_config, records) if checkpoint is not None else _no_model(run_dir),
        _training(run_dir, out_dir, train_config, records, checkpoint),
        _evaluation(run_dir, checkpoint),
    ]
    if samples and checkpoint is not None:
        try:
            sections.append(_samples(run_dir, checkpoint, train_config))
        except CheckpointError as error:  # its weights or config.json damaged: the rest of the page is the run's still
            sections.append(f"## Samples\n\nNone: the checkpoint cannot be read ({error}).")
    return write_atomic(out_dir / REPORT_FILE, "\n\n".join(section for section in sections if section) + "\n")


def _environment() -> str:
    import torch

    commit = _source_commit()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    rows = [
        ("seekstack", _version("seekstack")), ("commit", commit), ("python", platform.python_version()),
        ("torch", torch.__version__), ("lm-eval", _version("lm_eval")), ("platform", platform.platform()),
        ("device", device), ("torch threads", str(torch.get_num_threads())),
    ]  # fmt: skip
    return "## Environment\n\n" + _table(("", ""), rows)


def _source_commit() -> str:
    """The commit of the git checkout seekstack's own source is a tracked part of, wherever the report runs; unknown
    for a package installed from a wheel (even into a folder inside some other repository)."""
    package = Path(seekstack.__file__).parent
    try:
        _git(package, "ls-files", "--error-unmatch", "__init__.py")  # fails where git does not track the package
        return _git(package, "rev-parse", "--short", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def _git(folder: Path, *arguments: str) -> str:
    """What `git ARGUMENTS` run in `folder` prints; CalledProcessError when it fails."""
    return subprocess.run(
        ["git", *arguments], cwd=folder, capture_output=True, text=True, check=True, timeout=5
    ).stdout.strip()


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _is_rl(train_config: dict[str, Any]) -> bool:
    """Whether the run is `seekstack rl` (GRPO samples its groups on a task's prompts)."""
    return "num_generations" in train_config


def trained_task(train_config: dict[str, Any]) -> Task | None:
    """The post-training task whose prompts the run trained on (`rl`; `sft` and `distill` with `task` and no
    `data`, which they would read instead), else None."""
    if not train_config.get("task") or train_config.get("data"):
        return None
    return make_task(train_config["task"], train_config.get("difficulty"))


def trained_conversations_file(run_dir: Path, train_config: dict[str, Any]) -> Path | None:
    """The conversations file an `sft` or `distill data=` run trained on, or a `lora train` run on conversations or
    TRL's prompt-completion text (its data_dir, a file of them) (train_config.json holds it relative to the run's
    folder), else None."""
    from seekstack.adapters.data import is_chat

    if _is_rl(train_config):
        return None
    if train_config.get("data"):
        return _from_run(run_dir, train_config["data"])
    data_dir = _from_run(run_dir, train_config["data_dir"]) if train_config.get("data_dir") else None
    return data_dir if data_dir is not None and is_chat(data_dir) else None


def asked_conversations(
    run_dir: Path, path: Path, train_config: dict[str, Any]
) -> tuple[list[Conversation], list[Conversation] | None]:
    """The conversations `report` and `sample` ask a run on the conversations file `path`: its held-out ones, never
    trained on, else the file's own (TRL's prompt-completion text as it is); and what `held_out_conversations` said
    ([]: it holds none out, None: it recorded not which), which tells the two apart."""
    held_out = held_out_conversations(run_dir, path, train_config)
    return held_out or read_conversations(path, text_completions=True), held_out


def _reads_token_shards(train_config: dict[str, Any]) -> bool:
    """Whether the run trained on `data_dir`'s shards (rows seq_len long) rather than a task's prompts (`rl`) or
    conversations (`sft`, `distill data=`/`task=`), which leave data_dir and seq_len at unused defaults."""
    conversations = train_config.get("data") or train_config.get("task")
    return bool(train_config.get("data_dir")) and not _is_rl(train_config) and not conversations


def _data(run_dir: Path, train_config: dict[str, Any]) -> str:
    teacher = f"\n\nTeacher: `{_from_run(run_dir, train_config['teacher'])}`." if train_config.get("teacher") else ""
    conversations_file = trained_conversations_file(run_dir, train_config)  # a `lora train` run's is its data_dir
    if conversations_file is not None:
        return f"## Data\n\nConversations from `{conversations_file}`.{teacher}"
    if _reads_token_shards(train_config):
        return _shard_data(run_dir, train_config) + teacher
    if not train_config.get("task"):
        # no train_config.json, or one written by hand ({"model": "tiny"}) that names no data: none to report
        return f"## Data{teacher}" if teacher else ""
    return f"## Data\n\n{_task_data(train_config)}{teacher}"


def _task_named(name: str, difficulty: int | None) -> str:
    """Task `name` as a report names it: a generator at its difficulty, a file of problems (which has none) alone."""
    from seekstack.posttrain.tasks.problems_file import is_problems_file

    if is_problems_file(name):
        return f"the problems of `{name}`"
    return f"task `{name}` ({f'difficulty {difficulty}' if difficulty else 'default difficulty'})"


def _task_data(train_config: dict[str, Any]) -> str:
    """What a run on a task trained on: its prompts (`rl`) or the conversations generated of it."""
    task = _task_named(train_config["task"], train_config.get("difficulty"))
    if _is_rl(train_config):
        return f"Prompts of {task}, {train_config['num_generations']} completions each sampled from the policy."
    return f"{train_config.get('examples', 0):,} generated conversations of {task}."


def _shard_data(run_dir: Path, train_config: dict[str, Any]) -> str:
    data_dir = _from_run(run_dir, train_config["data_dir"])
    rows, order, tokenizer = [], [], None
    for index_path in sorted(data_dir.glob("*_index.json")):
        index = json_object(index_path, "tokenize the corpus again (seekstack data tokenize)")
        missing = [key for key in ("split", "documents", "total_tokens") if key not in index]
        if missing:
            raise ValueError(
                f"{index_path}: a shard index without {', '.join(map(repr, missing))}; tokenize the corpus again "
                "(seekstack data tokenize)"
            )
        tokens, text_bytes = index["total_tokens"], index.get("text_bytes") or 0
        per_token = f"{text_bytes / tokens:.2f}" if tokens and text_bytes else "-"
        rows.append((index["split"], f"{index['documents']:,}", f"{tokens:,}", f"{text_bytes:,}", per_token))
        order.append(_split_order(index))
        tokenizer = tokenizer or index.get("tokenizer")
    rows = [row for _, row in sorted(zip(order, rows, strict=True))]
    if not rows:  # moved or deleted since the run, or a folder without shards
        return f"## Data\n\nToken shards `{data_dir}`: no *_index.json there (moved or deleted since the run?)."
    text = f"## Data\n\nToken shards `{data_dir}`:\n\n"
    text += _table(("split", "documents", "tokens", "text bytes", "bytes/token"), rows)
    corpus_report = _corpus_report(data_dir)
    if corpus_report:
        removed = ", ".join(f"{count} {rule}" for rule, count in corpus_report.get("removed", {}).items() if count)
        text += (
            f"\n\nCorpus: {corpus_report['documents_in']:,} documents in ({corpus_report['bytes_in']:,} bytes), "
            f"{corpus_report['documents_kept']:,} kept ({corpus_report['train_documents']} train / "
            f"{corpus_report['val_documents']} val); removed: {removed or 'none'}."
        )
    if tokenizer:
        text += (
            f"\n\n## Tokenizer\n\n{tokenizer['vocab_size']:,} tokens, BOS id {tokenizer['bos_id']}, EOS id "
            f"{tokenizer['eos_id']}, `{tokenizer.get('path', '')}` (sha256 {tokenizer['sha256'][:16]}...)."
        )
    return text


def _split_order(index: dict[str, Any]) -> tuple[str, float]:
    """Where a shard index's split sits in the data table: each split (train, val), then its difficulty buckets
    (`train_easy`, ...) from the easiest, by the lowest score each holds."""
    difficulty = index.get("difficulty")
    if not isinstance(difficulty, dict) or "bucket" not in difficulty:
        return index["split"], -math.inf
    return index["split"].removesuffix(f"_{difficulty['bucket']}"), difficulty.get("lowest_score", 0.0)


def _corpus_report(data_dir: Path) -> dict[str, Any] | None:
    """The report.json of the `data build` folder the shards in `data_dir` were encoded from, when it is there."""
    from seekstack.tokens.provenance import corpus_folder

    corpus = corpus_folder(data_dir)
    if corpus is None or not (corpus / "report.json").is_file():
        return None
    return json_object(corpus / "report.json", "build the corpus again (seekstack data build), or delete it")


def _model(run_dir: Path, checkpoint: Path, train_config: dict[str, Any], records: list[dict[str, Any]]) -> str:
    from seekstack.adapters.files import model_folders

    weights, adapter, _ = model_folders(checkpoint)
    config = read_config(weights)  # the checkpoint's (a LoRA run's: its base's) config.json
    main = accounting.main_parameters(config)
    mtp_depths = config.num_nextn_predict_layers
    last_step = int(checkpoint.name.removeprefix("step_"))  # the checkpoint's step: the model this page describes
    trained = _tokens_trained(records, last_step)
    cache = accounting.kv_cache_bytes_per_token(config)
    init_from = train_config.get("init_from")
    origin = f"from `{_from_run(run_dir, init_from)}`" if init_from else train_config.get("model", "-")
    rows = [
        ("preset / layers", f"{origin} / {config.num_hidden_layers}"),
        ("parameters (main model)", f"{main.total:,}"),
        ("activated per token", f"{main.activated:,}"),
        ("routed experts", _routed_experts(config)),
    ]
    if mtp_depths:
        rows.append(("MTP module parameters", f"{accounting.mtp_parameters(config).total:,}"))
    if adapter is not None:
        rows.append(("LoRA adapter", _adapter_summary(adapter, main.total)))
    per_token = None
    if _reads_token_shards(train_config):  # rows of seq_len tokens: the FLOPs per token are exact
        seq_len = train_config.get("seq_len", 256)
        per_token = _training_flops_per_token(config, train_config, run_dir if adapter is not None else None)
        rows.append(
            (f"forward FLOPs per token (context {seq_len})", f"{accounting.forward_flops_per_token(config, seq_len):,}")
        )
        if per_token is not None:
            rows.append(("training FLOPs per token" + (" (with MTP)" if mtp_depths else ""), f"{per_token:,}"))
    if trained is not None:
        positions, labelled, missing = trained
        steps = f"{last_step} steps"
        if missing:  # not counted: the row says so, rather than passing for the whole run's
            steps = (
                f"{last_step - len(missing)} of {last_step} steps; {steps_text(missing)}: no tokens/s and step time "
                f"in {METRICS_FILE}, not counted"
            )
        if labelled is None:
            rows.append(("tokens trained", f"{positions:,} ({steps})"))
        else:  # sft, distill on conversations, rl: the loss is on some tokens of the rows, not prompts or padding
            kind, count = labelled
            rows.append((f"tokens trained ({kind})", f"{count:,} of {positions:,} positions ({steps})"))
        if per_token is not None and not missing:
            rows.append(("training compute", f"{per_token * positions:.3e} FLOP"))
    rows.append(
        ("KV cache per token (bf16)", f"{cache.latent:,} B latent vs {cache.mha:,} B plain MHA ({cache.ratio:.1f}x)")
    )
    return "## Model\n\n" + _table(("", ""), rows)


def _no_model(run_dir: Path) -> str:
    """The Model section of a run that has no complete checkpoint (stopped before its first save, or during it)."""
    return (
        f"## Model\n\nNo complete checkpoint under `{checkpoint_dir(run_dir)}`: the run stopped before its first save "
        f"finished (a step_N folder without {TRAIN_STATE_FILE} is a save cut short). A run saves every save_every "
        "steps, at its last step and on Ctrl-C or SIGTERM; once it has saved one, this page describes and samples "
        "its model. Its data and curves are those it logged."
    )


def _training_flops_per_token(config: ModelConfig, train_config: dict[str, Any], lora_run: Path | None) -> int | None:
    """Training FLOPs per token of the run's rows; a LoRA run's (`lora_run`) without weight gradients for its frozen
    base (seekstack/adapters/flops.py), of the targets it trained where an earlier seekstack took ones now refused
    (`AdapterConfig.as_trained`, as a resume reads them); None when its lora_config.json is not there (a run made by
    hand) or names targets this seekstack refuses otherwise."""
    from seekstack.adapters.config import CONFIG_FILE, AdapterConfig
    from seekstack.adapters.flops import lora_training_flops

    seq_len = train_config.get("seq_len", 256)
    if lora_run is None:
        return accounting.training_flops_per_token(config, seq_len)
    if not (lora_run / CONFIG_FILE).is_file():
        return None
    positions = train_config.get("batch_size", 1) * seq_len  # of a micro-batch
    adapter = load_config(AdapterConfig, lora_run / CONFIG_FILE)  # a damaged file is named, not taken for old
    try:
        return lora_training_flops(config, adapter.as_trained(config)[0].validate(), seq_len, positions) // positions
    except ConfigError:  # targets refused that as_trained does not mend
        return None


def _adapter_summary(adapter: Path, base_parameters: int) -> str:
    """A LoRA run's adapter as the report's model table shows it: rank, alpha, parameters and their share of the
    base's main model, file size."""
    from safetensors import safe_open

    from seekstack.adapters.files import adapter_weights, read_lora_config

    lora = read_lora_config(adapter)  # a damaged adapter_config.json named
    weights_file = adapter_weights(adapter)  # peft's pickled adapter_model.bin named, with how to re-save it
    with safe_open(weights_file, "pt") as weights:
        parameters = sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    size = weights_file.stat().st_size
    return (
        f"rank {lora.r}, alpha {lora.lora_alpha}: {parameters:,} parameters "
        f"({parameters / base_parameters:.2%} of the base's), {size / 2**20:.2f} MiB, on the base above"
    )


def _routed_experts(config: ModelConfig) -> str:
    """Where the model routes: its MoE layers and MTP modules (blocks too, numbered on from the main model's), the
    MoE of either in the MaxVio its validation logs."""
    layers, depths = config.num_hidden_layers, config.num_nextn_predict_layers
    moe_layers = config.moe_layer_count
    moe_modules = len(config.mtp_moe_blocks)
    if not moe_layers and not moe_modules:
        return "none (a dense FFN in every layer)"
    places = [f"{moe_layers} of {layers} layers"] if moe_layers else []
    if moe_modules:
        places.append("the MTP module" if depths == 1 else f"{moe_modules} of {depths} MTP modules")
    dense_main = "" if moe_layers else " (the main model has a dense FFN in every layer)"
    return f"{config.n_routed_experts} ({config.num_experts_per_tok} per token) in {' and '.join(places)}{dense_main}"


def _tokens_trained(
    records: list[dict[str, Any]], last_step: int
) -> tuple[int, tuple[str, int] | None, list[int]] | None:
    """(token positions, (kind, count) of the tokens the loss was on, the steps not counted) trained up to
    `last_step`, as metrics.jsonl logged them: the positions as tokens/s x step time, padding included; the count
    where every step counted logged one of LOSS_TOKEN_COUNTS, else None; the steps up to `last_step` the log holds no
    tokens/s and step time of (a run resumed from another run's checkpoint logs only its own steps); None when it
    holds those of none (a step logged twice counts once, its later record)."""
    per_step = {r["step"]: r for r in records if "tokens_per_s" in r and "step_s" in r and r["step"] <= last_step}
    if not per_step:
        return None
    missing = [step for step in range(1, last_step + 1) if step not in per_step]
    positions = sum(step_tokens(r) for r in per_step.values())
    for name, kind in LOSS_TOKEN_COUNTS.items():
        if all(name in r for r in per_step.values()):
            return positions, (kind, sum(round(r[name]) for r in per_step.values())), missing
    return positions, None, missing


def _training(
    run_dir: Path,
    out_dir: Path,
    train_config: dict[str, Any],
    records: list[dict[str, Any]],
    checkpoint: Path | None = None,
) -> str:
    """The Training section: curves, the last step's loss (and the steps logged past the newest `checkpoint`), speed,
    the validation table."""
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    tail = steps[len(steps) * 3 // 4 :]  # the last quarter: past warm-up and compilation
    if _is_rl(train_config) or logs_rewards(records):  # as `seekstack plot RUN` tells one
        rl_steps = [r for r in records if "reward" in r]  # what rl-plot draws, a loss logged or not
        window = max(1, min(RL_WINDOW, len(rl_steps) // 4))
        curves = plot_rl_runs([run_dir], out_dir / "rl_curves.png", smooth=window, records=[records])
        drawn = _drawn_by(curves, run_dir, ["rl-plot", str(run_dir), "--smooth", str(window)], rl_steps)
        text = f"## Training\n\n![RL curves]({curves.name})\n\n{drawn}\n\n" + _rl_progress(rl_steps, window)
    else:
        curves = plot_run(run_dir, out_dir / "curves.png", records)  # read once: a torn last line told once
        drawn = _drawn_by(curves, run_dir, ["plot", str(run_dir)], steps)
        text = f"## Training\n\n![training curves]({curves.name})\n\n{drawn}\n\n"
        if steps:  # a step that trained no labelled token (on-policy answers) has no next-token loss
            last = steps[-1]
            total = f"(total {last['loss']:.4f})"  # as the progress line: metrics.jsonl's `loss` is the total
            loss = f"loss {last['lm_loss']:.4f} {total}" if "lm_loss" in last else f"loss {total}"
            text += f"Last step {last['step']}: {loss}. "
            saved = int(checkpoint.name.removeprefix("step_")) if checkpoint is not None else last["step"]
            if last["step"] > saved:  # logged before their checkpoint: a run still training, or stopped since
                past = (
                    f"Step {last['step']} is" if saved + 1 == last["step"] else f"Steps {saved + 1}-{last['step']} are"
                )
                text += (
                    f"{past} in no checkpoint yet (the newest is {checkpoint.name}): a run still training saves "
                    "them later, a stopped one trains them again on --resume. "
                )
    if steps:
        metrics = run_dir / METRICS_FILE
        speeds, mfus = _logged(tail, "tokens_per_s", metrics), _logged(tail, "mfu", metrics)
        speed = f"{statistics.median(speeds):,.0f} tokens/s" if speeds else "tokens/s not logged"
        mfu = _mfu_text(statistics.median(mfus), _peak_text(steps, tail, metrics)) if mfus else "MFU not logged"
        text += f"Speed over the last quarter of the steps (median): {speed}, {mfu}.\n\n"
    columns = [column for column in VALIDATION_COLUMNS if any(column[1] in r for r in evals)]  # no MoE: no MaxVio
    rows = [(str(r["step"]), *(format(r[key], spec) if key in r else "-" for _, key, spec in columns)) for r in evals]
    header = ("step", *(label for label, _, _ in columns))
    return text + _table(header, rows) if rows else text.rstrip()


def _drawn_by(figure: Path, run_dir: Path, command: list[str], steps: list[dict[str, Any]]) -> str:
    """The line under a figure of the page: the steps of the run's metrics.jsonl it shows and the `seekstack`
    command that draws it again (`--out` where the page is not in the run's folder)."""
    words = ["seekstack", *command, *(["--out", str(figure)] if figure.parent != run_dir else [])]
    shown = f"steps {steps[0]['step']}-{steps[-1]['step']}" if steps else "no step yet"
    return f"`{figure.name}`: {shown} of `{run_dir / METRICS_FILE}`, as `{shlex.join(words)}` draws it."


def _logged(records: list[dict[str, Any]], key: str, metrics: Path) -> list[float]:
    """The numbers `key` of the `records` that log one: it may be missing or null (another trainer's metrics.jsonl, or
    one written by hand), told as not logged, not a crash; ValueError naming `metrics` and the step of one that is no
    number (`column`)."""
    return column([r for r in records if r.get(key) is not None], key, metrics)


def _peak_text(steps: list[dict[str, Any]], tail: list[dict[str, Any]], metrics: Path) -> str:
    """The peak FLOP/s the MFU of the `tail` steps divides by and where it came from, as the run logged them (its
    newest `peak_source` up to the tail's last step) in `metrics`: '55.3 GFLOP/s: a 1024^3 float32 matmul measured on
    2 CPU threads'; '' for a run logged before peaks were."""
    peaks = _logged(tail, "peak_flops", metrics)
    sources = [r["peak_source"] for r in steps if r.get("peak_source") is not None and r["step"] <= tail[-1]["step"]]
    if not peaks or not sources:
        return ""
    return f"{flops_text(statistics.median(peaks))}: {sources[-1]}"


def _mfu_text(mfu: float, peak: str = "") -> str:
    """MFU as a percentage, with the `peak` it divides by (`_peak_text`); one above 100% is no utilisation but a peak
    FLOP/s measured too low, and says so, and a NaN (metrics.jsonl's NaN) is none."""
    against = f" (against a peak of {peak})" if peak else ""
    if mfu <= 1:
        return f"MFU {mfu:.1%}{against}"
    if math.isnan(mfu):
        return f"MFU not known: NaN logged{against}"
    return (
        f"MFU not known: {mfu:.1%} logged{against}, above 100% because the peak FLOP/s it divides by was too low (a "
        "CPU matmul probe that ran while other processes held the cores, or a `peak_flops` set too low)"
    )


VALIDATION_COLUMNS = (("val loss", "val_loss", ".4f"), ("val bits/byte", "val_bpb", ".4f"),
                      ("val divergence", "val_divergence", ".4f"),  # distillation's, from the teacher
                      ("val MaxVio", "val_maxvio", ".2f"))  # fmt: skip


RL_QUANTITIES = (
    ("reward", "reward", ".3f"), ("accuracy", "accuracy (answers that verify)", ".1%"),
    ("reward_format", "format reward", ".3f"), ("completion_length", "completion length (tokens)", ".1f"),
    ("kl", "KL to the reference", ".4f"), ("entropy", "entropy (nats)", ".3f"),
)  # fmt: skip


def _rl_progress(steps: list[dict[str, Any]], window: int) -> str:
    """What `rl-plot` draws, as a table: each quantity's mean over the first and over the last `window` steps."""
    if not steps:
        return ""
    first, last = steps[:window], steps[-window:]
    header = ("", *(_steps_label(part[0]["step"], part[-1]["step"]) for part in (first, last)))
    rows = [
        (label, *(format(statistics.fmean(r[key] for r in part), spec) for part in (first, last)))
        for key, label, spec in RL_QUANTITIES
        if all(key in r for r in first + last)
    ]
    return _table(header, rows) + "\n\n"


def _steps_label(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}-{last} (mean)"


def _evaluation(run_dir: Path, checkpoint: Path | None) -> str:
    """The Evaluation section: eval/results.json's table, naming the checkpoint it measured and saying when the run
    has a newer one; nothing for a run without a checkpoint nor results."""
    from seekstack.eval.evaluate import documents_key, results_table

    path = run_dir / EVAL_RESULTS
    if not path.is_file():
        if checkpoint is None:
            return ""
        return f"## Evaluation\n\nNo `{EVAL_RESULTS}` yet: `seekstack eval {run_dir} --tasks ...` writes it."
    remedy = f"run `seekstack eval {run_dir}` again to rewrite it, or delete it"
    results = json_object(path, remedy)
    counts = documents_key(results)
    checks = (("backend", str), ("wall_s", (int, float)), ("results", dict), (counts, dict), ("model", str),
              ("options", dict))  # fmt: skip
    for key, kind in checks:
        if key == "options" and key not in results:  # written before `seekstack eval` recorded its options
            continue
        wrong = not isinstance(results.get(key), kind)
        wrong = wrong or (key == "results" and not all(isinstance(m, dict) for m in results[key].values()))
        wrong = wrong or (key == "n-samples" and not all(isinstance(n, dict) and "effective" in n
                                                         for n in results[key].values()))  # fmt: skip
        if wrong:
            found = f"holds {json.dumps(results[key])[:40]}" if key in results else "is missing"
            raise ValueError(f"{path}: key {key!r} {found}, not what `seekstack eval` writes; {remedy}")
    measured = Path(results["model"])
    text = (
        f"## Evaluation\n\nlm-evaluation-harness on `{measured}`, backend `{results['backend']}`, "
        f"{results['wall_s']:.1f} s:\n\n" + results_table(results)
    )
    # eval records the checkpoint as it was named, from wherever it ran: its run's checkpoints/step_N identify it
    if checkpoint is None or measured.parts[-2:] == checkpoint.parts[-2:]:
        return text
    return text + (
        f"\n\n**Not the newest checkpoint:** these results are `{measured}`'s; the run's newest is "
        f"`{checkpoint.name}`. {_eval_again(run_dir, results)} measures `{checkpoint.name}` and rewrites "
        f"`{EVAL_RESULTS}`."
    )


def _eval_again(run_dir: Path, results: dict[str, Any]) -> str:
    """The `seekstack eval` command that measures the run's newest checkpoint as `results` were measured, with the
    options results.json records (a file from before they were recorded: its tasks, and a reminder)."""
    options = results.get("options")
    if options is None:
        return f"`seekstack eval {run_dir} --tasks {','.join(results['results'])}` (with the options it ran with)"
    words = ["seekstack", "eval", str(run_dir)]
    for key in EVAL_OPTIONS:
        value, flag = options.get(key), option_name(key)
        if value is True:
            words.append(flag)
        elif value is False and key == "fewshot_as_multiturn":  # --no-...: its default (None) is not False
            words.append(f"--no-{flag[2:]}")
        elif value is not None and not isinstance(value, bool):
            words += [flag, ",".join(value) if key == "tasks" else str(value)]
    return f"`{shlex.join(words)}`"


def _samples(run_dir: Path, checkpoint: Path, train_config: dict[str, Any]) -> str:
    from seekstack.adapters.files import model_folders
    from seekstack.eval.samples import DEMO_PROMPTS, demo_samples, run_prompts
    from seekstack.tokenizer import TOKENIZER_FILE

    folders = model_folders(checkpoint)
    variant = read_config(folders.weights).attention_variant
    if variant != "mla":  # the engine that would write the samples refuses it
        return (
            f"## Samples\n\nNone: the model's attention_variant={variant!r} is a training ablation the inference "
            "engine does not serve (no cached decode path for its temporal convolution)."
        )
    tokenizer = folders.tokenizer / TOKENIZER_FILE
    if not tokenizer.is_file():  # the run knew no tokenizer of its data (moved or deleted since it was tokenized)
        return (
            f"## Samples\n\nNone: no {tokenizer.name} in `{folders.tokenizer}` to read the model's text (the run "
            f"found none for its data; set `tokenizer` in a run to put one in its checkpoints, or copy the data's "
            f"{tokenizer.name} there and report again)."
        )
    try:
        task = trained_task(train_config)
    except ValueError as error:  # its file of problems gone (named relative to where the run started) or damaged
        return (
            f"## Samples\n\nNone: the run's task is not there to ask ({error}). Report from the folder the run started "
            f"in, or talk to the model: `seekstack chat --model {checkpoint}`."
        )
    if task is not None:
        return _task_answers(checkpoint, task, train_config)
    conversations_file = trained_conversations_file(run_dir, train_config)
    if conversations_file is not None:
        return _conversation_answers(run_dir, checkpoint, conversations_file, train_config)
    prompts = run_prompts(checkpoint)
    demo = prompts == DEMO_PROMPTS
    of = "" if demo else " of the openings of the first held-out documents (val.jsonl)"
    parts = [f"## Samples\n\nGreedy continuations from the engine on `{checkpoint}`{of}:"]
    for prompt, greedy, _ in demo_samples(checkpoint, prompts, max_new_tokens=48):
        parts.append(_fenced(prompt + greedy, "python" if demo else "text"))
    return "\n\n".join(parts)


def _task_answers(checkpoint: Path, task: Task, train_config: dict[str, Any]) -> str:
    """The samples of a run on a task: its held-out questions in the chat template, answered greedily, verified."""
    from seekstack.eval.samples import task_samples
    from seekstack.eval.tasks import REASONING_MAX_TOKENS

    max_new_tokens = train_config.get("max_completion_length", REASONING_MAX_TOKENS)  # rl's, or reason_<task>'s
    answers = task_samples(checkpoint, task, SAMPLE_QUESTIONS, max_new_tokens)
    named = _task_named(task.name, task.difficulty)
    parts = [
        f"## Samples\n\nGreedy answers from the engine on `{checkpoint}` to held-out questions of {named}, in the chat "
        f"template with the R1 system prompt: {sum(a.right for a in answers)} of {len(answers)} verify."
    ]
    for answer in answers:
        verdict = "Verifies." if answer.right else f"Does not verify (the answer is {answer.answer})."
        parts.append(f"{_fenced(answer.prompt + answer.completion)}\n\n{verdict}")
    return "\n\n".join(parts)


def _conversation_answers(run_dir: Path, checkpoint: Path, path: Path, train_config: dict[str, Any]) -> str:
    """The samples of a run on a conversations file: its held-out conversations (else the file's first) in the chat
    template up to their last assistant turn (TRL's prompt-completion text: its prompt as it is), answered greedily,
    each beside the file's own answer."""
    from seekstack.eval.samples import conversation_samples
    from seekstack.eval.tasks import REASONING_MAX_TOKENS
    from seekstack.posttrain.conversations import TextCompletion

    val_data = _from_run(run_dir, train_config["val_data"]) if train_config.get("val_data") else None
    if not (val_data is not None and val_data.is_file()) and not path.is_file():  # a val_data file is answered alone
        return (
            f"## Samples\n\nNone: the run's conversations file `{path}` is gone (moved or deleted). Put it back to "
            f"see the model answer its conversations here, or talk to the model: `seekstack chat --model "
            f"{checkpoint}`."
        )
    try:
        conversations, held_out = asked_conversations(run_dir, path, train_config)
        conversations = conversations[:SAMPLE_QUESTIONS]
    except ValueError as error:  # a file emptied or damaged since the run
        return (
            f"## Samples\n\nNone: the run's conversations are not there to ask ({error}). Restore the file to see the "
            f"model answer them here, or talk to the model: `seekstack chat --model {checkpoint}`."
        )
    if held_out:
        which = f"{len(conversations)} of the run's held-out conversations (never trained on)"
    else:
        if val_data is not None:
            trained = f"data the run trained on: its held-out conversations' file `{val_data}` is gone"
        elif held_out == []:
            trained = "data the run trained on: it holds none out"
        else:
            trained = (
                "perhaps trained on: the run held some conversations out, but an earlier seekstack started it and "
                "recorded not which"
            )
        which = f"the first {len(conversations)} conversations of `{path}` ({trained})"
    max_new_tokens = train_config.get("seq_len", REASONING_MAX_TOKENS)  # no row the run trained on was longer
    answers = conversation_samples(checkpoint, conversations, max_new_tokens)
    left_out = len(conversations) - len(answers)
    if all(isinstance(conversation, TextCompletion) for conversation in conversations):  # as the run trained on them
        asked = "each its prompt as it is (TRL's prompt-completion text: no chat template), beside its completion"
    else:
        asked = "each in the chat template up to its last assistant turn, beside that turn"
    parts = [
        f"## Samples\n\nGreedy answers from the engine on `{checkpoint}` to {which}, {asked} from the file."
        + (
            f" {left_out} of them left out: a prompt that fills the model's context leaves no room (or none asks: the "
            "conversation opens with its answer)."
            if left_out
            else ""
        )
    ]
    for answer in answers:
        parts.append(_fenced(answer.prompt + answer.completion))
        parts.append(f"The file's answer:\n\n{_fenced(answer.reference)}")
    return "\n\n".join(parts)


def _from_run(run_dir: Path, path: str) -> Path:
    """A path train_config.json holds (relative to the run's folder, as the run resolved it) made absolute."""
    return (run_dir / path).resolve()


# Control characters but tab and line breaks (a CR alone is one only to some viewers): a random byte-level model's
# continuations hold NUL, ^C or ESC, which a Markdown viewer shows as garbage, cuts the page at or runs in a terminal.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]|\r(?!\n)")


def _fenced(text: str, language: str = "text") -> str:
    """`text` as a Markdown code block whose fence is longer than any run of backticks in it (CommonMark's rule), so
    a sample that holds a code fence of its own stays inside its block; its control characters (`_CONTROL`) are
    written as Python writes them in a string, visibly: NUL as \\x00."""
    text = _CONTROL.sub(lambda control: f"\\x{ord(control[0]):02x}", text)
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
