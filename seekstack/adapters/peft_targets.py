"""What a peft LoraConfig adapts, read as peft reads it on transformers' model of the same base.

peft selects and sizes its LoRA layers by module name: target_modules (a list of names or name suffixes, a regex, or
"all-linear"), target_parameters, exclude_modules, layers_to_transform / layers_pattern, rank_pattern and
alpha_pattern. transformers' DeepseekV3ForCausalLM names the main layers `model.layers.N...` and has no MTP module;
seekstack's Transformer names them `layers.N...` and holds the MTP module `mtp.K...` beside them. So a saved config is
first applied, by peft itself, to a weightless view of our model that carries transformers' names and no MTP module
(`transformers_view`); the modules and parameters it adapts there, each with its rank and alpha, become an explicit
config on our names (`config_for_seekstack`). Every form peft accepts on transformers' model then adapts the same
modules on ours, and the MTP module, which transformers' model lacks, stays untouched.
"""

from __future__ import annotations

import copy
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from seekstack.config import ModelConfig
from seekstack.model.transformer import Transformer

if TYPE_CHECKING:
    from peft import LoraConfig

TRANSFORMERS_PREFIX = "model."  # what transformers' model puts before every module name but the output head's
# warnings.catch_warnings saves and restores the process-wide filter list: two at once in different threads (a
# server's concurrent adapter loads) can restore each other's "ignore" for good, so they take turns.
_WARNING_FILTERS = threading.RLock()


def transformers_view(model: Transformer) -> nn.Module:
    """A module tree over `model`'s own main modules, named as transformers' model names them (`model.embed_tokens`,
    `model.layers.N...`, `model.norm`, `lm_head`), without the MTP module."""
    inner = nn.Module()
    inner.embed_tokens, inner.layers, inner.norm = model.embed_tokens, model.layers, model.norm
    view = nn.Module()
    view.model, view.lm_head = inner, model.lm_head
    view.config = model.config  # its model_type makes peft convert the config as it does for transformers' model
    return view


def config_for_seekstack(config: LoraConfig, model_config: ModelConfig) -> LoraConfig:
    """`config`, written for transformers' model, with explicit targets in seekstack's names: the modules and
    parameters peft adapts on a model with `model_config` under transformers' names, each with its rank and alpha.
    peft's ValueError when it finds no target or refuses the config."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer, ParamWrapper

    probe = copy.deepcopy(config)  # the targeting fields only: nothing is initialised on the weightless view
    probe.init_lora_weights, probe.use_dora, probe.lora_bias, probe.trainable_token_indices = False, False, False, None
    # The LoRA layers made on the meta device by torch's device mode, which holds in this thread only; peft's
    # low_cpu_mem_usage instead patches nn.Module.register_parameter for the whole process, which moves the tensors
    # another thread loads meanwhile (a server's concurrent adapter loads) to the meta device.
    with torch.device("meta"), _ignoring_warnings():  # what peft warns, the load on our model warns again
        view = transformers_view(Transformer(model_config))
        get_peft_model(view, probe)
    modules, parameters, ranks, alphas = [], [], {}, {}
    for name, layer in view.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        ours = name.replace(".base_layer", "").removeprefix(TRANSFORMERS_PREFIX)
        if isinstance(layer, ParamWrapper):
            ours = f"{ours}.{layer.parameter_name}"  # peft's key for a parameter target and its patterns
        (parameters if isinstance(layer, ParamWrapper) else modules).append(ours)
        ranks[re.escape(ours)], alphas[re.escape(ours)] = layer.r["default"], layer.lora_alpha["default"]
    fitted = copy.deepcopy(config)
    fitted.target_modules, fitted.target_parameters = modules, parameters
    fitted.rank_pattern = {key: rank for key, rank in ranks.items() if rank != config.r}
    fitted.alpha_pattern = {key: alpha for key, alpha in alphas.items() if alpha != config.lora_alpha}
    fitted.exclude_modules = fitted.layers_to_transform = fitted.layers_pattern = None  # applied on the view
    return fitted


@contextmanager
def quiet_parameter_patterns() -> Iterator[None]:
    """peft's warning that rank_pattern / alpha_pattern keys match no targeted module silenced: it checks them
    against module targets only, so it names every key of a parameter target (`config_for_seekstack`), which it
    applies all the same."""
    with _ignoring_warnings(r"The following (rank|alpha)_pattern keys did not match", RuntimeWarning):
        yield


@contextmanager
def _ignoring_warnings(message: str = "", category: type[Warning] = Warning) -> Iterator[None]:
    """Warnings of `category` whose text starts with the regex `message` ignored in the block (any, by default),
    the filters restored after it, one such block in the process at a time."""
    with _WARNING_FILTERS, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message, category)
        yield
