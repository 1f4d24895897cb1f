"""A checkpoint's generation_config.json: the sampling defaults its authors ship with it (DeepSeek-R1: temperature 0.6,
top_p 0.95; DeepSeek-V2-Chat: temperature 0.3; a reply's length, max_new_tokens), read as vLLM's `--generation-config
auto` reads them, for what a request or a command line leaves unset. A release that sets `do_sample: false` is decoded
greedily, as transformers decodes it (whatever temperature it names): vLLM reads no `do_sample` and samples it at
temperature 1. Its `eos_token_id`, one id or a list, ends generation beside the tokenizer's EOS, as transformers and
vLLM stop. Its `max_length` is not read, as vLLM reads none: transformers takes it as the most tokens of prompt and
reply together when max_new_tokens is unset, a reply's room then shrinking with each prompt, where a reply here is
max_new_tokens long (the file's, else the command's or SamplingParams' default) and the context alone caps prompt and
reply together (max_model_len); a release that means a reply's length ships max_new_tokens, which is read."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from seekstack.infer.params import SamplingParams
from seekstack.schema import ConfigError

GENERATION_CONFIG_FILE = "generation_config.json"
# The generation_config.json fields that set a SamplingParams field of the same name when a request leaves it unset
# (vLLM's `get_diff_sampling_param`, which reads max_new_tokens as its max_tokens, as transformers' generate reads it).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def read_generation_config(model_dir: str | Path) -> dict[str, Any]:
    """`model_dir`'s generation_config.json ({} without the file); ConfigError naming the file when it is no JSON
    object."""
    path = Path(model_dir) / GENERATION_CONFIG_FILE
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError as error:
        raise ConfigError(f"{path}: not valid JSON ({error}); copy it again from the model's release") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of generation settings, got {type(raw).__name__}")
    return raw


def eos_ids_of(settings: Mapping[str, Any], source: str) -> frozenset[int]:
    """The ids generation settings `settings` (a generation_config.json's, read from `source`) end generation at,
    their `eos_token_id` (an id or a list of them, as transformers' GenerationConfig takes it; none without it).
    ConfigError naming `source` and the field otherwise."""
    eos = settings.get("eos_token_id")
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if any(type(token) is not int or token < 0 for token in ids):
        raise ConfigError(f"has value {eos!r}: give a token id or a list of them", "eos_token_id", source)
    return frozenset(ids)


def sampling_defaults_of(settings: Mapping[str, Any], source: str) -> dict[str, Any]:
    """SamplingParams field -> the value generation settings `settings` (a generation_config.json's, read from
    `source`) give it, for each of SAMPLING_FIELDS they set. ConfigError naming `source` (and the field) when a value
    is not one SamplingParams takes."""
    defaults = {name: settings[name] for name in SAMPLING_FIELDS if settings.get(name) is not None}
    if settings.get("do_sample") is False:  # its authors' greedy decoding: transformers then reads no temperature
        defaults["temperature"] = 0.0
    try:
        SamplingParams(**defaults).validate()
    except ConfigError as error:
        raise error.at(source) from None
    return defaults


def eos_token_ids(model_dir: str | Path) -> frozenset[int]:
    """`eos_ids_of` `model_dir`'s generation_config.json (none without the file)."""
    return eos_ids_of(read_generation_config(model_dir), str(Path(model_dir) / GENERATION_CONFIG_FILE))


def sampling_defaults(model_dir: str | Path) -> dict[str, Any]:
    """`sampling_defaults_of` `model_dir`'s generation_config.json ({} without the file); ConfigError naming the file
    (and the field) when it is no JSON object or a value is not one SamplingParams takes."""
    return sampling_defaults_of(read_generation_config(model_dir), str(Path(model_dir) / GENERATION_CONFIG_FILE))
