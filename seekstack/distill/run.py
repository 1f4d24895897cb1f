"""`seekstack distill`: a student trained against a frozen teacher by the pretraining trainer.

The run is an ordinary training run on `data_dir`'s token shards (same loop, progress, metrics.jsonl, validation
bits per byte of the student, atomic checkpoints, exact resume, DDP) whose model hooks (`DistillHooks`) wrap the
student in a `DistillModel`: the teacher in the loop, the feature projections trained beside the student. Each
checkpoint is the student's own Hugging Face-format folder plus, for resume, the projections in
`distill_projections.pt` (outside the student's safetensors).
"""

from __future__ import annotations

from pathlib import Path

import torch

from seekstack.checkpoint import load_pretrained, write_pretrained_files
from seekstack.distill.config import DistillConfig
from seekstack.distill.model import DistillModel
from seekstack.distill.onpolicy import StudentGenerations
from seekstack.distill.teacher import Teacher, TopKCache, check_shared_tokenizer
from seekstack.model.transformer import Transformer
from seekstack.tokenizer import Tokenizer
from seekstack.tokens.shards import load_index
from seekstack.train.trainer import TrainResult, train

PROJECTIONS_FILE = "distill_projections.pt"


def student_tokenizer(config: DistillConfig) -> Tokenizer:
    """The tokenizer the student's data was encoded with: `tokenizer`, else the one `data tokenize` recorded."""
    first_split = config.mixture_schedule().sources[0]
    recorded = load_index(config.data_dir, first_split)["tokenizer"].get("path")
    return Tokenizer.from_file(config.tokenizer or recorded)


class DistillHooks:
    """The trainer's model hooks for distillation: wrap the student, checkpoint it and its projections, restore both."""

    def __init__(self, config: DistillConfig):
        self.config = config
        self.tokenizer = student_tokenizer(config)
        check_shared_tokenizer(config.teacher, self.tokenizer)

    def prepare(self, model: Transformer) -> DistillModel:
        config, device = self.config, model.embed_tokens.weight.device
        cache = TopKCache(config.teacher_cache, config.cache_top_k, config.teacher) if config.teacher_cache else None
        teacher = Teacher(config.teacher, config.teacher_dtype, device, cache)
        generations = None
        if config.lmbda > 0:
            rows, tokens = config.batch_size, config.seq_len + 1  # a training row: seq_len inputs and the last target
            generations = StudentGenerations(
                model, self.tokenizer, rows, tokens, config.prompt_tokens, config.sample_temperature
            )
        return DistillModel(model, teacher, config, generations)

    def write(self, model: DistillModel, folder: Path) -> None:
        write_pretrained_files(model.student, folder)
        if model.projections.layer_map:
            torch.save(model.projections.state_dict(), folder / PROJECTIONS_FILE)

    def restore(self, model: DistillModel, folder: Path) -> None:
        device = model.student.embed_tokens.weight.device
        model.student.load_state_dict(load_pretrained(folder, device=device).state_dict())
        if model.projections.layer_map:
            model.projections.load_state_dict(torch.load(folder / PROJECTIONS_FILE, map_location=device))


def run_distill(config: DistillConfig, resume: bool | str | Path = False) -> TrainResult:
    """Distill `config.teacher` into the student `config` describes (or continue the run in `out_dir`)."""
    config = config.validate()
    return train(config, resume=resume, hooks=DistillHooks(config))
