"""The LoRA settings of an adapter, and the peft `LoraConfig` they make for a model.

LoRA (Hu et al. 2021): a frozen weight W gains a trainable low-rank update, W x + (alpha / r) B A x, with
A (r, in) random and B (out, r) zero at the start, so training starts from the base model exactly.

Targets. Attention projections are `nn.Linear` modules and are targeted as modules (peft's `lora.Linear`). The
feed-forward weights are targeted as parameters (peft's `target_parameters`, `lora.ParamWrapper`): the routed
experts because they are stacked 3-D parameters (E, out, in), one LoRA pair per expert; the dense FFNs and shared
experts because peft, under transformers 5, rewrites any *module* target named gate_proj/up_proj/down_proj of a
`deepseek_v3` model into the fused routed experts (its v4 -> v5 conversion), which would drop those layers from the
adapter. peft's ParamWrapper refuses dropout, so `dropout` > 0 needs `feed_forward` and `experts` empty.
Targets are listed by full name per main layer (`layers.3.self_attn.o_proj`): the MTP module stays untouched, and
peft matches the names as suffixes, so the same adapter_config.json selects the same layers in `transformers`.
The token embedding and the output head (`vocabulary`) are module targets (peft's lora.Embedding and lora.Linear).
The fused head + loss (model/head_loss.py) reads lm_head.weight instead of calling the head, so the adapted head's
`weight` is W + alpha/r B A (files.py, `FusedHeadLoRA`): the loss trains what the logits use.

Further options, measured on a code -> prose shift in bench/lora_domain.py:
- `rslora`: rank-stabilized LoRA (Kalajdzievski 2023), the update scaled by alpha / sqrt(r) instead of alpha / r,
  so a larger rank is not damped (peft's use_rslora).
- `head_tokens`: the output head's rows of the N most frequent tokens of the training data train in full, beside
  the low-rank targets (peft's trainable_token_indices on lm_head: N x D parameters). A domain shift moves the
  scores of the new domain's frequent tokens most, and a full row per such token is worth more there than a
  rank-r update spread over the whole vocabulary. It excludes `lm_head` from `vocabulary` (peft wraps a module one
  way). Served beside other adapters, each row adds its own adapter's rows (adapters/multi.py, `MultiTokenRows`).
- `embedding_tokens`: the token embedding's rows of the N most frequent training tokens train in full too (peft's
  trainable_token_indices on embed_tokens), the input side of `head_tokens`; excludes `embed_tokens` from
  `vocabulary`. On that shift, 150 of the best variant's 311 head rows moved to the embedding gain 2 points over
  3 seeds at lr 7e-3 (`head_tokens161_embedding150_ffn0_r8`, bench/lora_domain.py). The best under 2% puts them
  beside a LoRA on the head instead of head rows: rank 3 on `lm_head` and on every dense FFN / shared expert's gate
  and up, 215 embedding rows, 90.1% of the full fine-tune's gain over 3 seeds, 88.6% over 9 (EVA's recipe below:
  87.2%; `embedding215_head_r3_ffn_r3`, 1.970%): the head's rows outside the trained ones move together, in a few
  directions, which a low-rank update follows and rows cannot. On a base whose blocks hold more of the gain, the
  down projections at the same rank too, 192 rows (`embedding192_head_r3_ffnall_r3`, 1.995%), recover 1.5 points
  more of it over 9 seeds, better on 7.
- `layers`: the main layers whose attention, feed_forward and experts targets adapt (all by default), to spend a
  small budget where it counts: on that shift, the first layer's dense FFN (gate and up, which read the token's
  embedding) beside the head rows (`head_tokens311_ffn0_r8`).
- `init`: how A and B start. `lora`: A random, B = 0. `pissa` (Meng et al. 2024): B A is W's top-r singular part
  (from its SVD), `olora` (Büyükakyüz 2024): from W's QR decomposition; both train on the residual base
  W - alpha/r B0 A0, and the saved adapter is converted to plain LoRA on the original W, the trained factors beside
  the initial ones ([A; A0] and [B, -B0], rank 2r, alpha 2 alpha: peft's `path_initial_model_for_weight_conversion`
  conversion). Module targets and dense FFNs only: peft does not decompose embeddings or stacked experts.
  `eva` (Paischer et al. 2024, peft's EVA): A holds the top-r right singular vectors of each adapted layer's inputs
  on the run's first training batches (B = 0, so the start is still the base), `eva_rho` > 1 lets peft redistribute
  the ranks, at the same total, to the layers whose inputs' explained variance is largest (the saved config gets
  the `rank_pattern`). Attention and dense FFNs only: peft's EVA skips embeddings, stacked experts hold one pair per
  expert, and beside a head LoRA EVA did not pay (its start on the FFN factors 89.0% against 90.3% on one seed; on the
  head too 88.8% against 90.1% over 3 seeds, bench/lora_domain.py). On that shift it
  makes small ranks on every layer's FFN pay: rank 3 (eva_rho 4) on every dense FFN / shared expert's gate and up
  beside 161 head and 150 embedding rows recovers 88.2% of the full fine-tune's gain over 3 seeds (86.7% over 5),
  against 86.6% (85.3%) from the plain start and 85.5% (85.0%) for `head_tokens161_embedding150_ffn0_r8`
  (`head_tokens161_embedding150_ffn_r3_eva_rho4`, bench/lora_domain.py).
- `dora`: weight-decomposed LoRA (Liu et al. 2024, peft's use_dora): a trained magnitude per output row beside the
  low-rank direction update. Module targets only (peft's ParamWrapper refuses it), not the fused head (which reads
  `weight`, not DoRA's rescaled output); merged rather than served beside other adapters.
- `loraplus_ratio`: LoRA+ (Hayou et al. 2024): B's learning rate is this multiple of A's (peft's
  create_loraplus_optimizer; here a per-parameter `lr_scale` the trainer's optimizer groups read).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from annotated_types import Interval

from seekstack.config import ModelConfig
from seekstack.schema import NonNegative, Positive, PositiveFloat, load_config, recheck, require, write_config

if TYPE_CHECKING:
    import peft

CONFIG_FILE = "lora_config.json"  # the run's AdapterConfig, beside train_config.json
ATTENTION = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
QUERY = ATTENTION[:3]  # a base has q_proj, or q_a_proj and q_b_proj (q_lora_rank): base_query
FEED_FORWARD = ("gate_proj", "up_proj", "down_proj")
EXPERTS = ("gate_up_proj", "down_proj")
VOCABULARY = ("embed_tokens", "lm_head")
# Where a LoRA run differs from pretraining's defaults: the routing biases belong to the frozen base (no bias
# update), no weight decay on the low-rank factors, a short warmup, a higher learning rate (bench/lora_domain.py:
# 1e-2 beat 3e-3) and less of Adam's momentum: beta1 0.5 where pretraining's is 0.9 (bench/lora_domain.py: its best
# adapter under 2% recovers more of a full fine-tune's gain on every seed).
LORA_BETAS = "betas=[0.5,0.95]"
LORA_DEFAULTS = ("lr=1e-2", "min_lr=1e-3", "warmup_steps=10", "weight_decay=0.0", "bias_update_rate=0.0", LORA_BETAS)
ADAPTER_NAME = re.compile(r"[\w.:@/+-]+")  # what an adapter may be called (it becomes a model id a key may name)
TARGETS_BY_KIND = (
    "LoRA targets are given by kind here: lora.attention (" + ", ".join(ATTENTION) + "), lora.feed_forward ("
    + ", ".join(FEED_FORWARD) + "), lora.experts (" + ", ".join(EXPERTS) + ") and lora.vocabulary ("
    + ", ".join(VOCABULARY) + ")"
)  # fmt: skip


@dataclass
class AdapterConfig:
    """Rank, scale, dropout and targets of a LoRA adapter (`lora.FIELD=VALUE` on `seekstack lora train`)."""

    # what to say of peft's LoraConfig names and TRL's (its ModelConfig's --lora_r ...) that are none of these fields,
    # given as lora.NAME or as a training key (schema.known_fields)
    field_notes: ClassVar[dict[str, str]] = {
        "r": "peft's r is lora.rank here",
        "lora_r": "TRL's lora_r is lora.rank here",
        "lora_alpha": "lora_alpha is lora.alpha here",
        "lora_dropout": "lora_dropout is lora.dropout here",
        "target_modules": TARGETS_BY_KIND,
        "lora_target_modules": TARGETS_BY_KIND,
        "use_rslora": "use_rslora is lora.rslora here",
        "use_dora": "use_dora is lora.dora here",
        "init_lora_weights": "init_lora_weights is lora.init here (lora, pissa, olora or eva)",
        "layers_to_transform": "layers_to_transform is lora.layers here",
        "trainable_token_indices": "trainable_token_indices are lora.head_tokens and lora.embedding_tokens here, the "
        "output head's and token embedding's rows of the N most frequent training tokens",
        "use_peft": "lora train always trains a LoRA adapter (TRL's use_peft=true)",
        "modules_to_save": "peft's modules_to_save (whole modules trained beside the adapter) is not offered: "
        "lora.head_tokens and lora.embedding_tokens train the output head's and token embedding's rows of the N most "
        "frequent training tokens in full, and lora.vocabulary gives the head and embedding LoRA",
        "bias": "peft's bias (biases trained beside the adapter) is not offered: the adapter trains none (peft's "
        'bias="none"), and the base\'s projections have none',
        "lora_bias": "peft's lora_bias (a bias on each B factor) is not offered",
    }
    rank: Positive = 8  # r
    alpha: PositiveFloat = 16.0  # the update is scaled by alpha / r
    # on the adapted layers' inputs; only with feed_forward and experts empty (see above); 1 would zero every update
    dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.0
    attention: tuple[str, ...] = ATTENTION  # MLA projections to adapt (q_proj or q_a/q_b_proj, whichever exist)
    feed_forward: tuple[str, ...] = FEED_FORWARD  # projections of the dense FFNs and shared experts
    experts: tuple[str, ...] = EXPERTS  # stacked parameters of the routed experts
    vocabulary: tuple[str, ...] = ()  # the token embedding and/or the output head
    rslora: bool = False  # scale the update by alpha / sqrt(r) (rsLoRA) instead of alpha / r
    head_tokens: NonNegative = 0  # output-head rows of the N most frequent training tokens trained in full
    embedding_tokens: NonNegative = 0  # token-embedding rows of the N most frequent training tokens trained in full
    layers: tuple[int, ...] = ()  # main layers whose attention, feed_forward and experts adapt; () = all
    init: Literal["lora", "pissa", "olora", "eva"] = "lora"  # how A and B start (see above)
    eva_rho: PositiveFloat = 1.0  # init=eva: a layer's rank can grow to rank x this, at the same total rank
    dora: bool = False  # DoRA: a trained magnitude per output row of each adapted module
    loraplus_ratio: PositiveFloat = 1.0  # LoRA+: B's learning rate is lr x this

    def validate(self) -> AdapterConfig:
        config = recheck(self)
        for name, known in (
            ("attention", ATTENTION), ("feed_forward", FEED_FORWARD), ("experts", EXPERTS), ("vocabulary", VOCABULARY)
        ):  # fmt: skip
            given = list(getattr(config, name))
            unknown = sorted(set(given) - set(known))
            require(not unknown, name, f"a subset of {', '.join(known)} (not {', '.join(unknown)})")
            require(len(set(given)) == len(given), name, f"distinct names (not {given})")  # each adapts one module
        require(
            config.dropout == 0 or not (config.feed_forward or config.experts),
            "dropout",
            "0 when lora.feed_forward or lora.experts are adapted (peft's parameter targets refuse dropout); "
            "set lora.feed_forward=[] lora.experts=[] for an attention-only adapter with dropout",
        )
        require(
            not (config.head_tokens and "lm_head" in config.vocabulary),
            "head_tokens",
            "0 when lm_head is in lora.vocabulary (the head's rows train in full or the head gets LoRA, not both)",
        )
        require(
            not (config.embedding_tokens and "embed_tokens" in config.vocabulary),
            "embedding_tokens",
            "0 when embed_tokens is in lora.vocabulary (the embedding's rows train in full or it gets LoRA, not both)",
        )
        require(
            bool(config.attention or config.feed_forward or config.experts or config.vocabulary),
            "attention",
            "at least one LoRA target among lora.attention, lora.feed_forward, lora.experts and lora.vocabulary",
        )
        require(
            config.init not in ("pissa", "olora") or not (config.experts or "embed_tokens" in config.vocabulary),
            "init",
            "not pissa or olora when lora.experts or embed_tokens (lora.vocabulary) are adapted (they decompose 2-D "
            "Linear weights only); set lora.experts=[] and keep embed_tokens out of lora.vocabulary",
        )
        require(
            not config.dora or not (config.feed_forward or config.experts or "lm_head" in config.vocabulary),
            "dora",
            "false when lora.feed_forward, lora.experts or lm_head (lora.vocabulary) are adapted (peft's parameter "
            "targets refuse DoRA, and the fused head + loss reads the head's weight, not DoRA's rescaled output)",
        )
        require(
            config.init == "lora" or not config.dora, "dora", f"false with lora.init={config.init!r} (one or other)"
        )
        require(
            config.init != "eva" or not (config.experts or config.vocabulary),
            "init",
            "not 'eva' when lora.experts or lora.vocabulary are adapted (EVA starts attention and dense FFN factors); "
            "set lora.experts=[] lora.vocabulary=[] (lora.head_tokens and lora.embedding_tokens rows are fine)",
        )
        require(config.eva_rho >= 1, "eva_rho", f"at least 1 (not {config.eva_rho})")
        require(
            config.eva_rho == 1 or config.init == "eva",
            "eva_rho",
            f"1 unless lora.init=eva (lora.init={config.init!r})",
        )
        layers = list(config.layers)
        require(
            len(set(layers)) == len(layers) and min(layers, default=0) >= 0,
            "layers",
            f"distinct main layer numbers, from 0 (not {layers})",
        )
        return config

    def save(self, folder: str | Path) -> Path:
        return write_config(self, Path(folder) / CONFIG_FILE)

    @classmethod
    def load(cls, folder: str | Path) -> AdapterConfig:
        return load_config(cls, Path(folder) / CONFIG_FILE).validate()

    def peft_config(
        self, model_config: ModelConfig, head_token_ids: Sequence[int] = (), embedding_token_ids: Sequence[int] = ()
    ) -> peft.LoraConfig:
        """The peft LoraConfig adapting the main layers of a model with `model_config` (not its MTP module);
        `head_token_ids` / `embedding_token_ids`: the `head_tokens` / `embedding_tokens` ids whose output-head /
        token-embedding rows train (data.py)."""
        from peft import EvaConfig, LoraConfig

        for field, ids, rows in (
            ("head_tokens", head_token_ids, "head's"), ("embedding_tokens", embedding_token_ids, "embedding's")
        ):  # fmt: skip
            count = getattr(self, field)
            require(len(ids) == count, field, f"{count} token ids for the {rows} trainable rows (got {len(ids)})")
        token_rows = {"lm_head": head_token_ids, "embed_tokens": embedding_token_ids}
        modules, parameters = self.targets(model_config)
        require(
            bool(modules or parameters),
            "layers",
            f"main layers with at least one of the adapted targets (lora.layers {list(self.layers)} have none of them)",
        )
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=modules or None,
            target_parameters=parameters or None,
            use_rslora=self.rslora,
            init_lora_weights=True if self.init == "lora" else self.init,
            eva_config=EvaConfig(rho=self.eva_rho) if self.init == "eva" else None,
            use_dora=self.dora,
            trainable_token_indices={name: [int(i) for i in ids] for name, ids in token_rows.items() if ids} or None,
            bias="none",
        )

    def targets(self, model_config: ModelConfig) -> tuple[list[str], list[str]]:
        """(module names, parameter names) to adapt, in seekstack's names, which are suffixes of transformers'."""
        count = model_config.num_hidden_layers
        outside = sorted(layer for layer in self.layers if layer >= count)
        require(not outside, "layers", f"main layer numbers below {count}, the model's layers (not {outside})")
        modules, parameters = list(self.vocabulary), []
        query = base_query(model_config)
        named = foreign_query(self.attention, model_config)
        require(
            not named,
            "attention",
            f"projections this base has: its query is {' and '.join(query)} (q_lora_rank "
            f"{model_config.q_lora_rank}), not {' and '.join(named)}",
        )  # as peft refuses a target module the model has not; the default names both, for either kind of base
        for layer in self.layers or range(count):
            prefix = f"layers.{layer}"
            for name in self.attention:
                if name in query or name not in QUERY:
                    modules.append(f"{prefix}.self_attn.{name}")
            if not model_config.is_moe_layer(layer):
                parameters += [f"{prefix}.mlp.{name}.weight" for name in self.feed_forward]
                continue
            if model_config.n_shared_experts:
                parameters += [f"{prefix}.mlp.shared_experts.{name}.weight" for name in self.feed_forward]
            parameters += [f"{prefix}.mlp.experts.{name}" for name in self.experts]
        return modules, parameters

    def as_trained(self, model_config: ModelConfig) -> tuple[AdapterConfig, list[str]]:
        """The settings a run saved, as its adapter was trained on a base of `model_config`, and a note of each
        change: settings an earlier seekstack took and this one refuses (`validate`, `targets`), which a resume goes
        on with as they trained: a name given twice in lora.attention, lora.feed_forward, lora.experts or
        lora.vocabulary once (peft adapted the module once), and lora.attention's query projections left out where it
        names none the base has (they were dropped: q_proj of a base with q_lora_rank)."""
        changes, notes = {}, []
        for name in ("attention", "feed_forward", "experts", "vocabulary"):
            given = getattr(self, name)
            kept = tuple(dict.fromkeys(given))
            rules = ["a name once"] if kept != given else []
            if name == "attention" and foreign_query(kept, model_config):
                kept = tuple(target for target in kept if target not in QUERY)  # the query projections targets refuses
                rules.append("the base's projections alone")
            if rules:
                changes[name] = kept
                notes.append(
                    f"lora.{name}={list(given)} is refused by this seekstack, but the run's adapter was trained on "
                    f"{list(kept)} ({', '.join(rules)}): the resume goes on with that"
                )
        return replace(self, **changes), notes


def base_query(model_config: ModelConfig) -> tuple[str, ...]:
    """The query projections a base of `model_config` has: q_proj, or q_a_proj and q_b_proj with q_lora_rank."""
    return ("q_proj",) if model_config.q_lora_rank is None else ("q_a_proj", "q_b_proj")


def foreign_query(attention: Sequence[str], model_config: ModelConfig) -> list[str]:
    """The query projections `attention` names where it names none a base of `model_config` has; [] otherwise."""
    named = [name for name in attention if name in QUERY]
    return named if named and not any(name in base_query(model_config) for name in named) else []
