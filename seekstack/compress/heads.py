"""Attention-head pruning by importance, with MLA's per-head projections physically shrunk.

A mask xi_h multiplies head h's attention output before o_proj. The importance of head h is
I_h = E_x |dL(x)/dxi_h| at xi = 1, over calibration text (Michel et al. 2019, "Are Sixteen Heads Really Better
than One?", §4.1 eq. 2). In every attention layer (main blocks and MTP) the same number of least important heads goes,
so the config keeps one `num_attention_heads` and `transformers` loads the result too.
Removing head h deletes its rows of q_proj / q_b_proj (its N+R query features), of kv_b_proj (its N+V key and value
features) and its V input columns of o_proj: exactly the model with xi_h = 0, which the tests check.
Shapes: B batch, T tokens, H heads, N = qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from seekstack.compress.prune import removed_count
from seekstack.model.attention import MultiHeadLatentAttention

if TYPE_CHECKING:
    from seekstack.config import ModelConfig


def attention_layers(model: nn.Module) -> dict[str, MultiHeadLatentAttention]:
    """Name -> MLA module, for the main blocks and the MTP blocks."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiHeadLatentAttention)}


@contextlib.contextmanager
def head_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the `with` block, each named attention layer's head outputs are multiplied by its mask, (H,) or
    (B, H), just before o_proj."""
    hooks = []
    for name, attention in attention_layers(model).items():
        if name not in masks:
            continue

        def scale_heads(_module, inputs, attention=attention, mask=masks[name]):  # type: ignore[no-untyped-def]
            (heads_out,) = inputs  # (B, T, H*V)
            B, T, _ = heads_out.shape
            per_row = mask.expand(B, -1)[:, None, :, None].to(heads_out.dtype)  # (B, 1, H, 1)
            return ((heads_out.view(B, T, attention.num_heads, -1) * per_row).view(B, T, -1),)

        hooks.append(attention.o_proj.register_forward_pre_hook(scale_heads))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def head_importance(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attention layer name -> (H,) importance: |dL/dxi_h| per sequence, summed over `batches` (B, T) of token ids.
    L is the next-token plus MTP loss (the model in eval mode), so MTP blocks' heads are scored too."""
    layers = attention_layers(model)
    importance = {name: torch.zeros(a.num_heads) for name, a in layers.items()}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            masks = {name: torch.ones(batch.shape[0], a.num_heads, requires_grad=True) for name, a in layers.items()}
            with head_masks(model, masks):
                loss = model(batch, labels=batch).loss
            # per-sequence gradients: the batch's mean loss is a sum of per-sequence terms over B
            gradients = torch.autograd.grad(loss * batch.shape[0], list(masks.values()))
            for name, gradient in zip(masks, gradients, strict=True):
                importance[name] += gradient.abs().sum(dim=0)
    finally:
        model.train(was_training)
    return importance


def refuse_too_few_heads(heads: int, fraction: float) -> None:
    """ValueError, naming the largest fraction that leaves a head, when removing `fraction` of a layer's `heads`
    (whole heads: removed_count) leaves none."""
    if heads - removed_count(heads, fraction) < 1:
        raise ValueError(
            f"pruning {fraction:g} of the attention heads leaves none of {heads} per layer: prune "
            f"{(heads - 1) / heads:g} of them or less"
        )


def heads_to_keep(importance: torch.Tensor, fraction: float) -> torch.Tensor:
    """Sorted ids of the heads kept: all but the `fraction` least important (at least one head stays)."""
    heads = importance.numel()
    refuse_too_few_heads(heads, fraction)
    return importance.topk(heads - removed_count(heads, fraction)).indices.sort().values


@torch.no_grad()
def prune_heads(model: nn.Module, importance: dict[str, torch.Tensor], fraction: float) -> dict[str, list[int]]:
    """Remove `fraction` of every attention layer's heads (least important first), in place; returns the removed
    ids per layer. The config's num_attention_heads shrinks to match."""
    removed = {}
    for name, attention in attention_layers(model).items():
        kept = heads_to_keep(importance[name], fraction)
        removed[name] = sorted(set(range(attention.num_heads)) - set(kept.tolist()))
        shrink_attention(attention, kept)
    if removed:
        heads = {len(ids) for ids in removed.values()}
        model.config = model.config.replace(num_attention_heads=model.config.num_attention_heads - heads.pop())
    return removed


def transformers_head_count_notes(before: ModelConfig, after: ModelConfig) -> list[str]:
    """A note when transformers 5.23 will not load a checkpoint of head-pruned config `after`: its DeepseekV2Config
    (not V3's) requires hidden_size to be a multiple of num_attention_heads, which MLA does not need; the note names
    the head counts, and --heads fractions, that it loads."""
    hidden, heads = after.hidden_size, after.num_attention_heads
    if after.model_type != "deepseek_v2" or hidden % heads == 0:
        return []
    total = before.num_attention_heads
    loadable = [count for count in range(total - 1, 0, -1) if hidden % count == 0]
    options = ", ".join(f"{count} (--heads {(total - count) / total:g})" for count in loadable)
    return [
        f"transformers 5.23 will not load this deepseek_v2 checkpoint: its DeepseekV2Config requires hidden_size "
        f"({hidden}) to be a multiple of num_attention_heads ({heads}), which MLA does not need (seekstack loads "
        f"it); for transformers keep a head count dividing {hidden}: {options}"
    ]


def shrink_attention(attention: MultiHeadLatentAttention, kept: torch.Tensor) -> None:
    """Keep only heads `kept` of one MLA module: its per-head rows and columns, and its head count."""
    query = "q_proj" if hasattr(attention, "q_proj") else "q_b_proj"
    for projection in (query, "kv_b_proj"):
        linear = getattr(attention, projection)
        rows = linear.weight.view(attention.num_heads, -1, linear.in_features)[kept]  # (H', per-head, in)
        bias = None if linear.bias is None else linear.bias.view(attention.num_heads, -1)[kept].flatten()
        setattr(attention, projection, _linear(rows.flatten(0, 1), bias))
    o_proj = attention.o_proj
    columns = o_proj.weight.view(o_proj.out_features, attention.num_heads, -1)[:, kept]  # (hidden, H', V)
    attention.o_proj = _linear(columns.flatten(1), o_proj.bias)
    attention.num_heads = len(kept)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.clone())
    if bias is not None:
        linear.bias = nn.Parameter(bias.clone())
    return linear
