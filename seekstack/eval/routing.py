"""Which experts each token goes to, and what that routing looks like over a corpus.

Hooks from outside the model catch each MoE router's `Routing` (selected experts, gate weights) in a forward
pass. Over many tokens: the load of each expert, how often two experts are chosen together, how often
consecutive tokens share an expert against chance, and where tokens of each class (keyword, identifier,
number, whitespace, punctuation; in prose word in place of keyword and identifier) go.

Shapes: N tokens, K experts per token, E routed experts, C token classes.
"""

from __future__ import annotations

import keyword
import string
from dataclasses import dataclass

import torch

from seekstack.model.transformer import Transformer

TOKEN_CLASSES = ("whitespace", "keyword", "identifier", "word", "number", "punctuation", "mixed")


@dataclass
class LayerRouting:
    """One MoE layer's choices for N tokens."""

    layer: int
    experts: torch.Tensor  # (N, K) selected expert ids
    weights: torch.Tensor  # (N, K) gate weights g (after normalisation and routed_scaling_factor)


@torch.no_grad()
def capture_routing(model: Transformer, input_ids: torch.Tensor) -> list[LayerRouting]:
    """The routing of every main-model MoE layer for `input_ids` (B, T); tokens flattened row by row (N = B*T)."""
    caught: list[LayerRouting] = []
    hooks = []
    for index, layer in enumerate(model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None:
            continue

        def catch(module, args, routing, index=index):  # type: ignore[no-untyped-def]
            caught.append(LayerRouting(index, routing.experts.cpu(), routing.weights.float().cpu()))

        hooks.append(gate.register_forward_hook(catch))
    try:
        model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return caught


def token_class(text: str, code: bool = True) -> str:
    """The class of one token's text: whitespace, keyword (Python's), identifier (a word), number, punctuation,
    or mixed (several of these in one token, e.g. `(self`); in prose (not `code`) a word is a word, `and` too."""
    stripped = text.strip()
    if not stripped:
        return "whitespace"
    if code and keyword.iskeyword(stripped):
        return "keyword"
    if stripped.isidentifier():
        return "identifier" if code else "word"
    if stripped.replace(".", "", 1).replace("_", "").isdigit():
        return "number"
    if all(char in string.punctuation for char in stripped):
        return "punctuation"
    return "mixed"


@dataclass
class RoutingStatistics:
    """One layer's routing over a corpus."""

    layer: int
    load: torch.Tensor  # (E,) share of all N*K assignments going to each expert; sums to 1
    co_selection: torch.Tensor  # (E, E) share of tokens choosing both i and j (diagonal: choosing i)
    consecutive_share: float  # share of consecutive token pairs with at least one expert in common
    chance_share: float  # the same for random pairs of tokens of the corpus (independent routing, same loads)
    class_load: dict[str, torch.Tensor]  # class -> (E,) share of that class's assignments per expert
    class_tokens: dict[str, int]


def routing_statistics(
    routing: LayerRouting, classes: list[str], follows: torch.Tensor, num_experts: int, seed: int = 0
) -> RoutingStatistics:
    """Statistics of one layer. `classes` (N,) names each token's class; `follows` (N,) is True where token n
    continues the same sequence as token n-1 (so pairs never straddle two documents)."""
    experts = routing.experts
    N, K = experts.shape
    chosen = torch.zeros(N, num_experts).scatter_(1, experts, 1.0)  # (N, E) one-hot of the selection
    load = chosen.sum(0) / (N * K)
    co_selection = chosen.T @ chosen / N
    pairs = follows.nonzero().flatten()
    consecutive = (chosen[pairs] * chosen[pairs - 1]).sum(1) > 0
    generator = torch.Generator().manual_seed(seed)
    partner = torch.randint(0, N, (len(pairs),), generator=generator)
    by_chance = (chosen[pairs] * chosen[partner]).sum(1) > 0
    class_load, class_tokens = {}, {}
    for name in TOKEN_CLASSES:
        members = torch.tensor([c == name for c in classes])
        if members.any():
            class_tokens[name] = int(members.sum())
            class_load[name] = chosen[members].sum(0) / (class_tokens[name] * K)
    return RoutingStatistics(
        routing.layer, load, co_selection, consecutive.float().mean().item(), by_chance.float().mean().item(),
        class_load, class_tokens,
    )  # fmt: skip
