"""`seekstack eval`: a checkpoint through lm-evaluation-harness on the local tasks (tasks.py) or any lm_eval task
name, with our backend (harness.py) or lm_eval's HF one on the same directory; results as JSON and a table."""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

from seekstack.adapters.files import ModelFolders, model_folders
from seekstack.atomic import write_atomic
from seekstack.checkpoint import read_config
from seekstack.eval.tasks import (
    CODE_TASKS,
    LINE_TASKS,
    REASONING_PREFIX,
    TASKS,
    is_local_task,
    is_reasoning_task,
    task_configs,
    unknown_task,
)
from seekstack.extras import import_extra
from seekstack.posttrain.config import require_task
from seekstack.schema import ConfigError
from seekstack.tokenizer import TOKENIZER_FILE, Tokenizer

BACKENDS = ("seekstack", "hf")  # ours, or lm_eval's transformers backend on the same checkpoint
EVAL_DTYPES = ("float32", "bfloat16", "float16", "auto")  # as both backends read them; auto: config.json's
# what lm_eval's results JSON records of each task beside its results, kept as it names them: "configs" holds each
# task's config as it ran (prompt, splits, few-shot, metrics, generation kwargs), "n-samples" its documents,
# {"original": all, "effective": those scored (--limit)}; lm_eval's "samples" are logged samples
LM_EVAL_TASK_RECORDS = ("configs", "versions", "n-shot", "higher_is_better", "n-samples")
LM_EVAL_SEEDS = "0,1234,1234,1234"  # lm_eval's --seed default: Python's, numpy's, torch's and the few-shot sampler's
GLOB_CHARACTERS = "*?["  # a --tasks name holding one is a pattern, as lm_eval's command line matches it (fnmatch)


def task_names(text: str) -> tuple[str, ...]:
    """The task names of `text`, comma-separated, as lm_eval's --tasks and its EvaluatorConfig read a string."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def evaluate(
    model_dir: str | Path,
    tasks: tuple[str, ...] | str = CODE_TASKS,
    corpus: str | Path | None = None,
    backend: str = "seekstack",
    batch_size: int | str = 8,
    limit: float | None = None,
    per_module: int = 4,
    device: str | None = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    samples_folder: str | Path | None = None,
    include_path: str | Path | None = None,
    dtype: str = "float32",
    difficulty: int | None = None,
    seed: str | None = None,
    fewshot_as_multiturn: bool | None = None,
    system_instruction: str | None = None,
    gen_kwargs: str | None = None,
) -> dict[str, Any]:
    """Run `tasks` (local names built from `corpus`, others looked up by lm_eval; a string: comma-separated names) on
    the checkpoint, on `device` (default: CUDA when there is one, else the CPU), `batch_size` requests at once or "auto"
    (the most the device holds), `limit` documents per task (a fraction of them below 1), with `num_fewshot` examples
    (None: each task's own) and `apply_chat_template` (the examples as earlier turns unless `fewshot_as_multiturn` is
    False, as lm_eval's --fewshot_as_multiturn false puts them in the first user turn; None: lm_eval's default) and
    `system_instruction` (lm_eval's --system_instruction: the chat's system message, else the text before each prompt);
    with `samples_folder`, lm_eval's own results JSON and per-task samples JSONL written there as its --output_path
    --log_samples writes them; task YAML files (and groups of them) in the folder `include_path` found by name, as
    lm_eval's --include_path; the model's weights in `dtype` (`EVAL_DTYPES`; auto: the one its config.json states, as
    transformers reads it); the reason_* tasks' problems at `difficulty` (None: each task's own, as `pass-at-k
    --difficulty` takes it); `seed` as lm_eval's --seed (`lm_eval_seeds`); `gen_kwargs` as lm_eval's --gen_kwargs
    (`lm_eval_gen_kwargs`: each generating task's generation kwargs updated); return {"model", "backend", "wall_s",
    "results": {task: {metric: value}}, lm_eval's "configs", "versions", "n-shot", "higher_is_better" and "n-samples"
    of each task (its config as it ran; the examples each ran with, its own default where num_fewshot is None; its
    documents, all and scored), "options": what it ran with, as `seekstack eval` takes them (corpus and per_module None
    where no task read them)}; a task named twice runs and is recorded once, as lm_eval's --tasks a,a. ConfigError
    (field tasks) for no task."""
    if isinstance(tasks, str):
        tasks = task_names(tasks)
    # a pattern matching local tasks (code_*) runs them, as lm_eval's command line matches its own names; one that
    # matches none is matched against lm_eval's names (or YAML paths) below
    tasks = (name for task in tasks for name in (fnmatch.filter(TASKS, task) or [task]))
    tasks = tuple(dict.fromkeys(tasks))  # lm_eval's command line drops a repeated name the same way, keeping the order
    if not tasks:  # lm_eval's own refusal, "No tasks specified, or no tasks found", names neither
        raise ConfigError(
            f": {tasks!r} names no task: give at least one, a local task ({', '.join(CODE_TASKS)}, reason_addition, "
            "...) or an lm_eval task name (hellaswag)",
            "tasks",
        )
    local = tuple(task for task in tasks if is_local_task(task))
    local_alone = len(local) == len(tasks)
    if local_alone:  # they never download: say so to `datasets` (read at its import)
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # an lm_eval task's dataset downloads, as under lm_eval
    lm_eval = import_extra("lm_eval", "eval", "seekstack eval")
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    from seekstack.eval.harness import requests_per_batch, resolve_device  # registers the `seekstack` model too

    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if dtype not in EVAL_DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(EVAL_DTYPES)}")
    number = requests_per_batch(batch_size)  # ConfigError for what is neither a number nor auto
    seeds = lm_eval_seeds(seed)
    generation = lm_eval_gen_kwargs(gen_kwargs)
    limit = _documents_limit(limit)
    batch_size = batch_size if number is None else number
    misspelt = [task for task in tasks if not is_local_task(task) and task.startswith(("code_", REASONING_PREFIX))]
    if misspelt:
        raise ValueError(unknown_task(misspelt[0]))
    reasoning = [task for task in local if is_reasoning_task(task)]
    if apply_chat_template and reasoning:
        raise ValueError(
            f"{', '.join(reasoning)}: their prompts are in the model's chat template already, which "
            "--apply-chat-template would wrap in a second one; evaluate them without it"
        )
    if fewshot_as_multiturn and not apply_chat_template:  # lm_eval's rule, its message naming neither option
        raise ValueError(
            "--fewshot-as-multiturn puts the few-shot examples in the chat template as earlier turns: give "
            "--apply-chat-template too (with it they are earlier turns unless --no-fewshot-as-multiturn)"
        )
    if system_instruction is not None and reasoning:
        raise ValueError(
            f"{', '.join(reasoning)}: each prompt is a whole chat with its own system prompt (R1's), so "
            "--system-instruction would be put before it as text; evaluate them without it"
        )
    if difficulty is not None and not reasoning:
        raise ConfigError(
            f": difficulty {difficulty} applies to the reason_* tasks only, and none is asked for", field="difficulty"
        )
    for task in reasoning if difficulty is not None else ():  # one a task refuses, before the checkpoint is read
        try:
            require_task(task.removeprefix(REASONING_PREFIX), difficulty=difficulty)
        except ConfigError as error:  # a task that is none is said as task_configs says it, naming no field
            if error.field == "difficulty":  # named as the option by the command, as pass-at-k's is
                raise
    if num_fewshot and reasoning:
        raise ValueError(
            f"{', '.join(reasoning)}: each prompt is a whole chat (system prompt, question, the reply opened), "
            f"so --num-fewshot {num_fewshot} would glue {num_fewshot} other chats before it; evaluate them without it"
        )
    folders = model_folders(model_dir)  # an adapter checkpoint: its base, and the tokenizer the two read with
    read_config(folders.weights)  # a missing checkpoint said as such, before the code tasks read the corpus
    tokenizer = Tokenizer.from_file(folders.tokenizer) if reasoning else None
    if backend == "hf":  # the seekstack backend checks its own (SeekstackLM)
        _check_transformers_runs(folders)
    device = str(resolve_device(device))
    model_args = {**_model_args(folders), "device": device, "dtype": dtype}
    if include_path is not None and Path(include_path).is_file():  # lm_eval's index would find no task in it
        raise ValueError(
            f"--include-path {include_path} is a file: it takes the folder of your task YAML files "
            f"({Path(include_path).parent}); a YAML file runs as --tasks {include_path}"
        )
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path}: no such folder; give the folder of your task YAML files")
    # lm_eval's task manager, the model args its tasks' metadata as simple_evaluate's; None: simple_evaluate's default,
    # which indexes lm_eval's tasks (~15,000 YAML files, ~8 s); local tasks alone are whole configs and need no index
    if local_alone:
        tasks_found = TaskManager(include_defaults=False, metadata=model_args)
    elif include_path is not None:
        tasks_found = TaskManager(include_path=include_path, metadata=model_args)
    else:
        tasks_found = None
    # what lm_eval's command line does with a pattern (EvaluatorConfig), which simple_evaluate leaves undone; a YAML
    # file's own path is none, whatever characters it holds (test_x[1]/task.yaml); a folder of YAML files is its
    # *.yaml, as lm_eval's --tasks FOLDER (one holding none, an output folder named hellaswag, stays a task name)
    in_folders = {task: os.path.join(glob.escape(task), "*.yaml") for task in tasks if task not in local}
    tasks = tuple(in_folders[task] if glob.glob(in_folders.get(task, "")) else task for task in tasks)
    patterns = [
        task
        for task in tasks
        if task not in local and any(char in task for char in GLOB_CHARACTERS) and not Path(task).is_file()
    ]
    if any(not pattern.endswith(".yaml") for pattern in patterns):
        tasks_found = tasks_found or TaskManager(metadata=model_args)  # lm_eval's index, to match its names in
    matched = {pattern: _matching(pattern, tasks_found) for pattern in patterns}
    tasks = tuple(dict.fromkeys(name for task in tasks for name in matched.get(task, [task])))
    specs: list[Any] = [task for task in tasks if task not in local]
    specs += task_configs(corpus, local, per_module, tokenizer, difficulty, num_fewshot) if local else []
    tracker = EvaluationTracker(output_path=str(samples_folder)) if samples_folder is not None else None
    started = time.perf_counter()
    try:
        with _without_unkept_records(keep_environment=tracker is not None):
            output = lm_eval.simple_evaluate(
                model=backend, model_args=model_args, tasks=specs, batch_size=batch_size, limit=limit,
                num_fewshot=num_fewshot, apply_chat_template=apply_chat_template, log_samples=tracker is not None,
                fewshot_as_multiturn=apply_chat_template if fewshot_as_multiturn is None else fewshot_as_multiturn,
                system_instruction=system_instruction, gen_kwargs=generation,
                evaluation_tracker=tracker, task_manager=tasks_found, random_seed=seeds[0], numpy_random_seed=seeds[1],
                torch_random_seed=seeds[2], fewshot_random_seed=seeds[3],
            )  # fmt: skip
    except KeyError as error:  # how lm_eval refuses a task name it does not know
        raise ValueError(f"lm_eval: {error.args[0] if error.args else error}") from None
    except yaml.YAMLError as error:  # a task YAML file that does not parse, which lm_eval's loader lets through
        mark = getattr(error, "problem_mark", None)
        raise ValueError(f"lm_eval: {mark.name if mark else 'a task YAML file'}: cannot be parsed ({error})") from None
    wall_s = time.perf_counter() - started
    if tracker is not None:
        _save_lm_eval_files(tracker, output)
    not_metrics = ("alias", "name", "sample_len")
    results = {
        task: {_metric_name(key): value for key, value in values.items() if key not in not_metrics}
        for task, values in output["results"].items()
    }
    corpus_read = corpus is not None and any(task in CODE_TASKS for task in local)  # else unread: recorded as None
    options = {
        "tasks": list(tasks), "corpus": str(Path(corpus).resolve()) if corpus_read else None,  # type: ignore[arg-type]
        "backend": backend, "batch_size": batch_size, "limit": limit,
        "per_module": per_module if any(task in LINE_TASKS for task in local) else None, "device": device,
        "num_fewshot": num_fewshot, "apply_chat_template": apply_chat_template,
        "fewshot_as_multiturn": fewshot_as_multiturn, "system_instruction": system_instruction,
        "include_path": str(Path(include_path).resolve()) if include_path is not None else None, "dtype": dtype,
        "difficulty": difficulty, "seed": None if seed is None else ",".join(map(str, seeds)), "gen_kwargs": gen_kwargs,
    }  # fmt: skip
    return {
        "model": str(model_dir), "backend": backend, "wall_s": wall_s, "results": results,
        **{key: output.get(key, {}) for key in LM_EVAL_TASK_RECORDS}, "options": options,
    }  # fmt: skip


def _matching(pattern: str, tasks_found: Any) -> list[str]:
    """The YAML files (`*.yaml`) or lm_eval task names (lm_eval's TaskManager `tasks_found`) `pattern` matches, as
    lm_eval's --tasks matches them; ValueError for none."""
    matches = sorted(glob.glob(pattern)) if pattern.endswith(".yaml") else tasks_found.match_tasks([pattern])
    if not matches:
        raise ValueError(f"lm_eval: no task matches {pattern!r}; give a task name, a pattern of them (arc_*), a YAML "
                         "file's path or a folder of them")  # fmt: skip
    return matches


@contextlib.contextmanager
def _without_unkept_records(keep_environment: bool) -> Iterator[None]:
    """lm_eval's evaluator, while in this block, with no `git_hash` in its output: it runs `git describe` in the
    working folder with stderr left open, printing "fatal: not a git repository" outside a checkout. The results
    kept here never held it, and `seekstack report` records seekstack's own commit. Unless `keep_environment` (its
    results JSON is written), nor its environment records either: add_env_info runs torch's collect_env (~11
    subprocesses, `pip list` among them; 1-6 s) for a record the results kept here drop."""
    import lm_eval.evaluator

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None))
        if not keep_environment:
            stack.enter_context(mock.patch.object(lm_eval.evaluator, "add_env_info", lambda results: None))
        yield


def _save_lm_eval_files(tracker: Any, output: dict[str, Any]) -> None:
    """lm_eval's results JSON and each task's samples JSONL, written by its EvaluationTracker as its command line
    writes them (so its tools read them)."""
    samples = output.pop("samples")
    tracker.save_results_aggregated(results=output, samples=samples)
    for task in output["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])


def lm_eval_seeds(seed: str | None) -> list[int | None]:
    """lm_eval's --seed as its command line reads it: one number for all four seeds, or Python's, numpy's, torch's
    and the few-shot sampler's comma-separated (the last left out: lm_eval's default; None: left unset); None:
    `LM_EVAL_SEEDS`. ConfigError (field seed) for anything else."""
    from lm_eval._cli.utils import _int_or_none_list_arg_type

    try:
        return _int_or_none_list_arg_type(3, 4, LM_EVAL_SEEDS, seed or LM_EVAL_SEEDS)
    except ValueError as error:
        raise ConfigError(
            f": {seed!r}: {error}; give one number for all four seeds (42), or Python's, numpy's, torch's and the "
            f"few-shot sampler's ({LM_EVAL_SEEDS}, lm_eval's default; None leaves one unset)",
            "seed",
        ) from None


def lm_eval_gen_kwargs(text: str | None) -> dict[str, Any] | None:
    """lm_eval's --gen_kwargs as its command line reads it: a JSON object, or key=value pairs comma-separated (a value
    read as a number, boolean or list where it is one); None for none. ConfigError (field gen_kwargs) for anything
    else."""
    from lm_eval._cli.utils import key_val_to_dict, try_parse_json

    remedy = "give key=value pairs, comma-separated (temperature=0.8,do_sample=True), or a JSON object"
    try:
        parsed = try_parse_json(text)
        parsed = key_val_to_dict(parsed) if isinstance(parsed, str) else parsed
    except ValueError as error:
        raise ConfigError(f": {text!r}: {error}; {remedy}", "gen_kwargs") from None
    if parsed is not None and not isinstance(parsed, dict):  # JSON of another kind: a number, a list
        raise ConfigError(f": {text!r} is JSON of no object; {remedy}", "gen_kwargs")
    return parsed or None


def _documents_limit(limit: float | None) -> int | float | None:
    """`limit` as lm_eval takes it (get_sample_size): a number of documents per task, its whole part where it has a
    fraction (2.5: 2, with a warning saying so; one past any task's count, 1e30, runs them all), or a fraction of them
    below 1 (0.1: a tenth); ConfigError (field limit) for one of 0 or less, or no number (nan, inf)."""
    if limit is None or 0 < limit < 1:
        return limit
    if not 1 <= limit < math.inf:
        raise ConfigError(
            f": {limit:g}: give a number of documents per task (40) or a fraction of them below 1 (0.1)", "limit"
        )
    if not float(limit).is_integer():
        warnings.warn(
            f"--limit {limit:g} runs {int(limit)} documents per task: a limit of 1 or more is a number of documents, "
            f"its whole part taken, as lm_eval's int(limit); a fraction of the documents is a limit below 1",
            stacklevel=3,
        )
    return min(int(limit), sys.maxsize)  # lm_eval slices a task's documents with it, and islice takes no more


def _metric_name(key: str) -> str:
    """lm_eval's result key "metric,filter" as the results name it: the metric alone under lm_eval's default filter
    "none", else the whole key, so each filter of a task (gsm8k's strict-match and flexible-extract) keeps its value."""
    metric, _, filter_name = key.partition(",")
    return metric if filter_name in ("", "none") else key


def _check_transformers_runs(folders: ModelFolders) -> None:
    """ValueError when lm_eval's HF backend would score another model than the checkpoint in `folders`: one of
    seekstack's ablations, whose extra weights transformers drops, or a tokenizer.json with ids past its vocabulary;
    a warning for fields transformers computes differently (`transformers_divergences`), and for fp8 weights its CPU
    loader dequantizes in other blocks than the checkpoint's."""
    from seekstack.checkpoint.load import warn_fp8_blocks_transformers_misreads, warn_transformers_divergences
    from seekstack.infer.engine import check_tokenizer_fits

    weights = folders.weights
    config = read_config(weights)
    if (folders.tokenizer / TOKENIZER_FILE).is_file():  # transformers reads a slow tokenizer's files too
        check_tokenizer_fits(Tokenizer.from_file(folders.tokenizer), config.vocab_size, weights)
    if config.attention_variant != "mla":
        raise ValueError(
            f"{weights}: attention_variant={config.attention_variant!r} is a seekstack ablation that transformers "
            "loads as plain MLA, leaving its channel gate and temporal convolution out: the hf backend would score "
            "another model; evaluate it with --backend seekstack"
        )
    warn_transformers_divergences(config, weights)
    warn_fp8_blocks_transformers_misreads(weights)


def _model_args(folders: ModelFolders) -> dict[str, str]:
    """lm_eval model args of a checkpoint, or of a LoRA run's adapter checkpoint: its base as `pretrained` with the
    adapter as `peft` (which both backends merge) and its tokenizer."""
    weights, adapter, tokenizer = folders
    if adapter is None:
        return {"pretrained": str(weights)}
    return {"pretrained": str(weights), "peft": str(adapter), "tokenizer": str(tokenizer)}


def documents_key(report: dict[str, Any]) -> str:
    """Which key of a results.json holds each task's documents: lm_eval's "n-samples", or "samples" in one written
    before "n-samples" was kept (its scored counts alone)."""
    return "samples" if "n-samples" not in report and "samples" in report else "n-samples"


def documents_scored(report: dict[str, Any]) -> dict[str, int]:
    """Each task's documents scored (`documents_key`): lm_eval's "n-samples" "effective" count (after --limit), or
    the "samples" counts of an earlier results.json."""
    key = documents_key(report)
    counts = report.get(key, {})
    return counts if key == "samples" else {task: n["effective"] for task, n in counts.items()}


def table_number(value: float) -> str:
    """A value as the results table prints it: 4 decimals, as lm_eval's table (0.3300, 2.0841), and from 1e6 up 4
    significant decimals and a power of ten (1.2346e+12), which a perplexity of an untrained model reaches."""
    return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4e}"


def results_table(report: dict[str, Any]) -> str:
    """The results as a Markdown table: one row per task and metric (with its filter, where not lm_eval's default),
    its value, standard error and documents scored (`table_number`). A standard error lm_eval could not compute (a
    perplexity's, one of a single document) is recorded "N/A" and printed so, as lm_eval's table prints it; a metric
    with none recorded (seekstack's own tasks) reads "-"."""
    documents = documents_scored(report)
    rows = ["| task | metric | value | stderr | n |", "|---|---|---|---|---|"]
    for task, metrics in sorted(report["results"].items()):
        for metric, value in metrics.items():
            name, comma, filter_name = metric.partition(",")
            if name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{name}_stderr{comma}{filter_name}", "-")  # lm_eval's "N/A" printed as it is
            stderr_text = table_number(stderr) if isinstance(stderr, (int, float)) else stderr
            rows.append(f"| {task} | {metric} | {table_number(value)} | {stderr_text} | {documents.get(task, '-')} |")
    return "\n".join(rows)


def results_paths(out: str | Path) -> tuple[Path, Path]:
    """The files `write_results` makes for `out`: `out`.json and `out`.md, a .json or .md it ends in (in any case)
    dropped first (r.json, r.JSON: r.json and r.md)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in (".json", ".md") else out  # model_v1.5: a name, no suffix
    return stem.parent / f"{stem.name}.json", stem.parent / f"{stem.name}.md"


def write_results(report: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """`out`.json (everything) and `out`.md (the table and the wall time), as `results_paths` names them; returns both
    paths."""
    json_path, table_path = results_paths(out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(json_path, json.dumps(report, indent=2, default=str) + "\n")
    header = f"Model `{report['model']}`, backend `{report['backend']}`, wall time {report['wall_s']:.1f} s\n\n"
    write_atomic(table_path, header + results_table(report) + "\n")
    return json_path, table_path
