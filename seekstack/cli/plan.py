"""`seekstack plan`: where each part of a model would live within per-device memory budgets, computed on the meta
device (no weight is materialised), and the `--device-map` that places it so."""

from __future__ import annotations

from typing import Annotated

import typer

from seekstack.cli.common import Model, model_config, size, user_errors

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "float8": 1.0, "int8": 1.0, "int4": 0.5}


def plan(
    model: Model,
    memory: Annotated[
        str, typer.Option(help="Budgets per device, fastest first, e.g. cuda:0=80GiB,cpu=20GiB; the rest goes to disk.")
    ],
    weights: Annotated[
        str, typer.Option(help=f"Stored width of the weights: {', '.join(BYTES_PER_PARAM)}.")
    ] = "bfloat16",
) -> None:
    """Plan a placement of MODEL's embeddings, blocks (attention, shared and routed experts), MTP and head: print the
    resident bytes and the weight bytes one decoded token reads on each device, and the device map to pass to
    --device-map. Parts that read the most of their bytes per token take the fastest memory first."""
    from seekstack.infer.placement import parse_budgets, plan_placement

    with user_errors():
        if weights not in BYTES_PER_PARAM:
            raise ValueError(f"--weights {weights!r}: choose one of {', '.join(BYTES_PER_PARAM)}")
        config = model_config(model)
        result = plan_placement(config, parse_budgets(memory), BYTES_PER_PARAM[weights])
    typer.echo(f"{model}, {weights} weights (the latent cache comes on top: --kv-cache-memory)")
    typer.echo(f"{'device':<10}{'parts':>7}  {'resident':<32}{'read per token':<32}")
    for device, resident in result.resident_bytes.items():
        parts = sum(1 for placed in result.placement.values() if placed == device)
        typer.echo(f"{device:<10}{parts:>7}  {size(resident):<32}{size(result.active_bytes[device]):<32}")
    typer.echo(f"--device-map {result.device_map()}")


def register(app: typer.Typer) -> None:
    app.command()(plan)
