"""`seekstack eval`, `seekstack explain` and `seekstack report`: judging a checkpoint and looking inside it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from seekstack.cli.common import (
    Checkpoint,
    interrupted_says,
    nothing_written_if_interrupted,
    options_named,
    refuse_empty_path,
    run_given,
    user_errors,
)

# seekstack/eval/tasks.py's TASKS, kept here for a fast --help (a test checks they agree)
LOCAL_TASKS = (
    "code_cloze, code_next_line, code_perplexity, "
    "reason_addition, reason_subtraction, reason_multiplication, reason_countdown"
)


def eval_command(
    ctx: typer.Context,
    model: Checkpoint,
    tasks: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated: local tasks ({LOCAL_TASKS}; reason_module:Class or reason_path/to/problems.jsonl "
            "for a post-training task of your own) or any lm_eval task name"
        ),
    ] = "code_cloze,code_next_line,code_perplexity",
    corpus: Annotated[
        Path | None,
        typer.Option(
            help="Corpus folder whose val.jsonl the code tasks come from; default a run's own (the one its token "
            "shards were encoded from), else runs/demo/corpus"
        ),
    ] = None,
    backend: Annotated[str, typer.Option(help="seekstack, or hf: lm_eval's transformers backend")] = "seekstack",
    batch_size: Annotated[
        str, typer.Option(help="Requests per forward pass / per engine batch, or auto: the most the device holds")
    ] = "8",
    limit: Annotated[
        float | None, typer.Option(help="At most this many documents per task, or a fraction of them below 1 (0.1)")
    ] = None,
    per_module: Annotated[int, typer.Option(min=1, help="Questions per held-out module (cloze, next line)")] = 4,
    device: Annotated[
        str | None, typer.Option(help="Where the model runs: cuda, cuda:1, cpu; default cuda when available, else cpu")
    ] = None,
    num_fewshot: Annotated[
        int | None, typer.Option(min=0, help="Examples before each question; default each task's own")
    ] = None,
    apply_chat_template: Annotated[
        bool, typer.Option(help="Prompts in the model's chat template, the examples as earlier turns (as lm_eval)")
    ] = False,
    fewshot_as_multiturn: Annotated[
        bool | None,
        typer.Option(
            help="With --apply-chat-template: the few-shot examples as earlier turns (the default, as lm_eval), or "
            "with --no-fewshot-as-multiturn all in the first user turn, as lm_eval's --fewshot_as_multiturn false"
        ),
    ] = None,
    system_instruction: Annotated[
        str | None,
        typer.Option(
            help="lm_eval's --system_instruction: the system message of each prompt in the chat template, else the "
            "text before each prompt"
        ),
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            help="The weights' dtype: float32, bfloat16, float16, or auto: the one config.json states (either backend)"
        ),
    ] = "float32",
    include_path: Annotated[
        Path | None, typer.Option(help="A folder of your own task YAML files (and groups), found by task name")
    ] = None,
    difficulty: Annotated[
        int | None,
        typer.Option(min=1, help="The reason_* tasks' knob (digits, numbers), at least 1; default: each task's own"),
    ] = None,
    seed: Annotated[
        str | None,
        typer.Option(
            help="lm_eval's --seed: one number for all four seeds (42), or Python's, numpy's, torch's and the few-shot "
            "sampler's, comma-separated (None leaves one unset); default 0,1234,1234,1234, lm_eval's"
        ),
    ] = None,
    gen_kwargs: Annotated[
        str | None,
        typer.Option(
            help="lm_eval's --gen_kwargs: generation kwargs each generating task's own are updated with, key=value "
            "comma-separated (max_gen_toks=512,do_sample=True,temperature=0.6) or a JSON object"
        ),
    ] = None,
    log_samples: Annotated[
        bool,
        typer.Option(
            help="Also write lm_eval's own files, its results JSON and each task's samples (prompts, answers, "
            "scores), into lm_eval/ beside the results files (inside OUT when OUT is a folder), in a subfolder named "
            "after the model as lm_eval names it"
        ),
    ] = False,
    out: Annotated[
        str | None,
        typer.Option(
            help="Results path without suffix, or a folder to write results.json and results.md into (an existing "
            "one, or one ending in /, made); default RUN/eval/results for a run or its checkpoint, else "
            "CHECKPOINT/eval/results",
            callback=refuse_empty_path,
        ),
    ] = None,
) -> None:
    """Evaluate a checkpoint with lm-evaluation-harness; write OUT.json (with the options it ran with) and a Markdown
    table OUT.md (by default in the run's out_dir when CHECKPOINT is one or one of its checkpoints, where `report` reads
    it)."""
    from seekstack.atomic import refuse_a_file_in_the_way
    from seekstack.checkpoint import read_config
    from seekstack.eval.evaluate import (
        EVAL_DTYPES,
        evaluate,
        results_paths,
        results_table,
        task_names,
        write_results,
    )
    from seekstack.train.runs import run_holding

    if dtype not in EVAL_DTYPES:
        raise typer.BadParameter(f"{dtype!r}: choose one of {', '.join(EVAL_DTYPES)}", param_hint="'--dtype'")
    names = task_names(tasks)
    if not names:
        raise typer.BadParameter(
            f"{tasks!r} names no task: give task names, comma-separated (code_cloze,code_perplexity)",
            param_hint="'--tasks'",
        )
    with user_errors():
        if model.is_file():  # refused as no checkpoint, not as the folder of the default OUT in it ("afile/eval")
            read_config(model)
        folder = run_given(ctx, model) or run_holding(model) or model  # never a run's checkpoint, which pruning deletes
        corpus = corpus or _run_corpus(folder) or DEMO_CORPUS
        path = Path(out) if out else folder / "eval" / "results"
        # a folder, or a path ending in a slash (one to make, which Path's parts drop): the files go into it, as
        # lm_eval's --output_path takes a folder
        path = path / "results" if path.is_dir() or (out or "").endswith(("/", os.sep)) else path
        json_path, table_path = results_paths(path)
        refuse_a_file_in_the_way(path.parent, f"{json_path.name} and {table_path.name}")  # before the evaluation runs
        samples_folder = path.parent / "lm_eval" if log_samples else None
        # a value evaluate() refuses, as the parser's own
        refusable = ("batch_size", "limit", "seed", "gen_kwargs", "difficulty")
        with options_named(refusable), interrupted_says(f" before the evaluation ended: {json_path} was not written"):
            report = evaluate(
                model, names, corpus, backend, batch_size, limit, per_module, device, num_fewshot, apply_chat_template,
                samples_folder, include_path, dtype, difficulty, seed, fewshot_as_multiturn, system_instruction,
                gen_kwargs,
            )  # fmt: skip
        json_path, table_path = write_results(report, path)
    typer.echo(results_table(report))
    typer.echo(f"wall time {report['wall_s']:.1f} s; wrote {json_path} and {table_path}")
    if samples_folder is not None:
        typer.echo(f"lm_eval's results and samples: {samples_folder}")


DEMO_CORPUS = Path("runs/demo/corpus")  # `make demo`'s, from the repository's folder


def _run_corpus(folder: Path) -> Path | None:
    """The `data build` folder the token shards of the run in `folder` were encoded from, None where `folder` holds no
    run or its shards record no corpus that is still there."""
    from seekstack.tokens.provenance import corpus_folder
    from seekstack.train.plot import json_object

    data_dir = json_object(folder / "train_config.json", "give --corpus").get("data_dir")
    return corpus_folder(folder / data_dir) if isinstance(data_dir, str) and data_dir else None


def explain_command(
    model: Checkpoint,
    text: Annotated[str | None, typer.Argument(help="The text to look at")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the PNGs and the HTML page")] = Path("explain"),
    corpus: Annotated[
        Path | None, typer.Option(help="Also routing statistics over this corpus folder's val.jsonl")
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=256, help="Tokens of the corpus the statistics read")] = 32768,
) -> None:
    """Attention maps per layer and head, and the experts each token chose, for TEXT; with --corpus, routing
    statistics (load, co-selection, consecutive tokens sharing an expert, token classes) over its val split."""
    import json

    from seekstack.adapters.files import merged_model, model_folders
    from seekstack.atomic import write_atomic
    from seekstack.checkpoint import load_pretrained, read_config
    from seekstack.eval.explain import (
        corpus_routing,
        explain_text,
        no_routing_note,
        remove_earlier_outputs,
        routing_png,
    )
    from seekstack.eval.tasks import all_python, held_out_modules
    from seekstack.infer.engine import check_tokenizer_fits
    from seekstack.tokenizer import Tokenizer

    with user_errors(), nothing_written_if_interrupted(out):  # loading and the corpus's routing: the slow part
        if text is None and corpus is None:
            raise ValueError("give a TEXT to explain, --corpus for routing statistics, or both")
        _require_folder_path(out)
        weights, adapter, tokenizer_folder = model_folders(model)  # a LoRA run's checkpoint: its base, merged
        config = read_config(weights)  # a missing folder said as such, before its tokenizer.json is looked for
        tokenizer = Tokenizer.from_file(tokenizer_folder)
        check_tokenizer_fits(tokenizer, config.vocab_size, weights)  # before the weights load
        network = load_pretrained(weights) if adapter is None else merged_model(load_pretrained(weights), adapter)
        network = network.eval()
        records = None
        if corpus is not None:  # before anything is written: a model or corpus it cannot read leaves no output
            modules = held_out_modules(corpus)
            texts = [module["text"] for module in modules]
            source, code = str(corpus / "val.jsonl"), all_python(modules)  # else prose's token classes
            records = corpus_routing(network, tokenizer, texts, max_tokens, source=source, code=code)
    with user_errors(), interrupted_says(f": {out} may mix this explain's files with an earlier one's: run it again"):
        written: list[Path] = []
        if text is not None:
            by_name = explain_text(network, tokenizer, text, out, model)
            for name, path in by_name.items():
                typer.echo(f"{name}: {path}")
            if "routing" not in by_name:
                typer.echo(f"routing: none. {no_routing_note(network.config)}")
            written += by_name.values()
        if records is not None:
            out.mkdir(parents=True, exist_ok=True)
            stats_png, stats_json = routing_png(records, out / "routing_stats.png", model), out / "routing_stats.json"
            typer.echo(f"routing statistics: {stats_png}")
            write_atomic(stats_json, json.dumps(records, indent=1) + "\n")
            written += [stats_png, stats_json]
            for record in records:
                typer.echo(
                    f"layer {record['layer']}: {record['tokens']:,} tokens, MaxVio {record['max_violation']:.2f}, "
                    f"consecutive tokens share an expert {record['consecutive_share']:.1%} "
                    f"(random pairs {record['chance_share']:.1%})"
                )
        for path in remove_earlier_outputs(out, written):
            typer.echo(f"removed {path}, an earlier explain's")


def _require_folder_path(out: Path) -> None:
    """Fail before any model work when --out, the folder explain writes into, is a file or lies under one."""
    from seekstack.atomic import file_in_the_way

    blocking = file_in_the_way(out)
    if blocking is not None:
        raise ValueError(
            f"--out {out}: {blocking} is a file; --out is the folder explain writes its PNGs, explain.html and "
            "routing_stats.json into (new or existing), e.g. --out explain"
        )


def report_command(
    run: Annotated[Path, typer.Argument(help="A training run's out_dir (or its metrics.jsonl or train_config.json)")],
    out: Annotated[Path | None, typer.Option(help="Folder for report.md and its PNGs; default RUN")] = None,
    samples: Annotated[
        bool, typer.Option(help="Generate samples: the demo prompts' continuations, or a post-training run's answers")
    ] = True,
) -> None:
    """One Markdown page for a run: environment, data, tokenizer, model size and FLOPs, curves, speed (an rl run:
    reward, accuracy, completion length), evaluation (from `seekstack eval RUN`, naming the checkpoint it measured),
    samples (a run on a task: its held-out questions in the chat template, verified; on a conversations file: its
    first conversations up to their last assistant turn, answered beside the file's answers)."""
    from seekstack.eval.report import REPORT_FILE, write_report
    from seekstack.train.runs import run_folder

    with user_errors():
        run = run_folder(run)  # a run's metrics.jsonl or train_config.json: its folder
        page = (out or run) / REPORT_FILE
        with interrupted_says(
            f": {page} was not written (its samples, made last, take the longest: --no-samples leaves them out)"
        ):
            path = write_report(run, out, samples)
    typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("explain")(explain_command)
    app.command("report")(report_command)
