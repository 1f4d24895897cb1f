"""DeepSeekMoE (DeepSeek-V2 §2.2, DeepSeek-V3 §2.1.2): shared experts plus fine-grained routed experts.

Shapes: B batch, T tokens, N = B*T flattened tokens, D hidden, E routed experts, K experts per token,
G expert groups, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from seekstack.config import ModelConfig
from seekstack.model import cpu_kernels
from seekstack.model.precision import Float32Buffers


def require_routed_experts(config: ModelConfig, part: str) -> None:
    """ValueError naming the field, unless `config` routes each token to experts: `part` of an MoE layer needs them
    (a check that stays under `python -O`, as an assert does not)."""
    for name in ("n_routed_experts", "num_experts_per_tok"):
        if not getattr(config, name):
            raise ValueError(
                f"{part} needs routed experts, and the config has {name}={getattr(config, name)!r}: a dense model's "
                "layers are FeedForward; give n_routed_experts and num_experts_per_tok (>= 1) for an MoE layer"
            )


class FeedForward(nn.Module):
    """SwiGLU feed-forward: W_down (SiLU(W_gate x) * W_up x). Dense layers and shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def swiglu(gate: torch.Tensor, up: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(gate) * up for gate, up (..., I), times `weights` (...) per row where given (a routed expert's combine
    weight g, folded in before W_down). On a CPU one pass of the C++ kernel (forward and backward) in float32 math,
    where torch's eager ops make three, each into fresh memory."""
    if not cpu_kernels.elementwise_takes(gate, up):
        hidden = F.silu(gate) * up
        return hidden if weights is None else hidden * weights.unsqueeze(-1).to(hidden.dtype)
    width = gate.shape[-1]
    rows = (gate.reshape(-1, width), up.reshape(-1, width), None if weights is None else weights.reshape(-1).float())
    hidden = _SwiGLU.apply(*rows) if torch.is_grad_enabled() else torch.ops.seekstack.swiglu(*rows)
    return hidden.view_as(gate)


class _SwiGLU(torch.autograd.Function):
    """gate, up (n, I), weights (n,) float32 or None -> SiLU(gate) * up [* weights] through the C++ kernels."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up, weights)
        return torch.ops.seekstack.swiglu(gate, up, weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # type: ignore[override]
        gate, up, weights = ctx.saved_tensors
        grad_gate, grad_up, grad_weights = torch.ops.seekstack.swiglu_backward(grad, gate, up, weights)
        return grad_gate, grad_up, None if weights is None else grad_weights


@dataclass
class Routing:
    weights: torch.Tensor  # (N, K) combine weights g_{i,t}, from the unbiased scores
    experts: torch.Tensor  # (N, K) selected expert ids
    scores: torch.Tensor  # (N, E) affinities s_{i,t}


class Router(Float32Buffers):
    """The gate: affinity scores, (group-limited) top-K selection, combine weights.

    V3 eq. 15-16: s_i = Sigmoid(u^T e_i); select TopK over s_i + b_i; g_i = s_i / sum_{selected} s_j.
    V2 eq. 22: s_i = Softmax_i(u^T e_i); g_i = s_i for the K largest.
    The bias b (`e_score_correction_bias`) only decides which experts are selected, never the weights; it stays
    float32 in a bf16 model: its updates (~1e-3) vanish in bf16.
    """

    float32_buffers = ("e_score_correction_bias",)

    def __init__(self, config: ModelConfig):
        super().__init__()
        require_routed_experts(config, "Router")
        self.num_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.topk_method, self.scoring_func = config.topk_method, config.scoring_func
        self.n_group, self.topk_group = config.routing_groups
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        # V3's noaux_tc (§2.1.2): the bias b_i joins the choice (and scores the groups: limit_to_groups)
        self.aux_free = self.topk_method == "noaux_tc"
        if self.aux_free:
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        """x (N, D) -> Routing. Scores are computed in float32, under autocast too: bf16 would round sigmoid scores
        from 0.5 to 1 to steps of 2^-8, four times the bias's update (gamma 1e-3), and the experts chosen with them."""
        if torch.is_autocast_enabled(x.device.type):  # only then: the context costs ~4 us, a decode step 8 routers
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x)
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        experts = self.select(scores)
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(weights * self.scaling, experts, scores)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (N, E) float32 -> the chosen experts (N, K): TopK over s_i + b_i (or s_i) within the kept groups.

        A decode step's few rows take one C++ call (`route_rows`) that picks as these ops do, with torch.topk's own
        loop (the same ties, the same order): eager, they are a dozen ops of ~1-3 us each, ~25 of a one-token MoE's
        ~110; compiled, inductor calls each topk out of its loops, three a layer (`small` float32 step 1.03x)."""
        bias = self.e_score_correction_bias if self.aux_free else None
        few_rows = not scores.requires_grad and scores.shape[0] <= cpu_kernels.MAX_TOKENS
        if few_rows and cpu_kernels.usable(scores, scores):  # eager or compiled: built by a block's first RMSNorm
            return torch.ops.seekstack.route_rows(
                scores, bias, self.n_group, self.topk_group, self.aux_free, self.top_k
            )
        choice = scores if bias is None else scores + bias
        if self.n_group > 1:
            choice = self.limit_to_groups(choice)
        return choice.topk(self.top_k, dim=-1, sorted=False).indices

    def limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep the `topk_group` best groups, mask the rest to -inf (device-limited routing, V2 §2.2.2).

        A group's score is its maximum (V2 `group_limited_greedy`) or the sum of its top-2 (V3 `noaux_tc`).
        """
        grouped = choice.view(choice.shape[0], self.n_group, -1)  # (N, G, E/G)
        if self.aux_free:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        kept = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        return grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).flatten(1)


# Compiled, one CPU thread, `small` (bench/moe_decode.py): in bfloat16 the dense path is ~1.2-1.6x faster than the
# pairs from 32 tokens (8 pairs per expert) on and about even at 16; in float32 the pairs stay ~1.7x faster up to 64
# tokens, the matmul being bound by its FLOPs, not by the weights it reads.
DENSE_MIN_PAIRS_PER_EXPERT = 8


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights; tokens are sorted by expert and run through one grouped matmul."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        require_routed_experts(config, "RoutedExperts")
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))  # [W_gate; W_up] per expert
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x (N, D) -> sum_k g_k FFN_{e_k}(x) (N, D)."""
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            return self.forward_gathered(x, routing)
        if not torch.is_grad_enabled() and x.shape[0] <= cpu_kernels.MAX_TOKENS and self._kernel_takes(x, eager=True):
            return self.forward_kernel(x, routing)
        top_k = routing.experts.shape[1]
        flat_experts = routing.experts.flatten()  # (N*K,)
        order = flat_experts.argsort(stable=True)  # assignments sorted by expert
        token_of = order // top_k
        load = torch.bincount(flat_experts, minlength=routing.scores.shape[1])
        if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not on autocast's list: cast the N rows once,
            x = x.to(torch.get_autocast_dtype(x.device.type))  # not the N*K gathered ones, as it casts F.linear's
        tokens = x.index_select(0, token_of)  # its backward is an index_add, faster than x[...]'s
        gate, up = self.grouped_linear(tokens, "gate_up_proj", load).chunk(2, dim=-1)
        hidden = swiglu(gate, up, routing.weights.flatten()[order])  # g_k folded in before the down projection
        weighted = self.grouped_linear(hidden, "down_proj", load)
        return weighted.new_zeros(x.shape).index_add_(0, token_of, weighted)  # autocast: in the matmuls dtype

    def grouped_linear(self, x: torch.Tensor, name: str, load: torch.Tensor) -> torch.Tensor:
        """x (n, in) sorted by expert, load[e] rows for expert e -> (n, out): each group times its expert's W^T.

        One grouped matmul over the stacked weights, no per-expert loop and no host sync; experts that replace
        `expert_linear` (quantized, LoRA) or widths the kernel cannot take (rows of 16-byte multiples) get one
        call per expert instead.
        """
        weight = getattr(self, name)
        if type(self).expert_linear is RoutedExperts.expert_linear and _grouped_mm_fits(x, weight):
            offsets = load.cumsum(0).to(torch.int32)
            return _grouped_mm(x, weight.to(x.dtype).transpose(1, 2), offsets)
        chunks = x.split(load.tolist())
        return torch.cat([self.expert_linear(chunk, name, e) for e, chunk in enumerate(chunks) if len(chunk)])

    def expert_linear(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        """x (n, in) @ W_expert^T for stacked weight `name`; the one step quantized experts replace (compress/)."""
        return F.linear(x, getattr(self, name)[expert])

    def forward_gathered(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The same sum with no data-dependent shape, for compiled inference (the engine's decode step).

        `forward` splits tokens by expert counts it reads back from the device, which torch.compile cannot
        trace as one graph; the paths here can. Every expert on every token (`forward_dense`) reads each expert once
        but does E/K times the FLOPs, which pays only where the matmul has FLOPs to spare: bfloat16 with at least
        `DENSE_MIN_PAIRS_PER_EXPERT` pairs per expert. Below that, on a CPU, a C++ kernel groups the pairs by expert
        and reads each chosen expert once (`forward_kernel`, float32 or bfloat16); else each (token, expert) pair
        gathers its expert's weights (`forward_pairs`). The choice is by shape and dtype only, so a compiled
        graph holds one path and recompiles when a batch crosses over.
        """
        pairs, num_experts = routing.experts.numel(), routing.scores.shape[1]
        if x.dtype == torch.bfloat16 and pairs >= DENSE_MIN_PAIRS_PER_EXPERT * num_experts:
            return self.forward_dense(x, routing)
        if self._kernel_takes(x, eager=False):
            return self.forward_kernel(x, routing)
        return self.forward_pairs(x, routing)

    def forward_kernel(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The pairs grouped by expert in a C++ kernel (seekstack.model.cpu_kernels): each chosen expert's weights
        read once, for float32 or bfloat16 on a CPU."""
        return cpu_kernels.grouped_experts(x, routing.experts, routing.weights, self.gate_up_proj, self.down_proj)

    def _kernel_takes(self, x: torch.Tensor, eager: bool) -> bool:
        """Whether `forward_kernel` can stand in for this path. The compiled paths read the stacked weights as they are,
        like the kernel; the eager one defers to subclasses that change the experts' matmuls (quantized, LoRA). Eager
        calls build the kernel on first use, a compiled region only reads whether it was built (Engine builds it
        before compiling)."""
        if eager and (self.matmuls_replaced() or not cpu_kernels.available()):
            return False
        return cpu_kernels.usable(x, self.gate_up_proj)

    def matmuls_replaced(self) -> bool:
        """Whether this forward's expert matmuls are a subclass's (quantized, LoRA), which the eager kernel skips."""
        return (type(self).grouped_linear, type(self).expert_linear) != (
            RoutedExperts.grouped_linear,
            RoutedExperts.expert_linear,
        )

    def forward_pairs(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Each (token, expert) pair gathers its expert's weights: N*K expert weight sets read, N*K GEMVs."""
        N, K = routing.experts.shape
        experts = routing.experts.flatten()  # (N*K,) one (token, expert) pair per row
        pairs = x.repeat_interleave(K, dim=0).unsqueeze(1)  # (N*K, 1, D)
        gate, up = torch.bmm(pairs, self.gate_up_proj[experts].transpose(1, 2)).chunk(2, dim=-1)  # (N*K, 1, I) each
        hidden = swiglu(gate, up, routing.weights.view(N * K, 1))
        weighted = torch.bmm(hidden, self.down_proj[experts].transpose(1, 2))  # (N*K, 1, D)
        return weighted.view(N, K, -1).sum(dim=1)

    def forward_dense(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Every expert on every token, weighted by the dense routing weights (zero where an expert was not chosen):
        each expert's weights read once, in one matmul per projection, for E/K times the pairs' FLOPs."""
        N, D = x.shape
        E = self.gate_up_proj.shape[0]
        dense_weights = torch.zeros_like(routing.scores).scatter_(1, routing.experts, routing.weights)  # (N, E)
        gate, up = F.linear(x, self.gate_up_proj.flatten(0, 1)).view(N, E, -1).chunk(2, dim=-1)  # (N, E, I) each
        hidden = swiglu(gate, up, dense_weights)
        weighted = torch.bmm(hidden.transpose(0, 1), self.down_proj.transpose(1, 2))  # (E, N, D)
        return weighted.sum(dim=0)


def _expert_load(routing: Routing, counted: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens routed to each expert (E,), of the `counted` ones (N,) when given, without a data-dependent shape."""
    experts = routing.experts.flatten()
    ones = torch.ones_like(experts) if counted is None else counted.repeat_interleave(routing.experts.shape[1]).long()
    return torch.zeros_like(routing.scores[0], dtype=torch.long).index_add_(0, experts, ones)


GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.compiler.disable
def _grouped_mm(x: torch.Tensor, weight_t: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """F.grouped_mm, run eagerly inside compiled blocks: its compile-time shape check takes only bfloat16 (torch 2.13),
    so a float32 MoE block under torch.compile (train.compile=true) failed to trace."""
    return F.grouped_mm(x, weight_t, offs=offsets)


def _grouped_mm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped matmul takes these operands: float32, bfloat16 or float16 (not a float64 model) in
    rows that span multiples of 16 bytes."""
    return x.dtype in GROUPED_MM_DTYPES and all(width * x.element_size() % 16 == 0 for width in weight.shape[1:])


@dataclass
class MoEStats:
    expert_load: torch.Tensor | None  # (E,) tokens routed to each expert in this forward, unless not asked for
    balance_loss: torch.Tensor | None  # alpha * L_Bal for this layer, when enabled and training


class MoE(nn.Module):
    """h' = h + sum_shared FFN_s(h) + sum_routed g_i FFN_i(h) (V3 eq. 12; the residual is added by the block)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        shared = config.n_shared_experts or 0
        self.shared_experts = FeedForward(config.hidden_size, config.moe_intermediate_size * shared) if shared else None
        self.aux_loss_alpha = config.aux_loss_alpha

    def forward(
        self,
        x: torch.Tensor,
        counted: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        output_expert_load: bool = True,
    ) -> tuple[torch.Tensor, MoEStats]:
        """`counted` (B, T) bool: the tokens the routing statistics (expert load, balance loss) count; padding is
        routed and computed like any token but counts in neither (default: every token counts). `segments` (B, T):
        the sequences packed in each row (`packed_segments`), each a sequence of the balance loss (default: rows).
        `output_expert_load=False` leaves the expert load uncounted (None): inference, which never reads it."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        routing = self.gate(flat)
        out = self.experts(flat, routing)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        load = None
        if output_expert_load:
            load = _expert_load(routing, None if counted is None else counted.reshape(B * T))
        balance = None
        if self.training and self.aux_loss_alpha > 0:
            balance = self.aux_loss_alpha * sequence_balance_loss(routing, B, T, counted, segments)
        return out.view(B, T, D), MoEStats(load, balance)


def sequence_balance_loss(
    routing: Routing,
    batch: int,
    seq_len: int,
    counted: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sequence-wise balance loss, DeepSeek-V3 eq. 17-20, averaged over the sequences of the batch: its rows, or the
    sequences packed in them that `segments` (B, T) numbers within each row (0, 1, ...; `packed_segments`).

    L_Bal = sum_i f_i P_i,  f_i = E/(K T) sum_t 1[i in TopK_t],  P_i = 1/T sum_t s_{i,t} / sum_j s_{j,t},
    with T and the sums over a sequence's `counted` tokens (B, T) only (its padding left out), when given.
    """
    num_experts, top_k = routing.scores.shape[1], routing.experts.shape[1]
    scores = routing.scores.view(batch, seq_len, num_experts).float()  # counts past 256 are exact (not bf16's)
    if counted is None:
        counted = torch.ones(batch, seq_len, dtype=torch.bool, device=scores.device)
    weights = counted.reshape(batch, seq_len).float()
    slots = seq_len if segments is not None else 1  # sequences a row may hold, S
    if segments is None:
        segments = torch.zeros(batch, seq_len, dtype=torch.long, device=scores.device)
    tokens = weights.new_zeros(batch, slots).scatter_add_(1, segments, weights).clamp(min=1)[..., None]  # (B, S, 1)
    shares = scores / scores.sum(dim=-1, keepdim=True) * weights[..., None]  # (B, T, E)
    probs = shares.new_zeros(batch, slots, num_experts).scatter_add_(1, segments[..., None].expand_as(shares), shares)
    probs = probs / tokens  # P_i per sequence, (B, S, E)
    chosen = segments.repeat_interleave(top_k, dim=1) * num_experts + routing.experts.view(batch, -1)  # (B, T*K)
    selected = weights.new_zeros(batch, slots * num_experts)
    selected.scatter_add_(1, chosen, weights.repeat_interleave(top_k, dim=1))
    fraction = selected.view(batch, slots, num_experts) * num_experts / (top_k * tokens)  # f_i per sequence
    sequences = (segments[:, -1] + 1).sum()  # each row's last sequence is numbered highest
    return (fraction * probs).sum() / sequences
