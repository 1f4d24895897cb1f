"""The training run's configuration: one `TrainConfig`, read from YAML or TOML plus `key=value` overrides.

The resolved configuration is written beside the run as `train_config.json`, so a run says how it was made.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
import yaml

from seekstack.data.mixture import MixtureSchedule

SCHEDULES = ("cosine", "wsd")
DTYPES = ("float32", "bfloat16")
CONFIG_FILE = "train_config.json"
TRAIN_SPLIT = "train"


class TrainConfigError(ValueError):
    """A training configuration that cannot run; the message names the file and field at fault."""


@dataclass
class TrainConfig:
    """Everything a pre-training run needs. Batch sizes count sequences of `seq_len` tokens, over all ranks."""

    model: str = "tiny"  # a preset name of seekstack.config.PRESETS
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields changed from the preset
    data_dir: str = "data/shards"  # holds train_index.json (and val_index.json for evaluation)
    # Splits of data_dir to draw from, each with a weight or one weight per phase (phases cut training evenly),
    # e.g. {train_easy: [0.7, 0.2, 0.1], train_medium: [0.2, 0.5, 0.3], train_hard: [0.1, 0.3, 0.6]}; {} = train
    mixture: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = ""  # tokenizer.json (or its folder) copied into checkpoints; "" = the one data_dir records
    out_dir: str = "runs/tiny"  # metrics.jsonl, train_config.json, checkpoints/step_N
    seq_len: int = 256
    batch_size: int = 32  # sequences per micro-batch, summed over ranks
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    # Optimizer and schedule
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay)
    wsd_decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min_lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    # DeepSeek-V3 losses and balance
    mtp_loss_weight: float = 0.3  # lambda early in training (V3 §4.2)
    mtp_loss_weight_late: float = 0.1  # lambda after `mtp_switch_fraction` of the steps
    mtp_switch_fraction: float = 0.7
    bias_update_rate: float = 0.001  # gamma of the auxiliary-loss-free bias update; 0 disables it
    aux_loss_alpha: float = 1e-4  # sequence-wise balance loss weight, written into the model config
    # Evaluation and checkpoints
    eval_every: int = 100  # 0 disables evaluation
    eval_batches: int = 20
    save_every: int = 500  # a checkpoint is also written at the last step and on Ctrl-C
    keep_checkpoints: int = 3
    seed: int = 0
    dtype: str = "float32"  # float32 | bfloat16 (autocast on CUDA and CPU; weights and optimizer stay float32)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    compile: bool = False  # torch.compile each block
    peak_flops: float = 0.0  # per device, for the MFU estimate; 0 = a default for the device (see train/mfu.py)

    def validate(self, source: str = "config") -> TrainConfig:
        """Raise TrainConfigError naming the first field with an impossible value."""
        positive = ("seq_len", "batch_size", "grad_accum_steps", "max_steps", "eval_batches", "keep_checkpoints")
        for name in positive:
            _require(getattr(self, name) > 0, source, name, "a positive integer")
        for name in ("warmup_steps", "eval_every", "save_every"):
            _require(getattr(self, name) >= 0, source, name, ">= 0")
        _require(self.lr > 0, source, "lr", "positive")
        _require(0 <= self.min_lr <= self.lr, source, "min_lr", f"between 0 and lr={self.lr}")
        _require(self.schedule in SCHEDULES, source, "schedule", f"one of {SCHEDULES}")
        _require(0 <= self.wsd_decay_fraction <= 1, source, "wsd_decay_fraction", "between 0 and 1")
        _require(0 <= self.mtp_switch_fraction <= 1, source, "mtp_switch_fraction", "between 0 and 1")
        _require(self.dtype in DTYPES, source, "dtype", f"one of {DTYPES}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), source, "betas", "two numbers in [0, 1)")
        for name in ("weight_decay", "grad_clip", "bias_update_rate", "aux_loss_alpha", "peak_flops"):
            _require(getattr(self, name) >= 0, source, name, ">= 0")
        try:
            self.mixture_schedule()
        except ValueError as error:
            raise TrainConfigError(f"{source}: field 'mixture': {error}") from None
        return self

    def mixture_schedule(self) -> MixtureSchedule:
        """The schedule of `mixture`; the `train` split alone when it is empty."""
        return MixtureSchedule(self.mixture or {TRAIN_SPLIT: 1.0})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, out_dir: str | Path) -> Path:
        """Write the resolved configuration to `out_dir/train_config.json`."""
        path = Path(out_dir) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def load_train_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML/TOML/JSON file (or start from the defaults), apply `key=value` overrides, validate.

    `model.hidden_size=64` sets one entry of `model_overrides`; values are typed by the field they set.
    """
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path, source = Path(path), str(path)
        values = _read_file(path)
    values = dict(values)
    values["model_overrides"] = dict(values.get("model_overrides") or {})
    hints = typing.get_type_hints(TrainConfig)
    for name in values:
        if name not in hints:
            raise TrainConfigError(f"{source}: unknown field {name!r}; known fields are {sorted(hints)}")
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep:
            raise TrainConfigError(f"override {override!r} is not of the form key=value")
        if key.startswith("model."):
            values["model_overrides"][key.removeprefix("model.")] = yaml.safe_load(text)
        elif key in hints:
            values[key] = _parse_value(text, hints[key], key)
        else:
            raise TrainConfigError(f"override {override!r}: unknown field {key!r}; known fields are {sorted(hints)}")
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    for name, value in values.items():
        _check_type(value, hints[name], name, source)
    return TrainConfig(**values).validate(source)


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TrainConfigError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            raw = yaml.safe_load(text) or {}
        else:
            raise TrainConfigError(f"{path}: expected a .yaml, .yml, .toml or .json file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise TrainConfigError(f"{path}: cannot be parsed ({error})") from None
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path}: expected a mapping of field names to values")
    return raw


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    """`text` as the type of the field: numbers, booleans, strings, `0.9,0.95` for tuples, YAML for dicts."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return tuple(_parse_value(part, typing.get_args(annotation)[0], key) for part in text.split(","))
    if origin is dict:
        value = yaml.safe_load(text)
        if not isinstance(value, dict):
            raise TrainConfigError(f"field {key!r}: {text!r} is not a mapping")
        return value
    if annotation is str:
        return text
    if annotation is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise TrainConfigError(f"field {key!r}: {text!r} is not true or false")
        return text.lower() in ("true", "1")
    try:
        return annotation(float(text)) if annotation is int and "e" in text.lower() else annotation(text)
    except ValueError:
        raise TrainConfigError(f"field {key!r}: {text!r} is not a valid {annotation.__name__}") from None


def _check_type(value: Any, annotation: Any, name: str, source: str) -> None:
    expected = typing.get_origin(annotation) or annotation
    ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise TrainConfigError(f"{source}: field {name!r} has value {value!r}, expected {annotation}")


def _require(ok: bool, source: str, name: str, expectation: str) -> None:
    if not ok:
        raise TrainConfigError(f"{source}: field {name!r} must be {expectation}")
