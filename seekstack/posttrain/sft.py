"""Chat SFT: the pretraining trainer's loop fed conversations, the loss on assistant tokens only.

`SFTSource` is the trainer's batch source (seekstack.train.trainer.BatchSource): right-padded rows with their
labels (IGNORE_INDEX off the assistant's tokens), in a seeded order whose position is saved for an exact resume.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.model.transformer import ModelOutput
from seekstack.posttrain.config import SFTConfig, tokenizer_path
from seekstack.posttrain.conversations import (
    ShuffledRows,
    encode_conversation,
    read_conversations,
    task_conversations,
)
from seekstack.posttrain.padding import pad_labelled
from seekstack.posttrain.tasks import make_task
from seekstack.tokenizer import Tokenizer, tokenizer_json_path
from seekstack.train.state import refuse_new_run_into
from seekstack.train.trainer import TrainResult, train


def tokenizer_info(tokenizer: Tokenizer) -> dict[str, Any]:
    """What the trainer needs to know of a tokenizer: its size, and the file checkpoints copy."""
    return {"vocab_size": tokenizer.vocab_size, "path": tokenizer.source, "sha256": tokenizer.fingerprint}


class SFTSource:
    """Conversations as (input_ids, labels) micro-batches for the trainer."""

    def __init__(self, config: SFTConfig):
        self.config = config
        self.tokenizer = Tokenizer.from_file(tokenizer_json_path(tokenizer_path(config)))
        self.tokenizer_info = tokenizer_info(self.tokenizer)
        if config.data:
            conversations = read_conversations(config.data)
        else:
            conversations = task_conversations(make_task(config.task, config.difficulty), config.examples, config.seed)
        self.rows = ShuffledRows([encode_conversation(self.tokenizer, c) for c in conversations], config.seed)
        # a label at position t is predicted from position t - 1: a row's first seq_len positions hold its targets
        untrained = sum(all(label == IGNORE_INDEX for label in row[1][1 : config.seq_len]) for row in self.rows.rows)
        if untrained == len(self.rows.rows):
            raise ValueError(
                f"{config.data or config.task}: none of the {untrained} conversations has an assistant token within "
                f"seq_len={config.seq_len}, so there is nothing to train on; raise seq_len or shorten their prompts"
            )
        if untrained:
            print(
                f"note: {untrained} of {len(self.rows.rows)} conversations have no assistant token within "
                f"seq_len={config.seq_len}: they train nothing; raise seq_len or shorten their prompts",
                file=sys.stderr,
            )
        self.device = torch.device("cpu")

    def attach(self, model: nn.Module) -> None:
        self.device = next(model.parameters()).device

    def batch(self, batch_size: int, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_labelled(self.rows.take(batch_size), self.tokenizer.pad_id, self.config.seq_len)

    def loss(self, model: nn.Module, batch: Any, mtp_loss_weight: float) -> tuple[ModelOutput, dict[str, float]]:
        input_ids, labels = (t.to(self.device) for t in batch)
        out = model(input_ids, labels=labels, mtp_loss_weight=mtp_loss_weight, keep_logits=False)
        return out, {"assistant_tokens": float((labels != IGNORE_INDEX).sum())}

    def tokens(self, batch: Any) -> tuple[int, int]:
        input_ids, _ = batch
        return input_ids.numel(), input_ids.shape[1]

    def state_dict(self) -> dict[str, Any]:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state)


def run_sft(config: SFTConfig, resume: bool | str | Path = False) -> TrainResult:
    """Fine-tune `init_from` (or a fresh preset) on the conversations `config` names."""
    config = config.validate()
    if not resume:
        refuse_new_run_into(config.out_dir)  # before the conversations are read and tokenized
    return train(config, resume=resume, source=SFTSource(config))
