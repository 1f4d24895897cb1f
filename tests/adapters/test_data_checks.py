"""What a run from a checkpoint (`lora train`, `train init_from=`) accepts as data: token shards of the checkpoint's
own tokenizer, the DATA and BASE the run started with on resume; and the errors that say what to do otherwise."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seekstack.adapters.config import AdapterConfig
from seekstack.adapters.data import _split, chat_source, prepare_data
from seekstack.adapters.training import lora_train_config, train_adapter
from seekstack.checkpoint import read_config
from seekstack.cli import app
from seekstack.eval.samples import DEMO_PROMPTS, run_prompts
from seekstack.posttrain.conversations import write_conversations
from seekstack.schema import ConfigError
from seekstack.tokenizer import Tokenizer
from seekstack.tokens.shards import index_path, load_index, tokenize_corpus
from seekstack.train.config import TrainConfig, resolve_train_config
from seekstack.train.trainer import build_model, train
from tests.adapters.support import QUICK_RUN, write_base
from tests.posttrain.support import byte_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A `data build` folder: train.jsonl and val.jsonl."""
    folder = tmp_path_factory.mktemp("corpus")
    for split, count in (("train", 30), ("val", 3)):
        lines = (
            json.dumps({"text": f"def area_{n}(width, height):\n    return width * height\n" * 3}) for n in range(count)
        )
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def other_shards(base, corpus, tmp_path_factory):
    """The corpus tokenized by another tokenizer of the base's vocabulary size: the base's with two ids swapped."""
    tokenizer_file = tmp_path_factory.mktemp("other") / "tokenizer.json"
    spec = json.loads((base / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = "a", "b"
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer_file.write_text(json.dumps(spec))
    other = Tokenizer.from_file(tokenizer_file)
    assert other.vocab_size == Tokenizer.from_file(base).vocab_size
    shards = tmp_path_factory.mktemp("tokens") / "tokens"
    for split in ("train", "val"):
        tokenize_corpus(corpus / f"{split}.jsonl", other, shards, split)
    return shards


def test_lora_train_refuses_shards_of_another_tokenizer_and_gives_the_command_that_makes_them_right(
    base, corpus, other_shards, tmp_path
):
    with pytest.raises(ValueError) as refused:
        lora_train_config(base, other_shards, tmp_path / "adapter", QUICK_RUN)
    message = str(refused.value)
    assert (
        message.startswith(f"{other_shards} was tokenized with ") and f"the tokenizer of checkpoint {base}" in message
    )
    assert not (tmp_path / "adapter").exists()  # refused before the run's folder is written
    command = re.search(r"`(seekstack [^`]*)`", message)[1]
    retokenized = other_shards.with_name("tokens_base")
    assert command == f"seekstack data tokenize --corpus {corpus} --tokenizer {base} --out {retokenized}"
    result = runner.invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    train_config = lora_train_config(base, retokenized, tmp_path / "adapter", QUICK_RUN).config
    assert train_config.data_dir == str(retokenized)


def test_training_from_a_checkpoint_refuses_shards_of_another_tokenizer(base, other_shards, tmp_path):
    config = TrainConfig(
        init_from=str(base), data_dir=str(other_shards), out_dir=str(tmp_path / "run"), seq_len=32, batch_size=2,
        max_steps=1, eval_every=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match=f"{other_shards} was tokenized with .*the tokenizer of checkpoint {base}"):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_shards_whose_index_records_no_tokenizer_hash_are_not_checked(base, other_shards, tmp_path):
    old = shutil.copytree(other_shards, tmp_path / "old_tokens")
    for split in ("train", "val"):
        index = json.loads(index_path(old, split).read_text())
        del index["tokenizer"]["sha256"]
        index_path(old, split).write_text(json.dumps(index))
    train_config = lora_train_config(base, old, tmp_path / "adapter", QUICK_RUN).config
    assert train_config.data_dir == str(old)


def test_a_checkpoint_vocabulary_smaller_than_the_data_advises_tokenizing_with_its_tokenizer(
    corpus, other_shards, tmp_path
):
    small = write_base(tmp_path / "small")  # 96 ids, no tokenizer.json
    advice = re.escape(
        f"the checkpoint {small} cannot grow its vocabulary: tokenize the text with the checkpoint's tokenizer, "
        f"`seekstack data tokenize --corpus {corpus} --tokenizer TOKENIZER --out {other_shards}_small` (TOKENIZER: "
        f"the tokenizer {small} was trained with; it holds none)"
    )
    with pytest.raises(ValueError, match=advice) as refused:
        lora_train_config(small, other_shards, tmp_path / "adapter", QUICK_RUN)
    assert "model.vocab_size" not in str(refused.value)
    assert not (tmp_path / "adapter").exists()
    config = TrainConfig(init_from=str(small), data_dir=str(other_shards), out_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=advice):
        build_model(config, {"vocab_size": 512})  # a shard index's tokenizer: its size is what is checked


@pytest.fixture(scope="module")
def text_run(base, tmp_path_factory):
    """A LoRA run of one step on text, its DATA tokenized into the adapter folder."""
    folder = tmp_path_factory.mktemp("text_run")
    text = folder / "prose.txt"
    text.write_text(
        "\n\n".join(f"Clause {n}: the tenant keeps the garden tidy and the gate shut." * 8 for n in range(20))
    )
    train_adapter(*lora_train_config(base, text, folder / "adapter", QUICK_RUN))
    return text, folder / "adapter"


def test_a_resumed_lora_run_refuses_another_base_or_data_naming_the_runs(base, other_shards, text_run, tmp_path):
    text, out = text_run
    other_base = shutil.copytree(base, tmp_path / "other_base")
    other_text = tmp_path / "other.txt"
    other_text.write_text(text.read_text().replace("garden", "orchard"))
    saved = (out / "train_config.json").read_text()
    for given, thing in ((other_base, "BASE"), (other_text, "DATA"), (other_shards, "DATA")):
        data, base_given = (text, given) if thing == "BASE" else (given, base)
        with pytest.raises(ConfigError, match=f"{given}: the run in {out} trains its adapter with {thing} "):
            lora_train_config(base_given, data, out, ["max_steps=2"], resume=True)
    with pytest.raises(ConfigError, match="trains its adapter with BASE"):
        lora_train_config(None, None, out, ["max_steps=2", f"init_from={other_base}"], resume=True)
    assert (out / "train_config.json").read_text() == saved


def test_a_lora_run_moved_to_another_depth_resumes_given_its_base_and_data_again(base, tmp_path, monkeypatch):
    """Its saved relative base and data name nothing after the move: given again, the resume was refused anyway as
    'another BASE', the saved config being checked (and failing) before it was compared."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(base, "base")
    Path("prose.txt").write_text("A few words of prose to adapt to. " * 200)
    train_adapter(*lora_train_config("base", "prose.txt", "runs/adapter", QUICK_RUN))  # saved as ../../base
    shutil.copytree("runs/adapter", "adapter")
    with pytest.raises(ConfigError, match=r"adapter/train_config.json: field 'init_from' must be an existing"):
        lora_train_config(None, None, "adapter", ["max_steps=2"], resume=True)
    resumed = lora_train_config("base", "adapter/data", "adapter", ["max_steps=2"], resume=True)
    assert train_adapter(*resumed, resume=True).step == 2
    shutil.copytree(base, "other_base")
    with pytest.raises(ConfigError, match="trains its adapter with BASE"):  # a saved base that is there is compared
        lora_train_config("other_base", None, "adapter", ["max_steps=3"], resume=True)


def test_a_resumed_lora_run_given_its_text_again_continues_on_its_tokens(base, text_run, tmp_path):
    text, run = text_run
    out = shutil.copytree(run, tmp_path / "adapter")  # the module's run stays at step 1 for the tests after this one
    tokens_written = index_path(out / "data", "train").stat().st_mtime_ns
    train_config, adapter, continued = lora_train_config(base, text, out, ["max_steps=2"], resume=True)
    assert train_config.data_dir == str(out / "data")
    assert train_adapter(train_config, adapter, continued, resume=True).step == 2
    assert index_path(out / "data", "train").stat().st_mtime_ns == tokens_written  # not tokenized again


def test_one_document_written_without_spaces_holds_out_its_last_tenth_not_all_after_its_title():
    """Chinese has no spaces to cut at the start of a word: the cut stays at the last tenth, where moving back to the
    newline after the title trained on the title alone (3 characters) and held out the rest."""
    text = "标题\n" + "这是一个句子。" * 300
    texts, held_out = _split([text])
    assert "".join(texts) == text and held_out == {texts[-1]}
    assert len(texts[-1]) == len(text) // 10


def test_text_of_one_document_holds_out_its_last_tenth_and_the_run_evaluates_on_it(base, tmp_path):
    text = "\n\n".join(f"Clause {n}: the licensee keeps this notice in every copy." * 8 for n in range(20))
    (tmp_path / "legal.txt").write_text(text)  # one document: hashing holds out all of it or none
    run = ["seq_len=32", "batch_size=2", "max_steps=1", "eval_every=1", "eval_batches=1", "lora.rank=2"]
    train_adapter(*lora_train_config(base, tmp_path / "legal.txt", tmp_path / "adapter", run))
    data = tmp_path / "adapter" / "data"
    head, tail = (json.loads(line)["text"] for line in (data / "corpus.jsonl").read_text().splitlines())
    assert head + tail == text and head.endswith(" ") and not tail.startswith(" ")  # cut at the start of a word
    assert len(text) // 10 <= len(tail) < len(text) // 10 + len("licensee")
    assert [load_index(data, split)["documents"] for split in ("train", "val")] == [1, 1]
    metrics = [json.loads(line) for line in (tmp_path / "adapter" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [1]


def test_a_run_on_chinese_text_keeps_its_held_out_documents_whose_openings_it_is_prompted_with(base, tmp_path):
    """`lora train BASE zh.jsonl` kept its held-out documents in no val.jsonl, so `report` and `sample` continued the
    Python demo prompts ('def fibonacci(n):') on a model of Chinese prose."""
    documents = [f"第{n}章。" + "向量是可调整大小的数组。" * 10 for n in range(20)]
    (tmp_path / "zh.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    run = tmp_path / "adapter"
    data = prepare_data(tmp_path / "zh.jsonl", base, run)
    checkpoint = shutil.copytree(base, run / "checkpoints" / "step_1")  # the prompts that fit its context are asked
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))  # 180 bytes fit
    (run / "train_config.json").write_text(json.dumps({"data_dir": data.name}))  # as lora train writes it
    texts, held_out = _split(documents)
    openings = tuple(text[:60] for text in texts if text in held_out)[:3]  # no spaces: the first 60 characters
    assert openings and run_prompts(checkpoint) == openings
    python = [f"def area_{n}(width, height):\n    return width * height\n" for n in range(20)]
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in python))
    prepare_data(tmp_path / "code.jsonl", base, run)  # Python's held-out documents: the demo prompts suit it
    assert run_prompts(checkpoint) == DEMO_PROMPTS


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("lora.rank=0", "field 'lora.rank' has value 0"),
        ("lora.rnk=3", "unknown field 'lora.rnk'; did you mean 'lora.rank'\\? known fields are lora."),
        # a name given twice was taken, the same adapter counted twice in the run's FLOPs (its MFU)
        (
            "lora.attention=[o_proj,o_proj]",
            "field 'lora.attention' must be distinct names \\(not \\['o_proj', 'o_proj'\\]",
        ),
    ],
)
def test_errors_about_lora_keys_name_them_with_their_prefix(base, other_shards, override, named, tmp_path):
    with pytest.raises(ConfigError, match=named):
        lora_train_config(base, other_shards, tmp_path / "adapter", [*QUICK_RUN, override])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("lora_r=16", "unknown field 'lora_r'; TRL's lora_r is lora.rank here"),
        ("lora_alpha=32", "unknown field 'lora_alpha'; lora_alpha is lora.alpha here"),
        ("lora.r=16", "unknown field 'lora.r'; peft's r is lora.rank here"),
        ("lora_target_modules=[q_proj]", "LoRA targets are given by kind here: lora.attention \\(q_proj, "),
        ("learning_rate=1e-4", "unknown field 'learning_rate'; TRL's learning_rate is lr here"),
        ("per_device_train_batch_size=4", "TRL's per_device_train_batch_size is batch_size here"),
        ("max_length=64", "TRL's max_length is seq_len here \\(a conversation's row is cut there"),
        # peft's options that are not offered: modules_to_save had no word, bias and lora_bias a wrong guess
        # ('did you mean lora.layers?', 'lora.rslora?')
        (
            "lora.modules_to_save=[lm_head]",
            "peft's modules_to_save \\(whole modules trained beside the adapter\\) is "
            "not offered: lora.head_tokens and lora.embedding_tokens train",
        ),
        (
            "lora.bias=all",
            "unknown field 'lora.bias'; peft's bias \\(biases trained beside the adapter\\) is not "
            "offered: the adapter trains none",
        ),
        (
            "lora.lora_bias=true",
            "unknown field 'lora.lora_bias'; peft's lora_bias \\(a bias on each B factor\\) is not offered",
        ),
    ],
)
def test_trl_and_peft_names_are_refused_naming_ours_as_sft_names_them(base, other_shards, override, named, tmp_path):
    """TRL's SFTConfig and LoRA names (peft's, TRL's --lora_r ...) were refused as unknown fields with no word of the
    field that is theirs, or with a wrong guess (lora_alpha: 'did you mean aux_loss_alpha?'), where sft names it."""
    with pytest.raises(ConfigError, match=f"{named}.*; known fields are "):
        lora_train_config(base, other_shards, tmp_path / "adapter", [*QUICK_RUN, override])


def test_a_lora_layer_the_base_lacks_is_named_with_its_prefix_before_the_run_is_written(base, corpus, tmp_path):
    text = tmp_path / "text.jsonl"
    shutil.copy(corpus / "train.jsonl", text)
    config = lora_train_config(base, text, tmp_path / "adapter", [*QUICK_RUN, "lora.layers=[9]"])
    with pytest.raises(ConfigError, match="field 'lora.layers' must be main layer numbers below 2"):
        train_adapter(*config)
    assert not (tmp_path / "adapter" / "lora_config.json").exists()


def test_a_query_projection_the_base_lacks_is_refused_not_dropped(base, corpus, tmp_path):
    """On a base with q_lora_rank (q_a_proj, q_b_proj), lora.attention=[q_proj, o_proj] trained o_proj alone, q_proj
    dropped without a word (peft refuses a target module the model has not), and [q_proj] alone was refused naming
    lora.layers. The default, which names all three for either kind of base, and q_a_proj are taken."""
    text = tmp_path / "text.jsonl"
    shutil.copy(corpus / "train.jsonl", text)
    run = [*QUICK_RUN, "lora.feed_forward=[]", "lora.experts=[]"]
    named = "field 'lora.attention' must be projections this base has: its query is q_a_proj and q_b_proj"
    for given in ("[q_proj,o_proj]", "[q_proj]"):
        config = lora_train_config(base, text, tmp_path / "adapter", [*run, f"lora.attention={given}"])
        with pytest.raises(ConfigError, match=f"{named} \\(q_lora_rank 16\\), not q_proj$"):
            train_adapter(*config)
        assert not (tmp_path / "adapter" / "lora_config.json").exists()
    modules, _ = AdapterConfig(attention=("q_a_proj", "o_proj")).targets(read_config(base))
    assert modules == [f"layers.{n}.self_attn.{name}" for n in (0, 1) for name in ("q_a_proj", "o_proj")]


def test_compile_with_peft_parameter_targets_is_refused_before_the_run_is_written(base, tmp_path):
    """peft's parameter targets (feed_forward, experts) re-parametrize their weights in every forward: compile=true
    recompiled each layer until dynamo's limit sent it back to eager, minutes slower than compile=false."""
    text = tmp_path / "prose.txt"
    text.write_text("A few words of prose to adapt to. " * 200)
    with pytest.raises(ConfigError, match=r"field 'compile' must be false when lora.feed_forward or lora.experts are "
                       r"adapted: .*; set compile=false, or lora.feed_forward=\[\] lora.experts=\[\]"):  # fmt: skip
        lora_train_config(base, text, tmp_path / "adapter", [*QUICK_RUN, "compile=true"])
    assert not (tmp_path / "adapter").exists()
    attention_only = ["compile=true", "lora.feed_forward=[]", "lora.experts=[]"]
    assert lora_train_config(base, text, tmp_path / "adapter", [*QUICK_RUN, *attention_only]).config.compile


def test_a_seq_len_past_the_base_s_context_is_refused_before_the_text_is_tokenized(base, tmp_path):
    """It was refused by the trainer, once the text was tokenized into the adapter folder's data/."""
    text = tmp_path / "prose.txt"
    text.write_text("A few words of prose to adapt to. " * 200)
    with pytest.raises(ConfigError, match=r"field 'seq_len' has value 129: longer than the model's context "
                       r"\(max_position_embeddings 128\)"):  # fmt: skip
        lora_train_config(base, text, tmp_path / "adapter", [*QUICK_RUN, "seq_len=129"])
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize(("part", "window", "advice"), [("training part", 1.1, "give more text or a smaller seq_len"),
                                                       ("held-out part", 0.5, "or eval_every=0")])  # fmt: skip
def test_text_too_short_for_one_window_is_named_as_the_users_file_not_the_run_s_shards(
    base, part, window, advice, tmp_path
):
    """The refusal named the run's own data/train_index.json (or val_index.json), which the user never wrote. The
    text's 111 tokens keep a window of 1.1 times them within the base's context of 128."""
    text = tmp_path / "note.txt"
    text.write_text("A short note on the licence terms that follow in the next section. " * 3)
    seq_len = int(len(Tokenizer.from_file(base).encode(text.read_text())) * window)
    run = [f"seq_len={seq_len}", "batch_size=2", "max_steps=1", "eval_every=1", "lora.rank=2"]
    with pytest.raises(ValueError) as refused:
        lora_train_config(base, text, tmp_path / "adapter", run)
    said = str(refused.value)
    assert said.startswith(f"{text}: its {part} makes ") and said.endswith(advice), said
    assert f"too few for one window of {seq_len + 1:,} (seq_len + 1)" in said and "index.json" not in said


@pytest.mark.parametrize("field", ["head_tokens", "embedding_tokens"])
def test_more_trained_rows_than_the_base_has_are_refused_naming_the_key_and_the_base_before_writing(
    base, field, tmp_path
):
    """It was refused once the text was tokenized, naming neither key but the run's own data folder's vocabulary."""
    text = tmp_path / "prose.txt"
    text.write_text("A few words of prose to adapt to. " * 200)
    vocab_size = json.loads((base / "config.json").read_text())["vocab_size"]
    with pytest.raises(ConfigError, match=rf"field 'lora.{field}' must be at most {vocab_size:,}, the rows of the "
                       rf"base's head and embedding \(vocab_size in {base / 'config.json'}\)"):  # fmt: skip
        lora_train_config(base, text, tmp_path / "adapter", [*QUICK_RUN, f"lora.{field}={vocab_size + 1}"])
    assert not (tmp_path / "adapter").exists()


def test_tokenizing_an_empty_corpus_is_refused_naming_it(base, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "val"):
        (corpus / f"{split}.jsonl").write_text("")
    out = tmp_path / "tokens"
    result = runner.invoke(
        app, ["data", "tokenize", "--corpus", str(corpus), "--tokenizer", str(base), "--out", str(out)]
    )
    assert result.exit_code == 1 and f"{corpus / 'train.jsonl'}: no documents to tokenize" in result.output
    assert not out.exists()


def test_a_folder_whose_files_have_no_text_suffix_says_they_were_not_read(base, tmp_path):
    licenses = tmp_path / "licenses"  # files of suffixes a folder is not read by (Apache-2.0, a version, is read)
    licenses.mkdir()
    for name in ("Apache-2.0.rtf", "LGPL-2.1.odt"):
        (licenses / name).write_text("Licensed under the terms below. " * 50)
    with pytest.raises(ValueError, match=r"no text to train on; its 2 files were not read: .*\.txt.*without one when"):
        lora_train_config(base, licenses, tmp_path / "adapter", QUICK_RUN)


def test_a_jsonl_of_other_fields_says_which_fields_lora_train_reads(base, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"question": "Say hi.", "answer": "Hi."}) + "\n")
    result = runner.invoke(app, ["lora", "train", str(base), str(data), "--out", str(tmp_path / "adapter"), *QUICK_RUN])
    assert result.exit_code == 1
    assert f"{data}:1: no field 'text', only 'question', 'answer'; `lora train` reads a .jsonl of" in result.output
    chat = '{"messages": [...]} or {"prompt": [...], "completion": [...]} (chat conversations'
    assert chat in result.output and "--field" not in result.output


TURN = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]


@pytest.mark.parametrize(
    ("record", "rewrite"),
    [
        ({"chosen": "Say hi. Hi.", "rejected": "Say hi. No."}, "{text: .chosen}"),
        ({"chosen": TURN, "rejected": TURN}, "{messages: .chosen}"),
        ({"prompt": "Say hi.", "chosen": " Hi.", "rejected": " No."}, "{prompt, completion: .chosen}"),
        ({"prompt": TURN[:1], "chosen": TURN[1:], "rejected": TURN[1:]}, "{prompt, completion: .chosen}"),
    ],
)
def test_trls_preference_rows_are_refused_saying_how_to_train_on_the_chosen(base, tmp_path, record, rewrite):
    """TRL's DPO rows (chosen and rejected, with or without a prompt) were told "write each record's text as
    'text'", which would train the rejected answers too; the refusal names the format and the jq line that keeps the
    chosen ones in a form lora train reads."""
    data = tmp_path / "preference.jsonl"
    data.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError) as refused:
        lora_train_config(base, data, tmp_path / "adapter", QUICK_RUN)
    assert str(refused.value).startswith(f"{data}:1: no field 'text', only {', '.join(map(repr, record))}; `lora")
    assert str(refused.value).endswith(
        "chosen and rejected are TRL's preference format (DPO's), whose rejected answers SFT is not to learn; to "
        f"train on the chosen ones, write them so: jq -c '{rewrite}'"
    )


@pytest.mark.parametrize("form", ["text", "messages"])
def test_trls_unpaired_preference_rows_are_refused_naming_label_not_trained_alike(base, tmp_path, form):
    """TRL's KTO rows ({"prompt", "completion", "label"}) were trained as prompt-completion rows, the completions of
    label false (not to be learned) as the others."""
    prompt, completion = ("Say hi.", " Hi.") if form == "text" else (TURN[:1], TURN[1:])
    data = tmp_path / "kto.jsonl"
    pair = {"prompt": prompt, "completion": completion}
    rows = [pair, pair, {**pair, "label": True}, {**pair, "label": False}]  # the first labelled one is line 3
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "adapter"
    result = runner.invoke(app, ["lora", "train", str(base), str(data), "--out", str(out), *QUICK_RUN])
    assert result.exit_code == 1 and not out.exists()
    said = " ".join(result.output.split())
    assert f'{data}:3: "label": true beside "prompt" and "completion" is TRL\'s unpaired preference format' in said
    assert "keep the lines of label true without the field (jq -c 'select(.label) | del(.label)')" in said


def test_the_resume_a_refusal_of_another_base_suggests_goes_on_when_followed(base, text_run, tmp_path):
    """A run continued from another run's checkpoint into a new --out, given another BASE, was told to resume with
    `--resume --out NEW`, which NEW (holding no run yet) refused; the suggestion names the checkpoint it was given."""
    text, run = text_run
    out = shutil.copytree(run, tmp_path / "the run")  # its path holds a space, as the new one's: the command quotes
    other_base = shutil.copytree(base, tmp_path / "other_base")
    checkpoint, new = out / "checkpoints" / "step_1", tmp_path / "new run"
    given = ["lora", "train", str(other_base), str(text), "max_steps=2", "--resume-from", str(checkpoint)]
    refused = runner.invoke(app, [*given, "--out", str(new)])
    assert refused.exit_code == 1 and not new.exists()
    command = re.search(r"`(seekstack [^`]*)`", refused.output)[1]
    assert command == f"seekstack lora train --resume-from '{checkpoint}' --out '{new}'"
    followed = runner.invoke(app, shlex.split(command)[1:])  # as written: on to the run's own max_steps
    assert followed.exit_code == 0, followed.output
    assert f"resumed from step 1 ({checkpoint})" in followed.output
    assert f"trained to step 1; adapter: {new}" in followed.output
    assert json.loads((new / "train_config.json").read_text())["init_from"] == str(base)
    assert (new / "lora_config.json").read_text() == (out / "lora_config.json").read_text()


def test_a_chat_file_of_copies_holding_none_out_is_told_that_distinct_conversations_count(tmp_path, capsys):
    """25 conversations, 5 copies of each of 5: 1 of 25 is wanted, and a conversation goes with all its copies, so
    none is held out; the note counts distinct conversations, not lines ("a file of 20 ... or more" said of 25)."""
    byte_tokenizer(tmp_path / "tok")
    chats = [[{"role": "user", "content": f"hi {n}"}, {"role": "assistant", "content": f"hello {n}"}] for n in range(5)]
    data = write_conversations(chats * 5, tmp_path / "copies.jsonl")
    overrides = [f"data_dir={data}", f"tokenizer={tmp_path / 'tok'}", "model.vocab_size=300", "seq_len=64"]
    source = chat_source(resolve_train_config(None, overrides, cls=TrainConfig))
    assert source is not None and not source.validation
    assert "a file of 20 distinct conversations or more has some held out" in capsys.readouterr().err
