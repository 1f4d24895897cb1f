"""bench/decode.py's decode rate, B x (N - 1) / (t(N) - t(1)): never negative or infinite, and settings that cannot
measure one are refused."""

import math
import sys
import types

import pytest
import torch

import seekstack
from seekstack.infer import Engine, EngineOptions
from seekstack.tokenizer import train_tokenizer
from tests.bench.support import BENCH, run_in_process
from tests.conftest import micro_config

SCRIPT = BENCH / "decode.py"
sys.path.insert(0, str(BENCH))  # its siblings (machine.py, llama_cpp_peer.py), as when run
from bench import decode  # noqa: E402
from bench.decode import decode_rate  # noqa: E402


def test_decode_rate_is_the_decode_tokens_over_the_time_past_the_first_token():
    assert decode_rate({"ours_1": 0.01, "ours_4": 0.04}, "ours", sequences=2, new_tokens=4) == 2 * 3 / 0.03


def test_decode_rate_is_nan_where_the_timing_noise_hides_the_decode_time():
    for longest in (0.0199, 0.02):  # t(4 tokens) below t(1), and equal to it: a negative and an infinite rate
        assert math.isnan(decode_rate({"ours_1": 0.02, "ours_4": longest}, "ours", sequences=1, new_tokens=4))


def test_one_new_token_is_refused_naming_the_option(monkeypatch, capsys):
    run = run_in_process("decode.py", "--new-tokens", "1", monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert run.stderr.splitlines()[-1].endswith(
        "error: argument --new-tokens: 1: at least 2, the decode rate is t(N new tokens) - t(1 new token)"
    )


@pytest.mark.parametrize("option", ["--batches", "--scaling", "--prompt-len"])
def test_a_batch_of_no_sequences_or_an_empty_prompt_is_refused_naming_the_option(option, monkeypatch, capsys):
    # refused before any work: an empty batch would fail only after minutes of building and compiling
    run = run_in_process("decode.py", option, "0", monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert run.stderr.splitlines()[-1].endswith(f"error: argument {option}: 0: at least 1")


def test_a_sequence_past_the_presets_context_is_refused_naming_both_options(monkeypatch, capsys):
    # ours stops a sequence at the context, transformers goes on: refused before minutes of building and compiling
    run = run_in_process("decode.py", "--new-tokens", "961", monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert run.stderr.splitlines()[-1].endswith(
        "error: --prompt-len 64 + --new-tokens 961: past preset tiny's context of 1024 tokens, where ours stops "
        "decoding and transformers would go on"
    )


def test_the_engines_hold_the_llama_cpp_rows_sequences_at_once_whatever_batches_and_scaling_ask(monkeypatch):
    # engines built for --batches 1 --scaling 1 alone would decode the "8 concurrent sequences" row one after another
    class Built(Exception):
        pass

    def build(preset, directory, max_batch, dtype):
        raise Built(max_batch)

    monkeypatch.setattr(sys, "argv", ["decode.py", "--batches", "1", "--scaling", "1"])
    monkeypatch.setattr(decode, "prepare_machine", lambda args: None)
    monkeypatch.setattr(decode, "matmul_peaks", lambda clock: {})
    monkeypatch.setattr(decode, "build", build)
    with pytest.raises(Built) as built:
        decode.main()
    assert built.value.args == (decode.LLAMA_CPP_SEQUENCES,) == (8,)


DAMAGED_GGUF = "import sys\nopen(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write(b'GGUF' + bytes(60))\n"


def damaged_gguf_converter(folder, converter=DAMAGED_GGUF):
    """A llama.cpp source tree in `folder` whose converter runs `converter` (by default it writes a damaged GGUF file
    of every type), beside the config.json of a DeepSeek-V3 checkpoint in `folder`."""
    (folder / "config.json").write_text('{"architectures": ["DeepseekV3ForCausalLM"]}')
    source = folder / "llama.cpp"
    (source / "conversion").mkdir(parents=True)
    (source / "conversion" / "__init__.py").write_text('MODELS = {"DeepseekV3ForCausalLM": "deepseek"}\n')
    (source / "conversion" / "base.py").write_text("class TextModel:\n    pass\n")
    (source / "convert_hf_to_gguf.py").write_text(converter)
    return source


@pytest.mark.parametrize(
    ("older", "lacks"),
    [
        ("conversion/base.py", "{source}/conversion/base.py (an older tree converts in one script"),
        ("conversion/__init__.py", "a model class for DeepseekV3ForCausalLM (the architecture in config.json)"),
    ],
)
def test_a_llama_cpp_tree_too_old_is_refused_naming_the_folder_and_what_it_lacks(older, lacks, tmp_path):
    # a tree from before the converter became a package, or from before DeepSeek-V3: refused before converting
    pytest.importorskip("llama_cpp")
    from llama_cpp_peer import load_llama_cpp

    source = damaged_gguf_converter(tmp_path, "raise SystemExit('the converter ran')")
    (source / older).unlink()
    models, reason = load_llama_cpp(tmp_path, source, context=64, threads=1)
    assert models == []
    assert reason.startswith(
        f"--llama-cpp-source {source} is too old: its converter lacks {lacks.format(source=source)}"
    )
    assert not list(tmp_path.glob("*.gguf"))


def test_a_converter_killed_without_a_word_is_reported_with_its_signal(tmp_path):
    # as the kernel's OOM killer ends a conversion of a model too large for the memory: SIGKILL, nothing on stderr
    pytest.importorskip("llama_cpp")
    from llama_cpp_peer import load_llama_cpp

    killed = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    models, reason = load_llama_cpp(tmp_path, damaged_gguf_converter(tmp_path, killed), context=64, threads=1)
    assert models == []
    assert reason.startswith("f32: convert_hf_to_gguf.py --outtype f32 failed (killed by signal 9, nothing said); ")


def test_a_conversion_that_fails_costs_only_its_own_row_naming_the_type(tmp_path, monkeypatch):
    # as a converter that cannot write bf16 (an older llama.cpp, numpy without bfloat16) still converts f32 and q8_0
    pytest.importorskip("llama_cpp")
    import llama_cpp_peer

    refuses_bf16 = "import sys\nif 'bf16' in sys.argv:\n    sys.exit('ValueError: no bf16 here')\n" + DAMAGED_GGUF
    monkeypatch.setattr(llama_cpp_peer, "PROBE", "")  # every file that was written loads
    monkeypatch.setattr(llama_cpp_peer, "open_gguf", lambda path, context, threads, extra: path)
    source = damaged_gguf_converter(tmp_path, refuses_bf16)
    models, reason = llama_cpp_peer.load_llama_cpp(tmp_path, source, context=64, threads=1)
    assert [model.outtype for model in models] == ["f32", "q8_0"]
    assert reason == "bf16: convert_hf_to_gguf.py --outtype bf16 failed (ValueError: no bf16 here)"


def test_a_gguf_file_llama_cpp_cannot_load_is_skipped_naming_it_and_the_run_goes_on(tmp_path):
    pytest.importorskip("llama_cpp")
    from llama_cpp_peer import GGUF_TYPES, load_llama_cpp

    models, reason = load_llama_cpp(tmp_path, damaged_gguf_converter(tmp_path), context=64, threads=1)
    assert models == []
    for outtype in GGUF_TYPES:
        assert f"{outtype}: llama-cpp-python could not load {tmp_path / f'model-{outtype}.gguf'}" in reason


def test_a_gguf_file_llama_cpp_aborts_on_is_loaded_without_its_extra_weight_buffers_saying_so(tmp_path, monkeypatch):
    # llama-cpp-python 0.3.36 aborts loading a q8_0 GGUF on an AMX CPU while it repacks the weights into its extra
    # buffer types, and loads it without them: here a probe that aborts only with those buffers on stands for it.
    pytest.importorskip("llama_cpp")
    import llama_cpp_peer

    abort_with_buffers = (
        "import os, sys\nif sys.argv[4] == '1':\n    print('GGML_ASSERT(x) failed', file=sys.stderr)\n    os.abort()\n"
    )
    monkeypatch.setattr(llama_cpp_peer, "PROBE", abort_with_buffers)
    opened = []
    monkeypatch.setattr(llama_cpp_peer, "open_gguf", lambda path, context, threads, extra: opened.append(extra))
    models, reason = llama_cpp_peer.load_llama_cpp(tmp_path, damaged_gguf_converter(tmp_path), context=64, threads=1)
    assert reason is None and opened == [False] * len(llama_cpp_peer.GGUF_TYPES)
    assert [model.outtype for model in models] == list(llama_cpp_peer.GGUF_TYPES)
    said = "with them it aborted (GGML_ASSERT(x) failed)"
    assert [model.note for model in models] == [
        f"loaded without llama.cpp's extra (repacked) weight buffers: {said}"
    ] * 3


def test_llama_cpp_tokens_are_compared_with_ours_in_float32_not_with_the_timed_engine(tmp_path, monkeypatch, capsys):
    # llama.cpp's f32 GGUF computes the checkpoint in float32; ours is timed in its default dtype (bfloat16 where the
    # CPU has it), whose rounding flips a random model's near-ties. The timed engines here run another checkpoint in
    # bfloat16, so only a comparison with ours loaded in float32 from `model_dir` finds every token alike.
    config = micro_config(vocab_size=300, num_nextn_predict_layers=0)
    for name, seed in (("exact", 0), ("timed", 1)):
        torch.manual_seed(seed)
        seekstack.save_pretrained(seekstack.Transformer(config), tmp_path / name)
        train_tokenizer([SCRIPT.read_text()], vocab_size=300, out_path=tmp_path / name)

    def engine(name: str, dtype: str) -> Engine:
        return Engine.from_pretrained(tmp_path / name, **EngineOptions(compile=False, dtype=dtype).engine_kwargs(None))

    args = types.SimpleNamespace(prompt_len=8, new_tokens=6, reps=1, clock="wall", llama_cpp_source=None)
    prompt = decode.random_prompts(1, args.prompt_len, config.vocab_size)
    expected = decode.ours_generate(engine("exact", "float32"), prompt, args.new_tokens)[0]
    peer = types.SimpleNamespace(outtype="f32", convert_seconds=0.0, note="", use_threads=lambda threads: None)
    peer.generate = lambda tokens, n: expected[:n]
    monkeypatch.setattr(decode, "load_llama_cpp", lambda *_: ([peer], None))
    timed = engine("timed", "bfloat16")
    decode.llama_cpp_rows(timed, timed, tmp_path / "exact", args, flops_per_token=1.0, peak=1.0)
    printed = capsys.readouterr().out
    assert "llama.cpp f32" in printed and "greedy agree 100%" in printed.split("llama.cpp f32")[1], printed
