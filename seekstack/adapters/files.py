"""Adapters on disk in peft's format, and merged into a plain checkpoint.

    ADAPTER/adapter_config.json        peft's LoraConfig (r, lora_alpha, target_modules, target_parameters, ...)
    ADAPTER/adapter_model.safetensors  base_model.model.{transformers module}.lora_{A,B}.weight
                                       (an embedding's: base_model.model.model.embed_tokens.lora_embedding_{A,B};
                                       head_tokens' rows: base_model.model.lm_head.token_adapter.trainable_tokens_delta)

The tensor keys name transformers' modules (`model.layers.0.self_attn.q_a_proj`), translated from ours by the one key
mapping of `seekstack.checkpoint` (`checkpoint_key`), so `peft.PeftModel.from_pretrained` loads the adapter on the
`transformers` DeepseekV3ForCausalLM of the base. A parameter target wraps its module once per parameter (peft's
nested ParamWrapper), which adds `.base_layer` before `lora_A` for all but the outermost; the nesting is the same on
both sides, so that part of the key is kept as it is. The config names modules as peft matched them on whichever
model made the adapter; it is read as on transformers' model (seekstack/adapters/peft_targets.py).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from safetensors.torch import save_file

from seekstack.adapters.config import AdapterConfig
from seekstack.adapters.peft_targets import config_for_seekstack, quiet_parameter_patterns
from seekstack.atomic import atomic_directory, refuse_to_replace, staged_files
from seekstack.checkpoint import (
    CONFIG_FILE,
    MODEL_FOLDER_FILES,
    CheckpointError,
    checkpoint_key,
    load_pretrained,
    read_json_object,
    read_safetensors,
    refuse_hf_export,
    write_pretrained_files,
)
from seekstack.compress.linear import QuantizedWeight
from seekstack.config import ModelConfig
from seekstack.model.transformer import Transformer
from seekstack.schema import shown_value
from seekstack.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from seekstack.tokenizer import TOKENIZER_FILE
from seekstack.train.runs import run_checkpoint

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_ADAPTER_WEIGHTS_FILE = "adapter_model.bin"  # peft's save_pretrained(safe_serialization=False)
PEFT_PREFIX = "base_model.model."  # what peft puts before the base model's module names
ADAPTER_KEY = re.compile(
    r"(?P<module>.+?)(?P<lora>(\.base_layer)*\.lora_([AB]\.weight|embedding_[AB]|magnitude_vector)"
    r"|\.token_adapter\.trainable_tokens_delta)"
)
LORA_FACTOR = re.compile(r"\.lora_(embedding_)?(?P<factor>[AB])\.")  # in peft's parameter names, `.lora_A.default`
# peft's save_embedding_layers: the base's head or embedding weight, saved beside a LoRA on it (`.base_layer`) or,
# where the adapter leaves it alone, whole (peft saves it so when the vocabulary was resized, or when asked)
BASE_LAYER_COPY = re.compile(r"(?P<module>.+?)\.base_layer\.weight|(?P<whole>model\.embed_tokens|lm_head)\.weight")
UNSUPPORTED_OPTIONS = {  # peft's LoraConfig fields seekstack refuses, and what they add
    "lora_bias": "a trained bias on each lora_B; seekstack's adapted layers have no bias to merge it into",
    "modules_to_save": "whole modules trained in full beside the LoRA factors",
    "alora_invocation_tokens": "activated LoRA: the update applies only from an invocation sequence of tokens on",
    "layer_replication": "a deeper model made of repeated layers of the base",
    "kasa_config": "KaSA: the base weight's smallest singular directions cut off, a trained diagonal between A and B",
    "velora_config": "VeLoRA: grouped projections of the input activations saved beside the factors",
    "monteclora_config": "MonteCLoRA: learned Monte Carlo perturbations of the factors",
    "arrow_config": "Arrow: a per-token routing among several task adapters",
}
NUMBER_FIELDS = {  # peft's LoraConfig number fields, their JSON type (true and false are not numbers), what they are
    # and the field that maps module names to their own value of it
    "r": (int, "an integer (the rank)", "rank_pattern"),
    "lora_alpha": ((int, float), "a finite number (the scale is alpha/r)", "alpha_pattern"),
    "lora_dropout": ((int, float), "a finite number", None),
}
ADAPTER_PARAMETERS = (".lora_", ".trainable_tokens_delta")  # what names an adapter's own parameters


@functools.cache
def _fused_head_class() -> type:
    """peft's lora.Linear whose `weight` is the adapted W + alpha/r B A, for the output head: the fused head + loss
    (model/head_loss.py) reads the head's weight rather than calling it, and so trains and scores the adapted head."""
    from peft.tuners.lora import Linear

    class FusedHeadLoRA(Linear):
        @property
        def weight(self) -> torch.Tensor:
            base = self.get_base_layer().weight
            if self.merged or self.disable_adapters or not self.active_adapters:
                return base
            return base + sum(self.get_delta_weight(name) for name in self.active_adapters if name in self.lora_A)

    return FusedHeadLoRA


@functools.cache
def _fused_head_tokens_class() -> type:
    """peft's TrainableTokensWrapper whose `weight` is the head's weight with the trained rows in place
    (`head_tokens`), for the fused head + loss as `_fused_head_class`."""
    from peft.utils.other import TrainableTokensWrapper

    class FusedHeadTokens(TrainableTokensWrapper):
        @property
        def weight(self) -> torch.Tensor:
            rows = self.token_adapter
            if rows.merged or rows.disable_adapters or not rows.active_adapters:
                return rows.base_layer.weight
            return rows.get_merged_weights(rows.active_adapters)

    return FusedHeadTokens


def _fuse_head(peft_model: PeftModel) -> PeftModel:
    """Make an adapted output head of `peft_model` give its adapted weight to the fused loss (`_fused_head_class`,
    `_fused_head_tokens_class`)."""
    from peft.tuners.lora import Linear
    from peft.utils.other import TrainableTokensWrapper

    model = peft_model.get_base_model()
    if isinstance(model.lm_head, Linear):
        model.lm_head.__class__ = _fused_head_class()
    elif isinstance(model.lm_head, TrainableTokensWrapper):
        model.lm_head.__class__ = _fused_head_tokens_class()
    return peft_model


def apply_lora(
    model: Transformer,
    config: AdapterConfig,
    base_path: str | Path = "",
    head_token_ids: Sequence[int] = (),
    embedding_token_ids: Sequence[int] = (),
) -> PeftModel:
    """`model` under peft with fresh LoRA weights (B = 0: the output is the base model's) and, with `head_tokens` /
    `embedding_tokens`, the head's rows of `head_token_ids` / the embedding's of `embedding_token_ids`; only they
    train."""
    from peft import get_peft_model

    peft_config = config.validate().peft_config(model.config, head_token_ids, embedding_token_ids)
    peft_model = get_peft_model(model, peft_config)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_path) or None  # recorded in the adapter
    return _fuse_head(peft_model)


def save_adapter(model: PeftModel, folder: str | Path, initial: dict[str, torch.Tensor] | None = None) -> None:
    """adapter_config.json and adapter_model.safetensors into the existing `folder` (the caller makes it atomic).

    `initial`: the factors a PiSSA/OLoRA run started from (`adapter_state`), whose base holds W - s B0 A0; the
    adapter is saved as plain LoRA on the original W: s B A - s B0 A0 = s [B, -B0] [A; A0], rank 2r at the same
    scale (peft's `path_initial_model_for_weight_conversion`)."""
    folder = Path(folder)
    layers = model.get_base_model().config.num_hidden_layers
    tensors = {}
    for key, tensor in adapter_state(model).items():
        if initial is not None and ".lora_A." in key:
            tensor = torch.cat([tensor, initial[key]], dim=0)
        elif initial is not None and ".lora_B." in key:
            tensor = torch.cat([tensor, -initial[key]], dim=1)
        tensors[_file_key(key, layers, folder)] = tensor.detach().to("cpu").contiguous()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config["default"])
    config.task_type = "CAUSAL_LM"  # as TRL saves it: peft's AutoPeftModelForCausalLM loads the folder by it alone
    for name in ("target_modules", "target_parameters"):  # sets in peft, saved in their hash order: sorted, so the
        if isinstance(getattr(config, name), set):  # same run writes the same adapter_config.json
            setattr(config, name, sorted(getattr(config, name)))
    if initial is not None:  # rsLoRA's scale alpha/sqrt(r) stays the same with alpha x sqrt(2)
        config.init_lora_weights, config.r = True, 2 * config.r
        config.lora_alpha *= 2**0.5 if config.use_rslora else 2
    config.save_pretrained(str(folder))


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors by peft's state-dict keys (`base_model.model.layers.0...lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, save_embedding_layers=False)


def load_adapter(model: Transformer, folder: str | Path, weightless: bool = False) -> PeftModel:
    """`model` under peft with the adapter saved in `folder`; CheckpointError naming the file when it does not fit.
    A `weightless` model (on the meta device) is given the adapter's own tensors."""
    return _wrapped(model, Path(folder), _fitting_lora_config(model, folder), weightless)


def _fitting_lora_config(model: Transformer, folder: str | Path) -> LoraConfig:
    """The peft config of the adapter in `folder`, refused (CheckpointError naming the file) where the adapter does
    not fit `model` as far as that is known before peft wraps it: no weights, a quantized base, token ids outside the
    vocabulary."""
    folder = Path(folder)
    config = read_lora_config(folder)  # its own errors name what is wrong with the folder or the file
    adapter_weights(folder)
    refuse_quantized_base(model, folder)
    refuse_token_ids_outside_vocabulary(config, model.config.vocab_size, folder)
    return config


def _wrapped(model: Transformer, folder: Path, config: LoraConfig, weightless: bool) -> PeftModel:
    """`model` under peft with the adapter in `folder`, whose config (_fitting_lora_config) is `config`."""
    from peft import get_peft_model

    try:
        config = config_for_seekstack(config, model.config)
        with quiet_parameter_patterns(), torch.device("meta") if weightless else contextlib.nullcontext():
            peft_model = get_peft_model(model, config)  # not low_cpu_mem_usage, which is process-wide (peft_targets)
    except (TypeError, ValueError) as error:  # peft checks a config's fields against the model only here
        raise CheckpointError(
            f"{folder / ADAPTER_CONFIG_FILE}: peft cannot apply this adapter config to the base model ({error})"
        ) from None
    try:
        restore_adapter(peft_model, folder, weightless)
    except BaseException:
        peft_model.unload()  # peft's layers out again: the caller's model as it was
        raise
    return _fuse_head(peft_model).eval()


def adapter_weights(folder: Path) -> Path:
    """The adapter's weights file in `folder`; CheckpointError naming the folder, and what to do, when it has none."""
    weights = folder / ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS_FILE}; {_weights_hint(folder)}")
    return weights


def _weights_hint(folder: Path) -> str:
    """What to do about an adapter folder without ADAPTER_WEIGHTS_FILE: re-save the pickled weights peft writes with
    safe_serialization=False, which seekstack does not read (unpickling can run code), or give the weights."""
    if (folder / PICKLED_ADAPTER_WEIGHTS_FILE).is_file():
        return (
            f"it holds {PICKLED_ADAPTER_WEIGHTS_FILE} (peft's save_pretrained(safe_serialization=False)), a pickle, "
            "which seekstack does not read (unpickling can run code); re-save the adapter with peft's default "
            f"safe_serialization=True, or write its tensors with safetensors' save_file to {ADAPTER_WEIGHTS_FILE}"
        )
    return f"an adapter folder holds {ADAPTER_CONFIG_FILE} and weights"


def weightless_adapter(config: ModelConfig, folder: str | Path) -> PeftModel:
    """The adapter in `folder` on a weightless (meta device) model with `config`: its factors, or `load_adapter`'s
    CheckpointError when it does not fit, without the base's weights (minutes to read for a large one)."""
    with torch.device("meta"):
        skeleton = Transformer(config)
    return load_adapter(skeleton, folder, weightless=True)


def refuse_token_ids_outside_vocabulary(config: LoraConfig, vocab_size: int, folder: str | Path) -> None:
    """CheckpointError naming the adapter's config file when its trainable_token_indices (peft's token rows: a list
    for the embedding, or ids per module) hold an id outside a vocabulary of `vocab_size` tokens: the adapter was made
    on a base with more tokens (a resized vocabulary), whose rows this base does not have."""
    indices = config.trainable_token_indices or {}
    for module, ids in (indices if isinstance(indices, dict) else {"embed_tokens": indices}).items():
        outside = sorted(token for token in ids if not 0 <= token < vocab_size)
        if outside:
            raise CheckpointError(
                f"{Path(folder) / ADAPTER_CONFIG_FILE}: trainable_token_indices of {module!r} hold token ids "
                f"{outside[:5]}{' ...' if len(outside) > 5 else ''} outside this base's vocabulary of {vocab_size} "
                "tokens: the adapter was made on a base with a larger (resized) vocabulary"
            )


def refuse_quantized_base(model: torch.nn.Module, folder: str | Path) -> None:
    """CheckpointError naming the adapter `folder` when `model` holds quantized layers (seekstack.compress), which
    adapters are not applied to yet."""
    scheme = next((m.scheme for m in model.modules() if isinstance(m, QuantizedWeight)), None)
    if scheme is not None:
        raise quantized_base_error(folder, scheme)


def quantized_base_error(where: str | Path, scheme: str) -> CheckpointError:
    """The refusal of a base quantized as `scheme` (int8, int4, fp8), naming `where` (the adapter or the base)."""
    return CheckpointError(
        f"{where}: the base model is quantized ({scheme}), and adapters are not applied to quantized layers yet; "
        "use the float checkpoint it was quantized from, or merge the adapter into that (`seekstack lora merge`) "
        "and quantize the result"
    )


def _is_number(value: object, types: type | tuple[type, ...]) -> bool:
    """Whether `value`, read from JSON, is one of `types` and finite: true and false are no numbers, and Python's JSON
    reads NaN and Infinity, which would make every logit of the adapter's requests NaN. An integer past float's range
    (JSON's 400 digits) is none either: the comparison, exact for ints, holds for no NaN."""
    return isinstance(value, types) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


def read_lora_config(folder: str | Path) -> LoraConfig:
    """peft's LoraConfig saved in `folder`; CheckpointError naming the file when it is missing, damaged or holds a
    field peft refuses. A folder that holds no LoRA config is refused before peft is imported (seconds, which the
    first `/v1/load_lora_adapter` of a mistyped path waited)."""
    path = Path(folder) / ADAPTER_CONFIG_FILE
    if not Path(folder).is_dir():
        what = "is a file, not" if Path(folder).exists() else "does not exist; give"
        raise CheckpointError(f"{folder} {what} an adapter folder ({ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE})")
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG_FILE}; an adapter folder holds it and the weights")
    raw = read_json_object(path)  # names the file when it is not valid JSON
    kind = raw.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(
            f"{path}: peft_type {kind!r}, not LoRA: seekstack trains, merges and serves LoRA adapters"
        )
    for field, (types, what, pattern) in NUMBER_FIELDS.items():  # peft takes any JSON value, then fails naming none
        value, values = raw.get(field, 0), raw.get(pattern) or {}
        if not _is_number(value, types):
            raise CheckpointError(f"{path}: field {field!r} must be {what}, not {shown_value(value)}")
        if not isinstance(values, dict) or not all(_is_number(v, types) for v in values.values()):
            raise CheckpointError(
                f"{path}: field {pattern!r} must map module names to {what}, not {shown_value(values)}"
            )
    from peft import LoraConfig

    try:
        config = LoraConfig.from_pretrained(str(folder))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: not a LoRA adapter config peft accepts ({error})") from None
    for option, what in UNSUPPORTED_OPTIONS.items():
        if getattr(config, option):
            raise CheckpointError(
                f"{path}: peft's {option}={getattr(config, option)!r} ({what}) is not supported; retrain the adapter "
                f"without {option}"
            )
    config.base_model_name_or_path = None  # the caller gives the base; peft would warn that the recorded one differs
    config.task_type = None  # CAUSAL_LM's wrapper adds transformers' generation hooks, which our model does not have
    return config


def restore_adapter(model: PeftModel, folder: str | Path, weightless: bool = False, converted: bool = False) -> None:
    """Read the LoRA weights saved in `folder` into `model`, which peft wrapped with the same targets (`weightless`:
    on the meta device, where they are assigned rather than copied: peft's own assignment moves them to the meta
    device of the base layers). `converted`: the folder holds a PiSSA/OLoRA run's adapter saved on the original base
    (`save_adapter`'s `initial`), whose leading r ranks are the trained factors `model` takes back."""
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    weights = adapter_weights(folder)
    layers = model.get_base_model().config.num_hidden_layers
    names = [name for name, _ in model.get_base_model().named_modules() if name]
    ours = {checkpoint_key(f"{name}.weight", layers).removesuffix(".weight"): name for name in names}
    tensors, file_keys = {}, {}  # by peft's key on our model; that key -> the file's
    for key, tensor in read_safetensors(weights).items():
        if key.endswith(".bias"):  # peft's bias="all" or "lora_only" saves the base layers' biases it trained
            raise CheckpointError(
                f"{weights}: key {key!r} is a base layer's bias trained beside the factors (peft's bias="
                f"{model.peft_config['default'].bias!r} in {ADAPTER_CONFIG_FILE}), which seekstack does not apply; "
                "retrain the adapter with bias='none'"
            )
        base_copy = BASE_LAYER_COPY.fullmatch(key.removeprefix(PEFT_PREFIX))
        if base_copy:
            hf_module, lora = base_copy["module"] or base_copy["whole"], ""
        else:
            hf_module, lora = _split(key, weights)
        if hf_module not in ours and hf_module in names:  # keys of peft's save_pretrained on seekstack's model
            theirs = checkpoint_key(f"{hf_module}.weight", layers).removesuffix(".weight")
            raise CheckpointError(
                f"{weights}: key {key!r} names module {hf_module!r} as seekstack's model names it, where an adapter "
                f"folder names it as transformers' model does ({theirs!r}): peft saved it from a PeftModel on "
                "seekstack's model; load it back there with peft.PeftModel.from_pretrained, or make the adapter with "
                "`seekstack lora train` or with peft on transformers' model of the base"
            )
        if hf_module not in ours:
            raise CheckpointError(
                f"{weights}: key {key!r} names no module of the base model: the adapter was trained on another base"
            )
        if base_copy:
            _check_base_layer_copy(model.get_base_model().get_submodule(ours[hf_module]), key, tensor, weights)
            continue
        if converted and ".lora_A." in lora:
            tensor = tensor[: tensor.shape[0] // 2]
        elif converted and ".lora_B." in lora:
            tensor = tensor[:, : tensor.shape[1] // 2]
        tensors[f"{PEFT_PREFIX}{ours[hf_module]}{lora}"] = tensor
        file_keys[f"{PEFT_PREFIX}{ours[hf_module]}{lora}"] = key
    full_names = {  # peft saves DoRA's magnitude `lora_magnitude_vector.default.weight` without `.default.weight`
        key.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): key
        for key, _ in model.named_parameters()
        if is_adapter_parameter(key)
    }
    expected = {key: model.get_parameter(name) for key, name in full_names.items()}
    if set(tensors) != set(expected):
        missing = sorted(_file_key(key, layers, folder) for key in set(expected) - set(tensors))
        extra = sorted(file_keys[key] for key in set(tensors) - set(expected))
        raise CheckpointError(
            f"{weights}: the weights do not match {ADAPTER_CONFIG_FILE} (missing {missing[:3]}, unexpected "
            f"{extra[:3]}): re-save the adapter"
        )
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise _shape_error(
                model, full_names[key], tensor.shape, expected[key].shape, f"{weights}: key {file_keys[key]!r}"
            )
        if not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"{weights}: key {file_keys[key]!r} holds NaN or infinite values: the training that wrote it diverged; "
                "train the adapter again (e.g. with a lower lr)"
            )
    if weightless:
        model.load_state_dict({full_names[key]: tensor for key, tensor in tensors.items()}, strict=False, assign=True)
    else:
        set_peft_model_state_dict(model, tensors)


def _shape_error(
    model: PeftModel, parameter: str, stored: torch.Size, needed: torch.Size, where: str
) -> CheckpointError:
    """The refusal of a stored tensor (`where`: file and key) of shape `stored` for the adapter `parameter` of `model`,
    which is `needed`: the rank in adapter_config.json disagrees with the weights when only a factor's rank differs,
    else the adapter was trained on another base."""
    if not _differs_in_rank_only(parameter, stored, needed):
        return CheckpointError(
            f"{where} has shape {tuple(stored)}, the base model needs {tuple(needed)}: the adapter was trained on "
            "another base"
        )
    rank = model.get_submodule(parameter.rsplit(".lora_", 1)[0]).r["default"]
    return CheckpointError(
        f"{where} has shape {tuple(stored)}, where rank {rank} of {ADAPTER_CONFIG_FILE} (r / rank_pattern) needs "
        f"{tuple(needed)}: the rank in {ADAPTER_CONFIG_FILE} disagrees with the weights; correct r / rank_pattern, "
        "or re-save the adapter"
    )


def _differs_in_rank_only(parameter: str, stored: torch.Size, needed: torch.Size) -> bool:
    """Whether the shapes of LoRA factor `parameter`, A (r, in) or B (out, r) (an expert parameter's E pairs side by
    side along r), differ only in its rank dimension."""
    factor = LORA_FACTOR.search(parameter)
    if factor is None or len(stored) != len(needed):
        return False
    rank_dim = 0 if factor["factor"] == "A" else len(needed) - 1
    return all(ours == theirs for dim, (ours, theirs) in enumerate(zip(stored, needed, strict=True)) if dim != rank_dim)


def _check_base_layer_copy(layer: torch.nn.Module, key: str, stored: torch.Tensor, weights: Path) -> None:
    """CheckpointError naming `key` when the copy of an adapted embedding's or head's base weight that peft saved
    beside the adapter (its save_embedding_layers, on by default for those targets) is not `layer`'s base weight:
    the adapter was trained on another base, or on resized embeddings. Equal at bfloat16 precision (the copy may come
    from a float32 or a bfloat16 load of the base); on a weightless model only the shape is checked."""
    base = (layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer).weight
    if stored.shape != base.shape:
        differs = f"shape {tuple(stored.shape)}, this base's {tuple(base.shape)}"
    elif base.is_meta or torch.equal(stored.to(torch.bfloat16), base.detach().to(torch.bfloat16)):
        return
    else:
        differs = "other values"
    raise CheckpointError(
        f"{weights}: key {key!r}, the base weight peft saved beside the adapter (save_embedding_layers), differs from "
        f"this base model's ({differs}): the adapter was trained on another base or on resized embeddings"
    )


def merged_model(model: Transformer, adapter: str | Path) -> Transformer:
    """`model` with the adapter in `adapter` folded into its weights: W + alpha/r B A for every adapted weight, each
    merged weight a new tensor (`_merged_whole`), never the memory-mapped checkpoint pages changed in place (which
    a device map would take for weights still on disk). A head tied to the embedding (tie_word_embeddings) is merged
    apart from it, and left untied where the adapter makes the two differ (a LoRA on either). All or nothing: an
    adapter refused, or whose merge fails (`_merged_whole`), leaves `model` as it was given."""
    config = _fitting_lora_config(model, adapter)  # a refused adapter leaves the model as it was, its head tied
    tied, given = model.config.tie_word_embeddings, (model.lm_head.weight, model.config)
    if tied:  # one Parameter: the embedding's merged tensor would be the head's too
        model.lm_head.weight = torch.nn.Parameter(model.embed_tokens.weight.detach())
        model.config = model.config.replace()  # peft's merge unties the config it finds, in place
    try:
        merged = _merged_whole(_wrapped(model, Path(adapter), config, weightless=False), Path(adapter))
    except BaseException:  # an adapter peft cannot apply: the model as it was given, the head and config put back
        model.lm_head.weight, model.config = given
        raise
    if tied:
        equal = torch.equal(merged.lm_head.weight, merged.embed_tokens.weight)
        merged.config = merged.config.replace(tie_word_embeddings=equal)
        if equal:
            merged.tie_weights()
    return merged


def _merged_whole(peft_model: PeftModel, folder: Path) -> Transformer:
    """peft's merge_and_unload(safe_merge=True) of `peft_model`, all or nothing: each weight it merges into is first
    given a new tensor of its own (peft >= 0.22's safe_merge copies the merged weight back into the tensor it had),
    so when a merged weight comes out NaN or infinite (finite factors whose alpha/r B A overflows) the weights merged
    before it are given their tensors back and peft's layers taken out, and CheckpointError names the module and the
    adapter's weights file (peft's ValueError names neither)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = peft_model.get_base_model()
    tensors = [(parameter, parameter.data) for parameter in base.parameters()]
    for parameter in _merged_into(base):
        parameter.data = parameter.data.clone()
    try:
        return peft_model.merge_and_unload(safe_merge=True)
    except BaseException as error:
        for parameter, tensor in tensors:
            parameter.data = tensor
        # peft merges its layers in module order, taking each out once merged: the first left is the one that failed
        failed = next((name for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)), "")
        peft_model.unload()
        if isinstance(error, ValueError) and "NaNs detected in the merged weights" in str(error):
            raise CheckpointError(
                f"{folder / ADAPTER_WEIGHTS_FILE}: merging the adapter into {failed} gives NaN or infinite weights "
                "(alpha/r B A overflows): the training that wrote it diverged; train the adapter again (e.g. with a "
                "lower lr)"
            ) from None
        raise


def _merged_into(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of `model` that peft's merge writes, once each: an adapted layer's weight and bias, or the
    parameter a target_parameters layer (ParamWrapper) adapts."""
    from peft.tuners.lora import ParamWrapper
    from peft.tuners.tuners_utils import BaseTunerLayer

    written: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            layer = module.get_base_layer()
            if isinstance(module, ParamWrapper):
                parameters = [getattr(layer, module.parameter_name)]
            else:
                parameters = list(layer.parameters(recurse=False))
            written.update((id(parameter), parameter) for parameter in parameters)
    return list(written.values())


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Write base + adapter as a plain checkpoint folder (W + alpha/r B A in every adapted weight), with the
    tokenizer and generation_config.json of the adapter or of the base, whole or not at all (`atomic_directory`, as
    a training checkpoint is written: Ctrl-C leaves no model without its tokenizer). Merged in float32 (float64 for a
    float64 base) and written in the base's own dtype (rounded once: a bfloat16 base gives a bfloat16 checkpoint, as
    peft's merge_and_unload keeps it)."""
    from seekstack.infer.generation_config import GENERATION_CONFIG_FILE
    from seekstack.train.state import copy_model_folder_file

    refuse_to_replace(out, MODEL_FOLDER_FILES, inputs=(base, adapter))
    model = load_pretrained(base, dtype="auto")
    refuse_hf_export(model.config, out)
    stored = model.embed_tokens.weight.dtype
    merging = torch.promote_types(stored, torch.float32)  # a float64 base keeps its precision
    merged = _in_dtype(merged_model(model.to(merging), adapter), stored, Path(adapter))
    with atomic_directory(out) as staging:
        write_pretrained_files(merged, staging)
        for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE):
            source = next((Path(d) / name for d in (adapter, base) if (Path(d) / name).is_file()), None)
            if source is not None:
                copy_model_folder_file(source, staging, merged.config.max_position_embeddings)
    return Path(out)


def _in_dtype(merged: Transformer, dtype: torch.dtype, folder: Path) -> Transformer:
    """`merged` (float32, or float64 for a float64 base) cast to the base's `dtype`; CheckpointError naming the first
    weight that comes out infinite there (a float16 base: a merged value past 65504), as the float32 merge refuses one
    (`_merged_whole`)."""
    merged = merged.to(dtype)
    for name, parameter in merged.named_parameters():
        if not torch.isfinite(parameter).all():
            raise CheckpointError(
                f"{folder / ADAPTER_WEIGHTS_FILE}: the merged {name} overflows the base's "
                f"{str(dtype).removeprefix('torch.')} (W + alpha/r B A past its largest value): train the adapter "
                "again (e.g. with a lower lr), or merge it into a float32 copy of the base"
            )
    return merged


class ModelFolders(NamedTuple):
    """Where the parts of the model a folder names are: a checkpoint is all three; an adapter checkpoint (a `lora
    train` run's checkpoints/step_N or out_dir) is the adapter, its base's weights, and its own tokenizer or else
    its base's."""

    weights: Path  # the checkpoint folder holding the (base) weights
    adapter: Path | None  # the adapter folder to merge into them; None but for an adapter checkpoint
    tokenizer: Path  # the folder whose tokenizer.json reads the model's text


def model_folders(folder: str | Path) -> ModelFolders:
    """The `ModelFolders` of a checkpoint, a run's out_dir (its newest checkpoint) or an adapter checkpoint (adapter
    files and no config.json of their own: the base its adapter_config.json records). CheckpointError naming the
    file when the recorded base is not there."""
    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG_FILE
    if (folder / CONFIG_FILE).is_file() or not config_path.is_file():
        newest = run_checkpoint(folder)  # a run's out_dir: its newest checkpoint (a LoRA run's holds an adapter)
        return model_folders(newest) if newest is not None else ModelFolders(folder, None, folder)
    recorded = read_json_object(config_path).get("base_model_name_or_path")
    merge = f"or merge the adapter into its base (`seekstack lora merge BASE {folder} --out MERGED`) and use MERGED"
    if not recorded:
        raise CheckpointError(f"{config_path}: the adapter records no base model (base_model_name_or_path); {merge}")
    base = Path(recorded)
    if not (base / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{config_path}: the adapter's base model {base} (base_model_name_or_path) holds no {CONFIG_FILE} (moved "
            f"or deleted?): put it back, {merge}"
        )
    return ModelFolders(base, folder, folder if (folder / TOKENIZER_FILE).is_file() else base)


def publish_adapter(checkpoint: str | Path, out: str | Path) -> Path:
    """Copy a training checkpoint's adapter files (and tokenizer) into `out`, renamed into place together."""
    checkpoint, out = Path(checkpoint), Path(out)
    with staged_files(out) as staged:
        for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, staged.path(name))
    return out


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter of a peft model belongs to the adapter (a LoRA factor or a trained head row)."""
    return any(part in name for part in ADAPTER_PARAMETERS)


def _file_key(key: str, layers: int, folder: Path) -> str:
    """The key in the adapter file of the tensor peft keys `key` on our model of `layers` main layers
    (`base_model.model.layers.0.mlp.down_proj.lora_A.weight` -> `base_model.model.model.layers.0...`)."""
    module, lora = _split(key, folder)
    return f"{PEFT_PREFIX}{checkpoint_key(f'{module}.weight', layers).removesuffix('.weight')}{lora}"


def _split(key: str, source: Path) -> tuple[str, str]:
    """`base_model.model.layers.0.mlp.experts.base_layer.lora_A.weight` -> (`layers.0.mlp.experts`,
    `.base_layer.lora_A.weight`); CheckpointError naming `source` (the file or folder the key came from) and the
    whole key when it is no adapter weight's."""
    match = ADAPTER_KEY.fullmatch(key.removeprefix(PEFT_PREFIX))
    if match is None:
        raise CheckpointError(
            f"{source}: {key!r} is not an adapter weight key (...lora_A.weight / ...lora_B.weight / "
            "...token_adapter.trainable_tokens_delta)"
        )
    return match["module"], match["lora"]
