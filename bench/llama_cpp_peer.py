"""llama.cpp as a peer of the decode benchmark: our checkpoint converted to GGUF, decoded greedily by llama-cpp-python.

The conversion is llama.cpp's own `convert_hf_to_gguf.py`, from a llama.cpp source tree (`--llama-cpp-source`; the
llama-cpp-python sdist carries one under vendor/llama.cpp). Its converter names a tokenizer's pre-tokenizer by a
hash of how it splits a test text and refuses hashes it does not know, ours among them (GPT-2's split with combining
marks kept in letter runs, seekstack.tokenizer.PRE_TOKENIZER_PATTERN), so it is declared `gpt-2`. Token ids are fed
directly, so the tokenizer plays no part in the timing. Each GGUF file is first loaded, and a few tokens evaluated, in
a child process (`probe_gguf`, which bench/big_model.py's GGUF goes through too): llama.cpp aborts the process on a
file it cannot run, which would take the whole benchmark with it. 0.3.36 aborts so on a q8_0 `tiny`, `small` or
V2-Lite on a CPU with AMX (GGML_ASSERT(*cur_backend_id != -1) in ggml_backend_sched_split_graph; a narrower model
crashes evaluating two tokens at once) while it repacks weights into its extra CPU buffer types, and runs the file
without them (the model parameter `use_extra_bufts`, which `Llama` does not expose): a type that aborts is loaded so,
saying so, and one that fails either way is skipped, saying why.
"""

from __future__ import annotations

import importlib.util
import json
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
# Load one GGUF file as the benchmark will and evaluate a prompt of two tokens and a third, in a process of its own
# (argv: this folder, path, context, extra buffers).
PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
from llama_cpp_peer import open_gguf
llama = open_gguf(sys.argv[2], int(sys.argv[3]), threads=1, extra_buffers=sys.argv[4] == "1")
llama.eval([0, 0])
llama.eval([0])
"""


@dataclass
class LlamaCppModel:
    """One GGUF file of the checkpoint loaded by llama-cpp-python, and how long the conversion took."""

    outtype: str
    llama: object  # llama_cpp.Llama
    convert_seconds: float
    note: str = ""  # how it was loaded, where not as llama.cpp loads by default

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


def open_gguf(path: str | Path, context: int, threads: int, extra_buffers: bool = True) -> object:
    """llama_cpp.Llama on a GGUF file; `extra_buffers=False` keeps llama.cpp from repacking weights into its extra CPU
    buffer types (llama.cpp's default model parameters, with `use_extra_bufts` off, while Llama reads them)."""
    import llama_cpp.llama_cpp as library
    from llama_cpp import Llama

    defaults = library.llama_model_default_params

    def parameters():
        chosen = defaults()
        chosen.use_extra_bufts = extra_buffers
        return chosen

    library.llama_model_default_params = parameters
    try:
        return Llama(
            str(path), n_ctx=context, n_batch=context, n_threads=threads, n_threads_batch=threads, verbose=False
        )
    finally:
        library.llama_model_default_params = defaults


def last_words(process: subprocess.CompletedProcess) -> str:
    """What a failed child process said last: llama.cpp's GGML_ASSERT line, else its last line on stderr, else how it
    ended (one the kernel's OOM killer ends says nothing)."""
    lines = process.stderr.strip().splitlines()
    if not lines:
        code = process.returncode
        return f"killed by signal {-code}, nothing said" if code < 0 else f"exit status {code}, nothing said"
    return next((line for line in lines if "GGML_ASSERT" in line), lines[-1]).strip()


def probe_gguf(path: Path, context: int) -> tuple[bool | None, str]:
    """Whether llama.cpp runs `path` with its extra (repacked) weight buffers (True, ""), only without them (False, a
    note saying so), or not at all (None, what it said last): each try in a process of its own (PROBE)."""
    note, load = "", [sys.executable, "-c", PROBE, str(Path(__file__).parent), str(path), str(context)]
    for extra_buffers in (True, False):
        probe = subprocess.run([*load, str(int(extra_buffers))], capture_output=True, text=True)
        if probe.returncode == 0:
            return extra_buffers, note
        said = last_words(probe)
        if probe.returncode > 0:  # refused, not aborted: the buffers are not why
            break
        note = f"loaded without llama.cpp's extra (repacked) weight buffers: with them it aborted ({said})"
    return None, said


A_TREE = "e.g. vendor/llama.cpp of `pip download --no-binary :all: --no-deps llama-cpp-python` (0.3.36), unpacked"


def converter_lacks(source: Path, architecture: str) -> str | None:
    """What the llama.cpp tree at `source` lacks to convert a checkpoint of `architecture` (None: nothing): the
    conversion/ package whose TextModel CONVERT patches, or a model class registered there for the architecture."""
    package = source / "conversion"
    if not (package / "base.py").is_file():
        return f"{package / 'base.py'} (an older tree converts in one script, where our pre-tokenizer cannot be set)"
    if not any(f'"{architecture}"' in module.read_text() for module in package.glob("*.py")):
        return f"a model class for {architecture} (the architecture in config.json) in {package}"
    return None


def load_llama_cpp(
    model_dir: Path, source: Path | None, context: int, threads: int
) -> tuple[list[LlamaCppModel], str | None]:
    """The checkpoint in every GGUF type llama.cpp converts and runs here, and the reason for each type it does not
    (None: all ran): a type that fails costs only its own row."""
    if importlib.util.find_spec("llama_cpp") is None:
        return [], "llama-cpp-python is not installed (pip install -e '.[bench]', a long C++ build)"
    converter = source / "convert_hf_to_gguf.py" if source else None
    if converter is None or not converter.is_file():
        return [], f"no convert_hf_to_gguf.py in --llama-cpp-source {source}: give a llama.cpp source tree, {A_TREE}"
    lacks = converter_lacks(source, json.loads((model_dir / "config.json").read_text())["architectures"][0])
    if lacks:
        return [], f"--llama-cpp-source {source} is too old: its converter lacks {lacks}; give a newer tree, {A_TREE}"
    models, failures = [], []
    for outtype in GGUF_TYPES:
        path = model_dir / f"model-{outtype}.gguf"
        start = time.perf_counter()
        command = [sys.executable, "-c", CONVERT, str(converter), str(model_dir), "--outtype", outtype]
        done = subprocess.run([*command, "--outfile", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            failures.append(f"{outtype}: convert_hf_to_gguf.py --outtype {outtype} failed ({last_words(done)})")
            continue
        seconds = time.perf_counter() - start
        extra_buffers, note = probe_gguf(path, context)
        if extra_buffers is None:
            failures.append(f"{outtype}: llama-cpp-python could not load {path} ({note})")
            continue
        models.append(LlamaCppModel(outtype, open_gguf(path, context, threads, extra_buffers), seconds, note))
    return models, "; ".join(failures) or None
