"""The module a distillation run trains: the student, the feature projections beside it, and in training mode a
forward pass that is the whole distillation loss (teacher in the loop).

Per micro-batch of rows (B, T) with their labels (the rows themselves for corpus rows; the assistant's tokens of
conversations, IGNORE_INDEX elsewhere): with probability `lmbda` the rows are replaced by the student's own
(on-policy, GKD; seekstack/distill/onpolicy.py). The cross-entropy counts the labelled tokens; the divergence and
the feature distances compare teacher and student at the positions predicting them (off-policy) or predicting the
generated tokens (on-policy).

Shapes: B rows, T tokens, N positions compared, V vocabulary (the divergence: the tokenizer's ids alone).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from seekstack.config import MTP_LOSS_WEIGHT, ConfigError
from seekstack.distill.config import DistillConfig
from seekstack.distill.features import FeatureProjections
from seekstack.distill.losses import logit_distillation
from seekstack.distill.onpolicy import StudentGenerations
from seekstack.distill.teacher import Teacher, layer_outputs
from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.model.transformer import ModelOutput, Transformer


@dataclasses.dataclass
class Drawn:
    """A micro-batch as the loss scores it (`DistillModel.draw`): the reference rows, or the student's own
    (`on_policy`), their labels (the cross-entropy's), the (B, T - 1) positions the teacher is compared on, the tokens
    the student's MoE statistics count (None: all) and packed rows' positions (None: unpacked)."""

    rows: torch.Tensor
    labels: torch.Tensor
    compared: torch.Tensor
    counted: torch.Tensor | None
    positions: torch.Tensor | None
    on_policy: bool

    def scored(self) -> int:
        """The targets the micro-batch's loss averages over: those the cross-entropy or the divergence scores."""
        return int(((self.labels[:, 1:] != IGNORE_INDEX) | self.compared).sum())


class DistillModel(nn.Module):
    """Student + feature projections. In training mode `forward(rows, labels=rows)` returns the distillation loss
    (`lm_loss` stays the student's cross-entropy); in eval mode it is the student's forward, so validation scores
    the student's own loss, and `validation_terms` its divergence from the teacher. The teacher is kept out of the
    module tree: frozen, it is never trained, saved, wrapped by DDP or touched by the expert-bias update."""

    def __init__(
        self,
        student: Transformer,
        teacher: Teacher,
        config: DistillConfig,
        tokenizer_vocab: int,
        generations: StudentGenerations | None = None,
    ):
        """`tokenizer_vocab`: the shared tokenizer's ids, those the distributions are compared on; a vocab_size
        padded past them (as released checkpoints round it up) adds logits of ids no text has."""
        super().__init__()
        if teacher.model.config.vocab_size < tokenizer_vocab:
            raise ValueError(
                f"the teacher's vocab_size={teacher.model.config.vocab_size} ({teacher.directory}/config.json) is "
                f"smaller than its tokenizer's {tokenizer_vocab} tokens: it cannot score the ids past it; use a "
                "teacher checkpoint that fits its tokenizer.json"
            )
        self.student = student
        self.tokenizer_vocab = tokenizer_vocab
        self.projections = FeatureProjections(
            config.feature_layers,
            {layer: config.layer_weight(layer) for layer in config.feature_layers},
            student.config.num_hidden_layers,
            teacher.model.config.num_hidden_layers,
            student.config.hidden_size,
            teacher.model.config.hidden_size,
        ).to(student.embed_tokens.weight.device)
        self.settings = config
        self.config = student.config  # what the trainer reads of the model it trains (FLOPs per token)
        self.moe_layer_ids = student.moe_layer_ids
        self.__dict__["teacher"] = teacher  # outside the module tree (see the class docstring)
        self.__dict__["generations"] = generations
        self.steps_trained = 0  # the trainer's (DistillHooks.begin_step): on-policy batches start after on_policy_after
        # The terms the loss adds to the cross-entropy (`divergence` whenever the teacher is asked, `feature_distance`
        # with feature maps), each as (its sum over the positions compared, those positions) over the step's
        # micro-batches: the trainer logs their means beside lm_loss (DistillHooks.step_terms resets them each step)
        maps = bool(self.projections.layer_map)
        asked = {"divergence": config.kd_weight != 0 or maps, "feature_distance": maps}
        self.term_names = tuple(name for name, logged in asked.items() if logged)
        self.term_sums: dict[str, torch.Tensor] = {}

    def block(self, index: int) -> nn.Module:
        """The student's decoder block `index` (the trainer's bias update reaches its routers through it)."""
        return self.student.block(index)

    def training_state(self) -> dict:
        """What a resume needs besides the student's weights: the projections (the steps trained are the trainer's)."""
        return {"projections": self.projections.state_dict()}

    def load_training_state(self, state: dict, folder: Path) -> None:
        """Restore the `training_state` saved in checkpoint `folder`: a ConfigError naming feature_layers when the
        run maps other student layers than those whose projections (and their optimizer state) the run saved."""
        saved = sorted({int(key.split(".")[1]) for key in state["projections"]})  # keys maps.<layer>.weight
        if saved != self.projections.student_layers:
            raise ConfigError(
                f": maps student layers {self.projections.student_layers}, but checkpoint {folder} holds the learned "
                f"projections of student layers {saved} (the run's feature_layers when it saved); resume mapping "
                f"exactly those, or start a new run from the student with init_from={folder}",
                field="feature_layers",
            )
        self.projections.load_state_dict(state["projections"])

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        mtp_loss_weight: float = MTP_LOSS_WEIGHT,
        keep_logits: bool = True,
        counted: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        drawn: Drawn | None = None,
    ) -> ModelOutput:
        """`counted`: the tokens the student's MoE statistics count; `positions`: (B, T) of packed rows, each
        conversation's from 0, which student and teacher read alike (`Transformer.forward`). In training, `drawn`:
        the micro-batch `draw` made of these inputs ahead of the step (a conversation source, whose step weighs each
        micro-batch by the targets it scores); drawn here without it (token windows)."""
        if not self.training or labels is None:
            return self.student(
                input_ids,
                labels=labels,
                mtp_loss_weight=mtp_loss_weight,
                keep_logits=keep_logits,
                counted=counted,
                positions=positions,
            )
        return self.distillation_loss(drawn or self.draw(input_ids, labels, counted, positions), mtp_loss_weight)

    def validation_terms(
        self, rows: torch.Tensor, labels: torch.Tensor, out: ModelOutput, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """What an evaluation logs beside the student's loss, given the student's output `out` on the rows (packed
        by `positions` when given): `divergence`, the T^2 JSD_beta term the run trains (teacher from the cache when
        it holds the rows), averaged over the positions predicting labelled tokens."""
        compared = labels[:, 1:] != IGNORE_INDEX  # (B, T - 1)
        student_logits = self.student.lm_head(out.hidden_states[:, :-1][compared])
        teacher = self.teacher.score(rows, compared, [], positions=positions)
        return {"divergence": self.divergence(student_logits, teacher.logits)}

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """T^2 JSD_beta between the student's and the teacher's (N, V) logits over the tokenizer's ids (a padded
        vocabulary's extra logits left out)."""
        real = slice(self.tokenizer_vocab)
        return logit_distillation(
            student_logits[:, real], teacher_logits[:, real], self.settings.beta, self.settings.temperature
        )

    def draw(
        self,
        rows: torch.Tensor,
        labels: torch.Tensor,
        counted: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> Drawn:
        """The micro-batch the loss scores: with probability `lmbda`, once past on_policy_after steps, the student's
        own rows (GKD), else the reference rows compared on the positions predicting their labelled tokens."""
        config = self.settings
        warm = self.steps_trained >= config.on_policy_after
        if self.generations is not None and warm and bool(torch.rand(()) < config.lmbda):
            return Drawn(*self.generations(rows, labels, positions), on_policy=True)
        compared = labels[:, 1:] != IGNORE_INDEX  # (B, T - 1): the positions predicting labelled tokens
        return Drawn(rows, labels, compared, counted, positions, on_policy=False)

    def distillation_loss(self, drawn: Drawn, mtp_loss_weight: float) -> ModelOutput:
        """ce_weight * CE + kd_weight * T^2 JSD_beta + the feature term, plus the student's MTP and balance terms;
        `lm_loss` None when no token is labelled (the student's own answers to conversations: no cross-entropy)."""
        config = self.settings
        rows, labels, compared, counted, positions = (
            drawn.rows, drawn.labels, drawn.compared, drawn.counted, drawn.positions
        )  # fmt: skip
        with layer_outputs(self.student, self.projections.student_layers) as student_states:
            out, student_logits = self.student_outputs(rows, labels, mtp_loss_weight, counted, positions)
        loss = config.ce_weight * out.lm_loss + (out.loss - out.lm_loss)  # + the student's MTP and balance terms
        if not (labels[:, 1:] != IGNORE_INDEX).any():
            out = dataclasses.replace(out, lm_loss=None)
        if config.kd_weight == 0 and not self.projections.layer_map or not compared.any():
            return dataclasses.replace(out, loss=loss)  # nothing asks for the teacher, or nothing to compare it on
        teacher = self.teacher.score(rows, compared, self.projections.teacher_layers, drawn.on_policy, positions)
        terms = {"divergence": self.divergence(student_logits(compared), teacher.logits)}
        loss = loss + config.kd_weight * terms["divergence"]
        if self.projections.layer_map:
            terms["feature_distance"] = self.projections.loss(
                student_states, teacher.states, compared, config.feature_loss
            )
            loss = loss + terms["feature_distance"]
        counted_positions = compared.sum().float()
        for name, term in terms.items():
            summed = torch.stack([term.detach().float() * counted_positions, counted_positions])
            self.term_sums[name] = self.term_sums.get(name, 0) + summed
        return dataclasses.replace(out, loss=loss)

    def student_outputs(
        self,
        rows: torch.Tensor,
        labels: torch.Tensor,
        mtp_loss_weight: float,
        counted: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[ModelOutput, Callable[[torch.Tensor], torch.Tensor]]:
        """The student's output with its pretraining losses (`loss`, `lm_loss`), and a function giving its logits
        (N, V), with gradient, at the positions a (B, T - 1) mask selects.

        A student with MTP modules or MoE layers runs its own loss (MTP and balance terms need it, its head is fused
        with the cross-entropy), then its head again on the compared positions; a dense one without MTP runs its
        head once, and the cross-entropy comes from those logits."""
        if self.student.mtp or self.student.moe_layer_ids:
            out = self.student(
                rows,
                labels=labels,
                mtp_loss_weight=mtp_loss_weight,
                keep_logits=False,
                counted=counted,
                positions=positions,
            )
            return out, lambda compared: self.student.lm_head(out.hidden_states[:, :-1][compared])
        out = self.student(rows, positions=positions)
        logits = out.logits[:, :-1]  # (B, T - 1, V): position t predicts token t + 1
        targets = labels[:, 1:].flatten()
        summed = F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        lm_loss = summed / (targets != IGNORE_INDEX).sum().clamp(min=1)  # 0 on rows with no label (as head_loss)
        return dataclasses.replace(out, logits=None, loss=lm_loss, lm_loss=lm_loss), lambda compared: logits[compared]
