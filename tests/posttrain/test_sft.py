import dataclasses
import json
import os
import re

import pytest
import torch

from seekstack.accounting import training_flops_per_token
from seekstack.adapters.data import is_chat
from seekstack.checkpoint import load_pretrained
from seekstack.config import ConfigError
from seekstack.distill.config import DistillConfig
from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.posttrain.config import GRPOConfig, SFTConfig
from seekstack.posttrain.conversations import (
    ShuffledRows,
    conversation_key,
    encode_conversation,
    labelled_text_bytes,
    read_conversations,
    source_digest,
    write_conversations,
)
from seekstack.posttrain.padding import pad_labelled
from seekstack.posttrain.sft import SFTSource, run_sft
from seekstack.serve.reasoning import ReasoningSplit
from seekstack.tokenizer import ASSISTANT, BOS, EOS, USER, Tokenizer, train_tokenizer
from seekstack.train.config import TrainConfig, resolve_train_config
from seekstack.train.runs import TRAIN_STATE_FILE
from tests.interop.release import v2_chat_tokenizer
from tests.posttrain.support import assert_refused_naming_ours, byte_tokenizer, micro_checkpoint

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 1 + 2?"},
    {"role": "assistant", "content": "<think> 1+2=3 </think> 3"},
    {"role": "user", "content": "And 2 + 2?"},
    {"role": "assistant", "content": "4"},
]


def test_labels_cover_exactly_the_assistant_turns_and_their_eos(tmp_path):
    tokenizer = byte_tokenizer(tmp_path)
    ids, labels = encode_conversation(tokenizer, CHAT)
    assert ids == tokenizer.encode_chat(CHAT, add_generation_prompt=False)
    kept = [token if label != IGNORE_INDEX else None for token, label in zip(ids, labels, strict=True)]
    spans, current = [], []
    for token in kept + [None]:
        if token is None and current:
            spans.append(tokenizer.decode(current))
            current = []
        elif token is not None:
            current.append(token)
    assert spans == ["3" + EOS, "4" + EOS]  # the first answer's reasoning dropped, as a later prompt drops it
    assert encode_conversation(tokenizer, CHAT[:3])[0] == tokenizer.encode_chat(CHAT[:3], add_generation_prompt=False)
    assert tokenizer.decode(encode_conversation(tokenizer, CHAT[:3])[0]).endswith("<think> 1+2=3 </think> 3" + EOS)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    assert labels[ids.index(tokenizer.backend.token_to_id(ASSISTANT))] == IGNORE_INDEX


def test_a_long_conversation_is_encoded_once_per_turn_not_once_per_prefix(tmp_path):
    tokenizer = byte_tokenizer(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}]
    for turn in range(60):
        messages += [{"role": "user", "content": f"Question {turn}?"}, {"role": "assistant", "content": f"{turn}"}]
    rendered, render = [], tokenizer.render_chat
    tokenizer.render_chat = lambda chat, *options: rendered.append(render(chat, *options)) or rendered[-1]
    ids, labels = encode_conversation(tokenizer, messages)
    whole = len(render(messages, False))
    assert sum(map(len, rendered)) < 3 * whole  # was ~60x: every prefix encoded twice (25 s for 200 long turns)
    trained = [tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])]
    assert trained == ["".join(f"{turn}{EOS}" for turn in range(60))]


def test_labelled_text_bytes_count_each_target_tokens_own_bytes_even_where_seq_len_cuts_a_character(tmp_path):
    """The answer "café" + EOS: 5 bytes whole (the EOS counts none); cut between the two bytes of "é", the byte kept
    counts 1 (decoding the kept tokens counted its U+FFFD, 3)."""
    tokenizer = byte_tokenizer(tmp_path)  # "é" is two byte tokens: its vocabulary has no merge of them
    chat = [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": "café"}]
    ids, labels = encode_conversation(tokenizer, chat)
    assert labelled_text_bytes(tokenizer, labels, len(ids)) == len("café".encode())
    assert labelled_text_bytes(tokenizer, labels, len(ids) - 2) == len(b"caf\xc3")


def test_padding_is_masked_and_rows_are_cut():
    rows = [([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([8], [8])]
    input_ids, labels = pad_labelled(rows, pad_id=2, max_len=8)
    assert input_ids.tolist() == [[5, 6, 7], [8, 2, 2]]
    assert labels.tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert pad_labelled(rows, pad_id=2, max_len=2)[0].tolist() == [[5, 6], [8, 2]]


def test_padded_batch_loss_equals_the_mean_over_unpadded_rows(tmp_path):
    """Right padding changes nothing: the batch loss is the token-weighted mean of each row's own loss."""
    from seekstack.model.transformer import Transformer
    from tests.conftest import micro_config

    tokenizer = byte_tokenizer(tmp_path)
    model = Transformer(micro_config(vocab_size=tokenizer.vocab_size, num_nextn_predict_layers=0))
    rows = [encode_conversation(tokenizer, CHAT), encode_conversation(tokenizer, CHAT[:3])]
    input_ids, labels = pad_labelled(rows, tokenizer.pad_id, 512)
    batch_loss = model(input_ids, labels=labels).lm_loss
    losses, counts = [], []
    for ids, row_labels in rows:
        losses.append(model(torch.tensor([ids]), labels=torch.tensor([row_labels])).lm_loss)
        counts.append(sum(label != IGNORE_INDEX for label in row_labels[1:]))
    expected = sum(loss * count for loss, count in zip(losses, counts, strict=True)) / sum(counts)
    assert torch.allclose(batch_loss, expected, atol=1e-5)


def test_sft_lowers_the_assistant_loss_and_resumes_exactly(tmp_path):
    byte_tokenizer(tmp_path / "tok")
    data = write_conversations([CHAT, CHAT[:3]] * 4, tmp_path / "chats.jsonl")
    common = [f"tokenizer={tmp_path / 'tok'}", f"data={data}", "batch_size=2", "lr=1e-2", "warmup_steps=0"]
    common += ["model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=96", "seq_len=128"]
    common += ["model.vocab_size=300"]  # a fresh model sized to the byte tokenizer
    straight = run_sft(
        resolve_train_config(
            None,
            [*common, f"out_dir={tmp_path / 'a'}", "max_steps=6", "save_every=3", "keep_checkpoints=2"],
            cls=SFTConfig,
        )
    )
    assert straight.losses[-1] < straight.losses[0]
    again = resolve_train_config(None, [*common, f"out_dir={tmp_path / 'b'}", "max_steps=6"], cls=SFTConfig)
    resumed = run_sft(again, resume=tmp_path / "a" / "checkpoints" / "step_3")
    assert resumed.losses == straight.losses[3:]
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["assistant_tokens"] > 0 for line in lines)


def test_tokens_per_second_and_mfu_count_the_padded_batch_not_seq_len(tmp_path):
    """Rows are padded to the batch's longest, far below seq_len here: tokens/s and MFU count what was computed."""
    byte_tokenizer(tmp_path / "tok")
    data = write_conversations([CHAT, CHAT[:3]] * 3, tmp_path / "chats.jsonl")
    args = [f"tokenizer={tmp_path / 'tok'}", f"data={data}", "batch_size=2", "seq_len=1024", "max_steps=3"]
    args += ["model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=96"]
    args += ["model.vocab_size=300", "peak_flops=1e12", f"out_dir={tmp_path / 'run'}"]
    config = resolve_train_config(None, args, cls=SFTConfig)
    run_sft(config)
    replay = SFTSource(config)  # the same seed draws the same batches
    model_config = load_pretrained(tmp_path / "run" / "checkpoints" / "step_3").config
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        step = json.loads(line)
        input_ids, _ = replay.batch(2, 0.0)
        width = input_ids.shape[1]
        assert width < 200  # far from seq_len: counting seq_len would claim 5x the tokens
        assert step["tokens_per_s"] * step["step_s"] == pytest.approx(2 * width)
        assert step["mfu"] == pytest.approx(step["tokens_per_s"] * training_flops_per_token(model_config, width) / 1e12)


def test_a_batch_size_past_the_conversations_takes_each_once_as_trls_batches_do(tmp_path, capsys):
    """batch_size=8 of 3 conversations drew 8 rows, some conversations twice (weighed double) at random: TRL's
    dataloader batches a smaller dataset whole, each row once; a note says so at the start."""
    byte_tokenizer(tmp_path / "tok")
    chats = [CHAT, CHAT[:3], [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]]
    data = write_conversations(chats, tmp_path / "chats.jsonl")
    args = [f"tokenizer={tmp_path / 'tok'}", f"data={data}", "batch_size=8", "seq_len=256", "model.vocab_size=300"]
    source = SFTSource(resolve_train_config(None, args, cls=SFTConfig))
    assert (
        "note: batch_size=8 is more than the 3 conversations to train on: each micro-batch holds each of them once, "
        "as TRL's batches of a smaller dataset do" in capsys.readouterr().err
    )
    whole = sorted(pad_labelled(source.rows.rows, source.tokenizer.pad_id, 256)[0].tolist())
    for _ in range(3):  # three epochs
        assert sorted(source.batch(8, 0.0)[0].tolist()) == whole


def test_default_data_is_generated_task_traces(tmp_path):
    byte_tokenizer(tmp_path)
    source = SFTSource(
        resolve_train_config(None, [f"tokenizer={tmp_path}", "examples=10", "task=countdown"], cls=SFTConfig)
    )
    input_ids, labels = source.batch(4, 0.0)
    text = source.tokenizer.decode(input_ids[0].tolist())
    assert "Using the numbers" in text and "<think>" in text
    assert (labels != IGNORE_INDEX).sum() > 0


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": CHAT[:2]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*assistant"):
        read_conversations(path)
    path.write_text("\n" + json.dumps({"messages": ["hello", *CHAT]}) + "\n")  # a message that is not an object
    with pytest.raises(ValueError, match=r"bad.jsonl:2: chat message 0 must be a dict with 'role' and 'content'"):
        read_conversations(path)
    path.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}, *CHAT]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: chat message 0 has unknown role 'robot'"):
        read_conversations(path)
    path.write_bytes(json.dumps({"messages": CHAT}).encode() + b"\n" + '{"caf\u00e9"'.encode("cp1252") + b"\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8 text \(invalid continuation byte at byte 5\)"):
        read_conversations(path)


def test_an_unknown_role_is_refused_naming_every_role_a_file_may_use(tmp_path):
    """developer is read as system, so the refusal lists it (it listed system, user and assistant only)."""
    path = tmp_path / "roles.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "User", "content": "hi"}, *CHAT]}) + "\n")
    expected = "roles.jsonl:1: chat message 0 has unknown role 'User'; expected one of ('system', 'developer', 'user', "
    with pytest.raises(ValueError, match=re.escape(expected + "'assistant', 'tool')")):
        read_conversations(path)


def test_a_missing_or_unusable_data_init_from_or_tokenizer_is_refused_naming_its_key(tmp_path):
    from typer.testing import CliRunner

    from seekstack.cli import app

    checkpoint, bare, pipe = micro_checkpoint(tmp_path / "model"), tmp_path / "bare", tmp_path / "63"
    bare.mkdir()
    (tmp_path / "part1.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    (tmp_path / "part1.parquet").write_bytes(b"PAR1")
    os.mkfifo(pipe)  # `data=<(zcat chats.jsonl.gz)`: was told "no such file"
    start = f"init_from={checkpoint}"
    refused = [  # were: "[Errno 2] No such file ...", "[Errno 21] Is a directory", "nonexist/tokenizer.json: ..."
        ([start, "data=nope.jsonl"], "'data' must be a JSONL file of conversations, not 'nope.jsonl' (no such file)"),
        (  # a folder or a pattern of several files, which datasets' data_files reads as one dataset: told to join them
            [start, f"data={tmp_path}/"],
            f"'data' must be a JSONL file of conversations, not '{tmp_path}/' (a folder; a run reads one JSONL file: "
            f"join its files, cat {tmp_path}/*.jsonl > conversations.jsonl)",
        ),
        (
            [start, f"data={tmp_path}/part*.jsonl"],
            f"'data' must be a JSONL file of conversations, not '{tmp_path}/part*.jsonl' (a pattern; a run reads one "
            f"JSONL file: join its files, cat {tmp_path}/part*.jsonl > conversations.jsonl)",
        ),
        (  # no .jsonl file to join: a cat would write no JSONL (was: cat bare/*.jsonl, cat *.parquet > ....jsonl)
            [start, f"data={bare}"],
            f"'data' must be a JSONL file of conversations, not '{bare}' (a folder; a run reads one JSONL file)",
        ),
        (
            [start, f"data={tmp_path}/*.parquet"],
            f"'data' must be a JSONL file of conversations, not '{tmp_path}/*.parquet' (a pattern; a run reads one "
            "JSONL file)",
        ),
        ([start, f"data={pipe}"], f"'data' must be a JSONL file of conversations, not '{pipe}' (a named pipe or"),
        (["init_from=nonexist"], "'init_from' must be an existing checkpoint folder, not 'nonexist'"),
        (
            [f"{start}/config.json"],
            f"'init_from' must be an existing checkpoint folder, not '{checkpoint}/config.json'",
        ),
        ([f"init_from={bare}"], "'init_from' must be a checkpoint folder with its tokenizer.json (or set tokenizer)"),
        ([start, f"tokenizer={bare}"], f"'tokenizer' must be a tokenizer.json or a folder holding one, not '{bare}'"),
    ]
    for overrides, message in refused:
        run = tmp_path / "run"
        result = CliRunner().invoke(app, ["sft", *overrides, f"out_dir={run}"])
        assert result.exit_code == 1 and f"error: field {message}" in result.output, result.output
        assert not run.exists()


@pytest.mark.parametrize("command", ["sft", "rl"])
def test_a_tokenizer_other_than_the_init_from_checkpoints_is_refused_naming_both(tmp_path, command):
    from typer.testing import CliRunner

    from seekstack.cli import app

    checkpoint = micro_checkpoint(tmp_path / "model")
    other = train_tokenizer(["another corpus, other merges"] * 20, vocab_size=290, out_path=tmp_path / "other")
    same = byte_tokenizer(tmp_path / "same")  # the checkpoint's tokenizer in another folder: accepted
    source = SFTSource(SFTConfig(init_from=str(checkpoint), tokenizer=str(tmp_path / "same"), examples=8))
    assert source.tokenizer.fingerprint == same.fingerprint
    run = tmp_path / "run"
    args = [command, f"init_from={checkpoint}", f"tokenizer={tmp_path / 'other'}", f"out_dir={run}"]
    result = CliRunner().invoke(app, args)  # was: trained, the checkpoint reading other.json's ids as its own
    assert result.exit_code == 1 and not run.exists(), result.output
    said = result.output
    assert f"error: field 'tokenizer' is '{tmp_path / 'other'}' ({other.source}), another tokenizer than" in said
    assert f"{checkpoint}/tokenizer.json, the one init_from='{checkpoint}' was trained with" in said
    assert same.fingerprint != other.fingerprint


@pytest.mark.parametrize("cls", [TrainConfig, SFTConfig, DistillConfig])
def test_a_tokenizer_given_as_a_runs_out_dir_is_its_newest_checkpoints_as_init_from_takes_it(tmp_path, cls):
    """tokenizer=RUN, which init_from=RUN takes for the run's newest checkpoint, was refused as "no such file:
    RUN/tokenizer.json" (the tokenizer sits in RUN/checkpoints/step_N)."""
    newest = micro_checkpoint(tmp_path / "run" / "checkpoints" / "step_2")
    (newest / TRAIN_STATE_FILE).touch()
    told: list[str] = []
    settings = [f"tokenizer={tmp_path / 'run'}", f"init_from={newest}", f"out_dir={tmp_path / 'b'}"]
    settings += [f"teacher={newest}"] if cls is DistillConfig else []
    config = resolve_train_config(None, settings, cls=cls, warn=told.append)
    assert config.tokenizer == str(newest)
    assert told == [f"tokenizer={tmp_path / 'run'}: using the run's newest checkpoint, {newest}"]


@pytest.mark.parametrize(
    ("trl_name", "ours"),
    [("max_length=512", "is seq_len here"), ("padding_free=true", "is packing=true here"),
     ("learning_rate=2e-5", "is lr here"), ("packing_strategy=wrapped", '"wrapped", which lets them see each other'),
     ("packing_strategy=bfd_split", '"bfd_split", which trains the rest of a longer one as a sequence of its own'),
     ("eval_packing=true", "held-out conversations are packed when packing=true"),
     ("use_peft=true", "this trains the whole model: `seekstack lora train BASE DATA.jsonl` trains an adapter"),
     ("lora_r=16", "TRL's lora_r is for a LoRA adapter"),
     # transformers' TrainingArguments names: eval_steps and save_steps were met with "did you mean 'max_steps'?"
     ("eval_steps=50", "transformers' eval_steps (steps between evaluations) is eval_every here"),
     ("save_steps=100", "save_steps (steps between checkpoints) is save_every here"),
     ("max_grad_norm=0.3", "max_grad_norm is grad_clip here"), ("max_seq_length=512", "is seq_len here"),
     ("warmup_ratio=0.1", "warmup_steps = warmup_ratio x max_steps"), ("bf16=true", "bf16=true is dtype=bfloat16"),
     # were refused with the list alone (distill: eos_token and pad_token asked "did you mean 'prompt_tokens'?",
     # activation_offloading "'activation_checkpointing'?", which is another thing)
     ("truncation_mode=keep_end", "keeping their start, as TRL's truncation_mode=keep_start"),
     ("eos_token=<|im_end|>", "an assistant turn ends with the tokenizer's EOS, which the chat template writes"),
     ("pad_token=<pad>", "padding is masked out of the loss and the balance loss, whatever its id"),
     ("activation_offloading=true", "TRL's activation_offloading (activations kept in CPU memory) is not offered"),
     # TRL's script arguments, on every `trl sft` command line: were refused with the list of fields alone
     ("model_name_or_path=Qwen/Qwen2.5-0.5B", "TRL's model_name_or_path (the model trained) is init_from here"),
     ("dataset_name=trl-lib/Capybara", "TRL's dataset_name is data here: a JSONL file of conversations")],
)  # fmt: skip
@pytest.mark.parametrize("cls", [SFTConfig, DistillConfig])  # TRL's GKDConfig is an SFTConfig
def test_trls_sft_field_names_are_refused_naming_ours(tmp_path, trl_name, ours, cls):
    """A TRL SFTConfig name is no field here: the refusal says which field it is (difflib finds none of these)."""
    assert_refused_naming_ours(tmp_path, cls, trl_name, ours)


@pytest.mark.parametrize(
    ("cls", "ours"),
    [(SFTConfig, "the loss is the cross-entropy on the trained tokens (TRL's SFT loss_type=nll, its default); dft is "
      "not offered"),
     # was: SFT's note, though distill's loss is not SFT's cross-entropy alone
     (DistillConfig, "the loss is ce_weight x CE + kd_weight x T^2 x JSD_beta(teacher, student) (+ the mapped "
      "layers' feature terms), set by ce_weight, kd_weight, beta and temperature; TRL's SFT loss_type (nll, dft) is "
      "not offered")],
)  # fmt: skip
def test_trls_sft_loss_type_is_refused_saying_what_the_commands_loss_is(tmp_path, cls, ours):
    assert_refused_naming_ours(tmp_path, cls, "loss_type=dft", ours)


@pytest.mark.parametrize("cls", [SFTConfig, GRPOConfig, DistillConfig])
def test_a_negative_step_count_is_refused_naming_the_field(cls):
    counts = [f.name for f in dataclasses.fields(cls) if f.name.endswith(("_steps", "_every", "_after"))]
    assert {"warmup_steps", "eval_every", "save_every", "max_steps"} <= set(counts)
    for name in counts:  # was: sft and rl took warmup_steps=-3, eval_every=-1, save_every=-1
        with pytest.raises(ConfigError, match=f"field '{name}' has value -1: input should be greater than"):
            resolve_train_config(None, ["tokenizer=tok.json", f"{name}=-1"], cls=cls)


def test_a_system_message_after_the_first_turn_labels_the_assistant_turns_all_the_same(tmp_path):
    tokenizer = byte_tokenizer(tmp_path)
    late = [*CHAT[1:3], {"role": "system", "content": "Be terse."}, *CHAT[3:]]  # the template puts it first
    first = [{"role": "system", "content": "Be terse."}, *CHAT[1:]]
    assert encode_conversation(tokenizer, late) == encode_conversation(tokenizer, first)
    ids, labels = encode_conversation(tokenizer, late)
    assert tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]) == (
        "3" + EOS + "4" + EOS
    )


def test_rows_come_in_a_new_order_each_epoch_and_a_resume_continues_in_its_epochs_order():
    rows = [([number], [number]) for number in range(6)]
    source = ShuffledRows(rows, seed=3)
    first, second = source.take(6), source.take(6)
    assert sorted(first) == sorted(second) == rows and first != second
    source.take(2)  # two rows into the third epoch
    resumed = ShuffledRows(rows, seed=3)
    resumed.load_state_dict(source.state_dict())
    assert resumed.take(5) == source.take(5)


def test_resuming_on_other_conversations_is_refused(tmp_path):
    tokenizer = byte_tokenizer(tmp_path)
    rows = ShuffledRows([encode_conversation(tokenizer, CHAT)] * 3, seed=0)
    rows.take(2)
    other = ShuffledRows([encode_conversation(tokenizer, CHAT)] * 2, seed=0, data="chats.jsonl")
    # it named neither the file nor the checkpoint's count: 'the run's data (2 conversations) is not what ...'
    refused = r"the run's data \(chats.jsonl: 2 conversations, its checkpoint's 3\) is not what its checkpoint was"
    with pytest.raises(ValueError, match=refused):
        other.load_state_dict(rows.state_dict())
    with pytest.raises(ValueError, match=r"keeps its weights\); a checkpoint of an earlier seekstack, which recorded"):
        other.load_state_dict(rows.state_dict())
    again = ShuffledRows([encode_conversation(tokenizer, CHAT)] * 3, seed=0)
    again.load_state_dict(rows.state_dict())
    assert again.take(2) == rows.take(2)


def test_a_resume_whose_rows_an_earlier_seekstack_built_of_the_same_conversations_goes_on(tmp_path, capsys):
    """The checkpoint's state as an earlier seekstack wrote it for the same conversations and tokenizer: other rows (its
    chat format kept an earlier turn's reasoning) but the same `source_digest`. The run goes on from the same place,
    with a note; other conversations, or a state that records no source (before 2026-12-04), are refused."""
    tokenizer = byte_tokenizer(tmp_path)
    reasoned = [*CHAT[1:3], {"role": "assistant", "content": "<think>r</think>5"}, *CHAT[3:]]
    conversations = [CHAT, reasoned, CHAT]
    source = source_digest(tokenizer, conversations)
    rows = [encode_conversation(tokenizer, c) for c in conversations]
    earlier = ShuffledRows([(ids[:-1], labels[:-1]) for ids, labels in rows], 0, source)  # rows by other rules
    earlier.take(2)
    now = ShuffledRows(rows, 0, source)
    now.load_state_dict(earlier.state_dict())
    assert (now.epoch, now.cursor) == (0, 2) and now.order == earlier.order
    assert "its rows were built by other rules (an earlier seekstack's)" in capsys.readouterr().err
    other = ShuffledRows(rows, 0, source_digest(tokenizer, [CHAT, CHAT, CHAT]))
    with pytest.raises(ValueError, match=r"the run's data \(3 conversations\) is not what its checkpoint was trained"):
        other.load_state_dict(earlier.state_dict())
    unrecorded = {k: v for k, v in earlier.state_dict().items() if k not in ("source", "rows")}
    with pytest.raises(ValueError, match=r"before the chat format of 2026-12-04, which drops an earlier turn's"):
        now.load_state_dict(unrecorded)


def test_sft_and_rl_write_their_resolved_config(tmp_path):
    from typer.testing import CliRunner

    from seekstack.cli import app

    model_dir = micro_checkpoint(tmp_path / "model")
    for command, field in (("sft", "examples"), ("rl", "num_generations")):
        path = tmp_path / f"{command}.yaml"
        result = CliRunner().invoke(app, [command, f"init_from={model_dir}", f"{field}=7", "--write-config", str(path)])
        assert result.exit_code == 0, result.output
        assert f"{field}: 7" in path.read_text()


def test_conversations_whose_assistant_turn_starts_past_seq_len_are_left_out_and_reported(tmp_path, capsys):
    """A micro-batch of them alone would still take an optimizer step, on its balance loss: they are not drawn."""
    byte_tokenizer(tmp_path / "tok")
    long_prompt = [{"role": "user", "content": "Count the words of this long question. " * 4}, CHAT[2]]
    data = write_conversations([CHAT, CHAT[:3], long_prompt], tmp_path / "chats.jsonl")
    common = [f"tokenizer={tmp_path / 'tok'}", f"data={data}", "model.vocab_size=300"]
    assert len(SFTSource(resolve_train_config(None, [*common, "seq_len=512"], cls=SFTConfig)).rows.rows) == 3
    assert "left out" not in capsys.readouterr().err
    source = SFTSource(resolve_train_config(None, [*common, "seq_len=80"], cls=SFTConfig))
    assert "note: 1 of 3 conversations have no assistant token within seq_len=80: left out of training" in (
        capsys.readouterr().err
    )
    assert len(source.rows.rows) == 2
    assert all(source.labelled_tokens(source.batch(1, 0.0)) > 0 for _ in range(6))
    with pytest.raises(ValueError, match="none of the 3 conversations has an assistant token within seq_len=8,"):
        SFTSource(resolve_train_config(None, [*common, "seq_len=8"], cls=SFTConfig))


def test_conversations_whose_last_answer_is_cut_by_seq_len_are_counted(tmp_path, capsys):
    """A row keeps its first seq_len tokens: an answer cut there loses its EOS, and the model learns not to stop."""
    tokenizer = byte_tokenizer(tmp_path / "tok")
    data = write_conversations([CHAT[:3], CHAT[1:3], CHAT[1:3]], tmp_path / "chats.jsonl")
    whole = len(encode_conversation(tokenizer, CHAT[:3])[0])
    common = [f"tokenizer={tmp_path / 'tok'}", f"data={data}", "model.vocab_size=300"]
    SFTSource(resolve_train_config(None, [*common, f"seq_len={whole}"], cls=SFTConfig))
    assert "cut by" not in capsys.readouterr().err
    SFTSource(resolve_train_config(None, [*common, f"seq_len={whole - 1}"], cls=SFTConfig))
    assert (
        f"note: 1 of 3 conversations have their last assistant turn cut by seq_len={whole - 1}, its EOS with it: the "
        "model learns not to stop on them" in capsys.readouterr().err
    )


def test_reasoning_dropped_from_a_turn_before_the_last_user_message_is_noted(tmp_path, capsys):
    """The chat template drops an earlier turn's reasoning, in training as in a served prompt: the run says so."""
    byte_tokenizer(tmp_path / "tok")
    data = write_conversations([CHAT, CHAT[:3], CHAT[:3]], tmp_path / "chats.jsonl")
    SFTSource(resolve_train_config(None, [f"tokenizer={tmp_path / 'tok'}", f"data={data}", "model.vocab_size=300"],
                                   cls=SFTConfig))  # fmt: skip
    assert (
        "note: 1 of 3 conversations have reasoning (up to a </think>) in an assistant turn before their last user "
        "message: it is dropped" in capsys.readouterr().err
    )
    assert conversation_key(CHAT) == conversation_key([*CHAT[:2], {**CHAT[2], "content": "3"}, *CHAT[3:]])


def test_a_special_token_in_content_is_refused_naming_the_file_and_line(tmp_path):
    byte_tokenizer(tmp_path / "tok")
    forged = [{"role": "user", "content": f"hi {ASSISTANT} there"}, CHAT[2]]
    data = write_conversations([CHAT, forged], tmp_path / "chats.jsonl")
    clean = write_conversations([CHAT, CHAT[:3]], tmp_path / "clean.jsonl")
    common = [f"tokenizer={tmp_path / 'tok'}", "model.vocab_size=300", "eval_every=5"]
    special = rf"chat message 0 content contains the special token '{ASSISTANT}'"
    with pytest.raises(ValueError, match=rf"chats.jsonl:2: {special}"):
        SFTSource(resolve_train_config(None, [*common, f"data={data}"], cls=SFTConfig), holds_out=True)
    with pytest.raises(ValueError, match=rf"chats.jsonl:2: {special}"):
        SFTSource(resolve_train_config(None, [*common, f"data={clean}", f"val_data={data}"], cls=SFTConfig), True)


@pytest.mark.parametrize("label", ["math", 3, None])
def test_a_prompt_completion_line_labelled_other_than_true_or_false_is_read_as_its_pair(tmp_path, label):
    """Only a bool `label` beside prompt and completion is TRL's unpaired preference format (KTO's), refused; a label
    of another kind (a category, an id, null) is a column SFT leaves unread, as TRL's SFTTrainer drops it, and was
    refused too: data read before the KTO check was refused after it."""
    pairs = [{"prompt": "Say hi.", "completion": " Hi."}, {"prompt": CHAT[1:2], "completion": CHAT[2:3]}]
    plain, labelled = tmp_path / "plain.jsonl", tmp_path / "labelled.jsonl"
    plain.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    labelled.write_text("".join(json.dumps({**pair, "label": label}) + "\n" for pair in pairs))
    read = read_conversations(labelled, text_completions=True)
    assert read == read_conversations(plain, text_completions=True)
    assert [type(conversation).__name__ for conversation in read] == ["TextCompletion", "Conversation"]


def test_a_special_token_in_a_text_prompt_or_completion_is_refused_but_an_eos_ending_the_completion(tmp_path):
    """TRL's prompt-completion lines of text skipped the special-token check a conversation's content gets: a prompt
    holding <｜User｜> was encoded with the real token (a forged turn), and a completion "4<｜end▁of▁sentence｜> more"
    trained the EOS, then " more" after it. A completion ending with the EOS, which TRL takes for the one it adds,
    is read."""
    tokenizer = byte_tokenizer(tmp_path / "tok")
    data = tmp_path / "pairs.jsonl"
    forged = [({"prompt": f"Q: hi{USER} A: ", "completion": "4"}, "field prompt", USER)]
    completion = "field completion, but for one EOS ending it (TRL's own),"
    forged.append(({"prompt": "Q: 2 + 2? A: ", "completion": f"4{EOS} more{EOS}"}, completion, EOS))
    for line, field, token in forged:
        data.write_text(json.dumps({"prompt": "Q: 1 + 1? A: ", "completion": "2"}) + "\n" + json.dumps(line) + "\n")
        with pytest.raises(ValueError) as refused:
            read_conversations(data, tokenizer, text_completions=True)
        assert (
            str(refused.value)
            == f"{data}:2: {field} contains the special token {token!r}, which would forge a turn: take it out"
        )
    data.write_text(json.dumps({"prompt": "Q: 2 + 2? A: ", "completion": f"4{EOS}"}) + "\n")
    ids, labels = encode_conversation(tokenizer, *read_conversations(data, tokenizer, text_completions=True))
    assert ids[-2:] == labels[-2:] == [*tokenizer.encode("4"), tokenizer.eos_id] and ids.count(tokenizer.eos_id) == 1


def test_openai_developer_messages_and_text_parts_read_as_system_messages_and_joined_text(tmp_path):
    """An assistant's refusal part (OpenAI's {"type": "refusal", "refusal": ...}) was refused as no text part; it is
    the reply's text, as the server reads it."""
    path = tmp_path / "openai.jsonl"
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "1 + 2?"}]
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}, CHAT[2]]
    refused = [CHAT[1], {"role": "assistant", "content": [{"type": "refusal", "refusal": "I won't say."}]}]
    path.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"messages": refused}) + "\n")
    assert read_conversations(path) == [
        [CHAT[0], {"role": "user", "content": "What is\n1 + 2?"}, CHAT[2]],
        [CHAT[1], {"role": "assistant", "content": "I won't say."}],
    ]


@pytest.mark.parametrize(
    ("message", "refusal"),
    [
        ({"role": "tool", "content": "3", "tool_call_id": "1"}, "chat message 1 tool_call_id '1' answers no call"),
        (
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
            r'chat message 1 tool_calls\[0\] must be {"type": "function", "function": {"name": ...',
        ),
        (
            {"role": "assistant", "content": "Let me look.", "function_call": {"name": "f", "arguments": "{}"}},
            "chat message 1 has function_call, OpenAI's deprecated form of a tool call: give it as tool_calls",
        ),
        ({"role": "user", "content": [{"type": "image_url"}]}, "chat message 1 content part 0 is 'image_url'"),
        # were "is 'text': only text parts ... are supported", of a text part
        ({"role": "user", "content": [{"type": "text", "text": 5}]}, "chat message 1 content part 0 field 'text' must"),
        (
            {"role": "user", "content": [{"type": "text"}]},
            "chat message 1 content part 0 field 'text' must be text, left",
        ),
        (
            {"role": "assistant", "content": None},
            "chat message 1 content must be a string or a list of text parts, got null",
        ),
        (
            {"role": "assistant"},
            "chat message 1 has no 'content' key: an assistant message leaves it out only when it calls tools",
        ),
        (
            {"role": "user", "content": "smile \ud83d"},  # written as the JSON escape "\\ud83d", its pair missing
            r"chat message 1 content holds '\\ud83d' at character 6: half of a surrogate pair",
        ),
    ],
)
def test_malformed_tool_turns_and_non_text_content_are_refused_naming_the_line(tmp_path, message, refusal):
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": [CHAT[1], message, *CHAT]}) + "\n")
    with pytest.raises(ValueError, match=rf"tools.jsonl:2: {refusal}"):
        read_conversations(path)


def test_an_assistant_turn_of_weight_0_is_context_not_trained_on(tmp_path):
    """OpenAI fine-tuning's `weight`: 0 keeps the turn in the row, its tokens unlabelled; 1 trains it as usual."""
    tokenizer = byte_tokenizer(tmp_path)
    path = tmp_path / "weighted.jsonl"
    weighted = [*CHAT[:2], {**CHAT[2], "weight": 0}, CHAT[3], {**CHAT[4], "weight": 1}]
    path.write_text(json.dumps({"messages": weighted}) + "\n")
    ids, labels = encode_conversation(tokenizer, read_conversations(path, tokenizer)[0])
    assert ids == tokenizer.encode_chat(CHAT, add_generation_prompt=False)
    assert tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]) == "4" + EOS


def test_an_assistants_refusal_is_trained_as_its_reply(tmp_path):
    """OpenAI's {"role": "assistant", "content": null, "refusal": ...} was refused as a null content (with no word of
    the refusal), and rendered as an empty reply where it was read; the refusal is the reply trained."""
    tokenizer = byte_tokenizer(tmp_path)
    path = tmp_path / "refusals.jsonl"
    path.write_text(json.dumps({"messages": [CHAT[1], {"role": "assistant", "content": None, "refusal": "No."}]}))
    ids, labels = encode_conversation(tokenizer, read_conversations(path, tokenizer)[0])
    assert tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]) == "No." + EOS


def test_a_null_weight_as_a_datasets_export_writes_it_trains_the_turn(tmp_path):
    """A datasets column of messages holds every message's keys: exported, a message that gave no weight has "weight":
    null, which was refused ('field 'weight' has value None: it must be 0 (not trained on) or 1')."""
    tokenizer = byte_tokenizer(tmp_path)
    path = tmp_path / "exported.jsonl"
    exported = [{**m, "weight": 0 if m is CHAT[2] else None} for m in CHAT]
    path.write_text(json.dumps({"messages": exported}) + "\n")
    ids, labels = encode_conversation(tokenizer, read_conversations(path, tokenizer)[0])
    assert ids == tokenizer.encode_chat(CHAT, add_generation_prompt=False)
    assert tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]) == "4" + EOS


def test_trls_conversational_prompt_completion_trains_the_completion_alone(tmp_path):
    """TRL's {"prompt": [...], "completion": [...]} was refused as no {"messages": [...]}; its prompt is context, an
    assistant turn in it too (TRL's completion_only_loss), its completion trained. lora train reads it as chat."""
    tokenizer = byte_tokenizer(tmp_path)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": CHAT[:4], "completion": CHAT[4:]}) + "\n")
    ids, labels = encode_conversation(tokenizer, read_conversations(path, tokenizer)[0])
    assert ids == tokenizer.encode_chat(CHAT, add_generation_prompt=False)
    assert tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]) == "4" + EOS
    assert is_chat(path)


def test_trls_from_value_conversations_read_as_their_messages(tmp_path):
    """TRL's SFTTrainer reads {"conversations": [{"from": ..., "value": ...}]} as messages (maybe_convert_to_chatml:
    from as role, value as content); it was refused as no conversation. lora train reads it as chat."""
    path = tmp_path / "from_value.jsonl"
    conversations = [{"from": m["role"], "value": m["content"]} for m in CHAT]
    path.write_text(json.dumps({"conversations": conversations}) + "\n")
    assert read_conversations(path) == [CHAT]
    assert is_chat(path)


def test_sharegpt_human_and_gpt_roles_are_refused_naming_the_line_and_the_roles_to_write(tmp_path):
    """ShareGPT's from/value data says human and gpt, which TRL keeps as roles and DeepSeek-V3's template writes no
    turn for; they were refused as any unknown role ('expected one of (...)'), not saying what they stand for."""
    path = tmp_path / "sharegpt.jsonl"
    sharegpt = {"user": "human", "assistant": "gpt"}
    lines = [
        [{"from": roles.get(m["role"], m["role"]), "value": m["content"]} for m in CHAT] for roles in ({}, sharegpt)
    ]
    path.write_text("".join(json.dumps({"conversations": line}) + "\n" for line in lines))
    with pytest.raises(ValueError) as refused:
        read_conversations(path)
    position, message = next((p, m) for p, m in enumerate(lines[1]) if m["from"] in ("human", "gpt"))
    assert str(refused.value).startswith(
        f"{path}:2: chat message {position} is from {message['from']!r}, ShareGPT's name of {CHAT[position]['role']!r}"
    )
    assert '"from": "user" and "from": "assistant"' in str(refused.value)


@pytest.mark.parametrize(
    ("record", "refusal"),
    [
        ({"prompt": "What is 1 + 2?", "completion": " 3"}, "a \"prompt\" and \"completion\" of text (TRL's standard"),
        ({"text": "1 + 2 = 3"}, "\"text\" (TRL's language-modeling format) holds no assistant turn to train"),
        ({"prompt": CHAT[:2], "completion": [CHAT[1]]}, "chat message 2 (of the completion) has role 'user'"),
        ({"prompt": CHAT[:2], "completion": []}, "\"completion\" holds no message"),
        # TRL's SFTTrainer trains such a line's prompt and completion; its messages were trained here, unsaid
        ({"messages": CHAT, "prompt": CHAT[:2], "completion": CHAT[2:4]}, "the line holds \"messages\" and TRL's "
         "\"prompt\"/\"completion\" too, which TRL's SFTTrainer reads in place of its messages: keep one"),
        ({"messages": CHAT, "completion": CHAT[2:4]}, "the line holds \"messages\" and TRL's \"prompt\"/"),
        # these were "expected {"messages": [...]} ... got the keys ['messages']", of a line that has them
        ({"messages": "Hi"}, "field messages must be a list of OpenAI's chat messages [{\"role\": ..., \"content\": "
         "...}], got str 'Hi'"),
        ({"messages": CHAT[0]}, "field messages must be a list of OpenAI's chat messages"),
        ({"conversations": []}, "field conversations holds no message: a conversation is a list of TRL's from/value "
         "messages"),
        ({"conversations": CHAT}, "field conversations must be a list of TRL's from/value messages [{\"from\": "
         "\"user\", \"value\": ...}]; its first message is"),
        ({"prompt": CHAT[:2], "completion": "4"}, "TRL's \"prompt\" and \"completion\" are both lists of chat "
         "messages (its conversational form) or both text (its standard form), but here prompt is list, completion "
         "is str: give both as messages"),
        ({"conversation": CHAT}, "expected {\"messages\": [...]} (or TRL's {\"prompt\": [...], \"completion\": "
         "[...]}) with an assistant message, got the keys ['conversation']"),
        # "expected {"messages": [...]} ... got the keys ['content', 'role']": a message taken for a conversation
        (CHAT[1], "a chat message ('user'), not a conversation: write each conversation as one object, "
         "{\"messages\": [its messages]}, a line each"),
    ],
)  # fmt: skip
def test_other_dataset_formats_are_refused_naming_the_line_and_what_to_write(tmp_path, record, refusal):
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"other.jsonl:2: {refusal}")):
        read_conversations(path)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "thinking"])
def test_an_assistants_reasoning_content_is_trained_in_its_content_in_the_r1_format(tmp_path, field):
    """A reply recorded from DeepSeek's API or `seekstack serve --reasoning-parser deepseek_r1` holds its reasoning in
    reasoning_content, which SFT ignored as another key: a model trained on such replies answered without reasoning.
    vLLM names it reasoning (since late 2025; reasoning_content removed in 2026), and transformers' templates and TRL's
    gpt-oss datasets name it thinking: both were still dropped as other keys. A reply giving two names alike (servers
    that write both) is read the same."""
    tokenizer = byte_tokenizer(tmp_path)
    path = tmp_path / "served.jsonl"
    reply = {"role": "assistant", "content": "5", field: "2 + 3 is 5"}
    both = {**reply, "reasoning_content": "2 + 3 is 5"}
    path.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": "2 + 3?"}, r]}) + "\n" for r in (reply, both))
    )
    messages, messages_of_both = read_conversations(path, tokenizer)
    assert messages_of_both == messages
    assert messages[1] == {"role": "assistant", "content": "<think>\n2 + 3 is 5\n</think>\n\n5"}
    assert ReasoningSplit().message(messages[1]["content"]).reasoning_content == "2 + 3 is 5"  # serve's split of it
    ids, labels = encode_conversation(tokenizer, messages)
    trained = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    assert trained == messages[1]["content"] + EOS


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "thinking"])
def test_an_assistants_reasoning_apart_is_templated_for_transformers_and_serve_as_sft_trains_it(tmp_path, field):
    """SFT trained a reasoning given apart in the R1 format, while the chat template saved for transformers (TRL's
    assistant_only_loss on the same line) and encode_chat (serve, Engine.chat) left it out: the reply alone. All three
    now write it so; a turn before the last user message loses it in each, as a replayed think block."""
    import transformers

    tokenizer = byte_tokenizer(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ask, reply = {"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5", field: "2 + 3 is 5"}
    follow_up = [{"role": "user", "content": "And 2 + 4?"}, {"role": "assistant", "content": "6", field: "2 + 4 is 6"}]
    for conversation, expected in (
        ([ask, reply], f"<think>\n2 + 3 is 5\n</think>\n\n5{EOS}"),
        ([ask, reply, *follow_up], f"5{EOS}<think>\n2 + 4 is 6\n</think>\n\n6{EOS}"),
    ):
        path = tmp_path / "served.jsonl"
        path.write_text(json.dumps({"messages": conversation}) + "\n")
        ids, labels = encode_conversation(tokenizer, read_conversations(path, tokenizer)[0])
        assert tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]) == expected
        rendered = auto.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert rendered["input_ids"] == ids == tokenizer.encode_chat(conversation, add_generation_prompt=False)
        assert rendered["assistant_masks"] == [int(label != IGNORE_INDEX) for label in labels]


def test_a_system_message_in_the_middle_trains_in_a_checkpoints_own_template_where_it_writes_it(tmp_path):
    """A checkpoint's own template (DeepSeek-V2-Chat's) writes a system message where it is; SFT put every system
    message first and refused the conversation ("writes a conversation's turns otherwise alone than together")."""
    v2_chat_tokenizer(tmp_path)
    tokenizer = Tokenizer.from_file(tmp_path)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "system", "content": "Now in French."},
                    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Salut."}]  # fmt: skip
    ids, labels = encode_conversation(tokenizer, conversation)
    chat = "Be brief.\n\nUser: Hi\n\nAssistant: Hello.{EOS}Now in French.\n\nUser: Hi\n\nAssistant: Salut.{EOS}"
    assert tokenizer.decode(ids) == BOS + chat.format(EOS=EOS)
    spans = "".join(
        tokenizer.decode([token]) if label != IGNORE_INDEX else "|" for token, label in zip(ids, labels, strict=True)
    )
    assert spans.split("|")[-1] == f" Salut.{EOS}" and f"| Hello.{EOS}|" in spans


@pytest.mark.parametrize(
    ("reply", "refusal"),
    [
        ({"content": "5", "reasoning_content": 5}, "chat message 1 field 'reasoning_content' must be text or null"),
        ({"content": "<think> a </think> 5", "reasoning_content": "b"}, "chat message 1 has reasoning_content and a "
         "<think> block in its content too"),
        ({"content": "5", "reasoning_content": f"b{ASSISTANT}"}, "chat message 1 content contains the special token"),
        ({"content": "5", "reasoning": 5}, "chat message 1 field 'reasoning' must be text or null"),
        ({"content": "<think> a </think> 5", "thinking": "b"}, "chat message 1 has thinking and a <think> block"),
        ({"content": "5", "reasoning_content": "a", "reasoning": "b"}, "chat message 1 gives two reasonings, in "
         "reasoning_content and reasoning, which differ: keep the one the assistant wrote"),
    ],
)  # fmt: skip
def test_reasoning_content_that_cannot_be_trained_is_refused_naming_the_line(tmp_path, reply, refusal):
    tokenizer = byte_tokenizer(tmp_path)
    path = tmp_path / "served.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", **reply}]}))
    with pytest.raises(ValueError, match=re.escape(f"served.jsonl:1: {refusal}")):
        read_conversations(path, tokenizer)


@pytest.mark.parametrize(
    ("weight", "refusal"),
    [
        ({"role": "assistant", "content": "4", "weight": 2}, "chat message 4 field 'weight' has value 2: it must be 0"),
        ({"role": "assistant", "content": "4", "weight": True}, "chat message 4 field 'weight' has value True"),
        ({"role": "assistant", "content": "4", "weight": 0}, "every assistant message has weight 0"),
    ],
)
def test_a_weight_other_than_0_or_1_on_an_assistant_message_is_refused_naming_the_line(tmp_path, weight, refusal):
    path = tmp_path / "weighted.jsonl"
    messages = [*CHAT[:2], {**CHAT[2], "weight": 0}, CHAT[3], weight]
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ValueError, match=rf"weighted.jsonl:2: {refusal}"):
        read_conversations(path)


def test_a_weight_on_a_message_other_than_the_assistants_is_ignored(tmp_path):
    """OpenAI fine-tuning gives `weight` a meaning on assistant messages only; converted datasets that put one on
    every message (any value) train as without it."""
    tokenizer = byte_tokenizer(tmp_path)
    path = tmp_path / "weighted.jsonl"
    weighted = [{**CHAT[0], "weight": 0}, {**CHAT[1], "weight": 1}, CHAT[2], {**CHAT[3], "weight": 0.5}, CHAT[4]]
    path.write_text(json.dumps({"messages": weighted}) + "\n")
    conversation = read_conversations(path, tokenizer)[0]
    assert encode_conversation(tokenizer, conversation) == encode_conversation(tokenizer, CHAT)


def test_accumulated_micro_batches_weigh_every_assistant_token_the_same_whatever_the_split(tmp_path, step_gradients):
    """4 conversations whose answers are 1 and 40 words: 1 x 4, 2 x 2 and 4 x 1 micro-batches give one step the
    same loss and gradients (a mean over the step's assistant tokens, not a mean of micro-batch means)."""
    start = micro_checkpoint(tmp_path / "start")
    long_answer = {"role": "assistant", "content": " ".join(["forty"] * 40)}
    data = write_conversations([CHAT[1:3], [CHAT[1], long_answer]] * 2, tmp_path / "chats.jsonl")
    steps = []
    for batch_size, accumulated in [(4, 1), (2, 2), (1, 4)]:
        out_dir = tmp_path / f"{batch_size}x{accumulated}"
        args = [f"init_from={start}", f"data={data}", f"out_dir={out_dir}", "max_steps=1", "seq_len=320"]
        args += [f"batch_size={batch_size}", f"grad_accum_steps={accumulated}", "eval_every=0", "grad_clip=0"]
        args += ["aux_loss_alpha=0.1"]  # padding, whose width the split changes, counts in no balance loss
        run_sft(resolve_train_config(None, args, cls=SFTConfig))
        steps.append(json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[0]))
    for other, grads in zip(steps[1:], step_gradients[1:], strict=True):
        assert other["loss"] == pytest.approx(steps[0]["loss"], rel=1e-5)
        assert other["lm_loss"] == pytest.approx(steps[0]["lm_loss"], rel=1e-5)
        assert other["grad_norm"] == pytest.approx(steps[0]["grad_norm"], rel=1e-4)
        assert other["assistant_tokens"] == steps[0]["assistant_tokens"]  # the step's total
        for grad, reference in zip(grads, step_gradients[0], strict=True):
            torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6)
    source = SFTSource(resolve_train_config(None, [f"init_from={start}", f"data={data}"], cls=SFTConfig))
    assert steps[0]["assistant_tokens"] == sum(source.labelled_tokens(source.batch(1, 0.0)) for _ in range(4))


def test_padding_is_told_from_a_labelled_eos_where_eos_pads():
    """Where the pad id is EOS (V2 releases), an assistant turn's labelled EOS counts as a real token."""
    from seekstack.posttrain.padding import pad_labelled, real_tokens

    eos = 1
    input_ids, labels = pad_labelled([([5, 6, eos], [-100, 6, eos]), ([5, eos], [-100, eos])], eos, 8)
    assert real_tokens(input_ids, labels, eos).tolist() == [[True, True, True], [True, True, False]]


def test_an_unlabelled_eos_inside_a_row_is_real_where_eos_pads():
    """A turn of weight 0 ends in an EOS left unlabelled: where EOS pads, it was counted as padding (out of the expert
    load) though the model attends to it and routes it; only the EOS ids after a row's last token are padding."""
    from seekstack.posttrain.padding import pad_labelled, real_tokens

    eos = 1
    weight_0_turn = ([5, 6, eos, 7, 8, eos], [-100, -100, -100, -100, 8, eos])  # "6<eos>" untrained, "8<eos>" trained
    input_ids, labels = pad_labelled([weight_0_turn, ([5, 9, eos], [-100, 9, eos])], eos, 8)
    assert real_tokens(input_ids, labels, eos).tolist() == [[True] * 6, [True, True, True, False, False, False]]


def test_transformers_assistant_tokens_mask_is_the_sft_labels_mask(tmp_path):
    """TRL's assistant_only_loss reads the chat template's {% generation %} blocks (apply_chat_template with
    return_assistant_tokens_mask): the template had none, so transformers could not tell the assistant's tokens.
    Its mask is SFT's labels: each trained answer and its EOS, not the role tokens, nor a turn of weight 0."""
    import transformers

    tokenizer = byte_tokenizer(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    untrained_turn = [{"role": "assistant", "content": "Hm, é?", "weight": 0}, {"role": "user", "content": "Go on."}]
    for conversation in (CHAT, [*CHAT[:3], *untrained_turn, *CHAT[3:]]):
        ids, labels = encode_conversation(tokenizer, conversation)
        rendered = auto.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert rendered["input_ids"] == ids
        assert rendered["assistant_masks"] == [int(label != IGNORE_INDEX) for label in labels]
        assert sum(rendered["assistant_masks"]) > 0


def test_ctrl_c_while_sft_reads_its_conversations_says_that_nothing_was_saved(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the conversations were read and tokenized (seconds to minutes, before the trainer starts) ended
    `seekstack sft` with exit 130 and not a word, where one in the trainer's start-up says what it saved."""

    def interrupted_reading(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("seekstack.posttrain.sft.conversation_source", interrupted_reading)
    data = write_conversations([CHAT[1:3]] * 2, tmp_path / "chats.jsonl")
    byte_tokenizer(tmp_path / "tokenizer")
    args = [f"data={data}", f"tokenizer={tmp_path / 'tokenizer'}", f"out_dir={tmp_path / 'run'}"]
    config = resolve_train_config(None, args, cls=SFTConfig)
    with pytest.raises(KeyboardInterrupt):
        run_sft(config)
    assert capsys.readouterr().err.endswith("\ninterrupted before its first step: nothing saved\n")
    assert not (tmp_path / "run").exists()
