"""`seekstack distill`: knowledge distillation from a teacher checkpoint into a smaller student."""

from __future__ import annotations

from collections.abc import Callable

import typer

from seekstack.cli.common import CONFIG_KEYS_HEADING, key_value_command
from seekstack.cli.posttrain import stage_command


def _distill_stage() -> tuple[type, Callable]:
    from seekstack.distill.config import DistillConfig
    from seekstack.distill.run import run_distill

    return DistillConfig, run_distill


distill_command = stage_command(
    _distill_stage,
    """Train a student (a preset or config, e.g. model.first_k_dense_replace=NUM_LAYERS for a dense one) on token
    shards, or on conversations as `sft` reads them (data=traces.jsonl or task=NAME; losses on the assistant's tokens
    only), against a frozen `teacher` checkpoint sharing its tokenizer: cross-entropy, forward/reverse KL or GKD's
    JSD(beta) at temperature T, on-policy generations (lmbda, after on_policy_after steps), feature KD on mapped
    layers; token shards under torchrun for DDP.""",
)


def register(app: typer.Typer) -> None:
    from seekstack.config import ModelConfig
    from seekstack.distill.config import DistillConfig
    from seekstack.schema import describe_fields

    keyed = key_value_command((DistillConfig, ""), (ModelConfig, "model."))
    app.command("distill", epilog=CONFIG_KEYS_HEADING + describe_fields(DistillConfig), cls=keyed)(distill_command)
