"""Expert parallelism, applied from outside the model: each rank holds E / world of every layer's routed experts,
and tokens travel to the rank of the expert they chose and back with functional `all_to_all_single` (autograd-aware).

Per MoE layer and step, with W ranks and E experts (shapes: N tokens here, K experts per token, D model width):
  1. the (token, expert) pairs are sorted by expert, which groups them by the rank that owns the expert;
  2. counts, tokens (N*K, D) and expert ids go out with all-to-all; each rank runs its experts on what arrived;
  3. the outputs come back by the reverse all-to-all and are weighted by the gate and summed per token.
Everything else stays replicated under DDP. An expert's gradient is summed over the tokens of all ranks, while
DDP averages the replicated gradients, so expert gradients are divided by W: the step is one process's step on
the global batch. Gradient clipping uses the norm over all ranks' experts (`clip_gradients`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single
from torch.distributed.tensor import DTensor

from seekstack.model.moe import RoutedExperts, Routing, swiglu
from seekstack.model.transformer import Transformer
from seekstack.parallel.distributed import Ranks
from seekstack.schema import ConfigError

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


class ShardedExperts(nn.Module):
    """This rank's slice [first, first + local) of a layer's stacked routed experts, run on all ranks' tokens."""

    def __init__(self, experts: RoutedExperts, ranks: Ranks):
        super().__init__()
        total = experts.gate_up_proj.shape[0]
        if total % ranks.world_size:  # a setting every rank meets alike: said once, as the config's errors are
            raise ConfigError(
                f"expert_parallel={ranks.world_size} needs n_routed_experts={total} divisible by it (each rank holds "
                f"as many of every layer's routed experts): run on a number of ranks that divides {total}"
            )
        self.num_experts, self.world_size = total, ranks.world_size
        self.local = total // ranks.world_size
        self.first = ranks.rank * self.local
        for name in EXPERT_PARAMS:
            whole = getattr(experts, name).detach()
            setattr(self, name, nn.Parameter(whole[self.first : self.first + self.local].clone()))

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x (N, D) -> sum_k g_k FFN_{e_k}(x) (N, D), experts on their ranks."""
        top_k = routing.experts.shape[1]
        flat_experts = routing.experts.flatten()  # (N*K,)
        order = flat_experts.argsort(stable=True)  # by expert, hence by owning rank
        token_of = order // top_k
        load = torch.bincount(flat_experts, minlength=self.num_experts)
        send_counts = load.view(self.world_size, self.local).sum(dim=1)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        arrived_experts = torch.empty(sum(recv), dtype=flat_experts.dtype, device=x.device)
        dist.all_to_all_single(arrived_experts, flat_experts[order].contiguous(), recv, send)
        sent_tokens = x.index_select(0, token_of)
        arrived = all_to_all_single(sent_tokens, recv, send, dist.group.WORLD)
        local_experts = arrived_experts - self.first
        by_expert = local_experts.argsort(stable=True)
        counts = torch.bincount(local_experts, minlength=self.local).tolist()
        chunks = arrived.index_select(0, by_expert).split(counts)
        outputs = [self._expert(chunk, e) for e, chunk in enumerate(chunks) if len(chunk)]
        # the stacked experts' gradient is whole wherever one of them runs (zero for those no token chose); where none
        # does, one runs on no token so that it is zero, not None, and the optimizer steps them (momentum, weight
        # decay) as one process steps the stacked experts, whatever the tokens chose
        computed = torch.cat(outputs) if outputs else self._expert(arrived[:0], 0)
        returned = torch.zeros_like(arrived).index_copy(0, by_expert, computed)  # back in arrival order
        results = all_to_all_single(returned, send, recv, dist.group.WORLD)
        weights = routing.weights.flatten()[order].unsqueeze(-1).to(x.dtype)
        return x.new_zeros(x.shape).index_add_(0, token_of, results * weights)

    def _expert(self, tokens: torch.Tensor, expert: int) -> torch.Tensor:
        gate, up = F.linear(tokens, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return F.linear(swiglu(gate, up), self.down_proj[expert])


def apply_expert_parallel(model: Transformer, ranks: Ranks) -> list[str]:
    """Split every MoE layer's routed experts over all ranks; returns the names of the now rank-local parameters
    (DDP must not average them). ConfigError naming expert_parallel for a model without routed experts, or with a
    number of them the ranks do not divide."""
    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, RoutedExperts):
            owner, _, attribute = name.rpartition(".")
            sharded = ShardedExperts(module, ranks)
            setattr(model.get_submodule(owner), attribute, sharded)
            for param_name in EXPERT_PARAMS:
                getattr(sharded, param_name).register_hook(lambda grad, world=ranks.world_size: grad / world)
                names.append(f"{name}.{param_name}")
    if not names:
        raise ConfigError(
            f"expert_parallel={ranks.world_size} splits the routed experts over the ranks, and the model has none "
            f"(model.n_routed_experts={model.config.n_routed_experts}, first_k_dense_replace="
            f"{model.config.first_k_dense_replace} of {model.config.num_hidden_layers} layers): set expert_parallel=1"
        )
    return names


def sharded_expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, ShardedExperts) for p in m.parameters()]


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip to the gradient norm over all ranks: each rank's experts and FSDP shards added up, replicated (DDP)
    gradients counted once."""
    local = {id(p) for p in sharded_expert_params(model)}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    split = [g.to_local() if isinstance(g, DTensor) else g for p in model.parameters() if (g := p.grad) is not None
             and (id(p) in local or isinstance(g, DTensor))]  # fmt: skip
    replicated = [
        g for p in model.parameters() if (g := p.grad) is not None and not (id(p) in local or isinstance(g, DTensor))
    ]
    split_squares = _sum_of_squares(split)
    dist.all_reduce(split_squares)
    norm = (split_squares + _sum_of_squares(replicated)).sqrt()
    scale = min(1.0, max_norm / (norm.item() + 1e-6))
    for grad in grads:
        grad.mul_(scale)
    return norm


def _sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    if not grads:
        return torch.zeros(())
    return torch.stack([(grad.float() ** 2).sum() for grad in grads]).sum()


def gather_expert_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the model's state dict) with each rank-local expert tensor replaced by all ranks' slices, whole."""
    state = dict(state)
    for name, module in model.named_modules():
        if not isinstance(module, ShardedExperts):
            continue
        for param_name in EXPERT_PARAMS:
            local = getattr(module, param_name).detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(module.world_size)]
            dist.all_gather(parts, local)
            state[f"{name}.{param_name}"] = torch.cat(parts)
    return state
