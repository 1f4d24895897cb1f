"""The training FLOPs of a LoRA run, for its MFU: the frozen base computes no weight gradients.

A step of the full model costs 3x its forward per token (seekstack/accounting.py): the forward, the activations'
gradients (as many FLOPs) and the weights' gradients (2 per matrix parameter the token multiplies by). A LoRA run
computes the forward; the activations' gradients from the loss down to its lowest adapted layer (none below it, none
at all for a head-only adapter); and a weight's gradient only where the weight the forward uses takes one:
- module targets (the attention projections, an embedding LoRA: peft's lora.Linear / lora.Embedding) keep W frozen
  and add a branch B (A x): 6 FLOPs per factor parameter a token uses (its forward, its input's and its factors'
  gradients);
- parameter targets (dense FFNs, shared and routed experts: peft's ParamWrapper) and a LoRA on the output head (the
  fused head + loss reads the whole weight, once per MTP depth too) use W' = W + s B A as one weight: W' takes its
  gradient in full, and each forward builds s B A, 2 r FLOPs per weight parameter and 4 r more in the backward, once
  per micro-batch; so does the head with trained rows (`head_tokens`), without the factors.
Not counted: DoRA's norms, EVA's, PiSSA's and OLoRA's starts (once per run).
Checked against torch's FlopCounterMode on a dense model (tests/adapters/test_flops.py).
"""

from __future__ import annotations

import torch

from seekstack.accounting import block_forward_flops, main_parameters, training_flops_per_token
from seekstack.adapters.config import AdapterConfig
from seekstack.config import ModelConfig
from seekstack.model.transformer import Transformer


def lora_training_flops(model_config: ModelConfig, adapter: AdapterConfig, seq_len: int, positions: int) -> int:
    """Training FLOPs of a micro-batch of `positions` trained tokens in rows of `seq_len`, of the base `model_config`
    under `adapter`."""
    with torch.device("meta"):
        shapes = {name: param.shape for name, param in Transformer(model_config).named_parameters()}
    modules, parameters = adapter.targets(model_config)
    rank, heads = adapter.rank, 1 + model_config.num_nextn_predict_layers  # the head runs once per MTP depth too
    head = model_config.vocab_size * model_config.hidden_size
    trained_matmul = branch = per_micro_batch = 0
    for name in modules:
        if name == "lm_head":
            trained_matmul += heads * head
            per_micro_batch += heads * 6 * rank * head
        elif name == "embed_tokens":  # a row of A looked up, then B (hidden, r)
            branch += rank * model_config.hidden_size
        else:
            branch += rank * sum(shapes[f"{name}.weight"])  # A (r, in), B (out, r)
    for name in parameters:
        weight = shapes[name].numel()
        share = _activated_share(model_config) if ".experts." in name else 1.0  # K of E experts per token
        trained_matmul += round(share * weight)
        per_micro_batch += 6 * rank * weight
    if adapter.head_tokens:  # the head's weight with the trained rows in place: its gradient in full
        trained_matmul += heads * head
    forward = training_flops_per_token(model_config, seq_len) // 3
    per_token = forward + _activation_gradients(model_config, adapter, modules + parameters, seq_len, forward)
    return positions * (per_token + 2 * trained_matmul + 6 * branch) + per_micro_batch


def _activation_gradients(
    config: ModelConfig, adapter: AdapterConfig, targets: list[str], seq_len: int, forward: int
) -> int:
    """FLOPs per token of the activations' gradients: the forward's, less the blocks below the lowest layer that holds
    an adapted weight (all of them, and the head and MTP module, when no layer does)."""
    layers = [int(name.split(".")[1]) for name in targets if name.startswith("layers.")]
    if "embed_tokens" in targets or adapter.embedding_tokens:
        layers.append(0)
    if not layers:
        return 0
    return forward - sum(block_forward_flops(config, layer, seq_len) for layer in range(min(layers)))


def _activated_share(config: ModelConfig) -> float:
    """The share of the routed experts' parameters one token multiplies by: K of E."""
    main = main_parameters(config)
    return main.routed_activated / main.routed
