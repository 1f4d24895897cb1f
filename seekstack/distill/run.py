"""`seekstack distill`: a student trained against a frozen teacher by the pretraining trainer.

The run is an ordinary training run on `data_dir`'s token shards (same loop, progress, metrics.jsonl, validation
bits per byte of the student, atomic checkpoints, exact resume, DDP), or on conversations through the SFT stage's
batch source (seekstack/posttrain/sft.py: assistant tokens labelled, the rest IGNORE_INDEX; held-out conversations
recorded in out_dir and scored as in SFT; one process), whose
model hooks (`DistillHooks`) wrap the student in a `DistillModel`: the teacher in the loop, the feature projections
trained beside the student. Each
checkpoint is the student's own Hugging Face-format folder plus, for resume, the projections in `distill_state.pt`
(outside the student's safetensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from seekstack.accounting import training_flops_per_token
from seekstack.checkpoint import load_pretrained, read_config, write_pretrained_files
from seekstack.config import ModelConfig
from seekstack.distill.config import DistillConfig
from seekstack.distill.model import DistillModel, Drawn
from seekstack.distill.onpolicy import StudentGenerations
from seekstack.distill.teacher import Teacher, TopKCache, shared_tokenizer
from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.model.transformer import ModelOutput, Transformer
from seekstack.posttrain.config import run_tokenizer
from seekstack.posttrain.padding import real_tokens
from seekstack.posttrain.sft import SFTSource, conversation_source
from seekstack.schema import require
from seekstack.tokenizer import Tokenizer
from seekstack.tokens.shards import load_index
from seekstack.train.runs import refuse_new_run_into
from seekstack.train.state import load_training_file
from seekstack.train.trainer import TrainResult, told_if_interrupted_before_training, train

STATE_FILE = "distill_state.pt"


def student_tokenizer(config: DistillConfig) -> Tokenizer:
    """The tokenizer teacher and student share: the teacher's, once it is the one the student's data is encoded
    with, `tokenizer` (conversations: else `init_from`'s), else the one whose sha256 `data tokenize` recorded (the
    file its index names may be gone with the shards copied or moved, as `train` allows)."""
    if config.conversational:
        student = run_tokenizer(config)
        described = f"{student.source} (vocabulary {student.vocab_size})"
        return shared_tokenizer(config.teacher, student.fingerprint, described, conversational=True)
    first_split = config.mixture_schedule().sources[0]
    recorded = load_index(config.data_dir, first_split)["tokenizer"]
    described = f"{recorded.get('path') or 'tokenizer'} (vocabulary {recorded['vocab_size']}) of {config.data_dir}"
    return shared_tokenizer(config.teacher, recorded["sha256"], described, conversational=False)


class DistillHooks:
    """The trainer's model hooks for distillation: wrap the student, checkpoint it and its projections, restore both."""

    def __init__(self, config: DistillConfig):
        self.config = config
        self.tokenizer = student_tokenizer(config)

    def prepare(self, model: Transformer) -> DistillModel:
        config, device = self.config, model.embed_tokens.weight.device
        cache = (
            TopKCache(config.teacher_cache, config.cache_top_k, config.teacher, config.teacher_dtype)
            if config.teacher_cache
            else None
        )
        teacher = Teacher(config.teacher, config.teacher_dtype, device, cache)
        generations = None
        if config.lmbda > 0:
            # a corpus row is seq_len inputs and the last target, written up to the student's context (a row at full
            # context leaves its last target out); a conversation row at most seq_len tokens
            corpus_row = min(config.seq_len + 1, model.config.max_position_embeddings)
            tokens, prompt = (corpus_row, config.prompt_tokens) if not config.conversational else (config.seq_len, None)
            generations = StudentGenerations(
                model, self.tokenizer, config.batch_size, tokens, prompt, config.sample_temperature
            )
        return DistillModel(model, teacher, config, self.tokenizer.vocab_size, generations)

    def write(self, model: DistillModel, folder: Path) -> None:
        write_pretrained_files(model.student, folder)
        torch.save(model.training_state(), folder / STATE_FILE)

    def restore(self, model: DistillModel, folder: Path) -> None:
        device = model.student.embed_tokens.weight.device
        model.student.load_state_dict(load_pretrained(folder, device=device).state_dict())
        model.load_training_state(load_training_file(folder / STATE_FILE, device), folder)  # a damaged one named

    def training_flops(self, config: ModelConfig, positions: int, seq_len: int) -> int:
        return positions * training_flops_per_token(config, seq_len)  # the student's (the teacher's are not counted)

    def begin_step(self, model: DistillModel, step: int) -> None:
        model.steps_trained = step  # the trainer's count: a step Ctrl-C cut short is not counted, a resume restores it
        model.term_sums.clear()

    def step_terms(self, model: DistillModel) -> dict[str, torch.Tensor]:
        """The step's distillation terms the trainer logs beside lm_loss, each as (its sum over the positions
        compared, those positions) on this rank: `divergence` (T^2 JSD_beta) and `feature_distance`, as the run asks
        for them; zeros where no micro-batch compared a position."""
        device = model.student.embed_tokens.weight.device
        return {name: model.term_sums.get(name, torch.zeros(2, device=device)) for name in model.term_names}


class DistillSource(SFTSource):
    """SFT's batch source for a distillation run on conversations, whose micro-batches are drawn as the loss scores
    them (`DistillModel.draw`: the student's own answers with probability lmbda) when the step takes them, ahead of
    its loss: each micro-batch's share of the step's loss counts the targets it scores (`labelled_tokens`), its
    generated tokens on-policy, not the reference answers it no longer holds, as TRL normalises by the tokens
    scored; tokens/s and MFU count the rows trained."""

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        self.model = model

    def batch(self, batch_size: int, progress: float) -> Drawn:
        input_ids, labels, *packed = (t.to(self.device) for t in super().batch(batch_size, progress))
        counted = real_tokens(input_ids, labels, self.tokenizer.pad_id)  # padding is routed, not counted in the load
        return self.model.draw(input_ids, labels, counted, packed[0] if packed else None)

    def labelled_tokens(self, batch: Drawn) -> int:
        return batch.scored()

    def sequences(self, batch: Drawn) -> int:
        """The conversations of the micro-batch (a row each, or packed, each starting at position 0)."""
        return batch.rows.shape[0] if batch.positions is None else int((batch.positions == 0).sum())

    def loss(self, model: nn.Module, batch: Drawn, mtp_loss_weight: float) -> tuple[ModelOutput, dict[str, Any]]:
        out = model(batch.rows, labels=batch.labels, mtp_loss_weight=mtp_loss_weight, keep_logits=False, drawn=batch)
        # the reference's assistant tokens the cross-entropy trained (none on-policy: the student answered the
        # prompts itself), and the answer tokens the loss scored: those, or on-policy the student's own
        labelled = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
        return out, {"assistant_tokens": float(labelled), "answer_tokens": float(batch.scored())}

    def tokens(self, batch: Drawn) -> tuple[int, int]:
        return batch.rows.numel(), batch.rows.shape[1]


def run_distill(config: DistillConfig, resume: bool | str | Path = False) -> TrainResult:
    """Distill `config.teacher` into the student `config` describes (or continue the run in `out_dir`)."""
    config = config.validate(resume=bool(resume))
    teacher = read_config(config.teacher)
    require(
        config.seq_len <= teacher.max_position_embeddings,
        "seq_len",
        f"at most the teacher's context of {teacher.max_position_embeddings} tokens (max_position_embeddings of "
        f"{config.teacher}): past it the teacher's predictions, which the student learns, were never trained",
    )
    if config.teacher_cache:
        vocab_size = teacher.vocab_size
        require(config.cache_top_k <= vocab_size, "cache_top_k", f"at most the teacher's vocab_size {vocab_size:,}")
    if not resume:
        refuse_new_run_into(config.out_dir)  # before the conversations are read
    with told_if_interrupted_before_training(resume):
        source = conversation_source(config, config.packing, DistillSource)
    return train(config, resume=resume, hooks=DistillHooks(config), source=source)
