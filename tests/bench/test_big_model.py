"""bench/big_model.py: a failed child says why, and sizes that cannot measure a decode rate are refused naming the
option."""

import sys

import pytest
import torch

import seekstack
from tests.bench.support import BENCH, run_in_process
from tests.conftest import micro_config

sys.path.insert(0, str(BENCH))  # its siblings (gguf_deepseek2.py), as when run
from bench import big_model  # noqa: E402


def test_a_failed_child_stops_the_run_with_its_command_and_error(tmp_path, monkeypatch):
    # the child runs this file: big_model.py's argument parser without its imports (torch: seconds to start)
    script = tmp_path / "big_model.py"
    parser = "import argparse\nparser = argparse.ArgumentParser()\nparser.add_argument('--layers', type=int)\n"
    script.write_text(parser + "parser.parse_args()\n")
    monkeypatch.setattr(big_model, "__file__", str(script))
    with pytest.raises(SystemExit) as stopped:
        big_model.child("--layers", "many")
    assert str(stopped.value).startswith("bench/big_model.py --layers many failed (exit 2): ")
    assert "invalid int value: 'many'" in str(stopped.value)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--layers", "0", "argument --layers: 0: at least 1"),
        ("--layers", "-3", "argument --layers: -3: at least 1"),
        ("--layers", "28", "argument --layers: 28: at most 27 (DeepSeek-V2-Lite's layers)"),
        ("--prompt-tokens", "0", "argument --prompt-tokens: 0: at least 1"),
        (
            "--new-tokens",
            "1",
            "argument --new-tokens: 1: at least 2, the decode rate is t(N new tokens) - t(1 new token)",
        ),
    ],
)
def test_sizes_that_measure_nothing_are_refused_naming_the_option(option, value, message, monkeypatch, capsys):
    options = ("--layers", "1", "--skip-llama-cpp", option, value)
    run = run_in_process("big_model.py", *options, monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert run.stderr.splitlines()[-1].endswith(f"error: {message}")


def test_a_model_routing_within_expert_groups_is_refused_as_a_gguf_naming_n_group(tmp_path):
    # llama.cpp keeps groups by the sum of a group's top-2 experts, ours (V2's group_limited_greedy) by its best one
    pytest.importorskip("gguf")
    from gguf_deepseek2 import write_gguf

    config = micro_config(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2)
    with pytest.raises(ValueError, match=r"^n_group 4 \(topk_group 2, topk_method 'group_limited_greedy'\): group"):
        write_gguf(seekstack.Transformer(config), tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []


def test_the_expert_selection_bias_of_noaux_tc_routing_is_written_for_llama_cpp(tmp_path):
    # a V2-shaped config (softmax scores) with V3's bias-corrected selection, topk_method noaux_tc in one group
    gguf = pytest.importorskip("gguf")
    from gguf_deepseek2 import write_gguf

    model = int8_v2_model(topk_method="noaux_tc", n_group=1, topk_group=1)
    bias = model.layers[1].mlp.gate.e_score_correction_bias
    bias.copy_(torch.linspace(-1, 1, bias.numel()))
    write_gguf(model, tmp_path / "model.gguf")
    tensors = {tensor.name: tensor.data for tensor in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    assert "blk.0.exp_probs_b.bias" not in tensors  # the dense layer routes nothing
    torch.testing.assert_close(torch.from_numpy(tensors["blk.1.exp_probs_b.bias"].copy()), bias, rtol=0, atol=0)


def int8_v2_model(**overrides) -> seekstack.Transformer:
    """A micro V2-shaped model (softmax routing, no query compression; one dense and one MoE layer) quantized to int8
    as `seekstack quantize` does; `overrides` change its config."""
    from seekstack.compress.quantize import QuantConfig, quantize_model

    config = micro_config(**{
        "vocab_size": 1024, "scoring_func": "softmax", "topk_method": "greedy", "q_lora_rank": None,
        "num_hidden_layers": 2, "num_nextn_predict_layers": 0, **overrides,
    })  # fmt: skip
    torch.manual_seed(0)
    model = seekstack.Transformer(config)
    quantize_model(model, QuantConfig(scheme="int8"))
    return model


def int8_v2_model_as_gguf(path) -> seekstack.Transformer:
    """`int8_v2_model()` written as a q8_0 GGUF at `path`."""
    from gguf_deepseek2 import write_gguf

    model = int8_v2_model()
    write_gguf(model, path)
    return model


def test_an_int8_model_is_written_as_q8_0_blocks_holding_its_codes_and_row_scales(tmp_path):
    gguf = pytest.importorskip("gguf")
    model = int8_v2_model_as_gguf(tmp_path / "model.gguf")
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    experts = model.layers[1].mlp.experts.down_proj
    for name, expected in (
        ("blk.0.attn_q.weight", model.layers[0].self_attn.q_proj.qweight.dequantize()),
        ("blk.1.ffn_down_exps.weight", experts.weight.float() * experts.weight_scale.float().unsqueeze(-1)),
    ):
        tensor = tensors[name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
        written = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        torch.testing.assert_close(torch.from_numpy(written), expected.float(), rtol=0, atol=0)


def test_llama_cpp_runs_the_gguf_without_its_extra_weight_buffers_where_they_crash_it(tmp_path):
    # llama-cpp-python 0.3.36 on an AMX CPU repacks q8_0 weights into extra buffers it then cannot run: it aborts
    # loading a V2-Lite-wide model (GGML_ASSERT(*cur_backend_id != -1)) and crashes evaluating two tokens of this micro
    # one; on a CPU without AMX both load as llama.cpp loads by default
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    int8_v2_model_as_gguf(tmp_path / "model.gguf")
    result = big_model.run_llama_cpp(tmp_path / "model.gguf", prompt=[5, 6, 7, 8], new_tokens=3)
    assert len(result["tokens"]) == 3 and all(0 <= token < 1024 for token in result["tokens"])
    without = "loaded without llama.cpp's extra (repacked) weight buffers: with them it aborted ("
    assert result["loaded"] == "as llama.cpp loads by default" or result["loaded"].startswith(without), result


def test_llama_cpp_holds_the_prompt_and_new_tokens_past_512(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    int8_v2_model_as_gguf(tmp_path / "model.gguf")
    result = big_model.run_llama_cpp(tmp_path / "model.gguf", prompt=[5] * 512, new_tokens=3)
    assert len(result["tokens"]) == 3
