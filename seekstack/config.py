"""Model configuration with Hugging Face's field names for `deepseek_v2` and `deepseek_v3`, and presets; the
model's generation settings (`GenerationConfig`, its generation_config.json, which seekstack.infer reads).

A `ModelConfig` reads any real DeepSeek-V2/V3 `config.json`: fields it does not set take the upstream
default of its `model_type`; unknown fields are kept so they round-trip through `save_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from seekstack.schema import (
    ConfigError,
    NonNegative,
    NonNegativeFloat,
    Positive,
    PositiveFloat,
    check,
    check_set_fields,
    known_fields,
    recheck,
    require,
    settable_fields,
)

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
ROPE_TYPES = ("default", "linear", "yarn")  # transformers' "dynamic" rescales with the input length: refused
# The fields of a `rope_scaling` that hold numbers (linear reads factor and mscale_all_dim of them); null takes the
# default of those that have one.
ROPE_SCALING_NUMBERS = (
    "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
    "attention_factor",
)  # fmt: skip
SEEKSTACK_ONLY_FIELDS = ("attention_variant",)  # fields transformers does not know; left out of config.json at default
MTP_LOSS_WEIGHT = 0.3  # lambda of the MTP loss early in training (DeepSeek-V3 §4.2); 0.1 later
__all__ = ["ConfigError", "ModelConfig", "preset"]


@dataclass
class ModelConfig:
    """DeepSeek-V2/V3 hyper-parameters. Field names and meanings are those of Hugging Face's configs."""

    model_type: Literal["deepseek_v2", "deepseek_v3"] = "deepseek_v3"
    vocab_size: Positive = 129280
    hidden_size: Positive = 7168
    intermediate_size: Positive = 18432  # dense FFN width (the first `first_k_dense_replace` layers)
    moe_intermediate_size: NonNegative = 2048  # width of one routed or shared expert
    num_hidden_layers: Positive = 61
    num_attention_heads: Positive = 128
    num_key_value_heads: int | None = None  # kept for compatibility; MLA has one latent shared by all heads
    # Multi-head Latent Attention (DeepSeek-V2 §2.1)
    q_lora_rank: Positive | None = 1536  # None: a plain q_proj, no query compression
    kv_lora_rank: Positive = 512  # d_c, width of the cached KV latent
    qk_nope_head_dim: Positive = 128  # per-head query/key width without position
    qk_rope_head_dim: Positive = 64  # decoupled RoPE width, key shared across heads
    v_head_dim: Positive = 128
    # DeepSeekMoE (DeepSeek-V2 §2.2, DeepSeek-V3 §2.1.2)
    n_routed_experts: NonNegative | None = 256
    n_shared_experts: NonNegative | None = 1
    num_experts_per_tok: Positive | None = 8  # K_r, routed experts per token
    first_k_dense_replace: NonNegative = 3  # layers [0, k) use a dense FFN
    moe_layer_freq: Positive = 1  # a layer l >= k is MoE when l % moe_layer_freq == 0 (transformers: every l >= k)
    n_group: Positive | None = 8  # expert groups for group-limited routing
    topk_group: Positive | None = 4  # groups a token may route to
    topk_method: Literal["greedy", "group_limited_greedy", "noaux_tc"] = (
        "noaux_tc"  # greedy | group_limited_greedy (V2) | noaux_tc (V3, bias-corrected)
    )
    scoring_func: Literal["softmax", "sigmoid"] = "sigmoid"  # softmax (V2) | sigmoid (V3)
    norm_topk_prob: bool = True  # renormalise the K_r gate weights to sum to 1
    routed_scaling_factor: PositiveFloat = 2.5
    aux_loss_alpha: NonNegativeFloat = 0.0  # weight of the sequence-wise balance loss (V3 eq. 17-20); 0 disables it
    # Multi-Token Prediction (DeepSeek-V3 §2.2)
    num_nextn_predict_layers: NonNegative = 1
    # Positions
    max_position_embeddings: Positive = 4096  # transformers' default; the V3 release states 163840 (YaRN 40x)
    rope_theta: PositiveFloat = 10000.0
    rope_scaling: dict[str, Any] | None = None  # normalised: {"rope_type": "yarn" or "linear", "factor": ..., ...}
    rope_interleave: bool = True  # DeepSeek checkpoints rotate interleaved pairs (x0,x1),(x2,x3),...
    # Misc
    hidden_act: Literal["silu"] = "silu"  # the only activation DeepSeek uses
    rms_norm_eps: PositiveFloat = 1e-6
    attention_bias: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # seekstack only (not in Hugging Face's configs; written to config.json only when not the default)
    attention_variant: Literal["mla", "3d"] = "mla"  # "3d": MLA + channel gate + temporal conv (model/attention_3d.py)
    # unknown config.json fields, written back on save (kept, not set: no override names it)
    extra: dict[str, Any] = field(default_factory=dict, metadata={"settable": False})

    # ----------------------------------------------------------------- derived quantities
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    @property
    def routing_groups(self) -> tuple[int, int]:
        """(n_group, topk_group) as the router uses them: (1, 1) for greedy routing, which picks among all experts
        whatever the config's group fields say, and for a dense model, which routes nothing (they go unchecked for
        both)."""
        if self.topk_method == "greedy" or not self.n_routed_experts:
            return 1, 1
        return self.n_group, self.topk_group

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block `layer_idx` (MTP blocks continue the numbering) uses DeepSeekMoE."""
        return (
            bool(self.n_routed_experts)
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def moe_layer_count(self) -> int:
        """How many main (non-MTP) layers use DeepSeekMoE; the others hold a dense FFN."""
        return sum(self.is_moe_layer(layer_idx) for layer_idx in range(self.num_hidden_layers))

    @property
    def mtp_moe_blocks(self) -> list[int]:
        """The MTP modules' blocks that use DeepSeekMoE, numbered on from the main layers (the first MTP module's
        block is `num_hidden_layers`); the others hold a dense FFN."""
        first = self.num_hidden_layers
        return [block for block in range(first, first + self.num_nextn_predict_layers) if self.is_moe_layer(block)]

    def transformers_divergences(self) -> dict[str, str]:
        """Field -> what transformers' DeepseekV2/V3 computes instead, for each field whose value here it ignores.

        seekstack honours these fields, so a checkpoint setting any of them gives other logits in transformers.
        """
        found: dict[str, str] = {}
        if self.model_type == "deepseek_v2" and not self.rope_interleave:
            found["rope_interleave"] = "transformers' DeepseekV2 always rotates interleaved pairs"
        if not self.n_routed_experts:
            return found
        if self.model_type == "deepseek_v3":
            if self.scoring_func != "sigmoid":
                found["scoring_func"] = "transformers' DeepseekV3 scores experts with a sigmoid"
            if self.topk_method != "noaux_tc":
                found["topk_method"] = (
                    "transformers' DeepseekV3 always routes with 'noaux_tc' (groups by top-2 sum, selection biased by "
                    "e_score_correction_bias)"
                )
        else:
            if self.scoring_func != "softmax":
                found["scoring_func"] = "transformers' DeepseekV2 scores experts with a softmax"
            if self.topk_method == "noaux_tc":
                found["topk_method"] = "transformers' DeepseekV2 routes only with 'greedy' or 'group_limited_greedy'"
            if self.norm_topk_prob:
                found["norm_topk_prob"] = "transformers' DeepseekV2 never renormalises the top-K gate weights"
        layers = range(self.first_k_dense_replace, self.num_hidden_layers)
        dense_between = [i for i in layers if not self.is_moe_layer(i)]
        if dense_between:
            found["moe_layer_freq"] = (
                "transformers ignores it and makes every layer from first_k_dense_replace="
                f"{self.first_k_dense_replace} on MoE; seekstack, as DeepSeek's V2 code, keeps layers {dense_between} "
                "dense"
            )
        return found

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R), times mscale^2 under YaRN (YaRN paper eq. 22 as DeepSeek applies it; transformers
        applies it under any scaling that gives mscale_all_dim)."""
        scale = self.qk_head_dim**-0.5
        scaling = self.rope_scaling or {}
        if scaling.get("mscale_all_dim"):
            mscale = yarn_mscale(self.rope_factor, scaling["mscale_all_dim"])
            scale *= mscale * mscale
        return scale

    @property
    def rope_factor(self) -> float:
        """The context extension ratio s of YaRN or linear interpolation (1 without scaling)."""
        scaling = self.rope_scaling or {}
        if "factor" in scaling and scaling["factor"] is None:  # YaRN's `factor: null`: inferred as transformers does
            return self.max_position_embeddings / scaling["original_max_position_embeddings"]
        return float(scaling.get("factor", 1.0))

    # ----------------------------------------------------------------- validation
    def __post_init__(self) -> None:
        """ConfigError naming the first field no DeepSeek model can have, and its value, as the config is built (a
        dataclass built in Python checks nothing): each set field against its type and range, then the rules
        across fields."""
        check_set_fields(self)
        self._check_rules()

    def validate(self) -> ModelConfig:
        """This config checked again, as a config file's values are (its types made those of the annotations):
        a field changed in place since it was built is refused by name as one given to the constructor."""
        return recheck(self)

    def _check_rules(self) -> None:
        require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "even (RoPE rotates pairs)")
        require(
            self.model_type != "deepseek_v2" or not self.extra.get("mlp_bias"),
            "mlp_bias",
            "false: transformers' deepseek_v2 then adds a bias to the dense and shared-expert FFNs, which seekstack's "
            "have not (no DeepSeek release sets it)",
        )
        if self.n_routed_experts:
            self._validate_moe()
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported; expected one of {ROPE_TYPES}"
            )
        if self.rope_scaling is not None:
            self._validate_scaling_numbers()
            scaling = self.rope_scaling
            inferred = (
                self.rope_type == "yarn" and "factor" in scaling and "original_max_position_embeddings" in scaling
            )
            require(
                scaling.get("factor") is not None or inferred,
                "rope_scaling.factor",
                f"given under {self.rope_type}: the ratio the context was extended by (40 in DeepSeek-V3's "
                f"config.json); transformers refuses a {self.rope_type} config without it too (a yarn "
                "`factor: null` beside original_max_position_embeddings is max_position_embeddings over it)",
            )
            require(self.rope_factor >= 1, "rope_scaling.factor", ">= 1")

    def _validate_scaling_numbers(self) -> None:
        """ConfigError naming the `rope_scaling` field that holds no number where the scaling computes with one (a
        string, a list, true), or a length or rotation count whose logarithm YaRN cannot take."""
        scaling = self.rope_scaling or {}
        for key in ROPE_SCALING_NUMBERS:
            value = scaling.get(key)
            if value is not None and not _is_number(value):
                raise ConfigError(f"has value {value!r}: must be a number", field=f"rope_scaling.{key}")
        if "original_max_position_embeddings" in scaling:
            context = scaling["original_max_position_embeddings"]
            require(context is not None and context > 0, "rope_scaling.original_max_position_embeddings", "> 0")
        for key in ("beta_fast", "beta_slow"):
            require((scaling.get(key) or 0) >= 0, f"rope_scaling.{key}", ">= 0 (0 or null: the default)")
        if "truncate" in scaling:
            require(isinstance(scaling["truncate"], bool), "rope_scaling.truncate", "true or false")

    def _validate_moe(self) -> None:
        experts, k = self.n_routed_experts, self.num_experts_per_tok
        require(self.moe_intermediate_size > 0, "moe_intermediate_size", "a positive integer")
        if k is None:
            raise ConfigError("num_experts_per_tok is required when n_routed_experts is set")
        require(1 <= k <= experts, "num_experts_per_tok", f"between 1 and n_routed_experts={experts}", k)
        if self.topk_method != "greedy":
            # null was read as 1 (all experts one group); transformers keeps it and its router fails on it
            given = {"n_group": "8; 1 routes over all experts", "topk_group": "4; n_group routes over all"}
            for name in ("n_group", "topk_group"):
                require(
                    getattr(self, name) is not None,
                    name,
                    f"a positive integer for {self.topk_method} routing, which picks topk_group of n_group groups of "
                    f"experts (DeepSeek-V3's config.json gives {given[name]}); transformers' router fails on null too",
                    None,
                )
        groups, topk_group = self.routing_groups  # (1, 1) for greedy: its group fields go unchecked
        require(experts % groups == 0, "n_group", f"a divisor of n_routed_experts={experts}", groups)
        require(1 <= topk_group <= groups, "topk_group", f"between 1 and n_group={groups}", topk_group)
        reachable = topk_group * (experts // groups)
        require(k <= reachable, "num_experts_per_tok", f"<= topk_group x experts per group = {reachable}", k)
        if self.topk_method == "noaux_tc":
            require(
                experts // groups >= 2,
                "n_group",
                "small enough that each group has >= 2 experts (noaux_tc sums a group's top-2)",
                groups,
            )

    # ----------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from a config.json dict; `source` names the file in error messages."""
        model_type = raw.get("model_type")
        if model_type is None:
            raise ConfigError(f"{source}: missing required field 'model_type' (one of {MODEL_TYPES})")
        if model_type not in UPSTREAM_DEFAULTS:
            raise ConfigError(f"{source}: model_type={model_type!r} is not supported; expected one of {MODEL_TYPES}")
        values = dict(UPSTREAM_DEFAULTS[model_type])
        known = {f.name: f for f in dataclasses.fields(cls)}
        extra: dict[str, Any] = {}
        raw = dict(raw)
        for alias, name in FIELD_ALIASES[model_type].items():
            value = raw.pop(alias, None)
            if value is None:  # null: unset, as absent (a null beside the field is no second value)
                continue
            if raw.get(name) not in (None, value):
                raise ConfigError(
                    f"{source}: {alias}={value!r} beside {name}={raw[name]!r}: {alias} is transformers' name for "
                    f"{name} in a {model_type} config, and they differ: give one of them"
                )
            raw[name] = value
        for key, value in raw.items():
            if key in known and key != "extra":
                values[key] = value
            elif key not in DERIVED_FIELDS:
                extra[key] = value
        values["rope_theta"], values["rope_scaling"] = _normalise_rope(raw, values, source)
        quantization = extra.get("quantization_config")
        if quantization is not None and not isinstance(quantization, dict):
            raise ConfigError(
                f"must be an object (its quant_method and settings), got {quantization!r}",
                field="quantization_config",
                source=source,
            )
        try:
            return check(cls, {**values, "extra": extra})
        except ConfigError as error:
            raise error.at(source) from None

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read a config.json; ConfigError naming the file when it is missing, not JSON or not an object."""
        path = Path(path)
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError for binary garbage
            raise ConfigError(f"{path}: not valid JSON ({error}); the file is truncated or damaged") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object of config fields, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """config.json contents readable by transformers 4.x (rope_scaling) and 5.x (rope_parameters), by its own
        DeepseekV2/V3 classes: a release's `auto_map` to its remote code is left out, as that code is not saved."""
        out = dict(self.extra)
        out.pop("quantization_config", None)  # weights we write are never quantized unless asked
        out.pop("auto_map", None)  # a release's remote code (modeling_deepseek.py), which is not written beside them
        for f in dataclasses.fields(self):
            if f.name != "extra" and not (f.name in SEEKSTACK_ONLY_FIELDS and getattr(self, f.name) == f.default):
                out[f.name] = getattr(self, f.name)
        out["n_shared_experts"] = self.n_shared_experts or 0  # none, as transformers' configs take it: an int
        if not self.n_routed_experts:  # dense: an int there too, and transformers makes no layer MoE before
            out.update(n_routed_experts=0, first_k_dense_replace=self.num_hidden_layers)  # first_k_dense_replace
        out["rope_parameters"] = {
            "rope_type": self.rope_type,
            "rope_theta": self.rope_theta,
            **(self.rope_scaling or {}),
        }
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"type": self.rope_type, **self.rope_scaling}
        out["architectures"] = [
            "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
        ]
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed, checked once as it is built (`check`: a field no ModelConfig has is
        refused by name)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return check(ModelConfig, {**values, **changes})


def _is_number(value: Any) -> bool:
    """Whether a config.json value is a JSON number (true and false are not, though Python counts them as ints)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (YaRN paper eq. 22), scaled by `mscale`."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _normalise_rope(raw: dict[str, Any], values: dict[str, Any], source: str) -> tuple[float, dict | None]:
    """Merge the newer `rope_parameters` and the legacy `rope_scaling` dicts into (theta, scaling).

    Where both are given and disagree, `rope_scaling` wins, as in transformers 5.
    """
    theta = raw.get("rope_theta", values.get("rope_theta", 10000.0))
    scaling: dict[str, Any] = {}
    for key in ("rope_parameters", "rope_scaling"):
        given = raw.get(key)
        if given is None:
            continue
        if not isinstance(given, dict):
            raise ConfigError(f"must be an object, got {given!r}", field=key, source=source)
        given = dict(given)
        if "type" in given:
            given["rope_type"] = given.pop("type")
        scaling.update(given)
    theta_field = "rope_parameters.rope_theta" if "rope_theta" in scaling else "rope_theta"
    theta = scaling.pop("rope_theta", theta)
    if not _is_number(theta):
        raise ConfigError(f"has value {theta!r}: must be a number", field=theta_field, source=source)
    rope_type = scaling.pop("rope_type", "default")
    if rope_type == "default":
        return float(theta), None
    return float(theta), {"rope_type": rope_type, **scaling}


# Fields that `to_dict` writes from others, so they are not kept as unknown extras.
DERIVED_FIELDS = ("rope_parameters", "qk_head_dim", "head_dim", "architectures")
# Other names a config.json may give a field, read as the field: transformers' attribute_map of each model_type
# (num_mtp_layers, V3's, is read in a V2 config too)
FIELD_ALIASES: dict[str, dict[str, str]] = {
    "deepseek_v3": {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"},
    "deepseek_v2": {"num_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"},
}

# Defaults of the upstream configurations (transformers' DeepseekV2Config / DeepseekV3Config and the
# DeepSeek release config classes for the fields transformers lacks).
UPSTREAM_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {},
    "deepseek_v2": {
        "model_type": "deepseek_v2",
        "vocab_size": 102400,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "moe_intermediate_size": 1407,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": None,
        "first_k_dense_replace": 0,
        "n_group": None,
        "topk_group": None,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "num_nextn_predict_layers": 0,
        "max_position_embeddings": 2048,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}

_YARN_40X = {
    "rope_type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
}

PRESETS: dict[str, dict[str, Any]] = {
    # ~3M parameters: trains on a 2-core CPU in minutes.
    "tiny": dict(
        model_type="deepseek_v3",
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        max_position_embeddings=1024,
        num_nextn_predict_layers=1,
        routed_scaling_factor=1.0,
    ),  # fmt: skip
    # ~52M parameters (58M with the MTP module).
    "small": dict(
        model_type="deepseek_v3",
        vocab_size=16384,
        hidden_size=384,
        intermediate_size=1024,
        moe_intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=6,
        q_lora_rank=192,
        kv_lora_rank=96,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        max_position_embeddings=2048,
        num_nextn_predict_layers=1,
        routed_scaling_factor=1.0,
    ),  # fmt: skip
    # The released DeepSeek-V2-Lite config.json (15.7B total, 2.4B activated).
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2",
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        topk_method="greedy",
        scoring_func="softmax",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        max_position_embeddings=163840,
        bos_token_id=100000,
        eos_token_id=100001,
        rope_scaling={**_YARN_40X, "mscale": 0.707, "mscale_all_dim": 0.707},
        num_nextn_predict_layers=0,
    ),  # fmt: skip
    # The released DeepSeek-V3 config.json (671B total, 37B activated, plus one 14B MTP module).
    "deepseek-v3": dict(
        model_type="deepseek_v3",
        max_position_embeddings=163840,
        rope_scaling={**_YARN_40X, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset (`tiny`, `small`, `deepseek-v2-lite`, `deepseek-v3`), optionally overridden; ConfigError
    naming an override that is no ModelConfig field (a config.json's unknown keys are kept in `extra`, a typo here
    would be too, and the field it meant left at the preset's value)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    known = settable_fields(ModelConfig)
    for override in overrides:
        if override not in known:
            raise ConfigError(f"ModelConfig has no field {override!r}; {known_fields(override, known)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides}, source=f"preset {name!r}")


# transformers' GenerationConfig fields a generation_config.json may leave unset: read as None from a GenerationConfig
TRANSFORMERS_FIELDS = frozenset({
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "early_stopping", "max_time", "stop_strings",
    "do_sample", "num_beams", "use_cache", "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
    "no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores", "output_logits",
    "return_dict_in_generate", "pad_token_id", "bos_token_id", "eos_token_id", "transformers_version",
})  # fmt: skip


class GenerationConfig(dict[str, Any]):
    """A checkpoint's generation settings (its generation_config.json), as transformers' model.generation_config is
    read: each key an attribute too (`model.generation_config.max_new_tokens`; a transformers field the file leaves
    unset reads None, where the engine's own default applies), set by attribute or key alike (what the engine built on
    the model and save_pretrained then read), `to_dict()` a plain dict."""

    def __getattr__(self, name: str) -> Any:
        if name in self:
            return self[name]
        if name in TRANSFORMERS_FIELDS:
            return None
        raise AttributeError(
            f"generation config has no field {name!r}: it holds {', '.join(self) or 'none'}, and any of transformers' "
            "GenerationConfig fields reads None where unset"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        self.pop(name, None)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict, as transformers' GenerationConfig.to_dict gives them."""
        return dict(self)
