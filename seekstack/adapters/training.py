"""`seekstack lora train`: a LoRA adapter trained by the pretraining trainer, the base model frozen.

The run is an ordinary training run (same loop, metrics.jsonl, progress, atomic checkpoints, exact resume) whose
`init_from` is the base and whose model hooks (`LoraHooks`) wrap the base with peft and write only the adapter into
each checkpoint. The adapter folder is the run's `out_dir`: checkpoints/step_N hold each saved adapter with its
train_state.pt, and the folder itself gets the last one's adapter_config.json and adapter_model.safetensors.
DATA is token shards, text or chat conversations (seekstack.adapters.data).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from seekstack.adapters.config import CONFIG_FILE, AdapterConfig
from seekstack.adapters.data import chat_source, frequent_tokens, prepare_data
from seekstack.adapters.files import adapter_state, apply_lora, publish_adapter, restore_adapter, save_adapter
from seekstack.checkpoint import read_config
from seekstack.model.transformer import Transformer
from seekstack.schema import ConfigError, load_config, require
from seekstack.train.config import TrainConfig, resolve_train_config
from seekstack.train.trainer import TrainResult, train

PREFIX = "lora."  # overrides of AdapterConfig fields on the command line: lora.rank=16
# Where a LoRA run differs from pretraining's defaults: the routing biases belong to the frozen base (no bias
# update), no weight decay on the low-rank factors, a short warmup, and a higher learning rate (bench/lora_domain.py:
# 1e-2 beat 3e-3).
LORA_DEFAULTS = ("lr=1e-2", "min_lr=1e-3", "warmup_steps=10", "weight_decay=0.0", "bias_update_rate=0.0")


@dataclass
class LoraHooks:
    """The trainer's model hooks for LoRA: wrap the base with peft, checkpoint the adapter, restore it on resume.

    A PiSSA/OLoRA run (`init`) keeps the factors it started from, to save each adapter on the original base; with
    LoRA+ (`loraplus_ratio`) every B factor carries the `lr_scale` the trainer's optimizer gives its group."""

    config: AdapterConfig
    base_path: str
    head_token_ids: Sequence[int] = ()  # the config's head_tokens most frequent training tokens
    embedding_token_ids: Sequence[int] = ()  # the config's embedding_tokens most frequent training tokens
    initial: dict[str, torch.Tensor] | None = field(default=None, init=False)  # a PiSSA/OLoRA run's A0, B0

    def prepare(self, model: Transformer) -> nn.Module:
        peft_model = apply_lora(model, self.config, self.base_path, self.head_token_ids, self.embedding_token_ids)
        if self.config.init != "lora":
            self.initial = {key: tensor.detach().clone() for key, tensor in adapter_state(peft_model).items()}
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.lr_scale = self.config.loraplus_ratio
        return peft_model

    def write(self, model: nn.Module, folder: Path) -> None:
        save_adapter(model, folder, self.initial)

    def restore(self, model: nn.Module, folder: Path) -> None:
        restore_adapter(model, folder, converted=self.initial is not None)


def lora_train_config(
    base: str | Path | None,
    data_dir: str | Path | None,
    out: str | Path,
    overrides: Sequence[str] = (),
    resume: bool = False,
    warn: Callable[[str], None] | None = None,
) -> tuple[TrainConfig, AdapterConfig]:
    """The run's TrainConfig and AdapterConfig: `lora.FIELD=V` overrides go to the adapter, the rest to training.

    DATA is prepared first (text tokenized into `out`, seekstack.adapters.data); a resumed run starts from the
    configs saved in `out`."""
    adapter_overrides = [o.removeprefix(PREFIX) for o in overrides if o.startswith(PREFIX)]
    train_overrides = [o for o in overrides if not o.startswith(PREFIX)]
    saved = Path(out) / CONFIG_FILE
    if not resume and base is not None and data_dir is not None:
        data_dir = prepare_data(data_dir, base, out)
    given = [f"{name}={value}" for name, value in (("init_from", base), ("data_dir", data_dir)) if value is not None]
    if resume:
        train_config = resolve_train_config(None, [f"out_dir={out}", *given, *train_overrides], True, warn)
        adapter = load_config(AdapterConfig, saved, adapter_overrides).validate()
    else:
        if base is None or data_dir is None:
            raise ConfigError("a new LoRA run needs BASE (a checkpoint folder) and DATA (token shards, text or chat)")
        train_config = resolve_train_config(None, [*LORA_DEFAULTS, f"out_dir={out}", *given, *train_overrides])
        adapter = load_config(AdapterConfig, None, adapter_overrides).validate()
    require(train_config.bias_update_rate == 0, "bias_update_rate", "0 for a LoRA run (the base stays frozen)")
    return train_config, adapter


def train_adapter(train_config: TrainConfig, adapter: AdapterConfig, resume: bool = False) -> TrainResult:
    """Train the adapter (or continue the run in `out_dir`); the adapter files end up in `out_dir` itself."""
    rows = (adapter.head_tokens, adapter.embedding_tokens)
    head_ids, embedding_ids = (frequent_tokens(train_config.data_dir, count) if count else [] for count in rows)
    adapter.peft_config(read_config(train_config.init_from), head_ids, embedding_ids)  # the targets fit the base
    out = Path(train_config.out_dir)  # written only once the configuration holds
    out.mkdir(parents=True, exist_ok=True)
    adapter.save(out)
    hooks = LoraHooks(adapter, str(Path(train_config.init_from).resolve()), head_ids, embedding_ids)
    result = train(train_config, resume, hooks, chat_source(train_config))
    if result.checkpoint is not None:
        publish_adapter(result.checkpoint, out)
    return result
