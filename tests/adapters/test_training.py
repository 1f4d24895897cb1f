"""`lora train`: the pretraining trainer trains only the adapter, checkpoints it in peft's format, resumes exactly."""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import json
import shutil
from codecs import BOM_UTF8 as BOM

import numpy as np
import pytest
import torch
from safetensors import safe_open

import seekstack
from seekstack.adapters.config import AdapterConfig
from seekstack.adapters.data import chat_source, first_batches, frequent_tokens, is_chat
from seekstack.adapters.files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    is_adapter_parameter,
    load_adapter,
    merge_adapter,
)
from seekstack.adapters.registry import attach_adapters, read_factors
from seekstack.adapters.training import START_BATCHES, LoraHooks, lora_train_config, train_adapter
from seekstack.checkpoint import CheckpointError
from seekstack.posttrain.conversations import HELD_OUT_FILE, conversation_key
from seekstack.schema import ConfigError
from seekstack.tokens.shards import load_index
from seekstack.train.runs import TRAIN_STATE_FILE
from tests.adapters.support import TINY, prompt_ids, write_base, write_random_adapter
from tests.posttrain.support import loss_and_gradients
from tests.train.test_trainer import write_split

PEFT_ATOL = 1e-4  # ours vs transformers + peft
MERGE_ATOL = 1e-5  # merged weights vs base + adapter, float32
RUN = ["seq_len=32", "batch_size=4", "max_steps=6", "save_every=3", "eval_every=3", "eval_batches=2", "lr=1e-2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards")
    write_split(path, "train", 8_000, seed=1)
    write_split(path, "val", 1_000, seed=2)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("base") / "base")


def test_lora_run_trains_the_adapter_only_and_writes_it_in_peft_format(base, data_dir, tmp_path):
    before = {k: v.clone() for k, v in seekstack.load_pretrained(base).state_dict().items()}
    train_config, adapter, continued = lora_train_config(base, data_dir, tmp_path / "adapter", [*RUN, "lora.rank=4"])
    result = train_adapter(train_config, adapter, continued)
    out = tmp_path / "adapter"
    for folder in (out, out / "checkpoints" / "step_6"):
        assert (folder / ADAPTER_CONFIG_FILE).is_file() and (folder / ADAPTER_WEIGHTS_FILE).is_file()
    assert not (out / "checkpoints" / "step_6" / "model.safetensors").exists()  # the base is not copied
    assert (out / "metrics.jsonl").is_file() and result.losses[-1] < result.losses[0]
    tuned = load_adapter(seekstack.load_pretrained(base), out)
    base_model = tuned.get_base_model()
    frozen = {k.replace(".base_layer", ""): v for k, v in base_model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(frozen[k], v) for k, v in before.items())  # the routing biases too
    ids = prompt_ids()
    with torch.no_grad():
        changed = (tuned(ids).logits - seekstack.load_pretrained(base)(ids).logits).abs().max()
    assert changed > 1e-3


def test_lora_run_resumes_exactly(base, data_dir, tmp_path):
    whole = train_adapter(*lora_train_config(base, data_dir, tmp_path / "whole", RUN))
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_6")
    assert (tmp_path / "cut" / "checkpoints" / "step_3" / TRAIN_STATE_FILE).is_file()
    resumed = train_adapter(*lora_train_config(None, None, tmp_path / "cut", resume=True), resume=True)
    assert resumed.losses == whole.losses[3:]  # bit for bit


def test_a_resume_at_another_seq_len_is_refused_with_a_way_on_that_fits_an_adapter_run(base, data_dir, tmp_path):
    """The data position counts windows of the checkpoint's seq_len; the checkpoint holds an adapter, no model to
    start a new run from (`init_from` is the base)."""
    out = tmp_path / "run"
    train_adapter(*lora_train_config(base, data_dir, out, [*RUN, "max_steps=3"]))
    config, adapter, continued = lora_train_config(None, None, out, ["max_steps=6", "seq_len=16"], resume=True)
    with pytest.raises(ConfigError, match="in windows of seq_len=32 .*or start a new run into another out_dir at"):
        train_adapter(config, adapter, continued, resume=True)


def test_a_run_stopped_by_ctrl_c_leaves_the_adapter_of_the_checkpoint_it_saved_in_its_folder(
    base, data_dir, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    train_adapter(*lora_train_config(base, data_dir, out, [*RUN, "max_steps=3"]))  # the folder's adapter: step 3's
    from seekstack.train import trainer

    original = trainer._Run.train_step

    def interrupted_step(self):
        if self.step == 5:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(trainer._Run, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(*lora_train_config(None, None, out, ["max_steps=6"], resume=True), resume=True)
    saved = out / "checkpoints" / "step_5"  # saved at the interruption
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        assert (out / name).read_bytes() == (saved / name).read_bytes()
    assert (out / ADAPTER_WEIGHTS_FILE).read_bytes() != (
        out / "checkpoints" / "step_3" / ADAPTER_WEIGHTS_FILE
    ).read_bytes()


def test_a_resumed_run_refuses_other_adapter_settings_and_a_new_run_refuses_a_run_folder(base, data_dir, tmp_path):
    out = tmp_path / "run"
    train_adapter(*lora_train_config(base, data_dir, out, [*RUN, "max_steps=3"]))
    saved = (out / "lora_config.json").read_text()
    for change in ("lora.rank=4", "lora.alpha=64"):  # a rank no checkpoint fits; a scale its factors did not train at
        with pytest.raises(ConfigError, match=f"{change}: a resumed run keeps the adapter settings"):
            lora_train_config(None, None, out, ["max_steps=6", change], resume=True)
    assert (out / "lora_config.json").read_text() == saved  # the run can still be resumed
    with pytest.raises(ConfigError, match="holds a run .checkpoint step_3.; continue it with --resume"):
        lora_train_config(base, data_dir, out, [*RUN, "lora.rank=4"])
    resumed = train_adapter(*lora_train_config(None, None, out, ["max_steps=6"], resume=True), resume=True)
    assert resumed.step == 6


@pytest.mark.parametrize(
    ("attention", "rules"),
    [(["o_proj", "o_proj"], "a name once"), (["q_proj", "o_proj"], "the base's projections alone"),
     (["q_proj", "o_proj", "q_proj"], "a name once, the base's projections alone")],
)  # fmt: skip
def test_a_run_whose_saved_targets_are_now_refused_resumes_with_the_targets_it_trained(
    base, data_dir, tmp_path, attention, rules
):
    """A run started by a seekstack that took lora.attention=[o_proj,o_proj] (ee898b0 refuses it) or [q_proj,o_proj]
    on a base with q_lora_rank (ab2376a refuses it; o_proj alone was trained) could not be resumed: "field 'attention'
    must be distinct names", naming no file. It goes on with what it trained, exactly, saying so and by which rule
    (the note named both whichever applied)."""
    kept = tmp_path / "kept"
    targets = ["lora.attention=[o_proj]", "lora.feed_forward=[]", "lora.experts=[]"]
    train_adapter(*lora_train_config(base, data_dir, kept, [*RUN, "max_steps=3", *targets]))
    shutil.copytree(kept, tmp_path / "old")
    saved = tmp_path / "old" / "lora_config.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "attention": attention}))  # as the old run saved it
    said: list[str] = []
    old = lora_train_config(None, None, tmp_path / "old", ["max_steps=4"], resume=True, warn=said.append)
    assert old.adapter.attention == ("o_proj",)
    assert said[-1] == (
        f"{saved}: lora.attention={attention} is refused by this seekstack, but the run's adapter was trained on "
        f"['o_proj'] ({rules}): the resume goes on with that"
    )
    again = train_adapter(*lora_train_config(None, None, kept, ["max_steps=4"], resume=True), resume=True)
    assert train_adapter(*old, resume=True).losses == again.losses  # bit for bit the run it continues


def test_the_base_checkpoints_own_folder_as_out_is_refused_before_anything_is_written(base, tmp_path):
    own = shutil.copytree(base, tmp_path / "base")
    before = sorted(path.name for path in own.iterdir())
    text = tmp_path / "prose.txt"
    text.write_text("A few words of prose to adapt to. " * 200)
    with pytest.raises(ConfigError, match=f"--out {own} is the base checkpoint's folder"):
        lora_train_config(own, text, own, RUN)
    assert sorted(path.name for path in own.iterdir()) == before  # no adapter_config.json for transformers to apply


def test_text_data_is_not_tokenized_before_the_settings_are_checked(base, tmp_path):
    text = tmp_path / "prose.txt"
    text.write_text("A few words of prose to adapt to. " * 200)
    for typo in ("max_step=3", "lora.rank=0"):
        with pytest.raises(ConfigError):
            lora_train_config(base, text, tmp_path / "run", [*RUN, typo])
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_a_quantized_base_is_refused_naming_the_scheme_before_anything_is_written(base, scheme, tmp_path):
    from seekstack.compress.quantize import QuantConfig, quantize_checkpoint

    quantized = tmp_path / "quantized"
    quantize_checkpoint(base, quantized, QuantConfig(scheme=scheme))  # type: ignore[arg-type]
    text = tmp_path / "prose.txt"
    text.write_text("A few words of prose to adapt to. " * 200)
    with pytest.raises(CheckpointError, match=f"{quantized}: the base model is quantized \\({scheme}\\)"):
        lora_train_config(quantized, text, tmp_path / "run", RUN)
    assert not (tmp_path / "run").exists()


def test_a_base_whose_quantization_config_holds_fused_rotations_alone_is_not_refused_as_quantized(
    base, data_dir, tmp_path
):
    """compressed-tensors writes a model rotated but not quantized (SpinQuant's or QuIP's rotations fused into its
    float weights) with a quantization_config of a transform_config alone; a LoRA run refused it as "quantized
    (compressed-tensors)", which it loads, and trains, as the float weights it holds."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.transform import TransformConfig

    from tests.test_quantized_checkpoint_damage import quip_transform_config

    rotated = tmp_path / "rotated"
    shutil.copytree(base, rotated)
    transforms = TransformConfig.model_validate(quip_transform_config("weight_input"))
    ModelCompressor(transform_config=transforms).update_config(str(rotated))
    train_config, adapter, continued = lora_train_config(rotated, data_dir, tmp_path / "run", [*RUN, "lora.rank=4"])
    assert (train_config.init_from, adapter.rank, continued) == (str(rotated), 4, None)


def test_a_bias_update_is_refused_because_the_base_stays_frozen(base, data_dir, tmp_path):
    with pytest.raises(ConfigError, match="bias_update_rate"):
        lora_train_config(base, data_dir, tmp_path, ["seq_len=32", "bias_update_rate=0.001"])


def test_text_and_chat_data_train_an_adapter(tmp_path):
    base = write_base(tmp_path / "base", with_tokenizer=True)
    texts = tmp_path / "texts"
    texts.mkdir()
    for number in range(12):
        (texts / f"doc{number}.txt").write_text(f"The licence number {number} grants the rights below. " * 20)
    chats = tmp_path / "chats.jsonl"
    turn = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    chats.write_text("\n".join(json.dumps({"messages": turn}) for _ in range(8)) + "\n")
    run = ["seq_len=32", "batch_size=2", "max_steps=2", "eval_every=0", "lora.rank=2"]
    from_text = train_adapter(*lora_train_config(base, texts, tmp_path / "prose", run))
    train_index, val_index = (load_index(tmp_path / "prose" / "data", split) for split in ("train", "val"))
    assert (train_index["documents"], val_index["documents"]) == (11, 1)  # 1 in 10 by hash: 1 of these 12
    from_chat = train_adapter(*lora_train_config(base, chats, tmp_path / "chat", run))
    metrics = [json.loads(line) for line in (tmp_path / "chat" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["assistant_tokens"] > 0  # SFT's batch source: the loss on the assistant's tokens
    for result, out in ((from_text, "prose"), (from_chat, "chat")):
        assert result.step == 2 and (tmp_path / out / ADAPTER_WEIGHTS_FILE).is_file()
    eva = [*run, "lora.attention=[]", "lora.experts=[]", "lora.init=eva"]
    with pytest.raises(ValueError, match="chats.jsonl: lora.init=eva reads the layers' inputs on token shards or text"):
        train_adapter(*lora_train_config(base, chats, tmp_path / "chat_eva", eva))
    assert not (tmp_path / "chat_eva").exists()  # refused before anything is written


def test_a_compressed_chat_file_or_one_opening_with_a_bom_is_chat_as_sft_reads_it(tmp_path):
    """`seekstack sft` reads a .jsonl.gz (.bz2, .xz, .zst) through its compression, skips a byte order mark, and reads
    the JSON Lines of a .json (datasets' `Dataset.to_json("train.json")` writes them so); lora train took such a chat
    file for text and refused it: "no field 'text', only 'messages' ... write each record's text as 'text'"."""
    base = write_base(tmp_path / "base", with_tokenizer=True)
    turn = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    lines = "".join(json.dumps({"messages": turn}) + "\n" for _ in range(3)).encode()
    files = {"chats.jsonl.gz": gzip.compress(lines), "chats.jsonl.bz2": bz2.compress(lines), "bom.jsonl": BOM + lines,
             "to_json.json": lines, "to_json.json.gz": gzip.compress(lines)}  # fmt: skip
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        run = ["seq_len=32", "batch_size=2", "max_steps=1", "eval_every=0", "lora.rank=2"]
        train_config = lora_train_config(base, tmp_path / name, tmp_path / f"out_{name}", run).config
        assert is_chat(tmp_path / name) and train_config.data_dir == str(tmp_path / name)
        assert len(chat_source(train_config).rows.rows) == 3


def test_trls_prompt_completion_rows_train_the_completion_alone_text_with_no_template(tmp_path):
    """TRL's SFTTrainer takes prompt-completion rows of text (tokenized with no chat template, the EOS added) and of
    messages, training the completion alone; lora train refused the text ones as "no field 'text', only 'prompt',
    'completion'"."""
    base = write_base(tmp_path / "base", with_tokenizer=True)
    turn = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    pairs = tmp_path / "pairs.jsonl"
    lines = [{"prompt": "Q: What is 2+2?\nA:", "completion": " It is 4."}, {"prompt": turn[:1], "completion": turn[1:]}]
    pairs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = ["seq_len=32", "batch_size=2", "max_steps=1", "eval_every=0", "lora.rank=2"]
    train_config, adapter, continued = lora_train_config(base, pairs, tmp_path / "pairs", run)
    source = chat_source(train_config)
    tokenizer = source.tokenizer
    (text_ids, text_labels), (chat_ids, chat_labels) = source.rows.rows  # in the file's order
    prompt, completion = tokenizer.encode_prompt("Q: What is 2+2?\nA:"), tokenizer.encode(" It is 4.")
    assert text_ids == [*prompt, *completion, tokenizer.eos_id]
    # as TRL tokenizes the pair, prompt and completion as one text (no token merges across " It" here), the EOS added
    assert text_ids == [*tokenizer.encode_prompt("Q: What is 2+2?\nA: It is 4."), tokenizer.eos_id]
    assert text_labels == [-100] * len(prompt) + [*completion, tokenizer.eos_id]
    assert chat_ids == tokenizer.encode_chat(turn, add_generation_prompt=False)
    trained = [label for label in chat_labels if label != -100]
    assert chat_labels[: len(chat_labels) - len(trained)] == [-100] * (len(chat_labels) - len(trained))
    assert tokenizer.decode(trained[:-1]) == "It is 4." and trained[-1] == tokenizer.eos_id
    assert train_adapter(train_config, adapter, continued).step == 1


def test_a_json_array_of_conversations_is_trained_as_chat_and_text_rows_under_a_key_get_no_rows_field(tmp_path):
    """lora train read a .json array of conversations as text and advised "'messages' holds an array of objects: rows
    held under a key are read with --rows-field messages", an option it has not, and a chat's messages are no rows;
    then it refused it as not JSON Lines, as `seekstack sft` did; both read it as TRL does, a chat file."""
    base = write_base(tmp_path / "base", with_tokenizer=True)
    turn = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    conversations, squad = tmp_path / "conversations.json", tmp_path / "squad.json"
    conversations.write_text(json.dumps([{"messages": turn}] * 3, indent=2))
    squad.write_text(json.dumps({"version": "1", "data": [{"text": "A row held under a key."}] * 3}))
    run = ["seq_len=32", "batch_size=2", "max_steps=1", "eval_every=0", "lora.rank=2"]
    assert is_chat(conversations)
    assert lora_train_config(base, conversations, tmp_path / "chat", run).config.data_dir == str(conversations)
    with pytest.raises(ValueError) as refused:
        lora_train_config(base, squad, tmp_path / "rows", run)
    assert str(refused.value).startswith(f"{squad}:1: no field 'text', only 'version', 'data'; `lora train` reads")
    assert "--rows-field" not in str(refused.value)


def test_chat_data_holds_out_conversations_for_val_loss_and_a_run_that_held_none_out_resumes_on_its_rows(
    tmp_path, capsys
):
    """TRL's SFTTrainer with a peft_config evaluates on its eval_dataset; lora train on a chat file held none out, so
    eval_every logged nothing. It holds out what `seekstack sft` holds out by default (5% by their content's hash,
    recorded in held_out.json) and logs val_loss. A run started before, which held none out (no held_out.json), goes
    on training on all its conversations, saying so, instead of being refused for rows that changed under it."""
    base = write_base(tmp_path / "base", with_tokenizer=True)
    chats = tmp_path / "chats.jsonl"
    turns = [[{"role": "user", "content": f"What is {n}+2?"}, {"role": "assistant", "content": f"It is {n + 2}."}]
             for n in range(40)]  # fmt: skip
    chats.write_text("".join(json.dumps({"messages": turn}) + "\n" for turn in turns))
    run = ["seq_len=48", "batch_size=2", "max_steps=2", "eval_batches=1", "lora.rank=2", "save_every=2"]
    train_config, adapter, continued = lora_train_config(base, chats, tmp_path / "new", [*run, "eval_every=2"])
    source = chat_source(train_config)
    assert (len(source.rows.rows), len(source.held_out)) == (38, 2)  # int(5% of 40), whole conversations
    train_adapter(train_config, adapter, continued)
    held_out = json.loads((tmp_path / "new" / HELD_OUT_FILE).read_text())["conversation_keys"]
    assert held_out == sorted(conversation_key(c) for c in source.held_out)
    metrics = [json.loads(line) for line in (tmp_path / "new" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [2] and metrics[-1]["val_loss"] > 0

    earlier = tmp_path / "earlier"  # as a seekstack that held none out left its run: all 40 trained on, no record
    train_adapter(*lora_train_config(base, chats, earlier, [*run, "eval_every=0"]))
    (earlier / HELD_OUT_FILE).unlink()
    capsys.readouterr()
    resumed = lora_train_config(None, None, earlier, ["max_steps=3", "eval_every=1"], resume=True)
    assert train_adapter(*resumed, resume=True).step == 3
    assert (
        f"{earlier} has no {HELD_OUT_FILE}: its run was started by a seekstack that held none"
        in capsys.readouterr().err
    )
    assert len(chat_source(resumed[0], resume=True).rows.rows) == 40
    assert not any("val_loss" in json.loads(line) for line in (earlier / "metrics.jsonl").read_text().splitlines())


def write_tokens(folder, ids, vocab):
    """A train split of exactly these token ids, in the `tokenize_corpus` format."""
    folder.mkdir(parents=True, exist_ok=True)
    np.asarray(ids, dtype="<u2").tofile(folder / "train_00000.bin")
    index = {
        "version": 1, "split": "train", "dtype": "uint16", "shards": [{"file": "train_00000.bin", "tokens": len(ids)}],
        "total_tokens": len(ids), "tokenizer": {"vocab_size": vocab},
    }  # fmt: skip
    (folder / "train_index.json").write_text(json.dumps(index))
    return folder


def test_frequent_tokens_are_the_most_frequent_train_ids_ties_by_id(tmp_path):
    data = write_tokens(tmp_path / "tokens", [9, 3, 3, 3, 7, 7, 5, 5, 9, 1], vocab=12)
    assert frequent_tokens(data, 4) == [3, 5, 7, 9]
    with pytest.raises(ValueError, match="more than the 12 tokens"):
        frequent_tokens(data, 13)


def test_a_head_tokens_run_trains_the_head_rows_of_the_frequent_tokens_only(base, data_dir, tmp_path):
    overrides = [*RUN, "max_steps=2", "lora.feed_forward=[]", "lora.experts=[]", "lora.head_tokens=6"]
    train_adapter(*lora_train_config(base, data_dir, tmp_path / "rows", overrides))
    head = load_adapter(seekstack.load_pretrained(base), tmp_path / "rows").get_base_model().lm_head.weight
    before = seekstack.load_pretrained(base).lm_head.weight
    changed = (head != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(frequent_tokens(data_dir, 6))


@pytest.mark.parametrize("head", ["rows", "lora"])
def test_embedding_rows_beside_head_rows_or_a_head_lora_train_load_in_peft_merge_and_serve(
    base, data_dir, tmp_path, head
):
    """The embedding rows beside the head's rows, or beside a LoRA on the head (bench/lora_domain.py's
    `embedding215_head_r3_ffn_r3`, smaller): the fused loss trains the head's update either way."""
    overrides = [*RUN, "max_steps=2", "lora.attention=[]", "lora.experts=[]", "lora.embedding_tokens=3"]
    head_side = {"rows": ["lora.head_tokens=4", "lora.layers=[0]"], "lora": ["lora.vocabulary=[lm_head]"]}[head]
    train_adapter(*lora_train_config(base, data_dir, tmp_path / "rows", [*overrides, *head_side]))
    tuned = load_adapter(seekstack.load_pretrained(base), tmp_path / "rows")
    before = seekstack.load_pretrained(base)
    head_rows = sorted(frequent_tokens(data_dir, 4)) if head == "rows" else list(range(before.config.vocab_size))
    for module, expected in (("embed_tokens", sorted(frequent_tokens(data_dir, 3))), ("lm_head", head_rows)):
        weight = getattr(tuned.get_base_model(), module).weight
        changed = (weight != getattr(before, module).weight).any(dim=1).nonzero().flatten().tolist()
        assert changed == expected
    ids = prompt_ids()
    with torch.no_grad():
        ours = tuned(ids).logits
        merged = seekstack.load_pretrained(merge_adapter(base, tmp_path / "rows", tmp_path / "merged"))(ids).logits
        served = seekstack.load_pretrained(base).eval()  # per row beside the base (seekstack.adapters.multi)
        loaded = attach_adapters(served, {"rows": tmp_path / "rows"})
        loaded.select([loaded.slot("rows"), 0], torch.device("cpu"))
        mixed = served(ids).logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(plain, tmp_path / "rows")(ids).logits
    assert (ours - theirs).abs().max() < PEFT_ATOL and (merged - ours).abs().max() < MERGE_ATOL
    assert (mixed[0] - ours[0]).abs().max() < 1e-5 and (mixed[1] - before(ids).logits[1]).abs().max() < 1e-5
    assert (ours - before(ids).logits).abs().max() > 1e-3


def test_embedding_rows_beside_a_lora_embedding_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="'embedding_tokens'.*embed_tokens is in lora.vocabulary"):
        AdapterConfig(embedding_tokens=2, vocabulary=("embed_tokens",)).validate()


def test_layers_given_on_the_command_line_adapt_only_those_layers(base, data_dir, tmp_path):
    overrides = [*RUN, "max_steps=1", "lora.attention=[]", "lora.feed_forward=gate_proj,up_proj", "lora.layers=0"]
    train_config, adapter, continued = lora_train_config(base, data_dir, tmp_path / "first", overrides)
    assert adapter.layers == (0,) and adapter.feed_forward == ("gate_proj", "up_proj")
    train_adapter(train_config, adapter, continued)
    saved = json.loads((tmp_path / "first" / ADAPTER_CONFIG_FILE).read_text())
    assert sorted(saved["target_parameters"]) == ["layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight"]
    assert not saved["target_modules"]
    train_config, adapter, continued = lora_train_config(base, data_dir, tmp_path / "beyond", [*RUN, "lora.layers=0,2"])
    with pytest.raises(ConfigError, match="'lora.layers'.*below 2"):  # the base has 2 main layers
        train_adapter(train_config, adapter, continued)
    assert not (tmp_path / "beyond").exists()


@pytest.mark.parametrize("rows", [["lora.embedding_tokens=3", "lora.head_tokens=3"], ["lora.head_tokens=4"]])
def test_token_rows_of_a_tied_base_train_and_load_in_peft_as_ours_merge_and_are_refused_by_serving(
    data_dir, tmp_path, rows
):
    """On a base whose head is its embedding, the same ids of both are one set of rows (peft ties the head's to the
    embedding's through get_input_embeddings and _tied_weights_keys); head rows alone change the head only."""
    torch.manual_seed(0)
    config = seekstack.preset("tiny", **TINY, tie_word_embeddings=True)
    tied = seekstack.save_pretrained(seekstack.Transformer(config), tmp_path / "tied")
    overrides = [*RUN, "max_steps=2", "lora.attention=[o_proj]", "lora.feed_forward=[]", "lora.experts=[]"]
    train_adapter(*lora_train_config(tied, data_dir, tmp_path / "rows", [*overrides, *rows]))
    tuned = load_adapter(seekstack.load_pretrained(tied), tmp_path / "rows")
    before = seekstack.load_pretrained(tied)
    ids = prompt_ids()
    with torch.no_grad():
        ours = tuned(ids).logits
        merged = seekstack.load_pretrained(merge_adapter(tied, tmp_path / "rows", tmp_path / "merged"))
        merged_logits = merged(ids).logits
    trained = sorted(frequent_tokens(data_dir, 3 if len(rows) == 2 else 4))
    embedding_changed = (merged.embed_tokens.weight != before.embed_tokens.weight).any(dim=1).nonzero().flatten()
    head_changed = (merged.lm_head.weight != before.lm_head.weight).any(dim=1).nonzero().flatten()
    assert head_changed.tolist() == trained and embedding_changed.tolist() == (trained if len(rows) == 2 else [])
    assert merged.config.tie_word_embeddings == (len(rows) == 2)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tied, dtype=torch.float32)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(plain, tmp_path / "rows")(ids).logits
    assert (ours - theirs).abs().max() < PEFT_ATOL and (merged_logits - ours).abs().max() < MERGE_ATOL
    assert (ours - before(ids).logits).abs().max() > 1e-3
    with pytest.raises(CheckpointError, match=f"{ADAPTER_CONFIG_FILE}: .*tied.*seekstack lora merge"):
        read_factors(config, tmp_path / "rows")


def test_a_head_tokens_count_above_the_vocabulary_is_refused_before_the_run_folder_is_made(base, data_dir, tmp_path):
    with pytest.raises(ValueError, match="field 'lora.head_tokens' must be at most "):
        lora_train_config(base, data_dir, tmp_path / "run", [*RUN, "lora.head_tokens=1000000"])
    assert not (tmp_path / "run").exists()


def perturbed(model, seed):
    """`model` with noise added to its adapter's tensors, as training would move them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_parameter(name):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_pissa_or_olora_adapter_gives_the_trained_logits_on_the_original_base(base, init, tmp_path):
    config = AdapterConfig(rank=2, attention=("q_a_proj", "o_proj"), experts=(), layers=(0,), head_tokens=2, init=init)
    hooks = LoraHooks(config, str(base), head_token_ids=[3, 5])
    trained = hooks.prepare(seekstack.load_pretrained(base))
    ids = prompt_ids()
    with torch.no_grad():
        start, plain = trained(ids).logits, seekstack.load_pretrained(base)(ids).logits
        assert (start - plain).abs().max() < 1e-5  # the residual base + B0 A0 is the base
        residual = trained.get_base_model().layers[0].mlp.gate_proj.weight
        assert (residual - seekstack.load_pretrained(base).layers[0].mlp.gate_proj.weight).abs().max() > 1e-3
        trained_logits = perturbed(trained, seed=3)(ids).logits
    hooks.write(trained, tmp_path)
    saved = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (4, 32.0, True)
    ours = load_adapter(seekstack.load_pretrained(base), tmp_path)
    with torch.no_grad():
        assert (ours(ids).logits - trained_logits).abs().max() < 1e-5
        assert (trained_logits - plain).abs().max() > 1e-2
        merged = ours.merge_and_unload()(ids).logits
    assert (merged - trained_logits).abs().max() < MERGE_ATOL
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path)
    with torch.no_grad():
        assert (reference(ids).logits - trained_logits).abs().max() < PEFT_ATOL
    resumed = LoraHooks(config, str(base), head_token_ids=[3, 5])
    again = resumed.prepare(seekstack.load_pretrained(base))
    resumed.restore(again, tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, trained_logits)  # a resume takes back the trained factors exactly


def test_a_pissa_run_resumes_exactly(base, data_dir, tmp_path):
    overrides = [*RUN, "lora.init=pissa", "lora.experts=[]", "lora.attention=[q_a_proj]"]
    whole = train_adapter(*lora_train_config(base, data_dir, tmp_path / "whole", overrides))
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_6")
    resumed = train_adapter(*lora_train_config(None, None, tmp_path / "cut", resume=True), resume=True)
    assert resumed.losses == whole.losses[3:]


@pytest.mark.parametrize(("init", "decomposition"), [("pissa", "SVD"), ("olora", "QR decomposition")])
def test_a_pissa_or_olora_rank_above_a_weights_smaller_side_is_refused_before_the_run(
    base, data_dir, tmp_path, init, decomposition
):
    """kv_b_proj's weight is 32 x 8: PiSSA / OLoRA at rank 9 trained, peft starting that layer's factors at rank 8
    under r=9, and saved an adapter whose weights disagree with its own r (lora merge, generate, serve and peft
    refused it, after the whole run); rank 8 is the most its decomposition gives."""
    run = ["seq_len=32", "batch_size=2", "max_steps=1", "eval_every=0", f"lora.init={init}", "lora.experts=[]"]
    with pytest.raises(ConfigError) as refused:
        lora_train_config(base, data_dir, tmp_path / "nine", [*run, "lora.rank=9"])
    assert str(refused.value) == (
        f"field 'lora.rank' must be at most 8 with lora.init={init} (not 9): layers.0.self_attn.kv_b_proj's weight is "
        f"32 x 8, whose {decomposition} gives no more directions to start from; give a smaller lora.rank, or leave "
        "that layer out (lora.attention, lora.feed_forward, lora.vocabulary, lora.layers)"
    )
    assert not (tmp_path / "nine").exists()
    train_adapter(*lora_train_config(base, data_dir, tmp_path / "eight", [*run, "lora.rank=8"]))
    adapted = load_adapter(seekstack.load_pretrained(base), tmp_path / "eight")  # r 16 (converted), as its weights
    assert adapted.peft_config["default"].r == 16


def test_an_eva_rank_above_a_layers_inputs_is_refused_before_the_run(base, data_dir, tmp_path):
    """EVA takes round(rank x eva_rho) singular vectors of each adapted layer's inputs, kv_b_proj's 8 wide here: 10 of
    them failed in peft, after the data was read, with "n_components=10 invalid for n_features=8, need more rows than
    columns for IncrementalPCA processing", naming no layer nor field; 8 is the most there is."""
    run = ["seq_len=32", "batch_size=2", "max_steps=1", "eval_every=0", "lora.init=eva", "lora.experts=[]"]
    with pytest.raises(ConfigError) as refused:
        lora_train_config(base, data_dir, tmp_path / "ten", [*run, "lora.rank=5", "lora.eva_rho=2"])
    assert str(refused.value) == (
        "field 'lora.rank' must be such that round(lora.rank x lora.eva_rho) = 10 is at most 8 with lora.init=eva: "
        "layers.0.self_attn.kv_b_proj's weight is 32 x 8, whose 8 inputs have no more singular vectors to start "
        "from; give a smaller lora.rank or lora.eva_rho, or leave that layer out (lora.attention, lora.feed_forward, "
        "lora.layers)"
    )
    assert not (tmp_path / "ten").exists()
    assert (
        train_adapter(
            *lora_train_config(base, data_dir, tmp_path / "eight", [*run, "lora.rank=4", "lora.eva_rho=2"])
        ).step
        == 1
    )


def test_a_dora_adapter_loads_in_peft_merges_exactly_and_is_refused_by_serving(base, tmp_path):
    config = AdapterConfig(rank=4, feed_forward=(), experts=(), vocabulary=("embed_tokens",), dora=True)
    adapter = write_random_adapter(base, tmp_path / "dora", seed=4, config=config)
    with safe_open(adapter / ADAPTER_WEIGHTS_FILE, "pt") as weights:
        assert "base_model.model.model.layers.0.self_attn.o_proj.lora_magnitude_vector" in set(weights.keys())
    ids = prompt_ids()
    with torch.no_grad():
        ours = load_adapter(seekstack.load_pretrained(base), adapter)(ids).logits
        merged = seekstack.load_pretrained(merge_adapter(base, adapter, tmp_path / "merged"))(ids).logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    with torch.no_grad():
        theirs = reference(ids).logits
    assert (ours - theirs).abs().max() < PEFT_ATOL and (merged - ours).abs().max() < MERGE_ATOL
    assert (ours - seekstack.load_pretrained(base)(ids).logits).abs().max() > 1e-2
    with pytest.raises(CheckpointError, match=f"{ADAPTER_CONFIG_FILE}.*DoRA.*lora merge"):
        read_factors(seekstack.load_pretrained(base).config, adapter)


def test_loraplus_moves_the_b_factors_ratio_times_the_lr(base, data_dir, tmp_path):
    lr = 1e-3
    overrides = [*RUN, "max_steps=1", "warmup_steps=0", f"lr={lr}", "lora.experts=[]", "lora.feed_forward=[]"]
    for ratio in (1, 16):  # from B = 0, Adam's first step moves each B entry by lr x ratio (A's gradient is 0)
        out = tmp_path / f"ratio_{ratio}"
        train_adapter(*lora_train_config(base, data_dir, out, [*overrides, f"lora.loraplus_ratio={ratio}"]))
        with safe_open(out / ADAPTER_WEIGHTS_FILE, "pt") as weights:
            moved = max(weights.get_tensor(k).abs().max().item() for k in weights.keys() if ".lora_B." in k)
        assert moved == pytest.approx(lr * ratio, rel=1e-3)


def test_a_new_run_trains_with_adams_beta1_at_half_unless_betas_are_given(base, data_dir, tmp_path):
    config = lora_train_config(base, data_dir, tmp_path / "default", RUN).config
    assert config.betas == (0.5, 0.95)  # bench/lora_domain.py: less momentum recovers more of a fine-tune's gain
    given = lora_train_config(base, data_dir, tmp_path / "given", [*RUN, "betas=[0.9,0.99]"]).config
    assert given.betas == (0.9, 0.99)


def test_pissa_beside_experts_and_dora_beside_parameter_targets_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="'init'.*experts"):
        AdapterConfig(init="pissa").validate()
    with pytest.raises(ConfigError, match="'dora'.*parameter targets"):
        AdapterConfig(dora=True, experts=()).validate()
    with pytest.raises(ConfigError, match="'dora'"):
        AdapterConfig(dora=True, feed_forward=(), experts=(), vocabulary=("lm_head",)).validate()


def test_an_eva_run_starts_a_from_the_inputs_singular_vectors_loads_in_peft_merges_and_resumes(
    base, data_dir, tmp_path
):
    overrides = [*RUN, "lora.attention=[q_a_proj]", "lora.experts=[]", "lora.head_tokens=2", "lora.init=eva"]
    train_config, adapter, continued = lora_train_config(base, data_dir, tmp_path / "whole", overrides)
    batches = first_batches(train_config, START_BATCHES)
    inputs = []  # every input of layer 0's dense gate projection over those batches, as EVA sees them
    plain = seekstack.load_pretrained(base)
    gate = plain.layers[0].mlp.gate_proj
    handle = gate.register_forward_hook(lambda _, args, __: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in batches:
            plain(batch, keep_logits=False)
    handle.remove()
    states = torch.cat(inputs)
    top = torch.linalg.svd(states - states.mean(dim=0), full_matrices=False).Vh[: adapter.rank]
    start = LoraHooks(adapter, str(base), head_token_ids=frequent_tokens(data_dir, 2), start_batches=batches)
    started = start.prepare(seekstack.load_pretrained(base))
    lora_a = started.get_base_model().layers[0].mlp.gate_proj.lora_A["default"].weight
    cosines = (lora_a @ top.T).abs().diagonal()  # up to sign; EVA's incremental PCA stops once they settle
    assert (cosines[:3] > 0.98).all() and torch.allclose(lora_a.norm(dim=1), torch.ones(adapter.rank))
    ids = prompt_ids()
    with torch.no_grad():
        assert (started(ids).logits - plain(ids).logits).abs().max() < 1e-5  # B = 0: the start is the base
    whole = train_adapter(train_config, adapter, continued)
    saved = json.loads((tmp_path / "whole" / ADAPTER_CONFIG_FILE).read_text())
    assert sorted(saved["target_modules"]) == ["layers.0.self_attn.q_a_proj", "layers.1.self_attn.q_a_proj"]
    assert "layers.0.mlp.gate_proj.weight" in saved["target_parameters"] and saved["init_lora_weights"] is True
    tuned = load_adapter(seekstack.load_pretrained(base), tmp_path / "whole")
    with torch.no_grad():
        ours = tuned(ids).logits
        merged = seekstack.load_pretrained(merge_adapter(base, tmp_path / "whole", tmp_path / "merged"))(ids).logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "whole"
    )
    with torch.no_grad():
        assert (reference(ids).logits - ours).abs().max() < PEFT_ATOL
    assert (merged - ours).abs().max() < MERGE_ATOL and (ours - plain(ids).logits).abs().max() > 1e-3
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_6")
    resumed = train_adapter(*lora_train_config(None, None, tmp_path / "cut", resume=True), resume=True)
    assert resumed.losses == whole.losses[3:]  # bit for bit


def test_eva_rho_moves_ranks_at_the_same_total_and_the_saved_adapter_gives_the_trained_logits(base, data_dir, tmp_path):
    overrides = [*RUN, "lora.attention=[q_a_proj,o_proj]", "lora.experts=[]", "lora.head_tokens=2"]
    eva = ["lora.rank=2", "lora.alpha=4", "lora.init=eva", "lora.eva_rho=4"]
    train_config, adapter, _ = lora_train_config(base, data_dir, tmp_path / "run", [*overrides, *eva])
    hooks = LoraHooks(adapter, str(base), frequent_tokens(data_dir, 2), start_batches=first_batches(train_config, 4))
    trained = perturbed(hooks.prepare(seekstack.load_pretrained(base)), seed=5)
    ids = prompt_ids()
    with torch.no_grad():
        trained_logits = trained(ids).logits
    hooks.write(trained, tmp_path)
    saved = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    with safe_open(tmp_path / ADAPTER_WEIGHTS_FILE, "pt") as weights:
        ranks = sorted(weights.get_tensor(key).shape[0] for key in weights.keys() if ".lora_A." in key)
    assert sum(ranks) == 10 * 2 and ranks[0] < 2 < ranks[-1]  # 4 attention + 6 FFN factors: the same total, moved
    moved = [rank for rank in ranks if rank != 2]
    assert sorted(saved["rank_pattern"].values()) == moved  # (parameter targets by their parameter's name)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path)
    with torch.no_grad():
        ours = load_adapter(seekstack.load_pretrained(base), tmp_path)(ids).logits
        assert (ours - trained_logits).abs().max() < 1e-5  # each layer's rank and alpha/r scale as trained
        assert (reference(ids).logits - ours).abs().max() < PEFT_ATOL
        merged = seekstack.load_pretrained(merge_adapter(base, tmp_path, tmp_path / "merged"))(ids).logits
        served = seekstack.load_pretrained(base).eval()  # served per row beside the base (seekstack.adapters.multi)
        loaded = attach_adapters(served, {"eva": tmp_path})
        loaded.select([0, loaded.slot("eva")], torch.device("cpu"))
        mixed, plain = served(ids).logits, seekstack.load_pretrained(base)(ids).logits
    assert (merged - ours).abs().max() < MERGE_ATOL
    assert (mixed[1] - ours[1]).abs().max() < 1e-5 and (mixed[0] - plain[0]).abs().max() < 1e-5
    assert (ours[1] - plain[1]).abs().max() > 1e-2  # the adapter's row is not the base's


def test_eva_beside_experts_or_a_vocabulary_lora_and_a_rho_without_eva_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="'init'.*not 'eva'"):
        AdapterConfig(init="eva").validate()
    with pytest.raises(ConfigError, match="'init'.*not 'eva'"):
        AdapterConfig(init="eva", experts=(), vocabulary=("lm_head",)).validate()
    with pytest.raises(ConfigError, match="'eva_rho'.*unless lora.init=eva"):
        AdapterConfig(eva_rho=2).validate()


def test_lora_on_chat_packs_with_packing_true_with_the_padded_loss_and_gradients(base, data_dir, tmp_path):
    """TRL's SFTTrainer with a peft_config and packing=True: a packed micro-batch of the chat file trains the adapter
    as the same conversations padded do; token shards, which hold no padding, refuse it naming packing."""
    with pytest.raises(ConfigError, match="field 'packing' is true, but data_dir=.* is read as token shards"):
        train_adapter(
            *lora_train_config(base, data_dir, tmp_path / "on_shards", ["seq_len=32", "max_steps=1", "packing=true"])
        )
    base = write_base(tmp_path / "base", with_tokenizer=True)
    chats = tmp_path / "chats.jsonl"
    answers = ["It is 4.", "Four, as two and two make four.", "4", "The answer: 2 + 2 = 4, always."]
    turns = [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": a}] for a in answers]
    chats.write_text("".join(json.dumps({"messages": turn}) + "\n" for turn in turns))
    run = ["seq_len=96", "batch_size=2", "max_steps=2", "eval_every=0", "lora.rank=2", "packing=true"]
    train_config, adapter, continued = lora_train_config(base, chats, tmp_path / "packed", run)
    padded = chat_source(dataclasses.replace(train_config, packing=False))
    packed = chat_source(train_config)
    padded_batch, packed_batch = padded.batch(4, 0.0), packed.batch(len(packed.rows.rows), 0.0)
    assert packed_batch[0].shape[0] < 4  # every conversation, in fewer rows
    torch.manual_seed(0)
    model = LoraHooks(adapter, str(base)).prepare(seekstack.load_pretrained(base))
    for parameter in model.parameters():  # B starts at 0, which would leave A's gradients 0 in both
        if parameter.requires_grad:
            parameter.data.normal_(std=0.1)

    (rows, row_grads) = loss_and_gradients(model, padded, padded_batch)
    (pack, pack_grads) = loss_and_gradients(model, packed, packed_batch)
    assert row_grads and len(pack_grads) == len(row_grads)
    torch.testing.assert_close(pack.loss, rows.loss, rtol=1e-5, atol=1e-6)
    for grad, reference in zip(pack_grads, row_grads, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6)
    assert train_adapter(train_config, adapter, continued).step == 2


@pytest.mark.parametrize("override", ["init_from=", "data_dir="])
def test_an_empty_path_setting_is_refused_naming_its_key_not_taken_as_its_default(base, data_dir, tmp_path, override):
    """`lora train BASE DATA --out OUT init_from=` (init_from=$UNSET) is refused as `sft data=` is, before any work."""
    key = override.rstrip("=")
    with pytest.raises(ConfigError, match=rf"^{key}=: an empty path \(a shell variable left unset\?\)"):
        lora_train_config(base, data_dir, tmp_path / "adapter", [*RUN, override])
    assert not (tmp_path / "adapter").exists()
