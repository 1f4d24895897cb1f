"""A paged latent cache: one pool of fixed-size blocks shared by all sequences, per layer only c^KV and k^R.

Each layer's pool holds, per token slot, the compressed KV latent (C = kv_lora_rank) and the rope key
(R = qk_rope_head_dim) side by side, so a token costs (C + R) x layers x dtype size bytes. A sequence owns
a block table (list of block ids); token j of it lives in slot table[j // block_size] * block_size + j % block_size.
Block 0 is never handed out: padding writes land there. The pool is sized by a memory budget
(`blocks_in_budget`; by default, each device's pools by the memory free there: `blocks_in_free_memory`), and a
sequence's table grows block by block as its tokens arrive (`allocate`).

Automatic prefix caching (as vLLM's): a full block whose tokens are computed is registered under the chained
hash of every token up to its end (`commit`), so a later sequence with the same prefix shares it (`admit`)
instead of recomputing it. Blocks count their users; one nobody uses stays cached until a new block is needed,
and then the least recently freed goes first (LRU).

Before each forward the engine calls `plan` with the sequences in the batch, where each one's new tokens
start and how many are real; every layer's `update` then writes the new tokens and gathers each sequence's
tokens into a padded (B, S, .) batch with a (B, T, S) mask that is causal within the sequence and hides padding.
`follow` derives, inside a compiled step, the plan of one more token per row at positions computed there.
Shapes: B sequences, T new tokens per row (padded), S cached tokens per row after the write (padded).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from seekstack.config import ModelConfig
from seekstack.schema import for_command

TRASH_BLOCK = 0
DEFAULT_MEMORY_FRACTION = 0.5  # of the memory free once the weights are loaded


class CacheFullError(RuntimeError):
    """Not enough free blocks for a request."""


def free_memory(device: torch.device | str) -> int:
    """Bytes free on `device`: the accelerator's free memory, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def blocks_in_budget(config: ModelConfig, budget_bytes: float, block_size: int, dtype: torch.dtype) -> int:
    """Blocks (block 0 included) whose pools fit in `budget_bytes`; ValueError when fewer than the 2 a cache needs."""
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    block_bytes = _block_bytes(config, block_size, dtype, layers)
    blocks = int(budget_bytes // block_bytes)  # a whole number of them where the budget is written 2e9, a float
    if blocks < 2:
        holds = (
            f"{budget_bytes} bytes holds {blocks} cache blocks of {block_bytes} bytes; the cache needs at least 2 "
            f"(block 0 is reserved):"
        )
        raise for_command(
            ValueError(f"kv_cache_memory={holds} raise kv_cache_memory"),
            f"--kv-cache-memory {holds} raise --kv-cache-memory",
        )
    return blocks


def blocks_in_free_memory(
    config: ModelConfig, layer_devices: list[torch.device], block_size: int, dtype: torch.dtype
) -> int:
    """Blocks (block 0 included) whose pools fit, on each device of `layer_devices` (one per cache layer), in
    `DEFAULT_MEMORY_FRACTION` of the memory free there; ValueError naming the device where fewer than 2 fit."""
    fits = {}  # device -> (blocks, bytes free, bytes of a block of its layers)
    for device, layers in Counter(layer_devices).items():
        free, block_bytes = free_memory(device), _block_bytes(config, block_size, dtype, layers)
        fits[device] = (int(DEFAULT_MEMORY_FRACTION * free) // block_bytes, free, block_bytes)
    device = min(fits, key=lambda d: fits[d][0])
    blocks, free, block_bytes = fits[device]
    if blocks < 2:
        raise ValueError(
            f"{device} has {free} bytes free; {DEFAULT_MEMORY_FRACTION:.0%} of them hold {blocks} cache blocks of "
            f"{block_bytes} bytes (its layers' pools); the cache needs at least 2 (block 0 is reserved): free memory "
            "there or give kv_cache_memory"
        )
    return blocks


def refuse_pools_past_free_memory(
    config: ModelConfig,
    num_blocks: int,
    layer_devices: list[torch.device],
    block_size: int,
    dtype: torch.dtype,
    asked: str,
) -> None:
    """ValueError where the pools of `num_blocks` blocks outgrow the memory free on a device of `layer_devices` (one
    per cache layer), before they are allocated (torch's bare allocation error, or the kernel's out-of-memory kill);
    `asked` names the setting the count came from."""
    for device, layers in Counter(layer_devices).items():
        free, pool_bytes = free_memory(device), num_blocks * _block_bytes(config, block_size, dtype, layers)
        if pool_bytes > free:
            raise ValueError(
                f"{asked}: {num_blocks} cache blocks of {block_size} tokens take {pool_bytes} bytes on {device}, which "
                f"has {free} bytes free: give a smaller one, or leave num_blocks and kv_cache_memory out (half the "
                "free memory)"
            )


def _block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype, layers: int) -> int:
    """Bytes one cache block takes in the pools of `layers` layers."""
    return (config.kv_lora_rank + config.qk_rope_head_dim) * layers * dtype.itemsize * block_size


def refuse_a_non_count(name: str, value: object) -> None:
    """ValueError naming keyword `name` unless `value` is a whole number >= 1 (kv_cache_memory: a number of bytes,
    which may be written 2e9, not inf)."""
    bytes_given = name == "kv_cache_memory"  # a count is an int, not True
    number = numbers.Real if bytes_given else numbers.Integral
    if isinstance(value, bool) or not isinstance(value, number) or value == math.inf:
        kind = "a number of bytes >= 1 or a size such as '4GiB'" if bytes_given else "a whole number >= 1"
        raise ValueError(f"{name}={value!r} must be {kind}")
    if not value >= 1:  # nan too
        raise ValueError(f"{name}={value} must be >= 1")


def refuse_too_few_blocks(num_blocks: object) -> None:
    """ValueError naming num_blocks unless it is a whole number >= 2 (block 0 is reserved)."""
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, numbers.Integral) or num_blocks < 2:
        raise ValueError(
            f"num_blocks={num_blocks!r}: the cache needs a whole number of at least 2 blocks (block 0 is reserved)"
        )


class PagedLatentCache:
    """Block pool + block tables; implements the model's `LatentCache` protocol for the planned batch.

    `key_extra_tokens` widens each block's prefix-cache key by that many tokens after it: with MTP speculative
    decoding, the MTP layer's slot at a block's last position holds the embedding of the next token too.
    `layer_devices` puts each layer's pool beside its attention when a device map spreads the model
    (seekstack.infer.placement); block tables and plans stay on `device`."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        prefix_caching: bool = True,
        key_extra_tokens: int = 0,
        layer_devices: list[torch.device] | None = None,
    ):
        refuse_too_few_blocks(num_blocks)
        refuse_a_non_count("block_size", block_size)
        self.layers = config.num_hidden_layers + config.num_nextn_predict_layers  # MTP layers index after the main
        self.kv_rank, self.rope_dim = config.kv_lora_rank, config.qk_rope_head_dim
        self.block_size, self.num_blocks = block_size, num_blocks
        self.device = torch.device(device)
        width = self.kv_rank + self.rope_dim
        # One tensor per layer, not views of one: a compiled decode step then writes its slots in place
        # instead of copying back a whole base tensor.
        devices = layer_devices or [self.device] * self.layers
        refuse_pools_past_free_memory(config, num_blocks, devices, block_size, dtype, f"num_blocks={num_blocks}")
        self.pools = [torch.zeros(num_blocks * block_size, width, dtype=dtype, device=device) for device in devices]
        for pool in self.pools:  # the model's width, one graph's constant: a compiled step takes no size for it
            torch._dynamo.mark_static(pool, 1)
        self.free_blocks = list(range(num_blocks - 1, TRASH_BLOCK, -1))  # never registered; pop() gives low ids first
        self.tables: dict[str, list[int]] = {}
        self.slots: dict[str, torch.Tensor] = {}  # per sequence, the slot of each of its token positions
        self.prefix_caching, self.key_extra_tokens = prefix_caching, key_extra_tokens
        self.users = [0] * num_blocks  # sequences whose table holds each block
        self.cached: dict[bytes, int] = {}  # prefix hash -> registered block
        self.block_key: dict[int, bytes] = {}  # registered block -> its prefix hash
        self.evictable: OrderedDict[int, None] = OrderedDict()  # registered blocks nobody uses, least recent first
        self.keys: dict[str, list[bytes]] = {}  # per sequence, the prefix hash of each of its committed blocks
        self.salts: dict[str, bytes] = {}  # per sequence, what else its cached values depend on (its adapter)
        self._plan: _Plan | None = None
        self._start_range = (0, 0)  # the planned rows' first and last start position

    # ------------------------------------------------------------------ blocks
    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return math.ceil(num_tokens / self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks a sequence can take: never used, or cached but used by none."""
        return len(self.free_blocks) + len(self.evictable)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether enough blocks are free for a new sequence of `num_tokens` tokens."""
        return self.blocks_for(num_tokens) <= self.num_free

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        """Grow `seq_id`'s table to hold `num_tokens` tokens in all (raises CacheFullError when too few are free)."""
        table = self.tables.setdefault(seq_id, [])
        needed = self.blocks_for(num_tokens) - len(table)
        if needed > self.num_free:
            if not table:
                del self.tables[seq_id]
            raise CacheFullError(
                f"sequence {seq_id} needs {needed} more cache blocks of {self.block_size} tokens; "
                f"{self.num_free} of {self.num_blocks - 1} are free"
            )
        for _ in range(max(needed, 0)):
            block = self.free_blocks.pop() if self.free_blocks else self._evict()
            self.users[block] = 1
            table.append(block)
        if needed > 0 or seq_id not in self.slots:  # a decode step mostly writes into a block the table has
            self._set_slots(seq_id)

    def _evict(self) -> int:
        """The least recently used cached block, forgotten by the prefix cache."""
        block, _ = self.evictable.popitem(last=False)
        del self.cached[self.block_key.pop(block)]
        return block

    def _set_slots(self, seq_id: str) -> None:
        blocks = torch.tensor(self.tables[seq_id], device=self.device)[:, None] * self.block_size
        self.slots[seq_id] = (blocks + torch.arange(self.block_size, device=self.device)).flatten()

    def free(self, seq_id: str) -> None:
        """Return the blocks of `seq_id` to the pool (unknown ids are ignored); cached ones stay cached."""
        # Tail blocks first: of one sequence's cached blocks, the longer prefixes are evicted before the shorter.
        for block in reversed(self.tables.pop(seq_id, [])):
            self.users[block] -= 1
            if self.users[block] > 0:
                continue
            if block in self.block_key:
                self.evictable[block] = None
            else:
                self.free_blocks.append(block)
        self.slots.pop(seq_id, None)
        self.keys.pop(seq_id, None)
        self.salts.pop(seq_id, None)

    # ------------------------------------------------------------------ prefix caching
    def reset_prefix_cache(self) -> None:
        """Forget every registered block (as vLLM's `reset_prefix_cache`): after the weights change, cached values
        are stale. Unused ones become free; those in use stay with their sequences and are freed as usual."""
        self.free_blocks.extend(reversed(self.evictable))
        self.evictable.clear()
        self.cached.clear()
        self.block_key.clear()

    def admit(self, seq_id: str, tokens: list[int], num_tokens: int, salt: str = "") -> int:
        """Start `seq_id` on `tokens` with room for `num_tokens`, sharing the cached blocks of its longest cached
        prefix; returns how many of `tokens` are already cached (never all: the last one is computed, for its
        logits). `salt` names what else the cached values depend on (a LoRA adapter). CacheFullError when too
        few blocks are free."""
        hits, needed = self._admission(tokens, num_tokens, salt)
        if needed > self.num_free:
            raise CacheFullError(
                f"sequence {seq_id} needs {needed} cache blocks of {self.block_size} tokens; "
                f"{self.num_free} of {self.num_blocks - 1} are free"
            )
        for block in hits:
            self.evictable.pop(block, None)
            self.users[block] += 1
        self.tables[seq_id] = list(hits)
        self.keys[seq_id] = [self.block_key[block] for block in hits]
        self.salts[seq_id] = salt.encode()
        self.allocate(seq_id, num_tokens)
        return len(hits) * self.block_size

    def can_admit(self, tokens: list[int], num_tokens: int, salt: str = "") -> bool:
        """Whether `admit` would find enough free blocks."""
        return self._admission(tokens, num_tokens, salt)[1] <= self.num_free

    def _admission(self, tokens: list[int], num_tokens: int, salt: str) -> tuple[list[int], int]:
        """The cached blocks of the longest cached prefix of `tokens` (at most len(tokens) - 1 tokens long), and
        the free blocks admitting it takes: new ones, and cached ones that nobody was using."""
        hits: list[int] = []
        key = salt.encode()
        # A block is looked up when the tokens its key covers are all in `tokens` and it ends before the last token.
        for end in range(self.block_size, len(tokens) + 1 - max(self.key_extra_tokens, 1), self.block_size):
            key = self._chained_key(key, tokens, end)
            if not self.prefix_caching or key not in self.cached:
                break
            hits.append(self.cached[key])
        revived = sum(1 for block in hits if block in self.evictable)
        return hits, self.blocks_for(num_tokens) - len(hits) + revived

    def _chained_key(self, previous: bytes, tokens: list[int], end: int) -> bytes:
        """Hash of the block ending at `end` chained with its predecessors' (and the extra tokens after it).
        BLAKE2b: a client cannot craft a prompt that collides with another's cached prefix."""
        block = array("q", tokens[end - self.block_size : end + self.key_extra_tokens]).tobytes()
        return hashlib.blake2b(previous + block, digest_size=16).digest()

    def commit(self, seq_id: str, tokens: list[int], num_computed: int) -> None:
        """Register the full blocks of `seq_id` whose `num_computed` first `tokens` are in the cache, for sharing."""
        if not self.prefix_caching:
            return
        keys, table = self.keys[seq_id], self.tables[seq_id]
        limit = min(num_computed, len(tokens) - self.key_extra_tokens)
        for index in range(len(keys), limit // self.block_size):
            previous = keys[-1] if keys else self.salts[seq_id]
            keys.append(self._chained_key(previous, tokens, (index + 1) * self.block_size))
            block = table[index]
            if keys[-1] not in self.cached and block not in self.block_key:  # a twin computed meanwhile stays private
                self.cached[keys[-1]] = block
                self.block_key[block] = keys[-1]

    def copy_tokens(self, copies: list[tuple[str, str, int, int]]) -> None:
        """For each (source, target, start, count): the target sequence's slots at positions start...start+count-1
        take the source's values there, in every layer (a twin prefill computed them once)."""
        source = torch.cat([self.slots[seq_id][start : start + count] for seq_id, _, start, count in copies])
        target = torch.cat([self.slots[seq_id][start : start + count] for _, seq_id, start, count in copies])
        for pool in self.pools:
            pool.index_copy_(0, target.to(pool.device), pool.index_select(0, source.to(pool.device)))

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks in use."""
        return 1 - self.num_free / (self.num_blocks - 1)

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
        # Query t of row b sees its own keys up to its position; padded queries see all real keys (never none).
        # Built even when every query sees every key (rows of one length): a compiled step then has one graph.
        key_index = torch.arange(key_slots.shape[1], device=self.device)
        row_end = torch.tensor(ends, device=self.device)[:, None, None]
        mask = (key_index < row_end) & (key_index <= positions_tensor[:, :, None])  # (B, T, S)
        write_slots_tensor = torch.tensor(write_slots, device=self.device).view(len(seq_ids), width)
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
        write_slots = plan.key_slots.gather(1, positions)
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `PagedLatentCache.update`."""
        return _write_and_gather(self.pools[layer_idx], self.plan, kv_latent, k_rope)


def _write_and_gather(
    pool: torch.Tensor, plan: _Plan, kv_latent: torch.Tensor, k_rope: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    new = torch.cat((kv_latent, k_rope), dim=-1).flatten(0, 1).to(pool.dtype)
    write_slots, key_slots = plan.write_slots.to(pool.device), plan.key_slots.to(pool.device)  # no-ops on one device
    pool.index_put_((write_slots.flatten(),), new)  # inductor updates an input in place for index_put_, not index_copy_
    cached = pool.index_select(0, key_slots.flatten()).view(*key_slots.shape, -1)  # (B, S, C+R)
    return cached, plan.mask.to(pool.device)


@dataclass
class _Plan:
    """Index tensors of one planned forward, shared by all layers."""

    positions: torch.Tensor  # (B, T)
    write_slots: torch.Tensor  # (B, T) slot of each new token (padding -> block 0)
    key_slots: torch.Tensor  # (B, S) slot of each row's keys (padding -> block 0)
    mask: torch.Tensor  # (B, T, S) which keys each query sees
