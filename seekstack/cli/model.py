"""`seekstack info` and `seekstack forward`: what a model is, and one pass through it."""

from __future__ import annotations

import math
import os
import time
from typing import Annotated

import typer

from seekstack.cli.common import Model, count, fail, flops, model_config, size, user_errors
from seekstack.config import PRESETS, ModelConfig

DEFAULT_FLOPS_CONTEXT = 4096  # DeepSeek-V3 pretrained on 4K-token sequences (V3 report, section 4.2)


def info(
    model: Model,
    context: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=f"Keys each token attends to, for the FLOPs per token; default {DEFAULT_FLOPS_CONTEXT} (DeepSeek-V3's "
            "pretraining sequence) or the model's context when shorter",
        ),
    ] = None,
) -> None:
    """Parameters (main model, MTP modules), activated parameters, FLOPs and KV-cache bytes per token, and the
    architecture."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from seekstack.accounting import (
        forward_flops_per_token,
        kv_cache_bytes_per_token,
        main_parameters,
        mtp_checkpoint_parameters,
        mtp_parameters,
        training_flops_per_token,
    )

    with user_errors():
        config = model_config(model)
    context, context_label = _flops_context(config, context)
    main_params, mtp_params = main_parameters(config), mtp_parameters(config)
    cache = kv_cache_bytes_per_token(config, torch.bfloat16)
    moe_layers = config.moe_layer_count
    experts = f"{config.n_routed_experts} / {config.num_experts_per_tok} / {config.n_shared_experts or 0}"
    table = Table(title=f"{model} ({config.model_type})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [
        ("layers", f"{config.num_hidden_layers} ({config.num_hidden_layers - moe_layers} dense, {moe_layers} MoE)"),
        ("hidden size", str(config.hidden_size)),
        ("attention heads", str(config.num_attention_heads)),
        ("q / kv LoRA rank", f"{config.q_lora_rank or 'none'} / {config.kv_lora_rank}"),
        ("head dims nope / rope / v", f"{config.qk_nope_head_dim} / {config.qk_rope_head_dim} / {config.v_head_dim}"),
        ("experts routed / per token / shared", experts if config.n_routed_experts else "none (dense)"),
        ("expert width", str(config.moe_intermediate_size)),
        ("MTP depths", str(config.num_nextn_predict_layers)),
        ("vocabulary", f"{config.vocab_size:,}"),
        ("params, main model", count(main_params.total)),
        ("params, MTP modules", count(mtp_params.total)),
        ("params, main model + MTP modules", count(main_params.total + mtp_params.total)),
        ("params, MTP in a checkpoint (+ emb./head copies)", count(mtp_checkpoint_parameters(config))),
        ("params activated per token, main (head, no emb.)", count(main_params.activated)),
        (f"forward FLOPs/token, context {context_label}", flops(forward_flops_per_token(config, context))),
        (f"training FLOPs/token, seq {context_label}", flops(training_flops_per_token(config, context))),
        ("KV cache/token bf16, MLA latent", size(cache.latent)),
        ("KV cache/token bf16, plain MHA", size(cache.mha)),
        ("KV cache MHA / latent", f"{cache.ratio:.1f}x"),
    ]
    for row in rows:
        table.add_row(*row)
    Console(markup=False).print(table)


def _flops_context(config: ModelConfig, context: int | None) -> tuple[int, str]:
    """The context of the info table's FLOPs and how it is named: --context, or DEFAULT_FLOPS_CONTEXT (the model's
    own when shorter) when not given; exits naming --context when it is longer than the model's
    (max_position_embeddings)."""
    longest = config.max_position_embeddings
    if context is None:
        if longest < DEFAULT_FLOPS_CONTEXT:
            return longest, f"{longest} (the model's)"
        return DEFAULT_FLOPS_CONTEXT, str(DEFAULT_FLOPS_CONTEXT)
    if context > longest:
        fail(f"--context {context}: longer than the model's context (max_position_embeddings {longest})")
    return context, str(context)


def forward(
    model: Model,
    seq_len: Annotated[int, typer.Option(min=1, help="Tokens per sequence.")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", "--batch", min=1, help="Sequences in the batch.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the random weights (presets) and token ids.")] = 0,
) -> None:
    """One forward pass on random tokens: parameters (main model + MTP modules), logits shape, losses, expert load
    per MoE layer, time taken."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from seekstack.accounting import main_parameters, mtp_parameters
    from seekstack.checkpoint import load_pretrained
    from seekstack.model.transformer import Transformer

    torch.manual_seed(seed)
    with user_errors():
        config = model_config(model)
        if seq_len > config.max_position_embeddings:  # positions past it were never trained: its losses mean nothing
            fail(
                f"--seq-len {seq_len}: longer than the model's context (max_position_embeddings "
                f"{config.max_position_embeddings})"
            )
        _require_memory(model, config, batch_size, seq_len)
        network = Transformer(config) if model in PRESETS else load_pretrained(model)
    network.eval()
    input_ids = torch.randint(config.vocab_size, (batch_size, seq_len))
    start = time.perf_counter()
    with torch.inference_mode():
        output = network(input_ids, labels=input_ids)
    elapsed = time.perf_counter() - start

    console = Console(markup=False)  # paths may hold [brackets]
    main, mtp = main_parameters(network.config).total, mtp_parameters(network.config).total
    console.print(
        f"{model}: {count(main + mtp)} parameters = main model {count(main)} + MTP modules {count(mtp)}", soft_wrap=True
    )
    console.print(f"logits shape: {tuple(output.logits.shape)}")
    if output.mtp_loss is not None:
        mtp_loss = f"{output.mtp_loss.item():.4f}"
    else:
        mtp_loss = "n/a (the model has no MTP module)" if len(network.mtp) == 0 else "n/a (needs seq-len >= 3)"
    lm_loss = f"{output.lm_loss.item():.4f}" if seq_len >= 2 else "n/a (needs seq-len >= 2: no token has a next one)"
    console.print(f"lm loss: {lm_loss}, mtp loss: {mtp_loss}")
    console.print(f"uniform guess: ln V = {math.log(config.vocab_size):.4f}")
    if output.expert_load is not None:
        table = Table(title="expert load (tokens per routed expert)")
        table.add_column("layer", justify="right")
        table.add_column("max / mean", justify="right")
        table.add_column("tokens per expert")
        for layer_idx, load in zip(network.moe_layer_ids, output.expert_load, strict=False):
            label = f"{layer_idx} (MTP)" if layer_idx >= config.num_hidden_layers else str(layer_idx)
            table.add_row(label, f"{(load.max() / load.float().mean()).item():.2f}", " ".join(map(str, load.tolist())))
        console.print(table)
    console.print(f"forward took {elapsed * 1000:.1f} ms (batch {batch_size} x {seq_len} tokens on {input_ids.device})")


def _require_memory(model: str, config: ModelConfig, batch_size: int, seq_len: int) -> None:
    """Refuse, with the numbers, to build a model whose float32 weights and a batch's float32 logits (B x T x V, the
    least a forward holds beside them) exceed this machine's memory: a typo's --batch-size 100000 took it all, and
    10**20 failed with torch's traceback."""
    from seekstack.accounting import main_parameters, mtp_parameters

    if not hasattr(os, "sysconf"):
        return
    weights = 4 * (main_parameters(config).total + mtp_parameters(config).total)
    logits = 4 * batch_size * seq_len * config.vocab_size
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if weights + logits > available:
        fail(
            f"{model} needs {size(weights)} for its float32 weights and {size(logits)} for the logits of "
            f"--batch-size {batch_size} x --seq-len {seq_len}; this machine has {size(available)}"
        )


def register(app: typer.Typer) -> None:
    app.command()(info)
    app.command()(forward)
