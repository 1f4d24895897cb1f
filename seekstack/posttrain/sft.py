"""Chat SFT: the pretraining trainer's loop fed conversations, the loss on assistant tokens only.

`SFTSource` is the trainer's batch source (seekstack.train.trainer.BatchSource): right-padded rows with their
labels (IGNORE_INDEX off the assistant's tokens), or with `packing` rows each packing several conversations
(packing.py), in a seeded order whose position is saved for an exact resume, and the held-out conversations as fixed
validation batches (`val_loss` on their assistant tokens).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seekstack.config import ConfigError
from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.model.transformer import ModelOutput
from seekstack.posttrain.config import ConversationConfig, SFTConfig, held_out_count, least_fraction, run_tokenizer
from seekstack.posttrain.conversations import (
    HELD_OUT_FILE,
    Conversation,
    ShuffledRows,
    conversation_key,
    encode_conversation,
    hold_out,
    labelled_text_bytes,
    read_conversations,
    source_digest,
    task_conversations,
    write_held_out,
)
from seekstack.posttrain.packing import pack_labelled, pack_rows
from seekstack.posttrain.padding import pad_labelled, real_tokens
from seekstack.posttrain.tasks import make_task
from seekstack.schema import counted
from seekstack.tokenizer import Tokenizer, drop_past_reasoning
from seekstack.train.runs import refuse_new_run_into
from seekstack.train.trainer import TrainResult, ValidationBatch, told_if_interrupted_before_training, train


def tokenizer_info(tokenizer: Tokenizer) -> dict[str, Any]:
    """What the trainer needs to know of a tokenizer: its size, and the file checkpoints copy."""
    return {"vocab_size": tokenizer.vocab_size, "path": tokenizer.source, "sha256": tokenizer.fingerprint}


def split_conversations(
    config: ConversationConfig, tokenizer: Tokenizer, fraction: float, val_data: str
) -> tuple[list[Conversation], list[Conversation]]:
    """(trained, held_out) conversations of an SFT run: `data` less the `fraction` `hold_out` keeps back, or
    `examples` training problems of `task` and `fraction` x `examples` distinct held-out ones; the held-out ones are
    `val_data`'s instead when it names a file. The same for every start and resume of the run."""
    if config.data:
        trained, held_out = hold_out(read_conversations(config.data, tokenizer, config.text_completions), fraction)
    else:
        task = make_task(config.task, config.difficulty)
        trained = task_conversations(task, config.examples, config.seed)
        held_out = task_conversations(task, held_out_count(fraction, config.examples), config.seed, "heldout")
    if not val_data:
        return trained, held_out
    held_out = read_conversations(val_data, tokenizer, config.text_completions)
    trained_keys = {conversation_key(c) for c in trained}
    also_trained = sum(conversation_key(c) in trained_keys for c in held_out)
    if also_trained:
        print(
            f"note: {also_trained} of the {len(held_out)} conversations of val_data={val_data} are also in the "
            "training data: val_loss measures them trained on",
            file=sys.stderr,
        )
    return trained, held_out


class SFTSource:
    """Conversations as (input_ids, labels) micro-batches for the trainer; with `holds_out` (an SFT or conversation
    distillation run: its config's val_data or val_fraction; an adapter run on a chat file), the held-out ones
    (`held_out`) as its fixed validation batches. Without, none are held out (an adapter run resumed from a seekstack
    that held none out, seekstack/adapters/data.py). With `packing`, a micro-batch is `batch_size` rows of up to
    seq_len tokens, each packing several conversations, the same packs every epoch in a seeded order (as TRL packs
    its dataset once), and so are the validation batches' rows."""

    def __init__(self, config: ConversationConfig, holds_out: bool = False, packing: bool = False):
        self.config = config
        self.tokenizer = run_tokenizer(config)
        self.tokenizer_info = tokenizer_info(self.tokenizer)
        if holds_out:
            conversations, held_out = split_conversations(
                config, self.tokenizer, config.held_out_fraction, config.val_data
            )
            _require_a_split(config, conversations, len(held_out))
        else:
            conversations, held_out = split_conversations(config, self.tokenizer, 0.0, "")
        source = source_digest(self.tokenizer, conversations)
        data = config.data or f"task={config.task}"
        rows = self._training_rows(conversations)
        self.packing = packing
        self.rows = ShuffledRows(pack_rows(rows, config.seq_len) if packing else rows, config.seed, source, data)
        if config.batch_size > len(self.rows.rows):
            what = "packed rows" if packing else "conversations"
            print(
                f"note: batch_size={config.batch_size} is more than the {len(self.rows.rows)} {what} to train on: "
                "each micro-batch holds each of them once, as TRL's batches of a smaller dataset do",
                file=sys.stderr,
            )
        self.held_out = held_out if holds_out else None
        self.validation = self._validation_rows(held_out) if holds_out else []
        self.device = torch.device("cpu")

    def _training_rows(self, conversations: list[Conversation]) -> list[tuple[list[int], list[int]]]:
        """The conversations' rows that have an assistant token within seq_len (a micro-batch of the others would
        still take an optimizer step, on the balance loss alone); a note when some are left out, or lose reasoning
        (`drop_past_reasoning`), a ValueError naming data and seq_len when all are left out."""
        config = self.config
        rows = [encode_conversation(self.tokenizer, c) for c in conversations]
        trained = [row for row in rows if has_targets_within(row, config.seq_len)]
        if not trained:
            raise ValueError(
                f"{config.data or config.task}: none of the {len(rows)} conversations has an assistant token within "
                f"seq_len={config.seq_len}, so there is nothing to train on; raise seq_len or shorten their prompts"
            )
        if len(trained) < len(rows):
            print(
                f"note: {len(rows) - len(trained)} of {len(rows)} conversations have no assistant token within "
                f"seq_len={config.seq_len}: left out of training; raise seq_len or shorten their prompts",
                file=sys.stderr,
            )
        # DeepSeek-V3's format drops it; a checkpoint's own template writes what it writes
        dropped = sum(drop_past_reasoning(c) != c for c in conversations) if self.tokenizer.has_role_tokens else 0
        if dropped:
            print(
                f"note: {dropped} of {len(rows)} conversations have reasoning (up to a </think>) in an assistant turn "
                "before their last user message: it is dropped, as the chat template drops it from a prompt, and the "
                "turn trains its answer alone; to train that reasoning too, add the conversation cut after that turn",
                file=sys.stderr,
            )
        cut = sum(not ends_within(row, config.seq_len) for row in trained)
        if cut:
            print(
                f"note: {cut} of {len(trained)} conversations have their last assistant turn cut by "
                f"seq_len={config.seq_len}, its EOS with it: the model learns not to stop on them; raise seq_len or "
                "shorten them",
                file=sys.stderr,
            )
        return trained

    def _validation_rows(self, held_out: list[Conversation]) -> list[tuple[list[int], list[int]]]:
        """The held-out conversations' rows that have an assistant token within seq_len (the others score nothing);
        a note when some are left out (all: the run logs no val_loss), or when evaluations are asked for and none
        are held out."""
        config = self.config
        rows = [encode_conversation(self.tokenizer, c) for c in held_out]
        scored = [row for row in rows if has_targets_within(row, config.seq_len)]
        if len(scored) < len(rows):
            left_out = (
                "val_loss leaves them out" if scored else "the run logs no val_loss; raise seq_len or shorten them"
            )
            print(
                f"note: {len(rows) - len(scored)} of {len(rows)} held-out conversations have no assistant token within "
                f"seq_len={config.seq_len}: {left_out}",
                file=sys.stderr,
            )
        if config.eval_every and not rows:
            print(
                f"note: no held-out conversations ({self._held_out_from()}), so the run logs no val_loss; "
                f"{config.held_out_advice}",
                file=sys.stderr,
            )
        return scored

    def _held_out_from(self) -> str:
        """Where the held-out conversations come from: the val_data file, or a share of the data."""
        config = self.config
        if config.val_data:
            return f"val_data {config.val_data}"
        return f"a share of {config.held_out_fraction:g} of {config.data or f'{config.examples} examples'}"

    def validation_rows(self) -> tuple[int, str, str]:
        """How many rows `validation_batches` scores at most (the held-out conversations with an assistant token
        within seq_len), what they are and where from: the trainer's note of fewer than eval_batches asks."""
        return len(self.validation), "held-out conversations", f"the held-out set ({self._held_out_from()})"

    def validation_batches(self, batch_size: int, count: int) -> list[ValidationBatch] | None:
        """The first `count` batches of the held-out rows, in a fixed order; None when none are held out. With
        `packing` the same rows are packed (TRL's eval_packing, which follows packing), `batch_size` packed rows a
        batch: the same targets scored, so the same val_loss, in fewer positions."""
        if not self.validation:
            return None
        scored = self.validation[: batch_size * count]
        groups = pack_rows(scored, self.config.seq_len) if self.packing else [[row] for row in scored]
        batches = []
        for start in range(0, len(groups), batch_size):
            packs = groups[start : start + batch_size]
            rows = [row for pack in packs for row in pack]
            text_bytes = sum(labelled_text_bytes(self.tokenizer, targets, self.config.seq_len) for _, targets in rows)
            if self.packing:
                input_ids, labels, positions = pack_labelled(packs, self.tokenizer.pad_id, self.config.seq_len)
            else:
                (input_ids, labels), positions = pad_labelled(rows, self.tokenizer.pad_id, self.config.seq_len), None
            real = real_tokens(input_ids, labels, self.tokenizer.pad_id)  # the padding counts in no expert load
            batches.append(ValidationBatch(input_ids, labels, text_bytes, positions=positions, real=real))
        return batches

    def attach(self, model: nn.Module) -> None:
        self.device = next(model.parameters()).device

    def batch(self, batch_size: int, progress: float) -> tuple[torch.Tensor, ...]:
        """(input_ids, labels), or packed (input_ids, labels, positions): each (B, T), B at most the rows there are
        (more would hold a row twice, weighing it double)."""
        rows = self.rows.take(min(batch_size, len(self.rows.rows)))
        if self.packing:
            return pack_labelled(rows, self.tokenizer.pad_id, self.config.seq_len)
        return pad_labelled(rows, self.tokenizer.pad_id, self.config.seq_len)

    def labelled_tokens(self, batch: Any) -> int:
        """The assistant tokens the micro-batch's loss averages over: its labels predicted from a position before."""
        labels = batch[1]
        return int((labels[:, 1:] != IGNORE_INDEX).sum())

    def sequences(self, batch: Any) -> int:
        """The conversations of the micro-batch, over which its balance loss is a mean: a row each, or packed, each
        starting at position 0."""
        return int((batch[2] == 0).sum()) if self.packing else batch[0].shape[0]

    def loss(self, model: nn.Module, batch: Any, mtp_loss_weight: float) -> tuple[ModelOutput, dict[str, float]]:
        input_ids, labels, *packed = (t.to(self.device) for t in batch)
        counted = real_tokens(input_ids, labels, self.tokenizer.pad_id)  # padding is routed, not counted in the load
        # packed rows' positions, each conversation's from 0 (none given unpacked)
        positions = {"positions": packed[0]} if packed else {}
        out = model(
            input_ids, labels=labels, mtp_loss_weight=mtp_loss_weight, keep_logits=False, counted=counted, **positions
        )
        # the assistant tokens trained: none when distillation answered the prompts itself (on-policy, no lm_loss)
        trained = self.labelled_tokens(batch) if out.lm_loss is not None else 0
        return out, {"assistant_tokens": float(trained)}

    def tokens(self, batch: Any) -> tuple[int, int]:
        input_ids = batch[0]
        return input_ids.numel(), input_ids.shape[1]

    def record(self, out_dir: Path) -> None:
        """Record in a new run's out_dir the conversations it holds out (HELD_OUT_FILE); the trainer calls this once
        the run has passed every check."""
        if self.held_out is not None:
            write_held_out(out_dir, self.held_out)

    def state_dict(self) -> dict[str, Any]:
        return {**self.rows.state_dict(), "packing": self.packing}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left the rows. An SFT run whose out_dir has no HELD_OUT_FILE was started by an
        earlier seekstack: it continues only when its rows are this one's (so are its held-out conversations, which
        are then recorded), and is refused otherwise, naming how to go on from its weights."""
        self._require_packing_of(state)
        unrecorded = self.held_out is not None and not (Path(self.config.out_dir) / HELD_OUT_FILE).is_file()
        # a state older still has no digest of its rows: as ShuffledRows, taken on trust when nothing is held out
        changed = state["digest"] != self.rows.digest if "digest" in state else bool(self.held_out)
        if unrecorded and changed:
            raise ValueError(
                f"{self.config.out_dir} has no {HELD_OUT_FILE}: its run was started by an earlier seekstack, which "
                "chose the held-out conversations and the training rows by other rules, so this one cannot continue "
                "its checkpoint's place in the rows (the same data gives other rows now). Start a new run from its "
                f"weights instead: init_from={self.config.out_dir} (its newest checkpoint) and another out_dir"
            )
        self.rows.load_state_dict(state)
        if unrecorded:  # the same rows, so the same held-out conversations
            write_held_out(self.config.out_dir, self.held_out)

    def _require_packing_of(self, state: dict[str, Any]) -> None:
        """A ConfigError naming packing when the checkpoint's rows were packed and this run's are not, or the other
        way: its place in its rows is no place in these (a checkpoint written before packing was not packed)."""
        packed = state.get("packing", False)
        if packed != self.packing:
            raise ConfigError(
                f"is {str(self.packing).lower()}, but the checkpoint in {self.config.out_dir} was trained with "
                f"packing={str(packed).lower()}: its place in its rows is none in rows built the other way; resume "
                f"with packing={str(packed).lower()}, or start a new run from its weights (init_from= the checkpoint "
                "and another out_dir)",
                field="packing",
            )


def has_targets_within(row: tuple[list[int], list[int]], seq_len: int) -> bool:
    """Whether a row's first seq_len positions hold a target: a label at position t is predicted from t - 1."""
    return any(label != IGNORE_INDEX for label in row[1][1:seq_len])


def ends_within(row: tuple[list[int], list[int]], seq_len: int) -> bool:
    """Whether a row's last target (the EOS ending its last trained assistant turn) is within its first seq_len
    positions, which are all a row keeps."""
    labelled = [position for position, label in enumerate(row[1]) if label != IGNORE_INDEX]
    return labelled[-1] < seq_len


def _require_a_split(config: ConversationConfig, trained: list[Conversation], held_out: int) -> None:
    """A ConfigError naming val_fraction when it was given and holds none of `data` out, and the least that holds out
    one conversation, every copy of it (`hold_out`). (It never holds all out: below 1, it leaves at least one
    conversation to train on.)"""
    if not config.data or config.val_data or not config.val_fraction or held_out:
        return
    total, fewest = len(trained), min(Counter(conversation_key(c) for c in trained).values())  # the rarest's copies
    copies = f" (each conversation is held out with its copies, and every one here has {fewest} or more)"
    mend = f"raise it to at least {least_fraction(fewest, total)}{copies if fewest > 1 else ''}, or give val_data"
    if fewest == total:  # one conversation (or copies of one): holding it out would leave none to train on
        alone = "it is the only one" if total == 1 else "they are copies of one conversation, held out together or not"
        mend = f"{alone}, and holding it out leaves none to train on: give val_data"
    raise ConfigError(
        f"has value {config.held_out_fraction}: it holds out none of the {counted(total, 'conversation')} of "
        f"{config.data}; {mend}",
        field="val_fraction",
    )


def conversation_source(
    config: ConversationConfig, packing: bool = False, kind: type[SFTSource] = SFTSource
) -> SFTSource | None:
    """The batch source of a run on conversations (SFT; distillation with `data` or `task`, whose `kind` is its
    own), holding out the conversations of its val_data or val_fraction, which a new run records in out_dir
    (`SFTSource.record`); None for a distillation run on token shards."""
    return kind(config, holds_out=True, packing=packing) if config.conversational else None


def run_sft(config: SFTConfig, resume: bool | str | Path = False) -> TrainResult:
    """Fine-tune `init_from` (or a fresh preset) on the conversations `config` names."""
    config = config.validate(resume=bool(resume))
    if not resume:
        refuse_new_run_into(config.out_dir)  # before the conversations are read and tokenized
    with told_if_interrupted_before_training(resume):
        source = conversation_source(config, config.packing)
    return train(config, resume=resume, source=source)
