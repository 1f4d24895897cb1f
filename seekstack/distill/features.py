"""Hierarchical feature distillation: each mapped student layer's output hidden state, projected to the teacher's
width by a learned linear map, is pulled towards the output of the teacher layer it is mapped to.

Shapes: B rows, T tokens, N positions compared (those a (B, T - 1) mask selects), d the student's hidden width, D
the teacher's.
"""

from __future__ import annotations

import torch
from torch import nn

from seekstack.config import ConfigError
from seekstack.distill.config import FeatureLoss
from seekstack.distill.losses import feature_distance


class FeatureProjections(nn.Module):
    """One bias-free linear map d -> D per mapped student layer; trained with the student, saved beside it in
    training checkpoints (for resume), never part of the student's own weights."""

    def __init__(
        self,
        layer_map: dict[int, int],
        weights: dict[int, float],
        student_layers: int,
        teacher_layers: int,
        student_width: int,
        teacher_width: int,
    ):
        super().__init__()
        for student_layer, teacher_layer in layer_map.items():
            if not (0 <= student_layer < student_layers and 0 <= teacher_layer < teacher_layers):
                raise ConfigError(
                    f": {student_layer}: {teacher_layer} is out of range; the student has "
                    f"layers 0..{student_layers - 1}, the teacher 0..{teacher_layers - 1}",
                    field="feature_layers",
                )
        self.layer_map, self.weights = dict(layer_map), dict(weights)
        self.maps = nn.ModuleDict(
            {str(layer): nn.Linear(student_width, teacher_width, bias=False) for layer in self.layer_map}
        )

    @property
    def student_layers(self) -> list[int]:
        return sorted(self.layer_map)

    @property
    def teacher_layers(self) -> list[int]:
        return sorted(set(self.layer_map.values()))

    def loss(
        self,
        student_states: dict[int, torch.Tensor],
        teacher_states: dict[int, torch.Tensor],
        compared: torch.Tensor,
        kind: FeatureLoss,
    ) -> torch.Tensor:
        """sum over mapped layers l of weight_l * distance(W_l h_student_l, h_teacher_map(l)), both (N, D), at the
        positions `compared` (B, T - 1) selects (those the logit divergence compares)."""
        terms = []
        for layer, teacher_layer in self.layer_map.items():
            projected = self.maps[str(layer)](student_states[layer][:, :-1][compared])  # (N, d) -> (N, D)
            target = teacher_states[teacher_layer][:, :-1][compared]
            terms.append(self.weights[layer] * feature_distance(projected, target, kind))
        return torch.stack(terms).sum()
