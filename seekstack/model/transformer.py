"""The DeepSeek-V2/V3 causal language model: embedding, blocks, final norm, output head, MTP, losses.

Shapes: B batch, T tokens, D hidden, V vocabulary, E routed experts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seekstack.config import MTP_LOSS_WEIGHT, GenerationConfig, ModelConfig
from seekstack.model.attention import LatentCache, attention_mask_of, causal_within, packed_segments
from seekstack.model.attention_3d import SpatioTemporalAttention
from seekstack.model.block import DecoderBlock
from seekstack.model.head_loss import IGNORE_INDEX, linear_cross_entropy
from seekstack.model.moe import MoEStats, RoutedExperts, Router
from seekstack.model.mtp import MTPModule
from seekstack.model.norm import RMSNorm
from seekstack.model.rope import RotaryEmbedding, yarn_inverse_frequencies


@dataclass(kw_only=True)
class ModelOutput:
    """The forward's results, read by name (`out.logits`) or as transformers' ModelOutput is: `out["logits"]`,
    `out[0]` (the first field set, in the order below: the loss given labels, else the logits, as transformers'
    Trainer reads it), `out.to_tuple()`, `"loss" in out`, `out.keys()`; a field that is None is not a key."""

    loss: torch.Tensor | None = None  # lm_loss + mtp_loss_weight * mtp_loss + balance_loss
    logits: torch.Tensor | None  # (B, T, V); with labels: without gradient (the loss fuses head and softmax),
    # and None when the caller asked for no logits (training does not read them)
    hidden_states: torch.Tensor  # (B, T, D) after the final norm: the input of MTP depth 1
    expert_load: torch.Tensor | None = None  # (MoE layers run, E) tokens per expert: a prefix of `moe_layer_ids`
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None  # mean over depths of each depth's cross-entropy
    balance_loss: torch.Tensor | None = None  # sum over MoE layers of alpha * L_Bal

    def keys(self) -> list[str]:
        """The names of the fields set (not None), in order."""
        return [field.name for field in fields(self) if getattr(self, field.name) is not None]

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        """The fields set, in order."""
        return tuple(getattr(self, name) for name in self.keys())

    def __getitem__(self, key: str | int | slice) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[str]:  # a mapping's keys, as transformers' ModelOutput (an OrderedDict)
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()


class Transformer(nn.Module):
    """DeepSeek-V2/V3. `model(input_ids)` gives logits; with `labels` (aligned with the inputs) the losses."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(
                f"Transformer takes a ModelConfig, got {type(config).__name__}: seekstack.preset(name) or "
                "ModelConfig.from_dict(values) builds one; seekstack.load_pretrained(folder) loads a checkpoint"
            )
        self.config = config  # checked as it was built (ModelConfig.__post_init__)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        first_mtp = config.num_hidden_layers
        self.mtp = nn.ModuleList(MTPModule(config, first_mtp + k) for k in range(config.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(config)
        self.moe_layer_ids = [i for i in range(first_mtp) if config.is_moe_layer(i)] + config.mtp_moe_blocks
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    @property
    def device(self) -> torch.device:
        """Where the inputs go: the embedding's device, as transformers' `model.device` (`ids.to(model.device)`)."""
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype the model was loaded or cast in (the embedding's), as transformers' `model.dtype`; the
        routing biases stay float32 in any."""
        return self.embed_tokens.weight.dtype

    def save_pretrained(self, directory: str | Path, **options: Any) -> Path:
        """`seekstack.save_pretrained(model, directory, **options)`, called as transformers' model.save_pretrained."""
        from seekstack.checkpoint import save_pretrained

        return save_pretrained(self, directory, **options)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **options: Any) -> Transformer:
        """`seekstack.load_pretrained(directory, **options)`, called as transformers'
        AutoModelForCausalLM.from_pretrained (dtype float32 where not given, as load_pretrained's)."""
        from seekstack.checkpoint import load_pretrained

        return load_pretrained(directory, **options)

    def generate(self, *args: Any, **kwargs: Any) -> None:
        """transformers' model.generate(input_ids, ...), which transformers users call: refused, an AttributeError as
        where a model has no generate, naming the engine that generates from this model (it needs its tokenizer)."""
        raise AttributeError(
            "Transformer.generate: seekstack generates with its engine (vLLM's API), not transformers' model.generate: "
            "seekstack.infer.Engine(model, tokenizer).generate(input_ids, SamplingParams(max_new_tokens=N)) (a 2-D "
            "tensor of input_ids is a prompt per row; each Completion's token_ids and text), or "
            "Engine.from_pretrained(folder) for a saved checkpoint"
        )

    @property
    def generation_config(self) -> GenerationConfig | None:
        """The checkpoint's generation_config.json as a dict (load_pretrained's), which save_pretrained writes back and
        an Engine on the model samples by, as transformers' model.generation_config, its fields read as attributes too
        (`.max_new_tokens`); None: a save writes the config's BOS, EOS and pad ids."""
        return self._generation_config

    @generation_config.setter
    def generation_config(self, settings: Mapping[str, Any] | Any | None) -> None:
        """Set it to a dict of the file's fields, or to transformers' GenerationConfig, kept as the file its
        save_pretrained writes (`to_diff_dict()`); TypeError for anything else."""
        if settings is not None and not isinstance(settings, Mapping):
            if not callable(getattr(settings, "to_diff_dict", None)):
                raise TypeError(
                    f"model.generation_config = {type(settings).__name__}: give a dict of generation_config.json's "
                    "fields or transformers' GenerationConfig"
                )
            settings = settings.to_diff_dict()
        self._generation_config = GenerationConfig(settings) if settings is not None else None

    _generation_config: GenerationConfig | None = None
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}  # transformers' map, tied when the config says so
    # read by peft alone, which otherwise makes the embedding's output require grad (a backward through every block)
    # for reentrant checkpointing; seekstack's (parallel/parallelize.py) is non-reentrant and needs no such inputs
    is_gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding, as transformers' models name it (peft finds the embedding's token rows by it)."""
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        """The output head, as transformers' models name it."""
        return self.lm_head

    def tie_weights(self) -> None:
        """Share the output head with the embedding when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms, zeros for biases; rebuild RoPE tables."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, std=std)
                if module.aux_free:
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, RoutedExperts):
                nn.init.normal_(module.gate_up_proj, std=std)
                nn.init.normal_(module.down_proj, std=std)
        for module in self.modules():  # a second pass: the loop above reaches a module's linears after the module
            if isinstance(module, SpatioTemporalAttention):
                module.start_as_plain_mla()
        self.reset_rope()

    @torch.no_grad()
    def reset_rope(self) -> None:
        """Recompute the (non-persistent) RoPE frequencies, e.g. after materialising from the meta device."""
        inv_freq, _ = yarn_inverse_frequencies(self.config)
        self.rotary.inv_freq.copy_(inv_freq)

    def block(self, layer_idx: int) -> DecoderBlock:
        """Block `layer_idx`, counting the MTP blocks after the main layers as DeepSeek-V3 checkpoints do."""
        if layer_idx < len(self.layers):
            return self.layers[layer_idx]
        return self.mtp[layer_idx - len(self.layers)].block

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs: object) -> dict[str, object]:
        """transformers' generation hook, which peft's CAUSAL_LM wrapper (`LoraConfig(task_type="CAUSAL_LM")`) takes
        from the model it wraps: the next forward's inputs. seekstack generates with its engine (seekstack.infer)."""
        return {"input_ids": input_ids, **kwargs}

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        positions: torch.Tensor | None = None,
        mtp_loss_weight: float = MTP_LOSS_WEIGHT,
        keep_logits: bool = True,
        logits_at: torch.Tensor | None = None,
        counted: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        use_cache: bool | None = None,
        output_expert_load: bool = True,
    ) -> ModelOutput | tuple[torch.Tensor, ...]:
        """input_ids (B, T); positions (T,) or (B, T), by default continuing after the tokens a cache holds.
        Without a cache, (B, T) positions may pack several sequences in a row, each restarting its positions
        (transformers' packed `position_ids`; `packed_segments`): each attends within itself alone, its losses and
        balance loss are its own, as it would have alone in a row (a sequence restarts wherever a position is not one
        more than the one before; consecutive positions are one sequence, computed through the explicit mask).

        `logits_at` (B,) picks one position per row whose logits alone are computed, (B, 1, V): prefill needs no more;
        (B, S) picks S a row, (B, S, V): the continuation a loglikelihood scores.
        With labels, `keep_logits=False` returns no logits: the loss never needs them whole, so training skips them.
        `counted` (B, T) bool marks the tokens the MoE layers' expert load and balance loss count: a padded batch
        leaves its padding out (as transformers' attention_mask does for its balance loss).
        `attention_mask` (B, T), transformers' (1 a token, 0 padding): no token attends to padding, so a left- or
        right-padded row's logits and losses are its own alone: it is `counted` unless that is given, and a
        prediction made at padding or of padding is left out of the losses (transformers counts them unless their
        labels are -100). `position_ids` is transformers' name of `positions` (a padding-free batch of TRL's
        DataCollatorWithFlattening, through peft's wrapper), taken the same.
        `inputs_embeds`, `output_attentions`, `output_hidden_states` and `return_dict` are transformers' keywords, which
        peft's CAUSAL_LM wrapper passes on: the first three only unset (None or False), return_dict=False returns
        `ModelOutput.to_tuple()` as transformers returns a tuple. `use_cache=False` (TRL's SFTTrainer sets it, scripts
        pass it) is taken: no forward here returns a cache; True, asking for transformers' past_key_values, is refused.
        `output_expert_load=False` counts no tokens per expert (`expert_load` None), for inference, which never reads
        them (as transformers' `output_router_logits`): training, evaluation and rollouts read them.
        """
        if inputs_embeds is not None or output_attentions or output_hidden_states:
            raise ValueError(
                "inputs_embeds, output_attentions and output_hidden_states are not supported: give input_ids (the "
                "output's hidden_states is the final norm's output, the input of the head)"
            )
        if use_cache:
            raise ValueError(
                "use_cache=True: the forward returns no past_key_values; decoding steps take a latent cache as cache= "
                "(seekstack.model.attention's caches), and seekstack.infer.Engine generates with one"
            )
        if position_ids is not None:
            if positions is not None:
                raise ValueError("positions and position_ids are one argument under two names: give one")
            positions = position_ids
        if not isinstance(input_ids, torch.Tensor):  # a list fails at .dim(), naming no argument
            raise TypeError(
                f"input_ids is a {type(input_ids).__name__}: expected a (batch, seq_len) tensor of token ids, such as "
                "torch.tensor([ids])"
            )
        if input_ids.dim() != 2 or 0 in input_ids.shape:  # no token: attention's reshape fails, naming no input
            raise ValueError(
                f"input_ids have shape {tuple(input_ids.shape)}: expected (batch, seq_len) token ids, at least one "
                "sequence of one token; one sequence is input_ids[None]"
            )
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}: it "
                    "marks each token of input_ids, 1 a token and 0 padding"
                )
            if cache is not None:
                raise ValueError(
                    "attention_mask with a cache: a cache's update says what its tokens see; padded prompts are "
                    "not needed for generation, seekstack.infer.Engine batches prompts of any lengths"
                )
            counted = attention_mask.bool() if counted is None else counted
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)}, input_ids {tuple(input_ids.shape)}: labels must be aligned "
                "with the inputs, one per token (the shift to the next token happens inside the loss)"
            )
        if logits_at is not None and (logits_at.dim() not in (1, 2) or logits_at.shape[0] != input_ids.shape[0]):
            raise ValueError(  # a flat (B x S,) one was read as (B, S) by a reshape
                f"logits_at has shape {tuple(logits_at.shape)}, input_ids {tuple(input_ids.shape)}: expected (batch,), "
                "one position a row, or (batch, S), S positions a row"
            )
        T = input_ids.shape[1]
        if positions is None:
            start = cache.length() if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device)
        packed = positions.dim() == 2 and cache is None  # rows that may pack several sequences
        segments = packed_segments(positions.expand(input_ids.shape)) if packed else None
        mask = _attention_of(attention_mask, segments)
        cos, sin = self.rotary(positions)  # (T, R) or (B, T, R)
        try:
            hidden = self.embed_tokens(input_ids)
        except IndexError:  # torch's "index out of range in self" names neither the id nor the vocabulary
            outside = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)]
            raise IndexError(
                f"input_ids hold {outside[0].item()}, outside the model's vocabulary of {self.config.vocab_size} ids "
                f"(0 to {self.config.vocab_size - 1}): encode with the model's own tokenizer"
            ) from None
        stats: list[MoEStats] = []
        for layer in self.layers:
            hidden, layer_stats = layer(hidden, cos, sin, cache, counted, mask, segments, output_expert_load)
            stats += [layer_stats] if layer_stats is not None else []
        hidden = self.norm(hidden)
        if labels is not None:
            lm_loss, logits = self.head_loss(hidden, _token_targets(labels, attention_mask, segments, 1), keep_logits)
        elif logits_at is not None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
            picked = logits_at[:, None] if logits_at.dim() == 1 else logits_at
            logits = self.lm_head(hidden[rows, picked])  # (B, S, V); S = 1 for (B,)
        else:
            logits = self.lm_head(hidden)
        if labels is None:
            output = ModelOutput(logits=logits, hidden_states=hidden, expert_load=_stack_load(stats))
            return output.to_tuple() if return_dict is False else output

        mtp_loss = self.mtp_loss(
            hidden, input_ids, labels, cos, sin, stats, counted, attention_mask, segments, output_expert_load
        )
        balance_losses = [s.balance_loss for s in stats if s.balance_loss is not None]
        balance_loss = torch.stack(balance_losses).sum() if balance_losses else None
        loss = lm_loss + mtp_loss_weight * mtp_loss if mtp_loss is not None else lm_loss
        if balance_loss is not None:
            loss = loss + balance_loss
        output = ModelOutput(
            loss=loss, logits=logits, hidden_states=hidden, expert_load=_stack_load(stats), lm_loss=lm_loss,
            mtp_loss=mtp_loss, balance_loss=balance_loss,
        )  # fmt: skip
        return output.to_tuple() if return_dict is False else output

    def mtp_loss(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        stats: list[MoEStats],
        counted: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        output_expert_load: bool = True,
    ) -> torch.Tensor | None:
        """L_MTP = 1/D sum_k CE(P^k_{i}, t_{i+k+1})  (V3 eq. 24-25); the weight lambda is applied by the caller.
        `attention_mask` (B, T): the tokens, as `forward` takes it; `segments` (B, T): the sequences packed in each
        row (`packed_segments`), a position whose token i+k is another sequence's being none of its own;
        `output_expert_load` is `forward`'s."""
        T = input_ids.shape[1]
        depths = [k for k in range(1, len(self.mtp) + 1) if T - k - 1 > 0]
        if not depths:
            return None
        losses = []
        for k in depths:
            n = T - k  # positions i with a token i+k to embed
            depth_counted = None if counted is None else counted[:, k:]  # position i reads token i+k
            depth_segments = None if segments is None else segments[:, :n]
            if segments is not None:  # ... counted only where that token is of its own sequence
                own = depth_segments == segments[:, k:]
                depth_counted = own if depth_counted is None else depth_counted & own
            depth_mask = _attention_of(None if attention_mask is None else attention_mask[:, :n], depth_segments)
            depth_cos, depth_sin = cos[..., :n, :], sin[..., :n, :]  # the first n positions, shared or per row
            embedded = self.embed_tokens(input_ids[:, k:])
            hidden, depth_stats = self.mtp[k - 1](
                hidden[:, :n], embedded, depth_cos, depth_sin, None, depth_counted, depth_mask, depth_segments,
                output_expert_load,
            )  # fmt: skip
            stats += [depth_stats] if depth_stats is not None else []
            depth_targets = _token_targets(labels, attention_mask, segments, k + 1)
            depth_loss, _ = self.head_loss(self.mtp[k - 1].head_input(hidden[:, :-1]), depth_targets)
            losses.append(depth_loss)
        return torch.stack(losses).mean()

    def head_loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, keep_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cross-entropy of the output head on hidden (B, T, D) against targets (B, T') at its first T' <= T
        positions, fused with the head (see head_loss.py); with `keep_logits` also the logits (B, T, V)."""
        B, T, D = hidden.shape
        targets = F.pad(targets, (0, T - targets.shape[1]), value=IGNORE_INDEX)  # positions past T' do not count
        loss, logits = linear_cross_entropy(
            hidden.reshape(B * T, D), self.lm_head.weight, targets.flatten(), keep_logits
        )
        return loss, logits.view(B, T, -1) if logits is not None else None


def _attention_of(attention_mask: torch.Tensor | None, segments: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, 1, T, T) mask of rows padded (`attention_mask`) and packed (`segments`); None (causal) for neither."""
    padded = None if attention_mask is None else attention_mask_of(attention_mask)
    if segments is None:
        return padded
    packed = causal_within(segments)
    return packed if padded is None else padded & packed


def _token_targets(
    labels: torch.Tensor, attention_mask: torch.Tensor | None, segments: torch.Tensor | None, ahead: int
) -> torch.Tensor:
    """The targets of positions 0..T-ahead-1, labels[:, ahead:], with -100 where the position or its target is
    padding (`attention_mask` 0), or where they are two sequences packed in a row (`segments`): a padded or packed
    row's losses are those of each of its sequences alone."""
    targets = labels[:, ahead:]
    if segments is not None:
        targets = targets.masked_fill(segments[:, :-ahead] != segments[:, ahead:], IGNORE_INDEX)
    if attention_mask is None:
        return targets
    tokens = attention_mask.bool()
    return targets.masked_fill(~(tokens[:, :-ahead] & tokens[:, ahead:]), IGNORE_INDEX)


def _stack_load(stats: list[MoEStats]) -> torch.Tensor | None:
    """The MoE layers' expert loads as rows (None without a MoE layer, or where they were not counted)."""
    loads = [s.expert_load for s in stats if s.expert_load is not None]
    return torch.stack(loads) if loads else None
