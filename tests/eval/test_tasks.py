"""The local tasks: questions built from held-out modules, and the same scores from both lm_eval backends."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from seekstack.corpus.sources import read_corpus_rows
from seekstack.eval.tasks import (
    CHOICES,
    CONTEXT_LINES,
    MAX_LINE_CHARS,
    TASKS,
    held_out_modules,
    next_line_docs,
    reasoning_docs,
    task_configs,
)
from seekstack.posttrain.rewards import R1_SYSTEM_PROMPT
from seekstack.posttrain.tasks import split_of
from seekstack.tokenizer import ASSISTANT, BOS, USER, Tokenizer
from tests.posttrain.test_tasks import your_task  # noqa: F401  (a fixture: a task module of a user's own)

pytest.importorskip("lm_eval")

MODULE = "\n".join(f"value_{i} = compute({i})" if i % 3 else "" for i in range(60))


def write_corpus(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"id": f"m{i}.py", "text": text}) + "\n" for i, text in enumerate(texts))
    (folder / "val.jsonl").write_text(lines)
    return folder


def test_next_line_question_is_the_lines_before_and_the_true_line_among_others_of_the_module():
    docs = next_line_docs([{"id": "m.py", "text": MODULE}], per_module=5)
    lines = MODULE.split("\n")
    assert len(docs) == 5
    for doc in docs:
        index = lines.index(doc["target"])
        assert index >= CONTEXT_LINES and doc["target"]  # blank lines are never asked for
        assert doc["context"] == "\n".join(lines[index - CONTEXT_LINES : index]) + "\n"
        assert len(set(doc["choices"])) == CHOICES and doc["choices"][doc["gold"]] == doc["target"]
        assert all(choice in lines for choice in doc["choices"])
        assert doc["prompt"] + doc["rest"] == doc["context"] + doc["target"]
    assert next_line_docs([{"id": "m.py", "text": MODULE}], per_module=5) == docs  # seeded: the same questions


def test_generation_prompt_ends_where_the_tokenizer_ends_a_token(checkpoint):
    from seekstack.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(checkpoint)
    text = "".join(f"def f_{i}(x):\n    if x > {i}:\n        return x\n" for i in range(30))
    docs = next_line_docs([{"id": "m.py", "text": text}], per_module=20)
    assert {doc["target"][:5] for doc in docs} == {"def f", "    i", "     "}  # all three indentations asked
    for doc in docs:
        whole = tokenizer.encode(doc["prompt"] + doc["rest"])
        prompt = tokenizer.encode(doc["prompt"])
        assert whole[: len(prompt)] == prompt, doc  # no token straddles the cut
        assert doc["rest"] == doc["target"].lstrip(" ") or doc["rest"] == " " + doc["target"].lstrip(" ")


def test_paragraphs_stored_one_to_a_line_are_not_asked_for_so_no_continuation_outgrows_the_context(tmp_path):
    """Web-text JSONL keeps a paragraph on one line: such lines (here 1,000+ characters, past a small model's
    context in tokens) are neither asked for nor offered as choices; a corpus of nothing else says so."""
    words = "the licence grants you the freedom to share and change all versions of a program".split()
    paragraph = [" ".join(words[(i + j) % len(words)] for j in range(200)) + "." for i in range(40)]
    headings = [f"Section {i}: terms of the licence" for i in range(40)]
    mixed = "\n".join(line for pair in zip(paragraph, headings, strict=True) for line in pair)
    docs = next_line_docs([{"id": "licence", "text": mixed}], per_module=8)
    assert len(docs) == 8
    assert all(len(choice) <= MAX_LINE_CHARS for doc in docs for choice in doc["choices"])
    corpus = write_corpus(tmp_path, ["\n".join(paragraph)])
    with pytest.raises(ValueError, match=r"lines of 8-200 characters.*paragraphs stored one to a line"):
        task_configs(corpus, ("code_cloze",))


def test_unknown_task_and_missing_corpus_are_named(tmp_path):
    with pytest.raises(ValueError, match="code_clozee"):
        task_configs(write_corpus(tmp_path, [MODULE]), ("code_clozee",))
    with pytest.raises(FileNotFoundError, match="val.jsonl"):
        held_out_modules(tmp_path / "nowhere")


def test_held_out_modules_skip_blank_lines_and_name_the_line_of_a_damaged_one(tmp_path):
    corpus = write_corpus(tmp_path, [MODULE, "x = 1\n"])
    path = corpus / "val.jsonl"
    path.write_text(path.read_text() + "\n  \n")  # trailing blank lines, as an editor leaves them
    assert [module["id"] for module in held_out_modules(corpus)] == ["m0.py", "m1.py"]
    for line, message in [
        ('{"id": "m.py"}', "no field 'text', only 'id'"),
        ('{"id": "m.py", "text": 3}', "field 'text' is int, not a string"),
        ('["m.py", "x = 1"]', "a JSON array, not an object with a 'text' field"),
        ('{"id": "m.py", "text": "x', "not valid JSON"),
    ]:
        path.write_text(json.dumps({"id": "m0.py", "text": MODULE}) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=f"{re.escape(str(path))}:2: {message}"):
            held_out_modules(corpus)


def test_held_out_modules_take_a_corpus_that_tokenize_takes_rows_without_an_id_named_by_their_line(tmp_path):
    # a hand-made val.jsonl of texts alone: `data tokenize` and `tokenizer train` read it, so eval and explain do
    path = tmp_path / "val.jsonl"
    rows = [{"text": MODULE}, {"id": 7, "text": "x = 1"}, {"id": " ", "text": "y = 2"}, {"id": "m.py", "text": ""}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    assert [module["id"] for module in held_out_modules(tmp_path)] == ["val.jsonl:1", "7", "val.jsonl:3", "m.py"]
    assert [row.text for row in read_corpus_rows(path)] == [module["text"] for module in held_out_modules(tmp_path)]


def test_line_tasks_on_a_corpus_without_enough_distinct_lines_say_so_and_perplexity_still_runs(tmp_path):
    prose = "A short paragraph of prose.\n" * 40  # one distinct line: no four choices to ask between
    corpus = write_corpus(tmp_path / "prose", [prose])
    with pytest.raises(ValueError, match=r"val\.jsonl: no held-out document has 4 distinct lines.*code_cloze"):
        task_configs(corpus, ("code_cloze", "code_perplexity"))
    assert [config["task"] for config in task_configs(corpus, ("code_perplexity",))] == ["code_perplexity"]
    with pytest.raises(ValueError, match=r"val\.jsonl: no held-out documents"):
        task_configs(write_corpus(tmp_path / "empty", []), ("code_perplexity",))


def test_word_perplexity_past_a_floats_range_is_inf_where_lm_eval_raised(checkpoint, tmp_path):
    """Chinese text is one 'word' of hundreds of bytes: lm_eval's weighted_perplexity of it overflowed math.exp, and
    eval ended in an OverflowError traceback instead of its scores."""
    from seekstack.eval.evaluate import evaluate

    corpus = write_corpus(tmp_path / "zh", ["中文的句子没有空格，" * 40])
    scores = evaluate(checkpoint, ("code_perplexity",), corpus, "seekstack", limit=1)["results"]["code_perplexity"]
    assert scores["word_perplexity"] == math.inf
    assert 1 < scores["byte_perplexity"] < 2**20 and 0 < scores["bits_per_byte"] < 20


def test_local_tasks_score_the_same_on_our_backend_and_lm_evals_hf_backend(checkpoint, tmp_path):
    from seekstack.eval.evaluate import documents_scored, evaluate

    code = "\n".join(f"def f_{i}(x):\n    return x * {i} + len(str(x))\n" for i in range(20))
    corpus = write_corpus(tmp_path / "corpus", [code, MODULE])
    ours = evaluate(checkpoint, corpus=corpus, backend="seekstack", batch_size=4, limit=6, per_module=3)
    theirs = evaluate(checkpoint, corpus=corpus, backend="hf", batch_size=4, limit=6, per_module=3)
    documents = {"code_cloze": 6, "code_next_line": 6, "code_perplexity": 2}
    assert documents_scored(ours) == documents_scored(theirs) == documents
    for metric in ("acc", "acc_norm"):
        assert ours["results"]["code_cloze"][metric] == theirs["results"]["code_cloze"][metric]
    assert ours["results"]["code_next_line"]["exact_match"] == theirs["results"]["code_next_line"]["exact_match"]
    ours_bpb, theirs_bpb = (
        ours["results"]["code_perplexity"]["bits_per_byte"],
        theirs["results"]["code_perplexity"]["bits_per_byte"],
    )
    assert 5 < ours_bpb < 20 and ours_bpb == pytest.approx(theirs_bpb, abs=1e-6)  # random weights: ~log2(512)/bytes


def test_the_hf_backend_refuses_a_checkpoint_transformers_loads_as_another_model_and_warns_of_divergences(
    checkpoint, checkpoint_3d, tmp_path, monkeypatch
):
    """A 3D-attention checkpoint loses its channel gate and convolution in transformers: lm_eval's HF backend would
    score another model, so it is refused; fields transformers computes differently are warned of by name."""
    from seekstack.eval.evaluate import evaluate

    corpus = write_corpus(tmp_path / "corpus", [MODULE])
    with pytest.raises(ValueError, match=f"{checkpoint_3d}: attention_variant='3d' .* --backend seekstack"):
        evaluate(checkpoint_3d, ("code_perplexity",), corpus, "hf", limit=1)
    assert evaluate(checkpoint_3d, ("code_perplexity",), corpus, "seekstack", limit=1)["n-samples"] == {
        "code_perplexity": {"original": 1, "effective": 1}
    }

    softmax = Path(shutil.copytree(checkpoint, tmp_path / "softmax"))  # transformers' DeepseekV3 scores by sigmoid
    config = json.loads((softmax / "config.json").read_text())
    (softmax / "config.json").write_text(json.dumps({**config, "scoring_func": "softmax"}))
    with pytest.warns(UserWarning, match=f"{softmax}: transformers computes this checkpoint differently.*scoring_func"):
        evaluate(softmax, ("code_perplexity",), corpus, "hf", limit=1)


def test_the_hf_backend_on_fp8_blocks_transformers_misreads_warns_that_it_scores_other_weights(
    checkpoint, tmp_path, monkeypatch
):
    """`seekstack quantize --scheme fp8` of a model whose projections its 128x128 blocks do not divide warns that
    transformers' CPU loader dequantizes them in other blocks; `seekstack eval --backend hf` of that checkpoint scored
    those other weights without a word (lm_eval's run stubbed here: the warning comes before it)."""
    import lm_eval

    import seekstack
    from seekstack.eval.evaluate import evaluate

    output = {"results": {"code_perplexity": {}}, "n-samples": {"code_perplexity": {"original": 1, "effective": 1}}}
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: output)

    corpus = write_corpus(tmp_path / "corpus", [MODULE])
    fp8 = seekstack.save_pretrained(seekstack.load_pretrained(checkpoint), tmp_path / "fp8", fp8_block=(64, 64))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(checkpoint / name, fp8 / name)
    with pytest.warns(UserWarning, match=f"{fp8}: weight_block_size \\[64, 64\\] does not divide .* CPU loader"):
        evaluate(fp8, ("code_perplexity",), corpus, "hf", limit=1)


def test_eval_of_local_tasks_alone_indexes_no_task_file_and_outside_a_git_checkout_prints_no_git_error(
    checkpoint, tmp_path, monkeypatch, capfd
):
    """Each evaluation indexed lm_eval's ~15,000 tasks from their YAML files (~8 s of a CPU), even of local tasks
    alone, whose configs are built here and looked up by no name; --include-path's folder was indexed for them too.
    It also ran torch's collect_env (1-6 s of subprocesses) for environment records only lm_eval's results JSON
    keeps, which is not written here (the next test writes it and finds them)."""
    import lm_eval.tasks._index
    import torch.utils.collect_env

    from seekstack.eval.evaluate import evaluate

    read = []
    load_yaml = lm_eval.tasks._index.load_yaml
    monkeypatch.setattr(
        lm_eval.tasks._index, "load_yaml", lambda path, **kwargs: read.append(path) or load_yaml(path, **kwargs)
    )
    collected = []
    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", lambda: collected.append(1) or "collected")
    monkeypatch.chdir(tmp_path)  # no git checkout: lm_eval's `git describe` there printed "fatal: not a git repository"
    corpus = write_corpus(tmp_path / "corpus", [MODULE])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "sums_a.yaml").write_text(TASK_YAML.format(name="sums_a", data=tasks / "sums.jsonl"))
    result = evaluate(checkpoint, ("code_perplexity",), corpus=corpus, limit=1, device="cpu", include_path=tasks)
    assert result["n-samples"] == {"code_perplexity": {"original": 1, "effective": 1}}
    assert "not a git repository" not in capfd.readouterr().err
    assert read == []  # lm_eval read none of its task files, nor the include folder's
    assert collected == []


def test_results_record_each_tasks_n_shot_version_direction_and_documents_as_lm_evals_results_json(
    checkpoint, tmp_path
):
    """results.json kept the scores alone: how many few-shot examples each task ran with (its own default where
    --num-fewshot is left out), its version and which way is better were lost; lm_eval records them beside its
    results as n-shot, versions and higher_is_better. Its documents were "samples": {task: scored}, where lm_eval's
    "n-samples" holds them (all and scored) and its "samples" are the logged samples themselves."""
    from seekstack.eval.evaluate import evaluate

    corpus = write_corpus(tmp_path / "corpus", [MODULE, MODULE, MODULE])  # modules to draw the example from
    report = evaluate(checkpoint, ("code_perplexity",), corpus, limit=2, device="cpu", num_fewshot=1)
    assert report["n-samples"] == {"code_perplexity": {"original": 3, "effective": 2}} and "samples" not in report
    # code_perplexity reads no examples, whatever --num-fewshot says (the next test)
    assert report["n-shot"] == {"code_perplexity": 0} and report["versions"] == {"code_perplexity": 1}
    directions = {"bits_per_byte": False, "byte_perplexity": False, "word_perplexity": False}
    assert report["higher_is_better"] == {"code_perplexity": directions}


def test_code_perplexity_runs_and_records_no_few_shot_examples_whatever_num_fewshot_says(checkpoint, tmp_path):
    """lm_eval scores a rolling log-likelihood on the document's text alone, so --num-fewshot N drew N examples for
    code_perplexity that were never read: its score was the zero-shot one while its n-shot said N, and a corpus of
    N modules or fewer was refused for examples it would not use. Its config sets num_fewshot 0, which lm_eval keeps."""
    from seekstack.eval.evaluate import evaluate

    corpus = write_corpus(tmp_path / "corpus", [MODULE, MODULE.replace("compute", "measure")])
    report = evaluate(checkpoint, "code_cloze,code_perplexity", corpus, limit=1, device="cpu", num_fewshot=1)
    assert report["n-shot"] == {"code_cloze": 1, "code_perplexity": 0}
    one = write_corpus(tmp_path / "one", [MODULE])
    assert [config["num_fewshot"] for config in task_configs(one, ("code_perplexity",), num_fewshot=2)] == [0]


def test_results_record_each_tasks_config_as_it_ran_as_lm_evals_results_json(checkpoint, tmp_path):
    """results.json lacked lm_eval's "configs", each task's config as it ran (its prompt and splits, few-shot count,
    output type, metrics), which an lm_eval user reads to know what a score measured."""
    from seekstack.eval.evaluate import evaluate, write_results

    corpus = write_corpus(tmp_path / "corpus", [MODULE, MODULE])
    report = evaluate(checkpoint, "code_perplexity,code_cloze", corpus, limit=1, device="cpu", num_fewshot=1)
    written = json.loads(write_results(report, tmp_path / "results")[0].read_text())
    assert sorted(written["configs"]) == ["code_cloze", "code_perplexity"]
    cloze, perplexity = written["configs"]["code_cloze"], written["configs"]["code_perplexity"]
    assert (cloze["num_fewshot"], cloze["output_type"], cloze["doc_to_choice"]) == (1, "multiple_choice", "choices")
    assert [metric["metric"] for metric in cloze["metric_list"]] == ["acc", "acc_norm"]
    assert (perplexity["num_fewshot"], perplexity["output_type"]) == (0, "loglikelihood_rolling")
    assert perplexity["test_split"] == perplexity["fewshot_split"] == "test"


def test_log_samples_writes_lm_evals_own_results_and_samples_files_that_its_tools_read(checkpoint, tmp_path):
    """seekstack eval kept only its own results.json: no per-request samples, no file of lm_eval's shape."""
    from lm_eval.utils import make_table

    from seekstack.eval.evaluate import evaluate

    corpus = write_corpus(tmp_path / "corpus", [MODULE])
    report = evaluate(checkpoint, ("code_perplexity",), corpus, limit=1, device="cpu", samples_folder=tmp_path / "lm")
    [results_file] = (tmp_path / "lm").glob("*/results_*.json")
    [samples_file] = results_file.parent.glob("samples_code_perplexity_*.jsonl")
    written = json.loads(results_file.read_text())
    bits = written["results"]["code_perplexity"]["bits_per_byte,none"]
    assert bits == report["results"]["code_perplexity"]["bits_per_byte"]
    assert "code_perplexity" in make_table(written)  # lm_eval's own table of a results file
    assert written["pretty_env_info"] and written["lm_eval_version"]  # its environment records, as its CLI writes
    [sample] = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert sample["doc"]["text"] == MODULE[:4000] and sample["doc_id"] == 0


TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{q}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def test_a_group_of_the_users_own_task_yamls_runs_from_include_path(checkpoint, tmp_path, monkeypatch):
    """seekstack eval had no --include-path: a group YAML naming the user's own tasks could not be run (a YAML path
    in --tasks failed in `datasets` with 'expected str, bytes or os.PathLike object, not NoneType'). Beside a local
    task, a task that is not local is still looked up in lm_eval's own index as well as the include folder."""
    import lm_eval.tasks._index

    from seekstack.eval.evaluate import evaluate

    read = []
    load_yaml = lm_eval.tasks._index.load_yaml
    monkeypatch.setattr(
        lm_eval.tasks._index, "load_yaml", lambda path, **kwargs: read.append(path) or load_yaml(path, **kwargs)
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"q": f"{a} + 1?", "choices": [str(a + 1), str(a + 2)], "label": 0} for a in range(3)]
    (tasks / "sums.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for name in ("sums_a", "sums_b"):
        (tasks / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=tasks / "sums.jsonl"))
    (tasks / "group.yaml").write_text("group: sums\ntask: [sums_a, sums_b]\naggregate_metric_list:\n  - metric: acc\n")
    corpus = write_corpus(tmp_path / "corpus", [MODULE])
    report = evaluate(checkpoint, ("code_perplexity", "sums"), corpus, limit=2, device="cpu", include_path=tasks)
    lm_evals_own = Path(lm_eval.tasks.__file__).parent
    assert sum(Path(path).is_relative_to(lm_evals_own) for path in read) > 1000  # lm_eval's index was built
    assert set(report["results"]) == {"code_perplexity", "sums", "sums_a", "sums_b"}
    assert report["n-samples"]["sums_a"] == {"original": 3, "effective": 2}
    assert report["results"]["sums"]["acc"] == report["results"]["sums_a"]["acc"]  # the same questions twice
    assert report["options"]["include_path"] == str(tasks.resolve())
    with pytest.raises(ValueError, match=f"--include-path {tmp_path / 'none'}: no such folder"):
        evaluate(checkpoint, ("sums",), include_path=tmp_path / "none")
    # lm_eval indexes a folder's YAML files: a file given finds no task, and was called "no such folder"
    file = tasks / "sums_a.yaml"
    with pytest.raises(ValueError, match=re.escape(f"--include-path {file} is a file: it takes the folder of your task "
                       f"YAML files ({tasks}); a YAML file runs as --tasks {file}")):  # fmt: skip
        evaluate(checkpoint, ("sums_a",), include_path=file)


@pytest.mark.usefixtures("lm_evals_index_built_once")
def test_a_system_instruction_is_the_chat_system_message_or_the_text_before_each_prompt_as_lm_evals(
    checkpoint, tmp_path
):
    """seekstack eval had no --system-instruction (lm_eval's): no task could be asked under a system prompt."""
    from seekstack.eval.evaluate import evaluate
    from seekstack.eval.report import _eval_again

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "sums.jsonl").write_text(json.dumps({"q": "1 + 1?", "choices": ["2", "3"], "label": 0}) + "\n")
    (tasks / "sums_a.yaml").write_text(TASK_YAML.format(name="sums_a", data=tasks / "sums.jsonl"))
    contexts = {}
    for chat in (True, False):
        folder = tmp_path / f"lm_{chat}"
        report = evaluate(checkpoint, ("sums_a",), device="cpu", include_path=tasks, apply_chat_template=chat,
                          samples_folder=folder, system_instruction="Answer with a number.")  # fmt: skip
        assert report["options"]["system_instruction"] == "Answer with a number."
        assert "--system-instruction 'Answer with a number.'" in _eval_again(tmp_path, report)  # report's rerun
        [samples_file] = folder.glob("*/samples_sums_a_*.jsonl")
        [sample] = [json.loads(line) for line in samples_file.read_text().splitlines()]
        contexts[chat] = {argument["arg_0"] for argument in sample["arguments"].values()}
    assert contexts[True] == {f"{BOS}Answer with a number.{USER}Question: 1 + 1?\nAnswer:{ASSISTANT}"}
    assert contexts[False] == {"Answer with a number.Question: 1 + 1?\nAnswer:"}  # lm_eval's own joining
    with pytest.raises(ValueError, match="reason_addition: each prompt is a whole chat with its own system prompt"):
        evaluate(checkpoint, ("reason_addition",), system_instruction="Be brief.")


def test_a_few_shot_example_of_the_line_tasks_ends_its_line_before_the_next_question(tmp_path):
    """With --num-fewshot, an example's line ran into the next question's context ('rv = reductor(x)import sys')."""
    from lm_eval.api.task import ConfigurableTask

    corpus = write_corpus(tmp_path / "corpus", [MODULE, MODULE.replace("compute", "measure")])
    for name in ("code_cloze", "code_next_line"):
        [config] = task_configs(corpus, (name,), per_module=2)
        task = ConfigurableTask(config={**config, "num_fewshot": 1})
        docs = list(task.test_docs())
        examples = task.fewshot_context(docs[0], 1).removesuffix(task.doc_to_text(docs[0]))
        assert any(examples.endswith(doc["target"] + "\n") for doc in docs), (name, examples[-80:])


def test_a_few_shot_example_is_never_the_document_asked_about(tmp_path):
    """The local tasks draw their examples from the test split itself, and lm_eval left the question out of them only
    when the few-shot split is named: with --num-fewshot 2 of 3 documents, a document was its own example (a
    code_cloze question shown with its answer line before it was asked)."""
    from lm_eval.api.task import ConfigurableTask

    texts = [f"opening_{i} = {i}\n" * 3 for i in range(3)]
    [config] = task_configs(write_corpus(tmp_path / "corpus", texts), ("code_perplexity",))
    task = ConfigurableTask(config={**config, "num_fewshot": 2})
    task.set_fewshot_seed(1234)
    for doc in task.test_docs():
        examples = task.fewshot_context(doc, num_fewshot=2)
        assert doc["text"] not in examples and examples.count("opening_") == 6  # the two others, 3 lines each


def test_more_few_shot_examples_than_a_task_has_other_documents_are_refused_naming_num_fewshot(tmp_path):
    """lm_eval's sampler failed with "Sample larger than population or is negative", naming neither the option nor
    the task: a document's examples are drawn from the task's other documents, so 2 documents hold 1 example."""
    corpus = write_corpus(tmp_path / "corpus", [MODULE, MODULE])
    refused = r"^--num-fewshot 2: code_cloze has 2 document\(s\) from .*val\.jsonl, .* the others: at most 1 \("
    with pytest.raises(ValueError, match=refused):
        task_configs(corpus, ("code_cloze",), per_module=1, num_fewshot=2)
    assert [config["task"] for config in task_configs(corpus, ("code_cloze",), per_module=1, num_fewshot=1)] == [
        "code_cloze"
    ]


def test_help_lists_every_local_task():
    from seekstack.cli.evaluate import LOCAL_TASKS

    assert tuple(LOCAL_TASKS.split(", ")) == TASKS


def test_reasoning_prompts_are_held_out_questions_in_the_chat_template(checkpoint):
    tokenizer = Tokenizer.from_file(checkpoint)
    docs = reasoning_docs("addition", tokenizer, count=5)
    assert len(docs) == 5 and all(split_of(doc["key"]) == "heldout" for doc in docs)
    for doc in docs:
        assert doc["prompt"].startswith(BOS) and doc["prompt"].endswith(ASSISTANT)
        assert f"{USER}{doc['question']}" in doc["prompt"] and R1_SYSTEM_PROMPT in doc["prompt"]


def test_reasoning_task_scores_the_verified_answer_after_the_think_block(checkpoint):
    tokenizer = Tokenizer.from_file(checkpoint)
    (config,) = task_configs(None, ("reason_countdown",), tokenizer=tokenizer)
    doc = reasoning_docs("countdown", tokenizer, count=1)[0]
    score = config["process_results"]
    assert score(doc, [f"<think> try </think> {doc['answer']}"]) == {"exact_match": 1.0}
    assert score(doc, ["<think> try </think> 1 + 1"]) == {"exact_match": 0.0}
    assert score(doc, [doc["answer"]]) == {"exact_match": 0.0}  # no think block: not in the R1 format


def test_a_reasoning_task_with_no_held_out_problem_is_refused_naming_it(checkpoint, tmp_path):
    """A problems file whose questions all hash to the train split (two of them, often) gave lm_eval a task of no
    documents, and `seekstack eval` ended in its IndexError traceback ('Invalid key: 0 is out of bounds for size 0')."""
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"question": "1+1=？", "answer": "2"}\n{"question": "3+4", "answer": "7"}\n', encoding="utf-8")
    tokenizer = Tokenizer.from_file(checkpoint)
    with pytest.raises(ValueError, match=rf"^task {re.escape(str(problems))} has no held-out problem to evaluate"):
        task_configs(None, (f"reason_{problems}",), tokenizer=tokenizer)


def test_reasoning_task_needs_no_corpus_and_code_tasks_do(checkpoint):
    tokenizer = Tokenizer.from_file(checkpoint)
    assert [c["task"] for c in task_configs(None, ("reason_addition",), tokenizer=tokenizer)] == ["reason_addition"]
    with pytest.raises(ValueError, match="code_cloze.*--corpus"):
        task_configs(None, ("reason_addition", "code_cloze"), tokenizer=tokenizer)


def test_reasoning_task_runs_on_both_backends_with_the_same_scores(checkpoint):
    from seekstack.eval.evaluate import documents_scored, evaluate

    ours = evaluate(checkpoint, ("reason_addition",), backend="seekstack", limit=3)
    theirs = evaluate(checkpoint, ("reason_addition",), backend="hf", limit=3)
    assert documents_scored(ours) == documents_scored(theirs) == {"reason_addition": 3}
    assert ours["results"]["reason_addition"]["exact_match"] == theirs["results"]["reason_addition"]["exact_match"]


def test_a_misspelt_local_task_is_named_before_lm_eval_runs(checkpoint):
    from seekstack.eval.evaluate import evaluate

    with pytest.raises(ValueError, match="unknown task 'reason_additon'.*reason_addition"):
        evaluate(checkpoint, ("reason_additon",))


def test_no_task_is_refused_naming_the_tasks_field_before_lm_eval_runs(checkpoint):
    """evaluate(tasks=()) reached lm_eval, which said 'No tasks specified, or no tasks found', naming no field."""
    from seekstack.eval.evaluate import evaluate
    from seekstack.schema import ConfigError

    with pytest.raises(ConfigError) as refused:
        evaluate(checkpoint, ())
    assert refused.value.field == "tasks"
    assert str(refused.value).startswith("field 'tasks': () names no task: give at least one, a local task (code_cloze")


def test_a_task_named_twice_runs_and_is_recorded_once_as_lm_evals_command_line_takes_it(checkpoint, tmp_path):
    """--tasks code_perplexity,code_cloze,code_perplexity built code_perplexity twice and recorded it twice in the
    options (and so in report's rerun command); lm_eval's --tasks drops a repeated name, keeping the first's place."""
    from seekstack.eval.evaluate import evaluate

    corpus = write_corpus(tmp_path / "corpus", [MODULE, MODULE.replace("compute", "measure")])
    tasks = ("code_perplexity", "code_cloze", "code_perplexity")
    report = evaluate(checkpoint, tasks, corpus, limit=1, device="cpu")
    assert report["options"]["tasks"] == ["code_perplexity", "code_cloze"]
    assert set(report["results"]) == set(report["n-samples"]) == {"code_perplexity", "code_cloze"}


def test_tasks_given_as_one_string_are_its_comma_separated_names_as_lm_evals(checkpoint, tmp_path):
    """evaluate(model, "code_perplexity") ran each character as a task: "lm_eval: Spec 'c' is not a registered
    task/group/tag name or valid YAML path"; lm_eval's --tasks and its EvaluatorConfig take a comma-separated string."""
    from seekstack.eval.evaluate import evaluate

    corpus = write_corpus(tmp_path / "corpus", [MODULE])
    report = evaluate(checkpoint, "code_perplexity, code_perplexity", corpus, limit=1, device="cpu")
    assert report["options"]["tasks"] == ["code_perplexity"] and set(report["results"]) == {"code_perplexity"}


@pytest.mark.usefixtures("lm_evals_index_built_once")
def test_a_pattern_in_tasks_runs_the_tasks_and_yaml_files_it_matches_as_lm_evals_command_line(checkpoint, tmp_path):
    """--tasks 'code_perp*' was refused ("unknown task 'code_perp*'") and 'sums_*.yaml' or 'arc_eas*' failed in
    lm_eval ("Spec ... is not a registered task/group/tag name or valid YAML path"): lm_eval's --tasks matches a
    pattern against its task names and YAML paths (fnmatch, glob), and takes a folder's YAML files, which
    simple_evaluate leaves to its command line."""
    from seekstack.eval.evaluate import evaluate

    rows = [{"q": f"{a} + 1?", "choices": [str(a + 1), str(a + 2)], "label": 0} for a in range(3)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for name in ("sums_a", "sums_b", "set[1]/sums_c"):  # a file's own path is no pattern, whatever it holds
        (tmp_path / f"{name}.yaml").parent.mkdir(exist_ok=True)
        (tmp_path / f"{name}.yaml").write_text(TASK_YAML.format(name=Path(name).name, data=tmp_path / "sums.jsonl"))
    corpus = write_corpus(tmp_path / "corpus", [MODULE])
    tasks = f"code_perp*,{tmp_path}/sums_*.yaml,{tmp_path}/set[1]/sums_c.yaml"
    report = evaluate(checkpoint, tasks, corpus, limit=1, device="cpu")
    assert set(report["results"]) == {"code_perplexity", "sums_a", "sums_b", "sums_c"}
    yaml_files = [str(tmp_path / name) for name in ("sums_a.yaml", "sums_b.yaml", "set[1]/sums_c.yaml")]
    assert report["options"]["tasks"] == ["code_perplexity", *yaml_files]
    folder = evaluate(checkpoint, str(tmp_path / "set[1]"), limit=1, device="cpu")  # its YAML files, as lm_eval's
    assert set(folder["results"]) == {"sums_c"} and folder["options"]["tasks"] == [yaml_files[2]]
    with pytest.raises(ValueError, match=re.escape(f"lm_eval: no task matches '{tmp_path}/none_*.yaml'; give a task")):
        evaluate(checkpoint, f"{tmp_path}/none_*.yaml")
    with pytest.raises(ValueError, match="unknown task 'code_x\\*'"):  # a local task's prefix: a local task misspelt
        evaluate(checkpoint, "code_x*")


@pytest.mark.usefixtures("lm_evals_index_built_once")
def test_a_task_yaml_file_that_does_not_parse_is_refused_naming_the_file(checkpoint, tmp_path):
    """A --tasks YAML file with a YAML error (a bracket left open) is a ValueError naming the file and YAML's
    problem, as one that parses to no mapping is (lm_eval's own ValueError): seekstack eval says it as its error."""
    from seekstack.eval.evaluate import evaluate

    task = tmp_path / "sums_a.yaml"
    task.write_text("task: [sums_a\noutput_type: multiple_choice\n")
    message = f"lm_eval: {task}: cannot be parsed (while parsing a flow sequence"
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate(checkpoint, (str(task),), device="cpu")


def test_a_reasoning_task_of_your_own_is_named_reason_module_colon_class_as_sft_rl_and_pass_at_k_name_it(
    checkpoint,
    your_task,  # noqa: F811  (the fixture imported above)
    monkeypatch,
):
    """`eval --tasks reason_your_task:Parity` was refused ("unknown task 'reason_your_task:Parity'; the local tasks
    are ..."), where `sft`, `rl`, `distill`, `pass-at-k` and `traces` take `task=your_task:Parity`."""
    import lm_eval

    from seekstack.eval.evaluate import evaluate

    tokenizer = Tokenizer.from_file(checkpoint)
    (config,) = task_configs(None, ("reason_your_task:Parity",), tokenizer=tokenizer)
    docs = config["custom_dataset"]()["test"]
    assert len(docs) > 0 and all(split_of(doc["key"]) == "heldout" and "count of 1s" in doc["question"] for doc in docs)
    doc = docs[0]
    assert config["process_results"](doc, [f"<think> count </think> {doc['answer']}"]) == {"exact_match": 1.0}
    asked = []
    output = {"results": {"reason_your_task:Parity": {"exact_match,none": 0.5}}, "n-samples": {}}
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: asked.append(kwargs["tasks"]) or output)
    evaluate(checkpoint, ("reason_your_task:Parity", "hellaswag"), device="cpu")
    assert asked[0][0] == "hellaswag" and asked[0][1]["task"] == "reason_your_task:Parity"  # built here, not lm_eval's
    with pytest.raises(ValueError, match="task 'your_task:Nope': module 'your_task' .* has no class 'Nope'"):
        evaluate(checkpoint, ("reason_your_task:Nope",), device="cpu")
    with pytest.raises(
        ValueError,
        match="unknown task 'reason_parity'; .* or reason_module:Class or reason_path/to/problems.jsonl for a",
    ):
        evaluate(checkpoint, ("reason_parity",), device="cpu")


def test_a_verifier_of_your_own_that_raises_or_returns_nan_is_refused_naming_the_task_as_rl_refuses_it(
    checkpoint,
    your_task,  # noqa: F811  (the fixture imported above)
    tmp_path,
):
    """eval scored with task.verify itself: a verifier returning NaN gave lm_eval a NaN exact_match, one that raised
    its bare traceback, where rl's reward (`verified`) names the task, the problem and the answer."""
    (tmp_path / "wrong_verifiers.py").write_text(
        "from your_task import Parity\n\n\n"
        "class GivesNaN(Parity):\n    def verify(self, problem, answer):\n        return float('nan')\n\n\n"
        "class Raises(Parity):\n    def verify(self, problem, answer):\n        return int(answer) == 1\n"
    )
    tokenizer = Tokenizer.from_file(checkpoint)
    for task, said in (("GivesNaN", "returned nan; a verifier returns True or False"), ("Raises", "raised ValueError")):
        (config,) = task_configs(None, (f"reason_wrong_verifiers:{task}",), tokenizer=tokenizer)
        doc = config["custom_dataset"]()["test"][0]
        call = rf"^task 'parity': verify\(problem '{doc['key']}', answer 'even'\) {said}"
        with pytest.raises(ValueError, match=call):
            config["process_results"](doc, ["<think> count </think> even"])


def test_a_file_of_problems_is_a_reasoning_task_named_reason_and_its_path(checkpoint, tmp_path):
    """`eval --tasks reason_problems.jsonl` was refused as an unknown task, where rl and pass-at-k take the file."""
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"question": f"Half of {n}?", "answer": n / 2}) + "\n" for n in range(60)))
    name = f"reason_{path}"
    (config,) = task_configs(None, (name,), tokenizer=Tokenizer.from_file(checkpoint))
    docs = config["custom_dataset"]()["test"]
    assert len(docs) > 0 and all(split_of(doc["key"]) == "heldout" for doc in docs)
    half = docs[0]
    number = float(half["answer"])
    assert config["process_results"](half, [f"<think> so </think> \\boxed{{{number}}}"]) == {"exact_match": 1.0}
    assert config["process_results"](half, [f"<think> so </think> {number + 1}"]) == {"exact_match": 0.0}


def test_eval_asks_the_reasoning_tasks_at_the_difficulty_given_as_pass_at_k_does(checkpoint, tmp_path, monkeypatch):
    """seekstack eval had no --difficulty: reason_addition asked 2-digit sums of a model SFT had trained on 1-digit
    ones (exact_match 0.00 where `pass-at-k --difficulty 1` read greedy 0.27)."""
    import lm_eval
    from typer.testing import CliRunner

    from seekstack.cli import app
    from seekstack.eval.evaluate import evaluate
    from seekstack.eval.report import _eval_again

    asked = []
    counts = {"reason_addition": {"effective": 15}}
    output = {"results": {"reason_addition": {"exact_match,none": 0.5}}, "n-samples": counts}
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: asked.append(kwargs) or output)
    args = ["eval", str(checkpoint), "--tasks", "reason_addition", "--difficulty", "1", "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (config,) = asked[-1]["tasks"]
    docs = config["custom_dataset"]()["test"]
    assert len(docs) == 15  # every held-out problem of 1-digit addition
    assert all(re.fullmatch(r"What is \d \+ \d\?", doc["question"]) for doc in docs)
    doc = docs[0]
    assert config["process_results"](doc, [f"<think> sum </think> {doc['answer']}"]) == {"exact_match": 1.0}
    options = json.loads((tmp_path / "r.json").read_text())["options"]
    assert options["difficulty"] == 1 and _eval_again(tmp_path, {"options": options}).endswith("--difficulty 1`")
    with pytest.raises(ValueError, match="^field 'difficulty': difficulty 1 applies to the reason_\\* tasks only, and"):
        evaluate(checkpoint, ("code_perplexity",), device="cpu", difficulty=1)


def test_eval_refuses_a_difficulty_past_the_most_naming_the_option_before_the_checkpoint_is_read(checkpoint, tmp_path):
    """--difficulty 5000 was refused once the tasks were built, naming no option ("error: difficulty 5000: ..."); then
    as "error: --difficulty: ..." where pass-at-k says click's "Invalid value for '--difficulty'" (exit 2), as it still
    said a difficulty given with no reason_* task ("error: --difficulty 2 applies to ...", exit 1)."""
    from typer.testing import CliRunner

    from seekstack.cli import app
    from seekstack.eval.evaluate import evaluate

    with pytest.raises(ValueError, match="^field 'difficulty': difficulty 5000: at most 1000 \\(digits or numbers"):
        evaluate(tmp_path / "no checkpoint", ("reason_addition",), device="cpu", difficulty=5000)
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n')
    args = ["eval", str(tmp_path / "none"), "--tasks", f"reason_{problems}", "--difficulty", "2"]
    refused = CliRunner().invoke(app, args)  # as pass-at-k refuses it, not "error: --difficulty: ..." (exit 1)
    assert refused.exit_code == 2 and "Invalid value for '--difficulty': difficulty 2: task" in refused.output
    refused = CliRunner().invoke(app, ["eval", str(tmp_path / "none"), "--tasks", "code_cloze", "--difficulty", "2"])
    assert (
        refused.exit_code == 2 and "'--difficulty': difficulty 2 applies to the reason_* tasks only" in refused.output
    )
    with pytest.raises(ValueError, match="^task 'no_module:Parity': module 'no_module' cannot be imported"):
        evaluate(checkpoint, ("reason_no_module:Parity",), device="cpu", difficulty=3)  # a task that is none
