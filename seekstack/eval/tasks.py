"""Evaluation tasks that need no download: built from the held-out modules of a corpus (`val.jsonl` of
`seekstack data build`), as lm_eval task configs whose dataset is made in memory.

- code_cloze       multiple choice: which of 4 lines of the module comes next after the lines before it
                   (the true one and 3 others from the same module); acc and length-normalised acc_norm.
- code_next_line   generation: write the next line greedily (its indentation given, as the tokenizer cuts it),
                   stop at the newline; exact match.
- code_perplexity  rolling log-likelihood of each module's opening; bits per byte, byte and word perplexity.

And from the post-training tasks' held-out split (seekstack/posttrain/tasks), no corpus needed:
- reason_<task>    (reason_addition, reason_countdown, ..., reason_my_tasks:Parity for your own `module:Class`,
                   reason_path/to/problems.jsonl for a file of problems) the question in the chat template with
                   the R1 system prompt, a greedy completion until EOS; exact match = the answer after </think>
                   verifies.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from seekstack.corpus.sources import read_corpus_rows
from seekstack.posttrain.conversations import prompt_messages
from seekstack.posttrain.rewards import extract_answer, verified
from seekstack.posttrain.tasks import TASKS as POSTTRAIN_TASKS
from seekstack.posttrain.tasks import Problem, Task, make_task, sample_problems
from seekstack.posttrain.tasks.base import HELDOUT_PERCENT
from seekstack.posttrain.tasks.problems_file import is_problems_file
from seekstack.tokenizer import EOS, Tokenizer

LINE_TASKS = ("code_cloze", "code_next_line")  # the questions of `next_line_docs`, `per_module` of them a module
CODE_TASKS = (*LINE_TASKS, "code_perplexity")  # built from a corpus's held-out modules
REASONING_PREFIX = "reason_"
REASONING_TASKS = tuple(REASONING_PREFIX + name for name in POSTTRAIN_TASKS)
TASKS = CODE_TASKS + REASONING_TASKS
REASONING_PROBLEMS = 100  # held-out problems per reasoning task (lm_eval's --limit takes fewer)
REASONING_MAX_TOKENS = 128  # a think block and an answer
CONTEXT_LINES = 24  # lines before the one to predict
MIN_LINE_CHARS = 8  # lines shorter than this (blank, `)`, `else:`) are not asked for, ...
# ... nor lines longer than this: a paragraph stored as one line (web-text JSONL) or minified code, a continuation
# that could pass the model's context (a continuation is scored whole, and one past max_length is refused)
MAX_LINE_CHARS = 200
CHOICES = 4
PERPLEXITY_CHARS = 4000  # the opening of each module that code_perplexity scores
PYTHON_KIND = "code/python"  # the `kind` `seekstack data build` gives a Python document


def is_reasoning_task(name: str) -> bool:
    """Whether `name` is a post-training task's held-out split: one of REASONING_TASKS, or `reason_module:Class`
    or `reason_path/to/problems.jsonl`, a task of your own as sft, rl and pass-at-k name it (`task_class`,
    `is_problems_file`)."""
    own = name.removeprefix(REASONING_PREFIX)
    return name in REASONING_TASKS or (name.startswith(REASONING_PREFIX) and (":" in own or is_problems_file(own)))


def is_local_task(name: str) -> bool:
    """Whether seekstack builds the task `name` itself (a code task, or `is_reasoning_task`) rather than lm_eval."""
    return name in CODE_TASKS or is_reasoning_task(name)


def held_out_modules(corpus: str | Path) -> list[dict[str, str]]:
    """The validation documents ({"id", "text", "kind"}; kind "" where a row has none) of a corpus folder, in file
    order, read as `data tokenize` reads them (`read_corpus_rows`: an id where a row has none is `val.jsonl:line`);
    a ValueError naming val.jsonl:line for a line that is not JSON, not an object, or holds no string "text"."""
    path = Path(corpus) / "val.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass --corpus the folder `seekstack data build` wrote")
    modules = []
    for row in read_corpus_rows(path):
        kind = row.record.get("kind")
        modules.append({"id": row.doc_id, "text": row.text, "kind": kind if isinstance(kind, str) else ""})
    return modules


def all_python(modules: list[dict[str, str]]) -> bool:
    """Whether every one of `modules` (`held_out_modules` rows) is Python code, the demo corpus's kind of text: what
    its prompts and its token classes (keywords, identifiers) suit; true of no modules."""
    return all(module["kind"] == PYTHON_KIND for module in modules)


def next_line_docs(modules: list[dict[str, str]], per_module: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """Per module up to `per_module` questions: the CONTEXT_LINES lines before a line, that line, and CHOICES
    candidate lines (the true one at `gold`, the others drawn from the same module's candidate lines); for
    generation, `prompt` (the context and the line's indentation up to its last token) and the `rest`."""
    rng = random.Random(seed)
    docs = []
    for module in modules:
        lines = module["text"].split("\n")
        candidates = [
            i for i in range(CONTEXT_LINES, len(lines)) if MIN_LINE_CHARS <= len(lines[i].strip()) <= MAX_LINE_CHARS
        ]
        distinct = sorted({lines[i] for i in candidates})
        if len(distinct) < CHOICES:
            continue
        for i in sorted(rng.sample(candidates, min(per_module, len(candidates)))):
            target = lines[i]
            choices = rng.sample([line for line in distinct if line != target], CHOICES - 1) + [target]
            rng.shuffle(choices)
            context = "\n".join(lines[i - CONTEXT_LINES : i]) + "\n"
            # Byte-level BPE glues a newline to the following indentation but one space, which goes with the
            # word: the generation prompt ends where a token ends, and the line's rest is what to write.
            cut = max(len(target) - len(target.lstrip(" ")) - 1, 0)
            docs.append(
                {"module": module["id"], "context": context, "target": target, "choices": choices,
                 "gold": choices.index(target), "prompt": context + target[:cut], "rest": target[cut:]}
            )  # fmt: skip
    return docs


def _perplexity(items: list[tuple[float, int]]) -> float:
    """lm_eval's weighted_perplexity of (log-likelihood, units) pairs, exp(-sum log-likelihood / sum units); inf where
    that passes a float's range: a text without spaces (Chinese) is a few words of hundreds of bytes each, whose
    word perplexity is past it (`math.exp` raises OverflowError, a traceback in place of all the scores)."""
    from lm_eval.api.metrics import weighted_perplexity

    try:
        return weighted_perplexity(items)
    except OverflowError:
        return math.inf


def asked_problems(task: Task, count: int) -> list[Problem]:
    """The held-out problems of `task` that eval, report and sample ask: the first `count` distinct ones of seed 0
    (all of them where it has fewer)."""
    return sample_problems(task, count, "heldout", seed=0, distinct=True, up_to=True)


def reasoning_docs(
    task_name: str, tokenizer: Tokenizer, count: int = REASONING_PROBLEMS, difficulty: int | None = None
) -> list[dict[str, Any]]:
    """`count` distinct held-out problems of a post-training task at `difficulty` (None: its own; all of them where
    it has fewer: multiplication 79): the chat prompt (R1 system prompt, the question, the assistant turn opened) and
    what the verifier needs to rebuild the problem."""
    task = make_task(task_name, difficulty)
    docs = [
        {"prompt": tokenizer.render_chat(prompt_messages(p)), "key": p.key, "question": p.question,
         "answer": p.answer, "data": json.dumps(p.data)}
        for p in asked_problems(task, count)
    ]  # fmt: skip
    if not docs:  # lm_eval reads a task's first document as it builds the task: an IndexError traceback
        raise ValueError(
            f"task {task.name} has no held-out problem to evaluate: a problem is held out by its key's hash (about "
            f"{HELDOUT_PERCENT}% of them), and none of its problems is; give it more problems"
        )
    return docs


def _verified(task_name: str, reply_opening: str, difficulty: int | None):  # type: ignore[no-untyped-def]
    """lm_eval's `process_results` for a reasoning task: exact_match 1 when the completion's answer verifies, the
    completion read as opening with the `reply_opening` its prompt wrote (`Tokenizer.reply_opening`); a verifier that
    raises or returns other than True or False is refused as rl refuses it (`verified`), not scored."""
    task = make_task(task_name, difficulty)

    def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
        problem = Problem(doc["key"], doc["question"], doc["answer"], trace="", data=json.loads(doc["data"]))
        answer = extract_answer(reply_opening + results[0])
        return {"exact_match": float(answer is not None and verified(task, problem, answer))}

    return process_results


def reasoning_config(task: str, tokenizer: Tokenizer, difficulty: int | None = None) -> dict[str, Any]:
    """The lm_eval config of `reason_<name>` at `difficulty` (None: the task's own): greedy generation until EOS,
    scored by the task's verifier."""
    name = task.removeprefix(REASONING_PREFIX)
    return {
        "output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "answer",
        "generation_kwargs": {"until": [EOS], "max_gen_toks": REASONING_MAX_TOKENS, "do_sample": False},
        "process_results": _verified(name, tokenizer.reply_opening, difficulty),
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "custom_dataset": _in_memory(reasoning_docs(name, tokenizer, difficulty=difficulty)),
    }  # fmt: skip


def task_configs(
    corpus: str | Path | None,
    tasks: tuple[str, ...] = CODE_TASKS,
    per_module: int = 4,
    tokenizer: Tokenizer | None = None,
    difficulty: int | None = None,
    num_fewshot: int | None = None,
) -> list[dict[str, Any]]:
    """lm_eval task config dicts for `tasks`: the code tasks' documents built now from the corpus's held-out
    modules (enough of them for `num_fewshot` examples each: `code_task_configs`), the reasoning tasks' from their
    held-out split (at `difficulty`, None: each task's own) in the chat template of `tokenizer`."""
    unknown = [task for task in tasks if not is_local_task(task)]
    if unknown:
        raise ValueError(unknown_task(unknown[0]))
    # a few-shot example (--num-fewshot) ends its line, as the module's next line does, before the next one's context;
    # the examples come from the test split itself, named as the few-shot split so lm_eval leaves the question out
    common = {
        "test_split": "test", "fewshot_split": "test", "target_delimiter": "", "fewshot_delimiter": "\n",
        "metadata": {"version": 1},
    }  # fmt: skip
    reasoning = [task for task in tasks if is_reasoning_task(task)]
    if reasoning and tokenizer is None:
        raise ValueError(f"the reasoning tasks ({', '.join(reasoning)}) need the model's tokenizer for the chat prompt")
    configs = [
        {"task": task, **common, **reasoning_config(task, tokenizer, difficulty)}  # type: ignore[arg-type]
        for task in reasoning
    ]
    code = tuple(task for task in tasks if task in CODE_TASKS)
    if not code:
        return configs
    if corpus is None:
        raise ValueError(f"the code tasks ({', '.join(code)}) need --corpus: a folder with val.jsonl")
    return configs + code_task_configs(corpus, code, per_module, common, num_fewshot)


def unknown_task(name: str) -> str:
    """What to say of a local task's name that is none."""
    return (
        f"unknown task {name!r}; the local tasks are {', '.join(TASKS)}, or {REASONING_PREFIX}module:Class or "
        f"{REASONING_PREFIX}path/to/problems.jsonl for a post-training task of your own"
    )


def code_task_configs(
    corpus: str | Path, tasks: tuple[str, ...], per_module: int, common: dict[str, Any], num_fewshot: int | None = None
) -> list[dict[str, Any]]:
    """The code tasks' configs, their documents built from the corpus's held-out modules; ValueError naming
    --num-fewshot when a line task has too few documents for `num_fewshot` examples each, which lm_eval's sampler
    draws from the task's other documents (it failed with "Sample larger than population or is negative").
    code_perplexity's config sets num_fewshot 0, which lm_eval keeps whatever --num-fewshot says: a rolling
    log-likelihood scores the text alone, so examples would be drawn and never read, and its n-shot would say so."""
    modules = held_out_modules(corpus)
    questions = next_line_docs(modules, per_module)
    val = Path(corpus) / "val.jsonl"
    if not modules:
        raise ValueError(f"{val}: no held-out documents; build the corpus with a validation share")
    line_tasks = [task for task in tasks if task in LINE_TASKS]
    if line_tasks and not questions:
        raise ValueError(
            f"{val}: no held-out document has {CHOICES} distinct lines of {MIN_LINE_CHARS}-{MAX_LINE_CHARS} "
            f"characters after {CONTEXT_LINES} lines of context, so {' and '.join(line_tasks)} have no questions "
            "(they are made for source code and hard-wrapped text, not for paragraphs stored one to a line); "
            "code_perplexity scores any text: --tasks code_perplexity"
        )
    openings = [{"module": m["id"], "text": m["text"][:PERPLEXITY_CHARS]} for m in modules]
    configs = {
        "code_cloze": {
            "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "custom_dataset": _in_memory(questions),
        },
        "code_next_line": {
            "output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "rest",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 48, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "custom_dataset": _in_memory(questions),
        },
        "code_perplexity": {  # each text scored whole, its rolling windows reading no context: never examples
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text", "num_fewshot": 0,
            "metric_list": [
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
                {"metric": "byte_perplexity", "aggregation": _perplexity, "higher_is_better": False},
                {"metric": "word_perplexity", "aggregation": _perplexity, "higher_is_better": False},
            ],
            "custom_dataset": _in_memory(openings),
        },
    }  # fmt: skip
    documents = len(questions)  # the line tasks share their questions, so the first asked is named
    if line_tasks and num_fewshot is not None and num_fewshot >= documents:
        raise ValueError(
            f"--num-fewshot {num_fewshot}: {line_tasks[0]} has {documents} document(s) from {val}, and each one's "
            f"examples are drawn from the others: at most {documents - 1} (more held-out modules, or --per-module for "
            "the line tasks, give more)"
        )
    return [{"task": task, **common, **configs[task]} for task in tasks]


def _in_memory(docs: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
    """The `custom_dataset` callable lm_eval calls (with the run's metadata as keywords) for a task's documents."""

    def dataset(**_metadata: Any):  # type: ignore[no-untyped-def]
        from datasets import Dataset, DatasetDict

        return DatasetDict({"test": Dataset.from_list(docs)})

    return dataset
