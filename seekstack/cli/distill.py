"""`seekstack distill`: knowledge distillation from a teacher checkpoint into a smaller student."""

from __future__ import annotations

import typer

from seekstack.cli.common import CONFIG_KEYS_HEADING, key_value_command
from seekstack.cli.posttrain import ConfigArg, OverridesArg, ResumeOpt, WriteConfigOpt
from seekstack.cli.train import ConfigOpt, ResumeFromOpt, run_stage


def distill_command(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    config_option: ConfigOpt = None,
    resume: ResumeOpt = False,
    resume_from: ResumeFromOpt = None,
    write_config: WriteConfigOpt = None,
) -> None:
    """Train a student (a preset or config, e.g. model.first_k_dense_replace=NUM_LAYERS for a dense one) on token
    shards, or on conversations as `sft` reads them (data=traces.jsonl or task=NAME; losses on the assistant's tokens
    only), against a frozen `teacher` checkpoint sharing its tokenizer: cross-entropy, forward/reverse KL or GKD's
    JSD(beta) at temperature T, on-policy generations (lmbda, after on_policy_after steps), feature KD on mapped
    layers; token shards under torchrun for DDP."""
    from seekstack.distill.config import DistillConfig
    from seekstack.distill.run import run_distill

    run_stage(DistillConfig, run_distill, config, overrides, resume, resume_from, write_config, config_option)


def register(app: typer.Typer) -> None:
    from seekstack.config import ModelConfig
    from seekstack.distill.config import DistillConfig
    from seekstack.schema import describe_fields

    keyed = key_value_command((DistillConfig, ""), (ModelConfig, "model."))
    app.command("distill", epilog=CONFIG_KEYS_HEADING + describe_fields(DistillConfig), cls=keyed)(distill_command)
