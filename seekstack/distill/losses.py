"""The distillation losses: divergences between the teacher's and the student's next-token distributions, and
distances between hidden states.

The divergence is made a chunk of positions at a time, like the output head's cross-entropy (head_loss.py): each
chunk's log-probabilities become at once its share of the loss and the gradient of the student's logits, so the
(N, V) intermediates of the formula never exist whole; the backward only scales the stored gradient.

Shapes: N positions compared, V vocabulary, D hidden width (the teacher's, after the student's projection).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seekstack.distill.config import FeatureLoss
from seekstack.model.head_loss import CHUNK_ELEMENTS, refuse_create_graph


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) per position, (N, V) log-probabilities -> (N,)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over positions of the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1) between
    teacher T and student S at `temperature`: beta KL(T || M) + (1 - beta) KL(S || M), M = beta T + (1 - beta) S;
    beta=0 is the forward KL(T || S), beta=1 the reverse KL(S || T). Logits are (N, V); equals TRL's
    `GKDTrainer.generalized_jsd_loss` with its labels masking the positions left out here. Only the student's
    logits get a gradient."""
    return _GeneralizedJSD.apply(student_logits, teacher_logits.detach(), beta, temperature)


def _jsd_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The divergence of each position (n,) and its gradient with respect to the student's logits (n, V)."""
    student = (student_logits.float() / temperature).log_softmax(-1)
    teacher = (teacher_logits.float() / temperature).log_softmax(-1)
    student_probs = student.exp()
    if beta == 0:
        divergence = kl_divergence(teacher, student)
        return divergence, (student_probs - teacher.exp()) / temperature
    if beta == 1:
        divergence = (student_probs * (student - teacher)).sum(-1)
        grad_probs = student - teacher  # dKL(S || T)/dS_v up to a constant, which the softmax's Jacobian removes
    else:
        mixture = torch.logaddexp(student + math.log1p(-beta), teacher + math.log(beta))  # log M
        divergence = beta * kl_divergence(teacher, mixture) + (1 - beta) * (student_probs * (student - mixture)).sum(-1)
        grad_probs = (1 - beta) * (student - mixture)  # dJSD/dS_v up to a constant
    # through the softmax: dL/dz_v = S_v (g_v - sum_u S_u g_u) / temperature
    weighted = (student_probs * grad_probs).sum(-1, keepdim=True)
    return divergence, student_probs * (grad_probs - weighted) / temperature


class _GeneralizedJSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, beta: float, temperature: float):  # type: ignore[override]
        rows, vocab = student_logits.shape
        chunk = max(16, CHUNK_ELEMENTS.get(student_logits.device.type, CHUNK_ELEMENTS["cuda"]) // vocab)
        total = student_logits.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(student_logits) if student_logits.requires_grad else None
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            divergence, grad_part = _jsd_rows(student_logits[part], teacher_logits[part], beta, temperature)
            total += divergence.sum()
            if grad is not None:
                grad[part] = grad_part / max(rows, 1)
        ctx.save_for_backward(grad)
        return total / max(rows, 1)

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        refuse_create_graph("generalized_jsd", "compute it from the logits' log_softmax with torch's ops")
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None


def logit_distillation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float
) -> torch.Tensor:
    """T^2 * JSD_beta at temperature T: the factor keeps the gradients' scale independent of T (Hinton et al. 2015,
    "Distilling the Knowledge in a Neural Network", §2)."""
    return temperature**2 * generalized_jsd(student_logits, teacher_logits, beta, temperature)


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, kind: FeatureLoss) -> torch.Tensor:
    """Mean over positions of the distance between projected student and teacher hidden states (..., D): the mean
    squared error per element (FitNets, Romero et al. 2015) or 1 - cosine similarity."""
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
