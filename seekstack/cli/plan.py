"""`seekstack plan`: where each part of a model would live within per-device memory budgets, computed on the meta
device from a checkpoint's safetensors headers (no weight is read), and the `--device-map` that places it so."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from seekstack.cli.common import Model, model_config, size, user_errors
from seekstack.config import PRESETS, ModelConfig

BYTES_PER_PARAM = {
    "float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "float8": 1.0, "int8": 1.0, "int4": 0.5, "float64": 8.0
}  # fmt: skip


def stored_weights(model: str, config: ModelConfig) -> str:
    """The width (a BYTES_PER_PARAM name) checkpoint `model` stores its weights in, from its config.json:
    quantization_config (fp8; compressed-tensors int8/int4, the widest group, or float-quantized fp8, which loads
    dequantized: the stated float dtype's), else (none, or a transform_config alone) the stated float dtype
    (`stated_float_dtype`), else bfloat16.
    ValueError naming the file for a quantization_config it cannot read."""
    from seekstack.checkpoint import stores_quantized_weights

    quantization = config.extra.get("quantization_config")
    if not stores_quantized_weights(quantization):  # none, or a transform_config alone (rotations fused into floats)
        return stated_float_dtype(model, config)
    method = quantization.get("quant_method", "fp8") if isinstance(quantization, dict) else None
    if method == "fp8":
        return "float8"
    groups = quantization.get("config_groups") if method == "compressed-tensors" else None
    weights = (
        [group.get("weights") for group in groups.values() if isinstance(group, dict)]
        if isinstance(groups, dict)
        else []
    )
    bits = {entry.get("num_bits") for entry in weights if isinstance(entry, dict)}
    if any(isinstance(entry, dict) and entry.get("type") == "float" for entry in weights):
        return stated_float_dtype(model, config)  # float-quantized (fp8) layers: loading holds them dequantized
    if bits and bits <= {4, 8}:
        return f"int{max(bits)}"
    raise ValueError(
        f"{Path(model) / 'config.json'}: quantization_config (quant_method {method!r}) is neither fp8 nor "
        "compressed-tensors int8/int4 groups; give the stored width with --weights"
    )


def stated_float_dtype(model: str, config: ModelConfig) -> str:
    """The float dtype (a BYTES_PER_PARAM name) checkpoint `model`'s config.json states its float weights in: dtype
    (transformers 5), else its legacy name torch_dtype (4), as transformers reads them, else bfloat16.
    CheckpointError naming the file and key for a value that names no float dtype a model loads in."""
    from seekstack.checkpoint import CONFIG_FILE
    from seekstack.checkpoint.load import stated_dtype

    stated = stated_dtype(config, Path(model) / CONFIG_FILE)
    return str(stated).removeprefix("torch.") if stated is not None else "bfloat16"


def tensor_bytes(model: str, config: ModelConfig, weights: str | None) -> tuple[dict[str, int], str]:
    """What each tensor of MODEL takes (by checkpoint key), and how that was found: every parameter at `weights` when
    given; else a checkpoint's tensors from its safetensors headers (quantized layers with their scales, the
    embedding, head and norms as stored), the width its config.json states when it has no weight files (a shard
    index alone, downloaded with config.json to plan before the weights, names no dtype; nor do Git LFS pointers, a
    clone's without Git LFS; fp8 in DeepSeek's release layout, with the layers it keeps in float at that width), or
    bfloat16 for a preset."""
    from seekstack.checkpoint import CONFIG_FILE, stored_tensor_bytes
    from seekstack.checkpoint.reader import _fp8_block, is_lfs_pointer
    from seekstack.infer.placement import tensor_bytes_at_width

    if weights is None and model not in PRESETS:
        directory = Path(model)
        if not all(map(is_lfs_pointer, directory.glob("*.safetensors"))):  # a clone without Git LFS: no weights yet
            _refuse_unstored_keys(directory, config)
            return stored_tensor_bytes(directory), "weights as stored in its safetensors files"
        weights = stored_weights(model, config)
        if weights == "float8":
            block = _fp8_block(config.extra["quantization_config"], directory / CONFIG_FILE)
            float_dtype = stated_float_dtype(model, config)
            priced = f"float8 weights as stored (config.json), {float_dtype} where DeepSeek's FP8 release keeps them"
            return tensor_bytes_at_width(config, BYTES_PER_PARAM[float_dtype], block), priced
        return tensor_bytes_at_width(config, BYTES_PER_PARAM[weights]), f"{weights} weights as stored (config.json)"
    weights = weights or "bfloat16"
    return tensor_bytes_at_width(config, BYTES_PER_PARAM[weights]), f"{weights} weights"


def _refuse_unstored_keys(directory: Path, config: ModelConfig) -> None:
    """ValueError naming the keys the model of checkpoint `directory` needs that its weight files (and shard index)
    hold in no layout: priced from the headers, the plan would leave them out, as loading refuses the checkpoint."""
    from seekstack.checkpoint import CheckpointError
    from seekstack.checkpoint.load import refuse_unstored_keys

    try:
        refuse_unstored_keys(directory)
    except CheckpointError as error:
        width = stored_weights(str(directory), config)
        raise ValueError(f"{error}; or plan at the width its config.json states: --weights {width}") from None


def plan(
    model: Model,
    memory: Annotated[
        list[str],
        typer.Option(
            help="Budgets per device, e.g. cuda:0=80GiB,cpu=20GiB (a GPU also as its number, 0=80GiB, as "
            "accelerate's max_memory), filled GPUs first (in the order given), then the CPU; the rest goes to disk. "
            "Repeat it to give them one by one (--memory cuda:0=80GiB --memory cpu=20GiB)."
        ),
    ],
    weights: Annotated[
        str | None,
        typer.Option(
            help=f"Price every parameter at this width: {', '.join(BYTES_PER_PARAM)}; default: a checkpoint's tensors "
            "as its safetensors headers give them (quantized layers with their scales), the width its config.json "
            "states when it has no weight files, bfloat16 for a preset."
        ),
    ] = None,
) -> None:
    """Plan a placement of MODEL's embeddings, blocks (attention, shared and routed experts), MTP and head: print the
    resident bytes and the weight bytes one decoded token reads on each device, and the device map to pass to
    --device-map. Parts that read the most of their bytes per token take the fastest memory first."""
    from seekstack.infer.placement import parse_budgets, plan_placement

    if weights is not None and weights not in BYTES_PER_PARAM:  # option values: usage errors, before the model
        raise typer.BadParameter(f"{weights!r}: choose one of {', '.join(BYTES_PER_PARAM)}", param_hint="'--weights'")
    try:
        budgets = parse_budgets(",".join(memory))
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="'--memory'") from None
    with user_errors():
        config = model_config(model)
        sizes, priced = tensor_bytes(model, config, weights)
        result = plan_placement(config, budgets, sizes)
    typer.echo(f"{model}, {priced} (the latent cache comes on top: --kv-cache-memory)")
    typer.echo(f"{'device':<10}{'parts':>7}  {'resident':<32}read per token")  # the last column unpadded
    for device, resident in result.resident_bytes.items():
        parts = sum(1 for placed in result.placement.values() if placed == device)
        typer.echo(f"{device:<10}{parts:>7}  {size(resident):<32}{size(result.active_bytes[device])}")
    typer.echo(
        f"cpu's resident and read per token include {size(result.unplaced_bytes)} of norms and routers, in no part: "
        "they stay on the CPU whatever the budgets"
    )
    typer.echo(f"--device-map {result.device_map()}")
    for device, over in result.overruns(budgets).items():
        typer.echo(
            f"warning: {device} holds {size(result.resident_bytes[device])}, {size(over)} past its budget of "
            f"{size(budgets[device])}: the norms and routers, which stay on the CPU, do not fit in it; give it more",
            err=True,
        )


def register(app: typer.Typer) -> None:
    app.command()(plan)
