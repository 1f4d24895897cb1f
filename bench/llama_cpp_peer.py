"""llama.cpp as a peer of the decode benchmark: our checkpoint converted to GGUF, decoded greedily by llama-cpp-python.

The conversion is llama.cpp's own `convert_hf_to_gguf.py`, from a llama.cpp source tree (`--llama-cpp-source`; the
llama-cpp-python sdist carries one under vendor/llama.cpp). Its converter names a tokenizer's pre-tokenizer by a
hash of how it splits a test text and refuses hashes it does not know, ours among them (GPT-2's split with combining
marks kept in letter runs, seekstack.tokenizer.PRE_TOKENIZER_PATTERN), so it is declared `gpt-2`. Token ids are fed
directly, so the tokenizer plays no part in the timing. Each GGUF file is first loaded in a child process: llama.cpp
aborts the process on a file it cannot run (0.3.36 on a q8_0 `tiny`: GGML_ASSERT(*cur_backend_id != -1) in
ggml_backend_sched_split_graph), which would take the whole benchmark with it; such a type is skipped, saying why.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Run the converter with our tokenizer's pre-tokenizer declared as GPT-2's (argv: converter, then its arguments).
CONVERT = """
import runpy, sys
from pathlib import Path
script = Path(sys.argv[1])
sys.path.insert(0, str(script.parent))
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = sys.argv[1:]
runpy.run_path(str(script), run_name="__main__")
"""
GGUF_TYPES = ("f32", "bf16", "q8_0")
# Load one GGUF file as the benchmark will (argv: path, context), in a process of its own.
PROBE = """
import sys
from llama_cpp import Llama
Llama(sys.argv[1], n_ctx=int(sys.argv[2]), n_batch=int(sys.argv[2]), verbose=False)
"""


@dataclass
class LlamaCppModel:
    """One GGUF file of the checkpoint loaded by llama-cpp-python, and how long the conversion took."""

    outtype: str
    llama: object  # llama_cpp.Llama
    convert_seconds: float

    def use_threads(self, threads: int) -> None:
        """Decode (and prefill) on `threads` threads from the next call on."""
        self.llama._ctx.set_n_threads(threads, threads)

    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Greedy tokens after `prompt`, `new_tokens` of them (no stop at end-of-sequence), from an empty cache."""
        self.llama.reset()
        tokens = []
        for token in self.llama.generate(prompt, top_k=1, temp=0.0, reset=True):
            tokens.append(token)
            if len(tokens) == new_tokens:
                return tokens
        return tokens


def load_llama_cpp(
    model_dir: Path, source: Path | None, context: int, threads: int
) -> tuple[list[LlamaCppModel], str | None]:
    """The checkpoint in every GGUF type llama.cpp runs here, and the reason for those it does not (None: all ran)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return [], "llama-cpp-python is not installed (pip install -e '.[bench]', a long C++ build)"
    converter = source / "convert_hf_to_gguf.py" if source else None
    if converter is None or not converter.is_file():
        return [], (
            f"no convert_hf_to_gguf.py in --llama-cpp-source {source}: give a llama.cpp source tree, e.g. "
            "vendor/llama.cpp of `pip download --no-binary :all: --no-deps llama-cpp-python`, unpacked"
        )
    models, failures = [], []
    for outtype in GGUF_TYPES:
        path = model_dir / f"model-{outtype}.gguf"
        start = time.perf_counter()
        command = [sys.executable, "-c", CONVERT, str(converter), str(model_dir), "--outtype", outtype]
        done = subprocess.run([*command, "--outfile", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            return [], f"convert_hf_to_gguf.py --outtype {outtype} failed: {done.stderr.strip().splitlines()[-1]}"
        seconds = time.perf_counter() - start
        probe = subprocess.run([sys.executable, "-c", PROBE, str(path), str(context)], capture_output=True, text=True)
        if probe.returncode != 0:
            lines = probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"]
            said = next((line for line in lines if "GGML_ASSERT" in line), lines[-1])
            failures.append(f"{outtype}: llama-cpp-python could not load {path} ({said.strip()})")
            continue
        llama = Llama(
            str(path), n_ctx=context, n_batch=context, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        models.append(LlamaCppModel(outtype, llama, seconds))
    return models, "; ".join(failures) or None
