"""SFT with packing=true (TRL's SFTConfig(packing=True), "bfd"): several conversations per row, each on its own."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch
import torch.nn.functional as F

from seekstack.checkpoint import load_pretrained
from seekstack.config import ConfigError
from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.model.transformer import Transformer
from seekstack.posttrain.config import SFTConfig
from seekstack.posttrain.conversations import encode_conversation, write_conversations
from seekstack.posttrain.packing import best_fit_decreasing, pack_labelled
from seekstack.posttrain.sft import SFTSource, run_sft
from seekstack.train.balance import max_violation
from seekstack.train.config import resolve_train_config
from tests.conftest import micro_config
from tests.posttrain.support import byte_tokenizer, loss_and_gradients

CHATS = [
    [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "3"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, how are you today?"}],
    [{"role": "user", "content": "Spell it: " + "x" * 30}, {"role": "assistant", "content": "no"}],
    [{"role": "system", "content": "Be."}, {"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}],
    [{"role": "user", "content": "Count"}, {"role": "assistant", "content": " ".join(["one"] * 12)}],
]


def test_best_fit_decreasing_puts_each_row_longest_first_in_the_bin_it_fills_most():
    # 9 | 6 then 4 (room 4 fits exactly) | 5 then 3 then 2
    assert best_fit_decreasing([5, 9, 3, 6, 2, 4], capacity=10) == [[1], [3, 5], [0, 2, 4]]
    assert best_fit_decreasing([10, 10], capacity=10) == [[0], [1]]


def test_best_fit_decreasing_packs_hundreds_of_thousands_of_rows_in_seconds():
    """TRL's BFD finds each row's bin in a segment tree; a sorted list of every bin's room made packing quadratic:
    28 s for these 500,000 conversations of up to 3,000 tokens at seq_len 4,096 (3.5 s now) on a loaded 2-core
    machine, minutes for a million. Timed in this process's CPU seconds: the wall clock of a busy machine (a CI
    worker beside others) ran 21 s."""
    rng = random.Random(0)
    lengths = [rng.randint(20, 3000) for _ in range(500_000)]
    start = time.process_time()
    bins = best_fit_decreasing(lengths, 4096)
    elapsed = time.process_time() - start
    assert sorted(index for packed in bins for index in packed) == list(range(len(lengths)))
    assert max(sum(lengths[index] for index in packed) for packed in bins) <= 4096
    assert len(bins) < 1.001 * sum(lengths) / 4096  # nearly every row full
    assert elapsed < 15, f"{elapsed:.1f} s"


def test_a_packed_row_restarts_positions_per_conversation_and_pads_as_its_last_one_goes_on():
    first, second, third = ([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([8, 9], [8, 9]), ([4], [IGNORE_INDEX])
    input_ids, labels, positions = pack_labelled([[first, second], [third]], pad_id=2, max_len=8)
    assert input_ids.tolist() == [[5, 6, 7, 8, 9], [4, 2, 2, 2, 2]]
    # a conversation's first label is predicted from none of its tokens: never trained
    assert labels.tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9], [IGNORE_INDEX] * 5]
    assert positions.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]


def _config(tmp_path, *args: str) -> SFTConfig:
    byte_tokenizer(tmp_path / "tok")
    data = write_conversations(CHATS, tmp_path / "chats.jsonl")
    common = [f"tokenizer={tmp_path / 'tok'}", f"data={data}", "seq_len=96", "eval_every=0", "model.vocab_size=300"]
    return resolve_train_config(None, [*common, *args], cls=SFTConfig)


def test_a_packed_batch_has_the_loss_and_gradients_of_the_same_conversations_padded(tmp_path):
    """All five conversations in one micro-batch, packed in fewer rows or padded one a row: the same lm, MTP and
    balance losses, gradients and assistant tokens."""
    padded, packed = SFTSource(_config(tmp_path)), SFTSource(_config(tmp_path), packing=True)
    model = Transformer(micro_config(vocab_size=300, aux_loss_alpha=0.1, num_nextn_predict_layers=1))
    padded_batch, packed_batch = padded.batch(5, 0.0), packed.batch(len(packed.rows.rows), 0.0)
    assert packed.rows.epoch == 0 and packed_batch[0].shape[0] < 5  # every conversation, in fewer rows
    assert packed_batch[0].numel() < padded_batch[0].numel()  # and fewer positions computed
    assert packed.labelled_tokens(packed_batch) == padded.labelled_tokens(padded_batch)

    (rows, row_grads) = loss_and_gradients(model, padded, padded_batch)
    (pack, pack_grads) = loss_and_gradients(model, packed, packed_batch)
    for name in ["loss", "lm_loss", "mtp_loss", "balance_loss"]:
        torch.testing.assert_close(getattr(pack, name), getattr(rows, name), rtol=1e-5, atol=1e-6)
    for grad, reference in zip(pack_grads, row_grads, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6)


def test_sft_with_packing_trains_and_resumes_exactly_and_not_unpacked(tmp_path):
    model = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=96", "lr=1e-2"]
    args = [*model, "batch_size=1", "max_steps=6", "warmup_steps=0", "packing=true"]
    first = [f"out_dir={tmp_path / 'a'}", "save_every=3", "keep_checkpoints=2"]
    straight = run_sft(_config(tmp_path, *args, *first))
    assert straight.losses[-1] < straight.losses[0]
    resumed = run_sft(_config(tmp_path, *args, f"out_dir={tmp_path / 'b'}"), resume=tmp_path / "a/checkpoints/step_3")
    assert resumed.losses == straight.losses[3:]
    unpacked = _config(tmp_path, *args[:-1], "max_steps=7", f"out_dir={tmp_path / 'a'}")
    refusal = "field 'packing' is false, but the checkpoint in .* was trained with packing=true: .* with packing=true"
    with pytest.raises(ConfigError, match=refusal):  # its place in the packed rows is none in the conversations
        run_sft(unpacked, resume=tmp_path / "a/checkpoints/step_6")


def test_packed_micro_batches_weigh_each_conversations_balance_loss_the_same_whatever_the_split(
    tmp_path, step_gradients
):
    """Packed rows hold unequal numbers of conversations: a step of 2 rows, or of 2 micro-batches of 1 row, has the
    same loss and gradients, its balance loss a mean over the step's conversations either way."""
    args = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=96", "packing=true"]
    args += ["max_steps=1", "grad_clip=0", "aux_loss_alpha=0.1"]
    losses = []
    for batch_size, accumulated in [(2, 1), (1, 2)]:
        split = [f"batch_size={batch_size}", f"grad_accum_steps={accumulated}", f"out_dir={tmp_path / str(batch_size)}"]
        losses.append(run_sft(_config(tmp_path, *args, *split)).losses[0])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for grad, reference in zip(step_gradients[1], step_gradients[0], strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6)
    source = SFTSource(_config(tmp_path, *args), packing=True)
    first, second = (source.sequences(source.batch(1, 0.0)) for _ in range(2))
    assert first != second  # the case the split's equal weights would get wrong


def _held_out_run(tmp_path, packing: bool) -> tuple[SFTConfig, dict]:
    """A 2-step run scoring CHATS as its held-out conversations at its last step: its config and that evaluation."""
    val_data = write_conversations(CHATS, tmp_path / "held_out.jsonl")
    args = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=96", "batch_size=2"]
    args += ["max_steps=2", "eval_every=2", "eval_batches=3", "save_every=2", f"val_data={val_data}"]
    config = _config(tmp_path, *args, f"packing={str(packing).lower()}", f"out_dir={tmp_path / 'run'}")
    run_sft(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    [evaluation] = [record for record in records if "val_loss" in record]
    return config, evaluation


def test_held_out_conversations_are_packed_too_and_score_the_val_loss_of_each_alone(tmp_path):
    """TRL's eval_packing follows packing: the held-out rows are packed as the training rows are, in fewer positions,
    and val_loss is still each held-out conversation's own loss."""
    config, evaluation = _held_out_run(tmp_path, packing=True)
    source = SFTSource(config, holds_out=True, packing=True)
    packed = source.validation_batches(2, 3)
    padded = SFTSource(config, holds_out=True).validation_batches(2, 3)
    assert sum(batch.input_ids.numel() for batch in packed) < sum(batch.input_ids.numel() for batch in padded)

    model = load_pretrained(tmp_path / "run" / "checkpoints" / "step_2").eval()
    nats, targets = 0.0, 0
    for conversation in CHATS:  # each alone in a row of its own
        ids, labels = encode_conversation(source.tokenizer, conversation)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        nats += F.cross_entropy(logits[:-1], torch.tensor(labels[1:]), reduction="sum").item()
        targets += sum(label != IGNORE_INDEX for label in labels[1:])
    assert evaluation["val_loss"] == pytest.approx(nats / targets, rel=1e-5)


@pytest.mark.parametrize("packing", [False, True])
def test_val_maxvio_counts_the_held_out_conversations_tokens_not_their_padding(tmp_path, packing):
    """The expert load of an evaluation counts each held-out conversation's tokens (its MTP module's too), as the
    training loss's counts them, not the padding after them (routed alike to a few experts, it raised MaxVio)."""
    config, evaluation = _held_out_run(tmp_path, packing)
    model = load_pretrained(tmp_path / "run" / "checkpoints" / "step_2").eval()
    tokenizer = SFTSource(config).tokenizer
    load = 0
    for conversation in CHATS:  # each alone in a row of its own: no padding
        ids, labels = encode_conversation(tokenizer, conversation)
        with torch.no_grad():
            load = load + model(torch.tensor([ids]), labels=torch.tensor([labels]), keep_logits=False).expert_load
    assert evaluation["val_maxvio"] == pytest.approx(max_violation(load).mean().item(), rel=1e-5)
