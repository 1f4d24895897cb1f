"""SFT's held-out conversations: never trained on, scored every eval_every steps as the masked loss on their
assistant tokens, the same after a resume."""

import dataclasses
import hashlib
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from seekstack.checkpoint import load_pretrained
from seekstack.config import ConfigError
from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.posttrain.config import SFTConfig
from seekstack.posttrain.conversations import (
    HELD_OUT_FILE,
    conversation_key,
    encode_conversation,
    hold_out,
    read_held_out,
    write_conversations,
)
from seekstack.posttrain.sft import SFTSource, run_sft
from seekstack.posttrain.tasks import split_of
from seekstack.train.config import resolve_train_config
from seekstack.train.runs import TRAIN_STATE_FILE
from tests.posttrain.support import byte_tokenizer, micro_checkpoint

SUMS = [
    [
        {"role": "user", "content": f"What is {a} + {b}?"},
        {"role": "assistant", "content": f"<think> {a + b} </think> é"},
    ]
    for a in range(8)
    for b in range(5)
]  # 40 distinct conversations; "é" is two UTF-8 bytes


def sft_config(tmp_path, *overrides: str) -> SFTConfig:
    byte_tokenizer(tmp_path / "tok")
    common = [f"tokenizer={tmp_path / 'tok'}", "model.vocab_size=300", "seq_len=128", "batch_size=4", "threads=1"]
    common += ["model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=96", "warmup_steps=0"]
    return resolve_train_config(None, [*common, *overrides], cls=SFTConfig)


def test_held_out_conversations_are_never_in_training_batches(tmp_path):
    data = write_conversations(SUMS + SUMS[:10], tmp_path / "sums.jsonl")  # the first 10 twice
    source = SFTSource(sft_config(tmp_path, f"data={data}", "val_fraction=0.2"), holds_out=True)
    held_out = {tuple(ids) for ids, _ in source.validation}
    trained = {tuple(ids) for ids, _ in source.rows.rows}
    assert len(source.validation) >= 10 and len(source.validation) + len(source.rows.rows) == 50
    for _ in range(30):  # three epochs of the training rows
        input_ids, _ = source.batch(4, 0.0)
        for row in input_ids.tolist():
            ids = tuple(token for token in row if token != source.tokenizer.pad_id)
            assert ids in trained and ids not in held_out
    other_seed = SFTSource(sft_config(tmp_path, f"data={data}", "val_fraction=0.2", "seed=7"), holds_out=True)
    assert other_seed.validation == source.validation  # chosen by content, not by the seed
    default = SFTSource(sft_config(tmp_path, f"data={data}"), holds_out=True)  # 5% of 50 while eval_every > 0
    assert len(default.validation) >= 2 and len(default.rows.rows) == 50 - len(default.validation)
    assert not SFTSource(sft_config(tmp_path, f"data={data}", "eval_every=0"), holds_out=True).validation


def test_val_loss_is_logged_every_eval_every_steps_as_the_masked_loss_and_a_resume_logs_the_same(tmp_path):
    data = write_conversations(SUMS, tmp_path / "sums.jsonl")
    run = ["max_steps=4", "eval_every=2", "eval_batches=3", "val_fraction=0.25", "save_every=2", "keep_checkpoints=2"]
    straight = sft_config(tmp_path, f"data={data}", f"out_dir={tmp_path / 'a'}", *run)
    run_sft(straight)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    # directly: the summed cross-entropy of every assistant token of the 10 held-out conversations, per token and byte
    source = SFTSource(straight, holds_out=True)
    tokenizer = source.tokenizer
    held_out = [c for c in SUMS if encode_conversation(tokenizer, c) in source.validation]
    assert len(held_out) == 10  # 3 batches of 4 hold them all
    model = load_pretrained(tmp_path / "a" / "checkpoints" / "step_4").eval()
    nats, targets = 0.0, 0
    for conversation in held_out:
        ids, labels = encode_conversation(tokenizer, conversation)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        nats += F.cross_entropy(logits[:-1], torch.tensor(labels[1:]), reduction="sum").item()
        targets += sum(label != IGNORE_INDEX for label in labels[1:])
    text_bytes = sum(len(c[1]["content"].encode()) for c in held_out)  # the EOS ending each answer counts none
    assert evaluations[-1]["val_loss"] == pytest.approx(nats / targets, rel=1e-5)
    assert evaluations[-1]["val_bpb"] == pytest.approx(nats / (math.log(2) * text_bytes), rel=1e-5)

    resumed = sft_config(tmp_path, f"data={data}", f"out_dir={tmp_path / 'b'}", *run)
    run_sft(resumed, resume=tmp_path / "a" / "checkpoints" / "step_2")
    again = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in again if "val_loss" in r] == evaluations[1:]


def test_held_out_conversations_scored_are_the_same_however_a_steps_batch_is_split(tmp_path):
    """eval_batches counts global batches: 3 of 4 x 1 and of 2 x 2 both score all 10 held-out conversations (2 x 2
    scored 6 of them: eval_batches micro-batches)."""
    data = write_conversations(SUMS, tmp_path / "sums.jsonl")
    run = ["max_steps=1", "eval_every=1", "eval_batches=3", "val_fraction=0.25", "save_every=0"]
    evaluations = []
    for batch_size, grad_accum_steps in ((4, 1), (2, 2)):
        out_dir = tmp_path / f"{batch_size}x{grad_accum_steps}"
        split = [f"batch_size={batch_size}", f"grad_accum_steps={grad_accum_steps}", f"out_dir={out_dir}"]
        run_sft(sft_config(tmp_path, f"data={data}", *run, *split))
        records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        evaluations.extend(r for r in records if "val_loss" in r)
    assert evaluations[1]["val_loss"] == pytest.approx(evaluations[0]["val_loss"], rel=1e-5)
    assert evaluations[1]["val_bpb"] == pytest.approx(evaluations[0]["val_bpb"], rel=1e-5)


def test_a_val_data_file_holds_the_held_out_conversations_and_data_is_trained_whole(tmp_path):
    data = write_conversations(SUMS[:30], tmp_path / "train.jsonl")
    val_data = write_conversations(SUMS[30:], tmp_path / "val.jsonl")
    config = sft_config(tmp_path, f"data={data}", f"val_data={val_data}")
    source = SFTSource(config, holds_out=True)
    assert len(source.rows.rows) == 30
    assert source.validation == [encode_conversation(source.tokenizer, c) for c in SUMS[30:]]
    batches = source.validation_batches(batch_size=4, count=2)
    assert [b.input_ids.shape[0] for b in batches] == [4, 4]  # 8 of the 10: eval_batches x batch_size at most
    assert sum(b.text_bytes for b in batches) == sum(len(c[1]["content"].encode()) for c in SUMS[30:38])


def test_held_out_conversations_fewer_than_eval_batches_asks_are_said_once_naming_the_numbers(tmp_path, capsys):
    """The note of a val split shorter than eval_batches asks was said of token shards alone: an SFT (or conversation
    distillation) run scored fewer held-out conversations than asked, untold."""
    data = write_conversations(SUMS[:30], tmp_path / "train.jsonl")
    val_data = write_conversations(SUMS[30:], tmp_path / "val.jsonl")
    run = ["max_steps=2", "eval_every=1", "eval_batches=5", "save_every=0", f"out_dir={tmp_path / 'run'}"]
    run_sft(sft_config(tmp_path, f"data={data}", f"val_data={val_data}", *run))
    notes = [line for line in capsys.readouterr().err.splitlines() if "eval_batches" in line]
    assert notes == [
        "note: eval_batches=5 asks 20 held-out conversations per evaluation (5 x batch_size 4 x grad_accum_steps 1); "
        f"the held-out set (val_data {val_data}) holds 10: each evaluation scores those"
    ]


def test_a_task_run_holds_out_problems_of_the_tasks_held_out_split(tmp_path):
    source = SFTSource(
        sft_config(tmp_path, "task=addition", "difficulty=2", "examples=200", "val_fraction=0.05"), holds_out=True
    )

    def sums(rows: list[tuple[list[int], list[int]]]) -> list[str]:  # each row's question as its problem key, a+b
        return [
            re.search(r"What is (\d+) \+ (\d+)\?", source.tokenizer.decode(ids)).expand(r"\1+\2") for ids, _ in rows
        ]

    held_out = sums(source.validation)
    assert len(set(held_out)) == 10 and all(split_of(key) == "heldout" for key in held_out)
    assert all(split_of(key) == "train" for key in sums(source.rows.rows))


def test_a_bad_val_fraction_or_val_data_is_refused_naming_its_key(tmp_path):
    from typer.testing import CliRunner

    from seekstack.cli import app

    checkpoint = micro_checkpoint(tmp_path / "model")
    data = write_conversations(SUMS[:8], tmp_path / "chats.jsonl")
    start, on_data = f"init_from={checkpoint}", f"data={data}"
    refused = [
        ([start, on_data, "val_fraction=1"], "'val_fraction' must be below 1 (1 leaves nothing to train on)"),
        ([start, "val_fraction=1.5"], "'val_fraction' has value 1.5: input should be less than or equal to 1"),
        (
            [start, on_data, "val_fraction=0.1"],
            "'val_fraction' has value 0.1: it holds out none of the 8 conversations",
        ),
        ([start, "examples=7", "val_fraction=0.14"], "'val_fraction' must be 0 or at least 0.15 (1 of examples=7)"),
        ([start, "val_data=nope.jsonl"], "'val_data' must be a JSONL file of conversations, not 'nope.jsonl'"),
        ([start, on_data, f"val_data={data}"], "'val_data' must be another file than data"),
        ([start, f"val_data={data}", "val_fraction=0.5"], "'val_fraction' must be 0 or unset when val_data is given"),
    ]
    for overrides, message in refused:
        run = tmp_path / "run"
        result = CliRunner().invoke(app, ["sft", *overrides, f"out_dir={run}"])
        assert result.exit_code == 1 and f"error: field {message}" in result.output, (overrides, result.output)
        assert not run.exists()


def test_copies_differing_only_in_keys_the_template_ignores_are_one_conversation(tmp_path, capsys):
    """A copy whose messages carry `name`, `"tool_calls": null`, `"reasoning_content": null` or `weight: 1` encodes the
    same row: val_fraction holds it out with the original, and val_data holding it is noted as trained on."""
    dressed = [
        [{**user, "name": "ada"}, {**answer, "tool_calls": None, "reasoning_content": None, "weight": 1}]
        for user, answer in SUMS
    ]
    data = write_conversations(SUMS + dressed, tmp_path / "sums.jsonl")
    source = SFTSource(sft_config(tmp_path, f"data={data}", "val_fraction=0.2"), holds_out=True)
    held_out = {tuple(ids) for ids, _ in source.validation}
    assert len(source.validation) == 16 and len(held_out) == 8  # both copies of 8 conversations
    assert held_out.isdisjoint(tuple(ids) for ids, _ in source.rows.rows)
    plain = write_conversations(SUMS, tmp_path / "plain.jsonl")
    val_data = write_conversations(dressed[:5], tmp_path / "val.jsonl")
    SFTSource(sft_config(tmp_path, f"data={plain}", f"val_data={val_data}"), holds_out=True)
    assert f"note: 5 of the 5 conversations of val_data={val_data} are also in the training data" in (
        capsys.readouterr().err
    )


def test_held_out_conversations_none_of_which_fits_seq_len_are_told_so_not_as_none_held_out(tmp_path, capsys):
    """val_data (or val_fraction's share) whose conversations all have no assistant token within seq_len: the note
    names seq_len, not "no held-out conversations ...; set val_data or val_fraction" (said of a given val_data)."""
    data = write_conversations(SUMS, tmp_path / "sums.jsonl")
    long_prompt = [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}]
    val_data = write_conversations([long_prompt] * 2, tmp_path / "val.jsonl")
    source = SFTSource(sft_config(tmp_path, f"data={data}", f"val_data={val_data}", "seq_len=64"), holds_out=True)
    said = capsys.readouterr().err
    assert not source.validation and source.validation_batches(4, 1) is None
    assert (
        "note: 2 of 2 held-out conversations have no assistant token within seq_len=64: the run logs no val_loss; "
        "raise seq_len or shorten them" in said
    )
    assert "no held-out conversations" not in said and "set val_data" not in said
    SFTSource(sft_config(tmp_path, f"data={data}", "val_fraction=0.1"), holds_out=True)  # none left out
    assert "held-out conversations have no assistant token" not in capsys.readouterr().err


def test_a_val_fraction_holding_none_out_is_told_the_least_that_holds_out_a_conversation_with_its_copies(tmp_path):
    """Every conversation twice at val_fraction=1/40 of 40: none is held out (each only with its copy), and the
    refusal says 0.05 (2/40), not the 1/40 the field already has; copies of one conversation alone, or one alone (which
    was told it held "copies"): give val_data. The least is a decimal the field reads and that holds one out: "at least
    1/3" was no number it reads, and 0.33 of 3 holds none out."""
    twice = write_conversations(SUMS[:20] * 2, tmp_path / "twice.jsonl")
    with pytest.raises(ConfigError) as refused:
        SFTSource(sft_config(tmp_path, f"data={twice}", "val_fraction=0.025"), holds_out=True)
    assert str(refused.value) == (
        f"field 'val_fraction' has value 0.025: it holds out none of the 40 conversations of {twice}; raise it to at "
        "least 0.05 (each conversation is held out with its copies, and every one here has 2 or more), or give val_data"
    )
    SFTSource(sft_config(tmp_path, f"data={twice}", "val_fraction=0.05"), holds_out=True)  # 2/40 holds one out
    three = write_conversations(SUMS[:3], tmp_path / "three.jsonl")  # 1/3 is no number val_fraction reads; 0.33 x 3 < 1
    with pytest.raises(ConfigError, match=r"value 0.33: .* raise it to at least 0.34, or give val_data"):
        SFTSource(sft_config(tmp_path, f"data={three}", "val_fraction=0.33"), holds_out=True)
    assert len(SFTSource(sft_config(tmp_path, f"data={three}", "val_fraction=0.34"), holds_out=True).held_out) == 1
    copies = write_conversations(SUMS[:1] * 30, tmp_path / "copies.jsonl")
    with pytest.raises(ConfigError, match="they are copies of one conversation, held out together or not, and hold"):
        SFTSource(sft_config(tmp_path, f"data={copies}", "val_fraction=0.5"), holds_out=True)
    one = write_conversations(SUMS[:1], tmp_path / "one.jsonl")  # was told it held "copies of one conversation"
    with pytest.raises(ConfigError) as refused:
        SFTSource(sft_config(tmp_path, f"data={one}", "val_fraction=0.5"), holds_out=True)
    assert str(refused.value).endswith(
        f"none of the 1 conversation of {one}; it is the only one, and holding it out leaves none to train on: give "
        "val_data"
    )


def test_a_big_group_of_copies_is_not_held_out_past_val_fraction(tmp_path):
    """60 distinct conversations and 40 copies of one greeting at 0.05: 5 held out, none of them the greeting (its 40
    copies, kept together, would have been 40% of the data)."""
    greeting = [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Hey!"}]  # its key sorts first
    conversations = [*SUMS, *SUMS[:20], *[greeting] * 40]
    conversations[40:60] = [[user, {**answer, "content": "é?"}] for user, answer in SUMS[:20]]  # 60 distinct
    kept, held_out = hold_out(conversations, 0.05)
    assert len(held_out) == 5 and greeting not in held_out and len(kept) == 95
    assert hold_out(conversations[::-1], 0.05)[1] == held_out[::-1]  # the same ones, whatever the order


def test_val_fraction_holds_out_its_share_as_written_not_as_a_float_product(tmp_path):
    """0.29 of 100 conversations (or task examples) holds out 29: the float product 0.29 x 100 is 28.999999999999996."""
    conversations = [
        [user, {**answer, "content": f"{answer['content']} {n}"}] for n in range(3) for user, answer in SUMS
    ]
    kept, held_out = hold_out(conversations[:100], 0.29)
    assert len(held_out) == 29 and len(kept) == 71
    task = sft_config(tmp_path, "task=addition", "difficulty=2", "examples=100", "val_fraction=0.29")
    assert len(SFTSource(task, holds_out=True).held_out) == 29


@pytest.mark.parametrize("damaged", ['{"conversation_keys": ', "[]", '{"conversation_keys": [1]}', "\xff"])
def test_a_damaged_held_out_record_is_refused_naming_the_file(tmp_path, damaged):
    """A held_out.json cut short or edited made `seekstack report` fail with json's "error: Expecting value: line 1
    column 23 (char 22)" (or "'list' object has no attribute 'get'"), naming no file."""
    (tmp_path / HELD_OUT_FILE).write_bytes(damaged.encode("latin-1"))
    with pytest.raises(ValueError) as refused:
        read_held_out(tmp_path)
    assert str(refused.value) == (
        f'{tmp_path / HELD_OUT_FILE}: damaged, not the {{"conversation_keys": [...]}} an SFT run records of the '
        "conversations it holds out: delete it (resuming the run records them again)"
    )


def earlier_seekstacks_digest(tokenizer, conversations: list[list[dict]], fraction: float) -> str:
    """The rows digest an SFT checkpoint of seekstack 13fb86a (before held_out.json) saved: it held out at least
    int(fraction x N) conversations in the order of their JSON's hash and trained on the rows of all the others."""
    keys = [hashlib.blake2b(json.dumps(c, sort_keys=True).encode(), digest_size=16).hexdigest() for c in conversations]
    held, wanted = set(), int(fraction * len(conversations))
    for key in sorted(set(keys)):
        if wanted <= 0:
            break
        held.add(key)
        wanted -= keys.count(key)
    rows = [encode_conversation(tokenizer, c) for c, key in zip(conversations, keys, strict=True) if key not in held]
    return hashlib.blake2b(json.dumps(rows).encode(), digest_size=16).hexdigest()


def test_a_run_records_its_held_out_conversations_and_one_an_earlier_seekstack_started_resumes_only_on_its_rows(
    tmp_path,
):
    """A run writes the keys of its held-out conversations to out_dir/held_out.json at its start. A run folder
    without one is an earlier seekstack's, which held out others (6 of these 10): its checkpoint is refused saying
    so and naming init_from, not blaming the data; one whose rows are this seekstack's resumes and is recorded."""
    data = write_conversations(SUMS, tmp_path / "sums.jsonl")
    run_dir = tmp_path / "run"
    run = [f"data={data}", "val_fraction=0.25", f"out_dir={run_dir}", "save_every=2", "eval_every=0"]
    run_sft(sft_config(tmp_path, *run, "max_steps=2"))
    source = SFTSource(sft_config(tmp_path, *run), holds_out=True)
    recorded = {conversation_key(c) for c in source.held_out}
    assert len(source.held_out) == 10 and read_held_out(run_dir) == recorded

    (run_dir / HELD_OUT_FILE).unlink()  # the run folder an earlier seekstack left
    checkpoint = run_dir / "checkpoints" / "step_2" / TRAIN_STATE_FILE
    state = torch.load(checkpoint, weights_only=False)
    todays_digest = state["data"]["digest"]
    state["data"]["digest"] = earlier_seekstacks_digest(source.tokenizer, SUMS, 0.25)
    torch.save(state, checkpoint)
    with pytest.raises(
        ValueError, match="has no held_out.json: its run was started by an earlier seekstack"
    ) as refusal:
        run_sft(sft_config(tmp_path, *run, "max_steps=3"), resume=True)
    assert f"init_from={run_dir} (its newest checkpoint) and another out_dir" in str(refusal.value)
    assert "resume with the same data" not in str(refusal.value) and not (run_dir / HELD_OUT_FILE).exists()

    state["data"]["digest"] = todays_digest  # an earlier seekstack's run whose rows are this one's
    torch.save(state, checkpoint)
    assert run_sft(sft_config(tmp_path, *run, "max_steps=3"), resume=True).step == 3
    assert read_held_out(run_dir) == recorded


def test_a_checkpoint_older_than_row_digests_resumes_when_its_run_holds_nothing_out(tmp_path):
    data = write_conversations(SUMS, tmp_path / "sums.jsonl")
    run_dir = tmp_path / "run"
    run = [f"data={data}", "val_fraction=0", f"out_dir={run_dir}", "save_every=2", "eval_every=0"]
    run_sft(sft_config(tmp_path, *run, "max_steps=2"))
    (run_dir / HELD_OUT_FILE).unlink()  # and no digest in its state: nothing to check it against, nothing held out
    checkpoint = run_dir / "checkpoints" / "step_2" / TRAIN_STATE_FILE
    state = torch.load(checkpoint, weights_only=False)
    del state["data"]["digest"]
    torch.save(state, checkpoint)
    assert run_sft(sft_config(tmp_path, *run, "max_steps=3"), resume=True).step == 3


def test_a_run_refused_after_its_conversations_are_read_writes_nothing_into_out_dir(tmp_path):
    """A seq_len past the model's context is refused with the config; a config built without that check is refused
    once the model is built, after the conversations were read and split: held_out.json was written by then, into an
    out_dir the refused run never used."""
    data = write_conversations(SUMS, tmp_path / "sums.jsonl")
    run_dir = tmp_path / "run"
    refusal = "field 'seq_len' has value 128: longer than the model's context"
    with pytest.raises(ConfigError, match=refusal):
        sft_config(tmp_path, f"data={data}", f"out_dir={run_dir}", "model.max_position_embeddings=64")
    config = sft_config(tmp_path, f"data={data}", f"out_dir={run_dir}")
    config = dataclasses.replace(config, model_overrides={**config.model_overrides, "max_position_embeddings": 64})
    with pytest.raises(ConfigError, match=refusal):
        run_sft(config)
    assert not run_dir.exists()
