"""A seekstack DeepSeek-V2 model (int8 layers as `seekstack quantize` writes them) as a llama.cpp GGUF, arch
`deepseek2`, at the same precision, for bench/big_model.py to time llama.cpp on the same weights.

An int8 row with its scale s becomes q8_0 blocks of 32 codes, each block carrying s as fp16 (s is bfloat16, which
fp16 holds exactly at these magnitudes): the same numbers. Float matrices go to F16 (ours are bfloat16: the same
bytes per weight), norms, the router and noaux_tc routing's selection bias to F32. kv_b_proj is split into the
per-head k_b (transposed) and v_b that llama.cpp's absorbed MLA multiplies with, as llama.cpp's own converter does.
The file is written one tensor at a time (gguf's streaming writer), so memory holds one tensor's blocks.

Tensor shapes below are torch's (outer dimension first); GGUF lists them reversed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from seekstack.compress.linear import QuantizedExperts, QuantizedLinear
from seekstack.model.moe import MoE
from seekstack.model.transformer import Transformer

Q8_0 = gguf.GGMLQuantizationType.Q8_0
BLOCK = 32  # weights per q8_0 block
# SentencePiece-style names for the first ids, which llama.cpp's vocabulary loader looks up; the rest are numbered.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256))]


def q8_0_blocks(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """int8 codes (..., R, C) with one scale per row (..., R), as Int8Weight holds them, as q8_0 bytes
    (..., R, C/32 x 34): per block of 32 codes its fp16 scale, then the codes."""
    *outer, columns = codes.shape
    blocks = columns // BLOCK
    scales = scale.float().half().unsqueeze(-1).expand(*outer, blocks).contiguous().unsqueeze(-1).view(torch.uint8)
    codes = codes.contiguous().view(*outer, blocks, BLOCK).view(torch.uint8)
    return torch.cat([scales, codes], dim=-1).reshape(*outer, blocks * (BLOCK + 2)).numpy()


def _matrix(layer: nn.Module) -> tuple[str, tuple[torch.Tensor, ...]]:
    """A Linear's weight as (kind, tensors): q8_0 from an int8 QuantizedLinear, else F16."""
    if isinstance(layer, QuantizedLinear):
        if layer.qweight.scheme != "int8":
            raise ValueError(f"{layer}: only int8 layers map to q8_0")
        return "q8_0", (layer.qweight.weight, layer.qweight.weight_scale)
    return "f16", (layer.weight,)


def gguf_tensors(model: Transformer) -> Iterator[tuple[str, str, tuple[torch.Tensor, ...]]]:
    """(GGUF name, kind: q8_0 | f16 | f32, torch tensors) for every tensor llama.cpp's deepseek2 reads."""
    config = model.config
    yield "token_embd.weight", "f16", (model.embed_tokens.weight,)
    for i, block in enumerate(model.layers):
        attention, prefix = block.self_attn, f"blk.{i}"
        yield f"{prefix}.attn_norm.weight", "f32", (block.input_layernorm.weight,)
        if config.q_lora_rank:
            raise ValueError("q_lora_rank models (V2, V3) are not mapped here: V2-Lite projects queries directly")
        yield f"{prefix}.attn_q.weight", *_matrix(attention.q_proj)
        yield f"{prefix}.attn_kv_a_mqa.weight", *_matrix(attention.kv_a_proj_with_mqa)
        yield f"{prefix}.attn_kv_a_norm.weight", "f32", (attention.kv_a_layernorm.weight,)
        per_head = attention.kv_b_proj.weight.view(config.num_attention_heads, -1, config.kv_lora_rank)
        yield f"{prefix}.attn_k_b.weight", "f16", (per_head[:, : config.qk_nope_head_dim].transpose(1, 2),)
        yield f"{prefix}.attn_v_b.weight", "f16", (per_head[:, config.qk_nope_head_dim :],)
        yield f"{prefix}.attn_output.weight", *_matrix(attention.o_proj)
        yield f"{prefix}.ffn_norm.weight", "f32", (block.post_attention_layernorm.weight,)
        mlp = block.mlp
        if not isinstance(mlp, MoE):
            for name in ("gate", "up", "down"):
                yield f"{prefix}.ffn_{name}.weight", *_matrix(getattr(mlp, f"{name}_proj"))
            continue
        yield f"{prefix}.ffn_gate_inp.weight", "f32", (mlp.gate.weight,)
        if mlp.gate.aux_free:  # the selection bias b (V3 eq. 16), which llama.cpp adds where present
            yield f"{prefix}.exp_probs_b.bias", "f32", (mlp.gate.e_score_correction_bias,)
        experts = mlp.experts
        if not isinstance(experts, QuantizedExperts) or experts.gate_up_proj.scheme != "int8":
            raise ValueError(f"layer {i}: the routed experts must be int8 (QuantizedExperts) to map to q8_0")
        gate_up, down = experts.gate_up_proj, experts.down_proj
        size = gate_up.weight.shape[1] // 2
        yield f"{prefix}.ffn_gate_exps.weight", "q8_0", (gate_up.weight[:, :size], gate_up.weight_scale[:, :size])
        yield f"{prefix}.ffn_up_exps.weight", "q8_0", (gate_up.weight[:, size:], gate_up.weight_scale[:, size:])
        yield f"{prefix}.ffn_down_exps.weight", "q8_0", (down.weight, down.weight_scale)
        for name in ("gate", "up", "down"):
            yield f"{prefix}.ffn_{name}_shexp.weight", *_matrix(getattr(mlp.shared_experts, f"{name}_proj"))
    yield "output_norm.weight", "f32", (model.norm.weight,)
    yield "output.weight", "f16", (model.lm_head.weight,)


def _array(kind: str, tensors: tuple[torch.Tensor, ...]) -> np.ndarray:
    if kind == "q8_0":
        return q8_0_blocks(*tensors)
    dtype = torch.float16 if kind == "f16" else torch.float32
    return tensors[0].detach().to(dtype).contiguous().numpy()


def _byte_shape(kind: str, tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, numpy dtype, bytes) of the array `_array` would make, without making it."""
    shape = tuple(tensors[0].shape)
    if kind == "q8_0":
        shape = (*shape[:-1], shape[-1] // BLOCK * (BLOCK + 2))
        return shape, np.dtype(np.uint8), int(np.prod(shape))
    dtype = np.dtype(np.float16 if kind == "f16" else np.float32)
    return shape, dtype, int(np.prod(shape)) * dtype.itemsize


def write_gguf(model: Transformer, path: Path) -> None:
    """Write `model` as a deepseek2 GGUF at `path`, one tensor at a time."""
    config = model.config
    writer = gguf.GGUFWriter(path, "deepseek2")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(1)  # absorbed MLA: one shared latent "head"
    writer.add_key_length(config.kv_lora_rank + config.qk_rope_head_dim)
    writer.add_value_length(config.kv_lora_rank)
    writer.add_key_length_mla(config.qk_nope_head_dim + config.qk_rope_head_dim)
    writer.add_value_length_mla(config.v_head_dim)
    writer.add_q_lora_rank(config.q_lora_rank or 0)
    writer.add_kv_lora_rank(config.kv_lora_rank)
    writer.add_rope_dimension_count(config.qk_rope_head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_leading_dense_block_count(config.first_k_dense_replace)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_count(config.n_routed_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_shared_count(config.n_shared_experts)
    writer.add_expert_weights_scale(config.routed_scaling_factor)
    writer.add_expert_weights_norm(config.norm_topk_prob)
    if config.scoring_func != "softmax":
        raise ValueError(f"scoring_func {config.scoring_func!r}: only V2's softmax routing is mapped here")
    if config.topk_method != "greedy" and (config.n_group or 1) > 1:
        # llama.cpp's deepseek2 keeps groups as V3 does (expert_group_count: a group scores the sum of its top-2
        # experts), not by V2's best expert per group, and without the key it routes over all experts
        raise ValueError(
            f"n_group {config.n_group} (topk_group {config.topk_group}, topk_method {config.topk_method!r}): "
            "group-limited routing is not mapped here, llama.cpp would route each token over other experts than ours"
        )
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_log_mul(0.1 * scaling.get("mscale_all_dim", 0.0))  # llama.cpp's convention
    tokens = [*SPECIAL_TOKENS, *(f"<t{i}>" for i in range(len(SPECIAL_TOKENS), config.vocab_size))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (
        len(tokens) - len(SPECIAL_TOKENS)
    ))  # fmt: skip
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    kinds = {"q8_0": Q8_0, "f16": None, "f32": None}
    with torch.no_grad():
        for name, kind, tensors in gguf_tensors(model):
            shape, dtype, nbytes = _byte_shape(kind, tensors)
            writer.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=kinds[kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, kind, tensors in gguf_tensors(model):
            writer.write_tensor_data(_array(kind, tensors))
    writer.close()
