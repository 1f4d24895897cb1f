"""The `auto` inference dtype: bfloat16 where the devices run it fast, float32 elsewhere; and a bfloat16 engine's
greedy tokens against float32's."""

from __future__ import annotations

import pytest
import torch

from seekstack.infer import Engine, EngineOptions, SamplingParams
from seekstack.infer.precision import (
    MIN_BF16_CPU_PARAMETERS,
    asked_dtype_caveat,
    auto_dtype,
    checkpoint_parameters,
    map_devices,
)
from seekstack.schema import ConfigError
from tests.infer.support import model_dir

ZEN5 = {"avx512_f": True, "avx512_bf16": True, "amx_tile": False}  # the 2-core machine bf16 was measured on
SKYLAKE = {"avx512_f": True, "avx512_bf16": False}  # AVX-512 without bf16 dot products: bf16 runs slower
SAPPHIRE_RAPIDS = {"avx512_bf16": True, "amx_bf16": True, "amx_tile": True}


@pytest.mark.parametrize(
    ("features", "expected"), [(ZEN5, "bfloat16"), (SAPPHIRE_RAPIDS, "bfloat16"), (SKYLAKE, "float32"), ({}, "float32")]
)
def test_auto_picks_bfloat16_only_on_a_cpu_with_bf16_dot_products(features, expected):
    dtype, reason = auto_dtype(["cpu"], features=features)
    assert dtype == expected
    assert ("has avx512_bf16" in reason or "has amx_bf16" in reason) == (expected == "bfloat16")


def test_auto_needs_every_device_of_the_map_fast():
    assert map_devices(None) == ["cpu"]
    assert map_devices("*=cuda:0,layers.*.mlp.experts=disk") == ["cpu", "cuda:0"]
    assert map_devices("auto:cuda:1=80GiB,cpu=20GiB") == ["cpu", "cuda:1"]
    assert map_devices("*=CUDA:1,embed_tokens=CPU") == ["cpu", "cuda:1"]  # the device map takes any case
    with_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    assert auto_dtype(["cpu", "cuda:0"], features=ZEN5)[0] == ("bfloat16" if with_gpu else "float32")
    assert auto_dtype(["cpu", "cuda:0"], features=SKYLAKE)[0] == "float32"
    assert auto_dtype(["mps"], features=ZEN5) == ("float32", "bf16 speed on mps is not known")


def test_a_model_that_fits_the_cache_stays_in_float32_on_the_cpu_but_not_on_a_gpu():
    """Small CPU matmuls cost more per call in bf16 (the 2.8M-parameter tiny decoded at 0.51x float32's speed)."""
    small, large = MIN_BF16_CPU_PARAMETERS - 1, MIN_BF16_CPU_PARAMETERS
    dtype, reason = auto_dtype(["cpu"], small, ZEN5)
    assert dtype == "float32" and "this CPU has avx512_bf16, but a model of 16.0M parameters" in reason
    assert auto_dtype(["cpu"], large, ZEN5)[0] == "bfloat16"
    with_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    assert auto_dtype(["cuda:0"], small)[0] == ("bfloat16" if with_gpu else "float32")


def test_a_dtype_asked_for_is_told_where_it_can_run_slower_than_float32():
    """float16 on a CPU without fp16 arithmetic (`small` decoded at 0.44-0.68x float32's speed on a Zen 4), bfloat16
    where `auto` would not take it; nothing against float32, or against either where the hardware computes it."""
    large = MIN_BF16_CPU_PARAMETERS
    assert asked_dtype_caveat("float16", ["cpu"], large, ZEN5) == "this CPU has none of avx512_fp16, amx_fp16"
    assert asked_dtype_caveat("float16", ["cpu"], large, {**SAPPHIRE_RAPIDS, "avx512_fp16": True}) is None
    assert asked_dtype_caveat("bfloat16", ["cpu"], large, SKYLAKE) == "this CPU has none of avx512_bf16, amx_bf16"
    small_caveat = asked_dtype_caveat("bfloat16", ["cpu"], large - 1, ZEN5)
    assert small_caveat is not None and "a model of 16.0M parameters (under 16M) runs faster in float32" in small_caveat
    assert asked_dtype_caveat("bfloat16", ["cpu"], large, ZEN5) is None
    assert asked_dtype_caveat("float32", ["cpu"], large, SKYLAKE) is None


def test_engine_options_default_to_auto_and_resolve_it_for_this_machine_and_checkpoint(tmp_path):
    options = EngineOptions()
    assert options.dtype == "auto"
    detected, reason = auto_dtype(["cpu"])
    assert options.resolved_dtype() == (detected, f"auto: {reason}")
    assert options.engine_kwargs()["dtype"] == getattr(torch, detected)
    directory = model_dir(tmp_path)  # the micro model: far under the size where bf16 pays on a CPU
    assert checkpoint_parameters(directory) < MIN_BF16_CPU_PARAMETERS
    assert options.engine_kwargs(directory)["dtype"] == torch.float32
    assert EngineOptions(dtype="float32").engine_kwargs()["dtype"] == torch.float32  # the opt-out
    with pytest.raises(ConfigError, match="dtype"):
        EngineOptions(dtype="float64").validate()


def test_a_bfloat16_engine_decodes_the_float32_tokens(tmp_path):
    """Greedy decoding of the micro model in bfloat16 keeps float32's tokens, but where float32's top two are closer
    than bfloat16's rounding (one row of 8 here: 0.0005 apart), and their log-probabilities within that rounding."""
    directory = model_dir(tmp_path)
    prompts = [list(range(5 + 7 * i, 25 + 7 * i)) for i in range(8)]
    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=2)
    outputs = {
        dtype: Engine.from_pretrained(directory, dtype=dtype, compile=False).generate(prompts, params)
        for dtype in (torch.float32, torch.bfloat16)
    }
    same, gaps, flipped = 0, [], 0
    for full, half in zip(outputs[torch.float32], outputs[torch.bfloat16], strict=True):
        for a, b in zip(full.logprobs, half.logprobs, strict=True):
            if a.token_id != b.token_id:  # a near tie: bfloat16 took float32's runner-up
                runner_up = {token: logprob for token, _, logprob in a.top}
                assert a.logprob - runner_up.get(b.token_id, float("-inf")) < 0.02
                flipped += 1
                break
            same += 1
            gaps.append(abs(a.logprob - b.logprob))
    assert flipped <= 2 and same >= 0.75 * len(prompts) * params.max_new_tokens
    assert max(gaps) < 0.1
