"""bench/decode.py's decode rate, B x (N - 1) / (t(N) - t(1)): never negative or infinite, and settings that cannot
measure one are refused."""

import math
import subprocess
import sys

import pytest

from tests.bench.support import BENCH

SCRIPT = BENCH / "decode.py"
sys.path.insert(0, str(BENCH))  # its siblings (machine.py, llama_cpp_peer.py), as when run
from bench.decode import decode_rate  # noqa: E402


def test_decode_rate_is_the_decode_tokens_over_the_time_past_the_first_token():
    assert decode_rate({"ours_1": 0.01, "ours_4": 0.04}, "ours", sequences=2, new_tokens=4) == 2 * 3 / 0.03


def test_decode_rate_is_nan_where_the_timing_noise_hides_the_decode_time():
    for longest in (0.0199, 0.02):  # t(4 tokens) below t(1), and equal to it: a negative and an infinite rate
        assert math.isnan(decode_rate({"ours_1": 0.02, "ours_4": longest}, "ours", sequences=1, new_tokens=4))


def test_one_new_token_is_refused_naming_the_option():
    # timeout: a hang's bound; loaded (4 busy processes beside), importing torch, transformers and seekstack took 82 s
    command = [sys.executable, str(SCRIPT), "--new-tokens", "1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2
    assert "--new-tokens 1: at least 2" in run.stderr


def test_a_gguf_file_llama_cpp_cannot_load_is_skipped_naming_it_and_the_run_goes_on(tmp_path):
    pytest.importorskip("llama_cpp")
    from llama_cpp_peer import GGUF_TYPES, load_llama_cpp

    source = tmp_path / "llama.cpp"  # a converter that writes a damaged GGUF file of every type
    (source / "conversion").mkdir(parents=True)
    (source / "conversion" / "__init__.py").write_text("")
    (source / "conversion" / "base.py").write_text("class TextModel:\n    pass\n")
    (source / "convert_hf_to_gguf.py").write_text(
        "import sys\nopen(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write(b'GGUF' + bytes(60))\n"
    )
    models, reason = load_llama_cpp(tmp_path, source, context=64, threads=1)
    assert models == []
    for outtype in GGUF_TYPES:
        assert f"{outtype}: llama-cpp-python could not load {tmp_path / f'model-{outtype}.gguf'}" in reason
