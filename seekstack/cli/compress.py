"""`seekstack quantize`: a checkpoint to int8 / int4 (compressed-tensors) or fp8 (DeepSeek-V3's block format),
optionally progressively with a quality gate on held-out text."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from seekstack.cli.common import (
    BadParameter,
    JsonErrorsCommand,
    get_current_context,
    interrupted_says,
    nothing_written_if_interrupted,
    options_named,
    run_to_checkpoint,
    size,
    usage_error,
    user_errors,
)

if TYPE_CHECKING:
    import torch

    from seekstack.compress.quantize import QuantConfig

# The mode options' defaults; left None on the command line, so that one given without its mode can be refused.
DEFAULT_BUDGET_BITS = 4.5  # --adaptive
DEFAULT_MAX_BPB_INCREASE = 0.01  # --progressive
DEFAULT_MAX_KL = 1.0  # --progressive


def quantize_command(
    model: Annotated[
        Path,
        typer.Argument(
            help="Checkpoint folder to quantize (float, or quantized: re-quantized, but not by --progressive or "
            "--adaptive), or a run's out_dir",
            callback=run_to_checkpoint,
            metavar="CHECKPOINT",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder to write the quantized checkpoint to (tokenizer copied)")],
    scheme: Annotated[
        str | None, typer.Option(help="int8 (per channel; the default) | int4 (per group) | fp8 (e4m3, 128x128 blocks)")
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option(
            help="int4 (and --progressive's int4 stage): input columns per scale (32, the default, 64, 128, 256); a "
            "layer whose input width it does not divide takes the largest smaller one that does, and the report says so"
        ),
    ] = None,
    keep: Annotated[
        list[str] | None,
        typer.Option(
            help="Layer pattern left in float (repeatable; replaces the default: lm_head; --keep '' keeps none, "
            "lm_head quantized too, but fp8 keeps lm_head and the MTP eh_proj whatever it says): our names "
            "(layers.1.mlp.experts, mtp.0.block.mlp.experts, *.o_proj) or the checkpoint's "
            "(model.layers.1.mlp.experts); one matching no layer is refused"
        ),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="A QuantConfig file (YAML/TOML/JSON); options go on top")] = None,
    progressive: Annotated[
        bool,
        typer.Option(
            help="Try float32 (skipped for a bf16 checkpoint) -> bfloat16 -> int8 -> int4, keep the smallest within "
            "the tolerance"
        ),
    ] = False,
    adaptive: Annotated[
        bool,
        typer.Option(help="Precision per layer (int4 g128/g64/g32, int8) by sensitivity, within --budget-bits"),
    ] = False,
    budget_bits: Annotated[
        float | None,
        typer.Option(help=f"Adaptive: average bits per weight, scales included (default {DEFAULT_BUDGET_BITS})"),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Token shards: val split for --progressive's gate, train split to calibrate --adaptive"),
    ] = None,
    max_bpb_increase: Annotated[
        float | None,
        typer.Option(help=f"Progressive: largest relative bits/byte increase (default {DEFAULT_MAX_BPB_INCREASE})"),
    ] = None,
    max_kl: Annotated[
        float | None,
        typer.Option(help=f"Progressive: largest mean KL (nats) from the original (default {DEFAULT_MAX_KL})"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Quantize a checkpoint's weights; the output loads in generate/chat/serve and runs on low-bit kernels.

    Always high precision: embedding, router gates, norms, kv_b_proj (absorbed by MLA). By default also lm_head
    (with fp8 always, and the MTP eh_proj, as DeepSeek-V3's FP8 release)."""
    from seekstack.compress.adaptive import SMALLEST_BITS
    from seekstack.compress.quantize import QuantConfig, checkpoint_bytes, quantize_checkpoint, refuse_out
    from seekstack.schema import ConfigError, load_config

    kept = None if keep is None else json.dumps([pattern for pattern in keep if pattern])  # --keep '': none
    options = {"scheme": scheme, "group_size": group_size, "keep": kept}
    given = {name: value for name, value in options.items() if value is not None}
    overrides = [f"{name}={value}" for name, value in given.items()]
    with user_errors(as_json), options_named(given):
        resolved = load_config(QuantConfig, config, overrides)
        if progressive and adaptive:
            raise usage_error("choose --progressive or --adaptive, not both")
        mode = "--progressive" if progressive else "--adaptive" if adaptive else None
        if mode is not None and data is None:  # a command-line mistake, as click's "Missing option"
            raise usage_error(
                f"{mode} needs --data: token shards with train and val splits (`seekstack data tokenize`)"
            )
        mode_options = {
            "--budget-bits": (budget_bits, adaptive, "--adaptive"),
            "--max-bpb-increase": (max_bpb_increase, progressive, "--progressive"),
            "--max-kl": (max_kl, progressive, "--progressive"),
            "--data": (data, progressive or adaptive, "--progressive or --adaptive"),
            "--scheme": (scheme, not progressive, "a quantization without --progressive (which tries int8, then int4)"),
        }
        for name, (value, applies, where) in mode_options.items():
            if value is not None and not applies:
                raise usage_error(f"{name} applies to {where} only")
        if progressive and "fp8" in (resolved.scheme, *resolved.layers.values()):  # set by the --config file
            raise ValueError(
                f"{config}: fp8 applies to a quantization without --progressive (which tries int8, then int4)"
            )
        budget_bits = DEFAULT_BUDGET_BITS if budget_bits is None else budget_bits
        max_bpb_increase = DEFAULT_MAX_BPB_INCREASE if max_bpb_increase is None else max_bpb_increase
        max_kl = DEFAULT_MAX_KL if max_kl is None else max_kl
        for name, value in (("--max-bpb-increase", max_bpb_increase), ("--max-kl", max_kl)):
            if progressive and not (math.isfinite(value) and value >= 0):
                raise _bad_value(name, f"{value}: must be a number >= 0")
        if adaptive and not (math.isfinite(budget_bits) and budget_bits > 0):
            raise _bad_value("--budget-bits", f"{budget_bits}: must be a number > 0")
        if adaptive and (overrides or config is not None):
            raise usage_error(
                "--adaptive chooses every layer's scheme itself: --scheme, --group-size, --keep and --config apply "
                "without it"
            )
        # --progressive's last stage is int4, at the group size
        int4_used = progressive or resolved.scheme == "int4" or "int4" in resolved.layers.values()
        if group_size is not None and not int4_used:
            raise usage_error(f"--group-size {group_size} applies to int4 (the scheme is {resolved.scheme})")
        fp8_used = "fp8" in (resolved.scheme, *resolved.layers.values())
        for name, value, used, scheme in (
            ("group_size", resolved.group_size, int4_used, "int4"),
            ("fp8_block", resolved.fp8_block, fp8_used, "fp8"),
        ):
            if value != getattr(QuantConfig(), name) and not used:  # set in the --config file, for nothing
                raise ValueError(f"{config}: {name} {value} applies to {scheme} (the scheme is {resolved.scheme})")
        if adaptive and budget_bits < SMALLEST_BITS:
            raise _bad_value(
                "--budget-bits",
                f"{budget_bits}: below the smallest option (int4 g128: {SMALLEST_BITS} bits per weight, "
                "scales included)",
            )
        refuse_out(model, out)
        if mode is not None:
            _refuse_quantized(
                model,
                f"{mode} measures against the float model and would quantize every layer again from dequantized "
                f"weights (a second rounding); run {mode} on the float checkpoint it was made from",
            )
        try:
            with nothing_written_if_interrupted(out, as_json):
                if progressive:
                    report = _progressive(model, out, resolved, data, max_bpb_increase, max_kl)
                elif adaptive:
                    report = _adaptive(model, out, data, budget_bits)
                else:
                    assignment, notes = quantize_checkpoint(model, out, resolved)
                    report = {"assignment": assignment, "notes": notes}
        except ConfigError as error:  # a field met with the checkpoint (fp8_block against its dtype, a pattern)
            field = error.field  # the --config file's where no option gave it and it is not the default
            in_file = field not in given and vars(resolved).get(field) != vars(QuantConfig()).get(field)
            raise error.at(str(config) if in_file else None) from None
        report |= {"bytes_before": checkpoint_bytes(model), "bytes_after": checkpoint_bytes(out), "out": str(out)}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for stage in report.get("stages", []):
        verdict = "pass" if stage["passed"] else "fail"
        typer.echo(  # the gated figures to 3 significant digits: a KL of 3e-7 against --max-kl 1e-6 is not 0.00000
            f"stage {stage['name']:<9} bits/byte {stage['bits_per_byte']:.4f} ({100 * stage['bpb_increase']:+.3g}%)  "
            f"KL {stage['mean_kl']:.3g}  top-1 {stage['top1_agreement']:.2%}  {size(stage['bytes'])} of tensors  "
            f"{verdict}"
        )
    if "chosen" in report:
        typer.echo(f"chosen: {report['chosen']}, the smallest stage that passed")
    for layer in report.get("layers", []):
        measured = f" KL, the rest int4 g32: {_kls(layer['kl'])}" if layer["kl"] else ""
        typer.echo(f"{layer['name']:<40} {layer['choice']:<9}{measured}")
    if "average_bits" in report:
        typer.echo(f"average {report['average_bits']:.3f} bits per weight (budget {budget_bits})")
    if "assignment" in report:
        _print_assignment(report["assignment"])
    for note in report.get("notes", []):
        typer.echo(f"note: {note}", err=True)
    before, after = report["bytes_before"], report["bytes_after"]
    typer.echo(f"wrote {out}: {size(after)} on disk, {after / before:.1%} of {size(before)}")


def _bad_value(option: str, problem: str) -> BadParameter:
    """An option's value refused (exit 2, as click's "Invalid value for '--max-kl'")."""
    return BadParameter(problem, get_current_context(silent=True), param_hint=f"'{option}'")


def _print_assignment(assignment: dict[str, str]) -> None:
    """The layers per scheme, then the reasons layers were kept or took a smaller int4 group than asked, each with
    how many it concerns."""
    from seekstack.compress.quantize import ABSORBED_KEPT, KEPT, is_absorbed, read_assigned

    entries = {name: read_assigned(value) for name, value in assignment.items()}
    counts = Counter(layer_format for layer_format, _ in entries.values())
    typer.echo("layers: " + ", ".join(f"{n} {layer_format}" for layer_format, n in sorted(counts.items())))
    reasons = Counter(
        (layer_format, reason or (ABSORBED_KEPT if is_absorbed(name) else "by default or by --keep"))
        for name, (layer_format, reason) in entries.items()
        if layer_format == KEPT or reason
    )
    for (layer_format, reason), n in sorted(reasons.items()):
        typer.echo(f"  {n} {layer_format}{'' if layer_format == KEPT else ' instead'}: {reason}")


def _progressive(
    model: Path, out: Path, config: QuantConfig, data: Path, max_bpb_increase: float, max_kl: float
) -> dict:
    from dataclasses import asdict

    import torch

    from seekstack.checkpoint import load_pretrained, stored_float_dtype
    from seekstack.compress.progressive import progressive
    from seekstack.compress.quality import log_probs, measure
    from seekstack.compress.quantize import mixed_experts_notes, save_with_tokenizer

    batches, byte_lengths = _held_out(model, data)
    bfloat16 = stored_float_dtype(model) == torch.bfloat16  # a bf16 checkpoint starts at bf16, others at float32
    original = load_pretrained(model, dtype=torch.bfloat16 if bfloat16 else torch.float32)
    chosen, chosen_name, stages = progressive(  # the reference computed again each stage, not kept: 8 batches' logits
        original,
        lambda m: measure(m, (log_probs(original, batch) for batch in batches), batches, byte_lengths),
        config,
        max_bpb_increase,
        max_kl,
    )
    save_with_tokenizer(chosen, model, out)
    rows = [
        {"name": s.name, **asdict(s.quality), "bpb_increase": s.bpb_increase, "passed": s.passed, "bytes": s.bytes}
        for s in stages
    ]
    return {"stages": rows, "chosen": chosen_name, "notes": mixed_experts_notes(chosen)}


def _held_out(model: Path, data: Path, split: str = "val", batches: int = 8) -> tuple[list, torch.Tensor]:
    """`batches` batches of 8 x 256 tokens (fewer where checkpoint `model`'s context is shorter) of `split` of token
    shards `data`, and the UTF-8 bytes of each token id (`split_byte_lengths`: the checkpoint's tokenizer, or the
    split's mean bytes per token, said on stderr); shards of another tokenizer than checkpoint `model`'s are refused
    (its ids would read as other text)."""
    from seekstack.checkpoint import read_config
    from seekstack.compress.quality import held_out_batches
    from seekstack.tokenizer import tokenizer_json_path
    from seekstack.tokens.provenance import require_checkpoint_tokenizer
    from seekstack.tokens.shards import load_index
    from seekstack.tokens.token_bytes import split_byte_lengths

    require_checkpoint_tokenizer(model, data, load_index(data, split)["tokenizer"])
    byte_lengths, estimated = split_byte_lengths(data, split, tokenizer_json_path(model))
    if estimated:
        typer.echo(f"note: {estimated}", err=True)
    context = read_config(model).max_position_embeddings
    return held_out_batches(str(data), context, batches=batches, split=split), byte_lengths


def _adaptive(model: Path, out: Path, data: Path, budget_bits: float) -> dict:
    from seekstack.checkpoint import load_pretrained, stored_float_dtype
    from seekstack.compress.adaptive import (
        adaptive_config,
        assign,
        average_bits,
        refuse_budget_below_smallest,
        sensitivities,
        unmeasured_choices,
        unmeasured_notes,
        widest_within,
    )
    from seekstack.compress.quality import log_probs, measure
    from seekstack.compress.quantize import mixed_experts_notes, quantize_model, save_with_tokenizer

    calibration, byte_lengths = _held_out(model, data, split="train", batches=2)
    original = load_pretrained(model, dequantize=True)
    choices = unmeasured_choices(original)
    refuse_budget_below_smallest(choices, budget_bits)
    chosen = widest_within(choices, budget_bits)
    if chosen is not None:  # measuring takes minutes: only where the budget leaves something to choose
        notes = [
            f"a budget of {budget_bits} bits per weight allows each layer its widest option (int8 where its shapes "
            "allow): no layer measured"
        ]
    else:
        reference = [log_probs(original, batch) for batch in calibration]  # once: every trial is measured against it
        choices = sensitivities(
            original,
            lambda m: measure(m, reference, calibration, byte_lengths).mean_kl,
            measured=lambda i, n, c: typer.echo(f"measured {i}/{n} {c.name}: KL {_kls(c.kl)}", err=True),
        )
        chosen, notes = assign(choices, budget_bits), []
    assignment = quantize_model(original, adaptive_config(chosen))
    notes += unmeasured_notes(original) + mixed_experts_notes(original)
    save_with_tokenizer(original.to(stored_float_dtype(model)), model, out)
    layers = [{"name": c.name, "choice": chosen[c.name], "kl": c.kl, "bits": c.bits[chosen[c.name]]} for c in choices]
    return {
        "layers": layers,
        "average_bits": average_bits(choices, chosen),
        "assignment": assignment,
        "notes": notes,
    }


def _kls(kl: dict[str, float]) -> str:
    """Each option's mean KL, as --adaptive prints them."""
    return "  ".join(f"{option} {value:.4g}" for option, value in kl.items())


def prune_command(
    model: Annotated[
        Path,
        typer.Argument(
            help="Checkpoint folder to prune, or a run's out_dir", callback=run_to_checkpoint, metavar="CHECKPOINT"
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder to write the pruned checkpoint to (tokenizer copied)")],
    data: Annotated[
        Path, typer.Option(help="Token shards: calibration text (the train split), and the healing fine-tune's data")
    ],
    experts: Annotated[
        float, typer.Option(help="Fraction (0 to 1) of routed experts to remove per layer (and per group)")
    ] = 0.25,
    heads: Annotated[
        float, typer.Option(help="Fraction (0 to 1) of attention heads to remove per layer (by importance)")
    ] = 0.0,
    calibration_batches: Annotated[int, typer.Option(min=1, help="Calibration batches of 8 x 256 tokens")] = 4,
    heal_steps: Annotated[int, typer.Option(min=0, help="Steps of healing fine-tune after pruning (0: none)")] = 0,
    heal_lr: Annotated[float, typer.Option(help="Healing: peak learning rate, >= 0")] = 1e-4,
    heal_batch_size: Annotated[int, typer.Option(min=1, help="Healing: sequences of 256 tokens per step")] = 8,
) -> None:
    """Remove the routed experts the router uses least (gate mass over calibration text), router shrinking with them,
    and the least important attention heads (gradient of the loss w.r.t. a head mask); optionally heal by a short
    fine-tune with the trainer."""
    import tempfile

    from seekstack.checkpoint import load_pretrained, read_config, stored_float_dtype
    from seekstack.compress.heads import (
        head_importance,
        prune_heads,
        refuse_too_few_heads,
        transformers_head_count_notes,
    )
    from seekstack.compress.heal import heal
    from seekstack.compress.prune import gate_mass, has_moe_layers, prune_experts, refuse_too_few_kept, rounding_notes
    from seekstack.compress.quality import held_out_batches
    from seekstack.compress.quantize import checkpoint_bytes, refuse_out, save_with_tokenizer
    from seekstack.interrupts import sigterm_cleaned_up
    from seekstack.tokens.provenance import require_checkpoint_tokenizer
    from seekstack.tokens.shards import load_index
    from seekstack.train.config import TRAIN_SPLIT

    # checked here, naming the value: typer's own range named none (nan: "should be less than or equal to 1")
    for name, value, most in (("--experts", experts, 1), ("--heads", heads, 1), ("--heal-lr", heal_lr, math.inf)):
        if not (math.isfinite(value) and 0 <= value <= most):
            raise _bad_value(name, f"{value}: must be a number >= 0" + (f" and <= {most}" if most < math.inf else ""))
    with user_errors(), nothing_written_if_interrupted(out):
        _refuse_quantized(
            model,
            "prune the float checkpoint it was made from, then quantize the pruned one "
            "(`seekstack quantize PRUNED --out ...`)",
        )
        config = read_config(model)  # fractions that leave too few, or none, are refused before calibrating
        if experts:  # a model without MoE layers is refused nothing (`refuse_too_few_kept`)
            refuse_too_few_kept(config, experts)
        if heads:
            refuse_too_few_heads(config.num_attention_heads, heads)
        notes = rounding_notes(config, experts, heads)
        refuse_out(model, out)
        require_checkpoint_tokenizer(model, data, load_index(data, TRAIN_SPLIT)["tokenizer"])
        network = load_pretrained(model, dequantize=True)
        dtype = stored_float_dtype(model)  # pruned (and healed) in float32, written in the dtype it came in
        batches = held_out_batches(
            str(data), config.max_position_embeddings, batches=calibration_batches, split=TRAIN_SPLIT
        )
        before = network.config
        has_moe = has_moe_layers(config)
        # the MTP module's experts are pruned too
        removed = prune_experts(network, gate_mass(network, batches), experts) if experts and has_moe else {}
        removed |= prune_heads(network, head_importance(network, batches), heads) if heads else {}
        notes += transformers_head_count_notes(before, network.config)
        if heal_steps:
            # SIGTERM before the trainer takes it (as Ctrl-C) would leave the pruned copy in the temporary folder
            with sigterm_cleaned_up(), tempfile.TemporaryDirectory(prefix="seekstack_heal_") as work:
                save_with_tokenizer(network, model, Path(work) / "pruned")
                with interrupted_says(
                    f": the healing run was in a temporary folder, removed now, and nothing was written to {out}: "
                    "`seekstack prune` has no --resume; run it again to prune and heal from the start"
                ):
                    healed = heal(Path(work) / "pruned", data, heal_steps, Path(work) / "run", heal_lr, heal_batch_size)
                save_with_tokenizer(load_pretrained(healed, dtype=dtype), model, out)
        else:
            save_with_tokenizer(network.to(dtype), model, out)
    for layer, ids in removed.items():
        typer.echo(f"{layer}: removed {'heads' if layer.endswith('self_attn') else 'experts'} {ids}")
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    before, after = checkpoint_bytes(model), checkpoint_bytes(out)
    typer.echo(f"wrote {out}: {size(after)} on disk, {after / before:.1%} of {size(before)}")


def _refuse_quantized(model: Path, what_to_do: str) -> None:
    """ValueError saying `what_to_do` instead when checkpoint `model` is quantized: pruning, --progressive and
    --adaptive work on float weights (a quantized input would be written back dequantized, or rounded twice, its
    stages measured against the quantized model instead of the float one). A compressed-tensors config of a
    transform_config alone (rotations fused into float weights, nothing quantized) is no quantization."""
    from seekstack.checkpoint import read_config, stores_quantized_weights

    if stores_quantized_weights(read_config(model).extra.get("quantization_config")):
        raise ValueError(f"{model} is quantized (its config.json has a quantization_config); {what_to_do}")


def register(app: typer.Typer) -> None:
    app.command("quantize", cls=JsonErrorsCommand)(quantize_command)
    app.command("prune")(prune_command)
