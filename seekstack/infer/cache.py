"""A paged latent cache: one pool of fixed-size blocks shared by all sequences, per layer only c^KV and k^R.

Each layer's pool holds, per token slot, the compressed KV latent (C = kv_lora_rank) and the rope key
(R = qk_rope_head_dim) side by side, so a token costs (C + R) x layers x dtype size bytes. A sequence owns
a block table (list of block ids); token j of it lives in slot table[j // block_size] * block_size + j % block_size.
Block 0 is never handed out: padding writes land there.

Before each forward the engine calls `plan` with the sequences in the batch, where each one's new tokens
start and how many are real; every layer's `update` then writes the new tokens and gathers each sequence's
tokens into a padded (B, S, .) batch with a (B, T, S) mask that is causal within the sequence and hides padding.
`follow` derives, inside a compiled step, the plan of one more token per row at positions computed there.
Shapes: B sequences, T new tokens per row (padded), S cached tokens per row after the write (padded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from seekstack.config import ModelConfig

TRASH_BLOCK = 0


class CacheFullError(RuntimeError):
    """Not enough free blocks for a request."""


class PagedLatentCache:
    """Block pool + block tables; implements the model's `LatentCache` protocol for the planned batch."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: the cache needs at least 2 blocks (block 0 is reserved)")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        self.layers = config.num_hidden_layers + config.num_nextn_predict_layers  # MTP layers index after the main
        self.kv_rank, self.rope_dim = config.kv_lora_rank, config.qk_rope_head_dim
        self.block_size, self.num_blocks = block_size, num_blocks
        self.device = torch.device(device)
        width = self.kv_rank + self.rope_dim
        # One tensor per layer, not views of one: a compiled decode step then writes its slots in place
        # instead of copying back a whole base tensor.
        self.pools = [
            torch.zeros(num_blocks * block_size, width, dtype=dtype, device=self.device) for _ in range(self.layers)
        ]
        self.free_blocks = list(range(num_blocks - 1, TRASH_BLOCK, -1))  # pop() hands out low ids first
        self.tables: dict[str, list[int]] = {}
        self.slots: dict[str, torch.Tensor] = {}  # per sequence, the slot of each of its token positions
        self._plan: _Plan | None = None
        self._start_range = (0, 0)  # the planned rows' first and last start position

    # ------------------------------------------------------------------ blocks
    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return math.ceil(num_tokens / self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether enough blocks are free for a new sequence of `num_tokens` tokens."""
        return self.blocks_for(num_tokens) <= len(self.free_blocks)

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        """Give `seq_id` blocks for `num_tokens` tokens in all (raises CacheFullError when too few are free)."""
        needed = self.blocks_for(num_tokens) - len(self.tables.get(seq_id, []))
        if needed > len(self.free_blocks):
            raise CacheFullError(
                f"sequence {seq_id} needs {needed} more cache blocks of {self.block_size} tokens; "
                f"{len(self.free_blocks)} of {self.num_blocks - 1} are free"
            )
        table = self.tables.setdefault(seq_id, [])
        table.extend(self.free_blocks.pop() for _ in range(max(needed, 0)))
        blocks = torch.tensor(table, device=self.device)[:, None] * self.block_size
        self.slots[seq_id] = (blocks + torch.arange(self.block_size, device=self.device)).flatten()

    def free(self, seq_id: str) -> None:
        """Return the blocks of `seq_id` to the pool (unknown ids are ignored)."""
        self.free_blocks.extend(reversed(self.tables.pop(seq_id, [])))
        self.slots.pop(seq_id, None)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks in use."""
        return 1 - len(self.free_blocks) / (self.num_blocks - 1)

    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies across all layers: (C + R) x layers x dtype size."""
        return sum(pool.shape[-1] * pool.element_size() for pool in self.pools)

    # ------------------------------------------------------------------ the planned batch
    def plan(
        self, seq_ids: list[str], starts: list[int], counts: list[int], width: int, lookahead: int = 0
    ) -> torch.Tensor:
        """Set up the next forward: row b writes `counts[b]` real tokens at positions starts[b]...

        Rows are padded to `width` new tokens. Returns the positions (B, width) to give the model.
        The gathered keys reach `lookahead` slots past the longest row (masked here), so that `follow` can
        plan forwards at later positions without leaving the compiled graph.
        Index lists are built in Python and become one tensor each: a decode step runs a handful of ops here.
        """
        positions = [[start + t for t in range(width)] for start in starts]
        write_slots = [  # padding (t >= count) lands in block 0, never on a real token
            self._slot(seq_id, position) if t < count else TRASH_BLOCK
            for seq_id, row, count in zip(seq_ids, positions, counts, strict=True)
            for t, position in enumerate(row)
        ]
        ends = [start + count for start, count in zip(starts, counts, strict=True)]
        longest = max(ends)
        rows = [self.slots[seq_id][: longest + lookahead] for seq_id in seq_ids]
        key_slots = rows[0][None] if len(rows) == 1 else pad_sequence(rows, batch_first=True, padding_value=TRASH_BLOCK)
        positions_tensor = torch.tensor(positions, device=self.device)  # (B, T)
        mask = None  # one new token per row, rows of one length: every query sees every key
        if width > 1 or min(ends) != longest or lookahead:
            # Query t of row b sees its own keys up to its position; padded queries see all real keys (never none).
            key_index = torch.arange(key_slots.shape[1], device=self.device)
            row_end = torch.tensor(ends, device=self.device)[:, None, None]
            mask = (key_index < row_end) & (key_index <= positions_tensor[:, :, None])  # (B, T, S)
        write_slots_tensor = torch.tensor(write_slots, device=self.device)
        self._plan = _Plan(positions_tensor, write_slots_tensor, key_slots, mask)
        self._start_range = (min(starts), max(starts))
        return positions_tensor

    def follow(self, positions: torch.Tensor) -> FollowingCache:
        """The cache for a forward of one token per row at `positions` (B, 1), within the keys the current plan
        gathers: row b writes its token's slot and sees its keys up to it. Tensor ops only, and this cache's plan
        stays as it is (a compiled step's MTP drafts run at positions that depend on how many were accepted)."""
        plan = self._require_plan()
        key_index = torch.arange(plan.key_slots.shape[1], device=positions.device)
        mask = key_index <= positions[:, :, None]  # (B, 1, S)
        write_slots = plan.key_slots.gather(1, positions).flatten()
        return FollowingCache(self.pools, _Plan(positions, write_slots, plan.key_slots, mask))

    def _slot(self, seq_id: str, position: int) -> int:
        block = self.tables[seq_id][position // self.block_size]
        return block * self.block_size + position % self.block_size

    def positions(self) -> torch.Tensor:
        """The positions (B, T) of the planned forward."""
        return self._require_plan().positions

    def length(self, layer_idx: int = 0) -> int:
        """Tokens cached before the planned forward, when all rows agree (else pass positions to the model)."""
        self._require_plan()
        first, last = self._start_range
        if first != last:
            raise ValueError("the planned rows start at different positions: pass positions to the model")
        return first

    def update(
        self, layer_idx: int, kv_latent: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Store (B, T, C) and (B, T, R) in the planned slots; return each row's [c^KV; k^R] (B, S, C+R) and the
        (B, T, S) mask."""
        return _write_and_gather(self.pools[layer_idx], self._require_plan(), kv_latent, k_rope)

    def _require_plan(self) -> _Plan:
        if self._plan is None:
            raise RuntimeError("PagedLatentCache.plan must be called before a forward")
        return self._plan


class FollowingCache:
    """The pools of a `PagedLatentCache` under a plan of their own, from `PagedLatentCache.follow`."""

    def __init__(self, pools: list[torch.Tensor], plan: _Plan):
        self.pools, self.plan = pools, plan

    def update(
        self, layer_idx: int, kv_latent: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As `PagedLatentCache.update`."""
        return _write_and_gather(self.pools[layer_idx], self.plan, kv_latent, k_rope)


def _write_and_gather(
    pool: torch.Tensor, plan: _Plan, kv_latent: torch.Tensor, k_rope: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    new = torch.cat((kv_latent, k_rope), dim=-1).flatten(0, 1).to(pool.dtype)
    pool.index_put_((plan.write_slots,), new)  # inductor updates an input in place for index_put_, not index_copy_
    cached = pool.index_select(0, plan.key_slots.flatten()).view(*plan.key_slots.shape, -1)  # (B, S, C+R)
    return cached, plan.mask


@dataclass
class _Plan:
    """Index tensors of one planned forward, shared by all layers."""

    positions: torch.Tensor  # (B, T)
    write_slots: torch.Tensor  # (B*T,) slot of each new token (padding -> block 0)
    key_slots: torch.Tensor  # (B, S) slot of each row's keys (padding -> block 0)
    mask: torch.Tensor | None  # (B, T, S) which keys each query sees; None: all of them
