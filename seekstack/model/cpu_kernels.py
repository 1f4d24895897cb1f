"""C++ kernels for the few token rows of a decode step on a CPU, where reading the weights is the whole cost.

A decode step has far fewer FLOPs than weight bytes, so its time is the bytes it streams, and the BLAS calls made
for wide matrices stream them slowly at a few rows (MKL, float32, one thread: 2.5-5 GB/s of this core's ~10). Two
ops, both loading every weight row once for all rows (float32 products in AVX-512's 16 lanes where the CPU has
AVX-512F, else in AVX2 + FMA's 8, plain loops where it has neither), and both reading a weight as 4 streams side by
side (its rows in 4 equal parts, one row of each per step): one core keeps more reads in flight over several streams
than over one (a plain sum over 128 MB, one Zen 3 core, under load: 1 / 2 / 4 streams 5.0 / 7.7 / 9.8 GB/s).
- `rows_linear`: x W^T for 1-16 rows of x, W row-major (out, in), split over threads by output rows. `small`'s
  block and head shapes, weights flushed from the L3, one thread, against the one-stream kernel before it: 1.8x at 1
  row, 1.4-1.6x at 2-4, 1.1x at 8, even at 16 (where the dot products, not the reads, bound it). At 3-16 rows of a
  float32 W it reads the panels `weight_panels` lays W out in, where given (`rows_linear_panels`): each block of 32
  output columns with its whole input, W[j : j + 32, :]^T, one sequential stream, 8 rows' outputs of it in
  registers (AVX2: 2), each weight vector times each row's input broadcast: no horizontal sums. `small`'s block and
  head shapes, weights flushed, one thread, Zen 4: 1.48x the rows' 4-stream kernel at 4 rows, 1.55x at 8, 1.30x at 16
  (0.76x at 1 row, 0.95x at 2, which keep W's rows).
- `grouped_experts`: the routed experts of few tokens. Each (token, expert) pair gathering its expert
  (`RoutedExperts.forward_pairs`, what inductor fuses) reads N*K expert weight sets; `small`'s 8 tokens x 4 choices
  read 32 sets for ~14 distinct experts. The kernel groups the pairs by expert and reads each chosen expert once,
  one expert per thread.
- `route_rows`: the experts a decode step's few rows are routed to (moe.py's `Router.select`), picked by torch.topk's
  own loop, in one call where torch's ops make a dozen (eager) or inductor calls three topk out of its loops.
- `latent_attention_rows`: MLA's absorbed attention of a decode step's 1-16 query rows a head over the cached
  [c^KV; k^R] (attention.py), the scores `rows_linear`'s products with the keys as the weight rows. torch's flash SDPA
  in its place, cold after the step's weights streamed through the cache, took ~47 us a `small` layer (~12 hot); this
  ~34 (compiled `small` float32 batch-1 step 1.03x).
- `feed_forward_rows`, `latent_query_rows`: a dense FFN or shared expert (gate, up, SwiGLU, down) and MLA's low-rank
  query (down, RMSNorm, up) of 1-16 rows of eager inference in one call (packed.py's `DecodeFeedForward`,
  `DecodeLatentAttention`): the same `rows_linear`s and row ops, bitwise, without the Python calls between them.
Compiled decode steps (1-16 rows) and eager inference of up to 16 tokens run them, on float32 weights or bfloat16
ones (half the bytes, where a BLAS call at a few bfloat16 rows ran no faster than float32). A CPU with avx512_bf16,
where `dtype auto` is bfloat16, multiplies bfloat16 weights by bfloat16 rows in `vdpbf16ps` (float32 sums; widening
each weight first bound the products by the core at 24-39 GB/s); other CPUs widen each weight as it is read.
`bench/decode.py --preset small --threads 1` on an avx512_bf16 EPYC: decode 203 -> 255 tok/s at batch 1 and 389 ->
611 at 8 (compiled) with widened weights, 60 -> 110 at batch 1 eager; then 227 -> 302 and 607 -> 825 with `vdpbf16ps`.
Float32, `bench/decode_options.py --preset small --rows N --options '{}' '{"cpu_kernels": false}'` (compiled engines
alternating in one process, same greedy tokens): decode +18% at 1 row, +81% at 8 (under load; before the 4 streams:
+21% / +23% / +51% at 2 / 8 / 16 rows and 1-row steps left to inductor's loops).

Two fused elementwise ops serve the training step and the prefill forward, where the matmuls (AMX in bfloat16) are
fast and torch's eager elementwise passes, each into fresh memory, set the pace: `swiglu` (SiLU(gate) * up [* a
combine weight per row], for the dense FFN, the shared and the routed experts; moe.py) and `rms_norm` (norm.py), each
with its backward in one pass, float32 math on float32 or bfloat16 rows (`elementwise_takes` says when; `rms_norm`
takes a float32 weight beside bfloat16 rows too); `cross_entropy_rows` (head_loss.py): a chunk of logits, bf16 under
autocast, turned into each row's loss and, where autograd wants it, the logits' gradient, written over them, and
`add_weight_grad`: a chunk's dL/dW = G^T h, bf16 products summed in float32 straight into dL/dW (MKL's GEMM, the op
registered where torch carries it: its x86 builds; taken where brgemm packs bfloat16, AMX); and
`causal_attention_backward` (attention.py's `_CausalAttention`): causal training attention's backward in bfloat16 with
AMX from torch's fused forward's log-sum-exp, FlashAttention-2's products over groups of heads (S and dP float32, by
AMX) with one fused pass a score row;
`causal_attention`: bfloat16 inference's causal forward (no log-sum-exp kept), each block of 64 query rows over its keys
up to the diagonal only, written in o_proj's (B, T, H, V) layout (where brgemm cannot pack bfloat16,
`packs_bfloat16`, `causal_attention_training`'s forward); `causal_attention_training` and its backward: float32
training attention (and bfloat16's where brgemm cannot pack it, each head widened to float32 rows in the kernel,
the results narrowed as written; the forward alone: float32 inference's), forward and backward in those blocks of
query rows (torch's brgemm products, float32; a bfloat16 head's S = Q K^T and dP = dO V^T by vdpbf16ps where the CPU
has avx512_bf16).

They are built for this CPU on first use (torch.utils.cpp_extension, cached under TORCH_EXTENSIONS_DIR, ~15 s) and
registered as `torch.ops.seekstack.*`, ops that compiled steps call like any other. Where no C++ compiler is found
the build fails once, with a warning, and the callers keep their other paths. Processes started together (ranks,
test workers) build one at a time, each taking its turn on the build folder's `turn.lock` to check, build, load and
prove the library, so the later ones load the first's. A build left unfinished (its lock, a truncated library) is
redone rather than waited on or loaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
NAME = "seekstack_cpu_kernels"
MAX_TOKENS = 16  # up to here the kernels run eager steps too (both measured to 16 rows)
FUSED_DTYPES = (torch.float32, torch.bfloat16)  # what the fused elementwise ops take
STALE_LOCK_SECONDS = 120.0  # a build takes ~15 s here; a lock file older than this was left by one that died

_built: dict[str, bool] = {}  # "ok": whether the build succeeded, once it was tried
_switch = {"on": True}  # set_enabled


def available() -> bool:
    """Build (on the first call) and load the kernels; whether they can be used. Call it outside a compiled region:
    `usable` inside one only reads the outcome."""
    if "ok" not in _built:
        _built["ok"] = _build()
    return _built["ok"]


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernels (already built) take these tensors: float32 or bfloat16 rows and a plain (not sharded)
    weight of the same dtype, on the CPU."""
    return (
        _switch["on"]
        and _built.get("ok", False)
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
        and not isinstance(weight, DTensor)
    )


def elementwise_takes(*tensors: torch.Tensor) -> bool:
    """Whether the fused row ops (`swiglu`, `rms_norm`, `cross_entropy_rows`; bfloat16 `causal_attention` and
    `causal_attention_backward`, `causal_attention_training` and its backward) take these tensors: float32
    or bfloat16 in one dtype on the CPU, contiguous along a row (the kernels' rows; a transposed input takes torch's
    ops), none sharded, outside a compiled region (inductor fuses its own); builds the kernels on the first call.
    Asked before each RMSNorm and SwiGLU of a decode step, so its checks are the cheapest torch offers (`is_cpu` in a
    loop: 1.1 us, where `device.type` in a generator took 2.3 us of a 1-row norm's 12)."""
    first = tensors[0]
    if not _switch["on"] or torch.compiler.is_compiling() or first.dtype not in FUSED_DTYPES or not first.is_cpu:
        return False
    for tensor in tensors:
        if tensor.dtype != first.dtype or not tensor.is_cpu or tensor.stride(-1) != 1 or isinstance(tensor, DTensor):
            return False
    return available()


@functools.cache
def packs_bfloat16(width: int) -> bool:
    """Whether torch's brgemm multiplies bfloat16 operands `width` wide packed to VNNI (a CPU with AMX, an even width):
    bfloat16 causal attention takes its bfloat16 kernels where it does, the float32-math ones where not.
    cpu_kernels.cpp's own answer, which its `causal_attention` takes too. Ask it after `available()`."""
    return torch.ops.seekstack.packs_bfloat16(width)


def set_enabled(on: bool) -> None:
    """Let the callers use the kernels, or not (their other paths then): `bench/decode_options.py` times both in one
    process. Compiled steps guard on it, so each setting keeps a graph of its own."""
    _switch["on"] = on


def rows_linear(x: torch.Tensor, weight: torch.Tensor, panels: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, in) W^T for W (out, in) -> (N, out); at 3-16 rows through `panels`, a float32 W's `weight_panels`,
    where given."""
    if panels is None:
        return torch.ops.seekstack.rows_linear(x, weight)
    return torch.ops.seekstack.rows_linear_panels(x, weight, panels)


class PanelLayout(NamedTuple):
    """`rows_linear`'s panels as cpu_kernels.cpp lays them out and reads them (its kPanelWidth, kPanelMinRows)."""

    width: int  # output columns a panel holds
    min_rows: int  # token rows from which rows_linear reads a weight's panels, up to MAX_TOKENS


@functools.cache
def panel_layout() -> PanelLayout:
    """The kernels' own panel layout (`PanelLayout`). Ask it after `available()`."""
    return PanelLayout(*torch.ops.seekstack.panel_layout())


def reads_panels(rows: int) -> bool:
    """Whether `rows_linear` reads a weight's panels for `rows` token rows; False where the kernels are not built."""
    return _built.get("ok", False) and panel_layout().min_rows <= rows <= MAX_TOKENS


def weight_panels(weight: torch.Tensor) -> torch.Tensor:
    """A float32 W (out, in) laid out for `rows_linear`'s few-row passes (1-D, out * in values): `panel_parts`."""
    return torch.cat([part.reshape(-1) for part in panel_parts(weight)])


def panel_parts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The views of W (out, in) that `weight_panels` holds one after the other: the blocks W[j : j + width, :]^T
    (out // width, in, width), then the last out % width columns, W[whole:]^T (in, out % width), the width the
    kernels' (`panel_layout`): the panels are refreshed, and compared, through them in place."""
    width = panel_layout().width
    whole = weight.shape[0] // width * width
    return weight[:whole].view(-1, width, weight.shape[1]).transpose(1, 2), weight[whole:].t()


def grouped_experts(
    x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    """x (N, D), routing experts / weights (N, K), stacked expert weights (E, 2I, D) / (E, D, I) -> (N, D)."""
    return torch.ops.seekstack.grouped_experts(x, experts, weights.float(), gate_up_proj, down_proj)


def latent_attention_rows(
    query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scale: float, value_width: int
) -> torch.Tensor:
    """MLA's absorbed decode attention: query (B, H, T, D) over keys (B, S, D), mask (B, T, S) bool or None ->
    (B, H, T, V) softmax(scale q K^T + mask) K[:, :V], V = value_width."""
    return torch.ops.seekstack.latent_attention_rows(query, keys, mask, scale, value_width)


def _build() -> bool:
    from torch.utils.cpp_extension import get_default_build_root, load

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # as cpp_extension's own load() reads it
    folder = _build_folder(Path(root))
    try:
        name = _library_name()
        library = folder / f"{name}.so"
        folder.mkdir(parents=True, exist_ok=True)
        # One process at a time checks, builds, loads and proves the library: torch removes its build lock before its
        # builder loads and proves the library, and a process arriving then took the new library for a truncated one
        # and deleted it (the builder loading a missing or half-relinked file). The kernel drops a dead one's flock.
        with open(folder / "turn.lock", "a") as turn:
            with contextlib.suppress(OSError):  # a file system without flock: no turns taken
                try:
                    fcntl.flock(turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another process's turn: building where no library is there yet (~15 s)
                    if not library.exists():
                        print(f"note: waiting for another process building {SOURCE.name} in {folder}", file=sys.stderr)
                    fcntl.flock(turn, fcntl.LOCK_EX)
            if not _clear_stale_lock(folder / "lock"):  # a build waited for left a whole library, proven a moment later
                _drop_unproven(library)
            if not library.exists():
                print(f"note: building {SOURCE.name} for this CPU in {folder} (once, ~15 s)", file=sys.stderr)
            load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native"],
                build_directory=str(folder),
                is_python_module=False,
            )
            with contextlib.suppress(OSError):  # a full disk: the next run proves it
                _proof(library).write_text(_signature(library))
    except Exception as error:  # no compiler, no ninja, an unknown -march: the callers keep their other paths
        # torch's "Could not load this library: PATH" keeps the loader's reason (an undefined symbol) as its cause
        reason = f"{error} ({error.__cause__})" if error.__cause__ else error
        warnings.warn(
            f"seekstack: {SOURCE.name} did not build, decode, SwiGLU, RMSNorm, the loss and causal attention "
            f"run without it: {reason}",
            stacklevel=3,
        )
        return False
    torch.library.register_fake("seekstack::grouped_experts")(_grouped_experts_shape)
    torch.library.register_fake("seekstack::rows_linear")(_rows_linear_shape)
    torch.library.register_fake("seekstack::rows_linear_panels")(_rows_linear_shape)
    torch.library.register_fake("seekstack::latent_attention_rows")(_latent_attention_rows_shape)
    torch.library.register_fake("seekstack::route_rows")(_route_rows_shape)
    return True


def _library_name() -> str:
    """The library is named by its source's text: ninja rebuilds only a source newer than its library, so an update
    whose cpu_kernels.cpp kept an older time (an unpacked archive, `cp -p`) loaded the old library, ops of another
    schema ("cross_entropy_rows() expected at most 3 argument(s) but received 4"). A new name is a new compile command
    (-DTORCH_EXTENSION_NAME), which ninja rebuilds on."""
    return f"{NAME}_{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:8]}"


def _drop_unproven(library: Path) -> None:
    """Remove a built library that no process has loaded as it is now: a build killed while linking, or a full disk,
    leaves a truncated file, and loading one kills the process (SIGBUS) where a rebuild costs ~15 s."""
    proof = _proof(library)
    if library.exists() and not (proof.exists() and proof.read_text() == _signature(library)):
        library.unlink()


def _proof(library: Path) -> Path:
    return library.with_suffix(".loaded")  # the library's size and time when a process last loaded it


def _signature(library: Path) -> str:
    status = library.stat()
    return f"{status.st_size} {status.st_mtime_ns}"


def _clear_stale_lock(lock: Path) -> bool:
    """cpp_extension waits, with no limit, for the lock file of a build under way; a build killed outside Python
    (SIGKILL, a crash) leaves its lock behind. Wait while the lock is younger than a build takes, then remove it.
    Return whether another process's build finished meanwhile: torch removes its lock before that process loads the
    library and proves it, so its library is not yet proven (a process outside `_build`'s turns: another version's)."""
    waited = False
    while lock.exists():
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # the other build just finished
            return True
        if age > STALE_LOCK_SECONDS:
            print(f"note: removing {lock}, left {age:.0f} s ago by a build that did not finish", file=sys.stderr)
            lock.unlink(missing_ok=True)
            return False
        if not waited:
            print(
                f"note: waiting up to {STALE_LOCK_SECONDS - age:.0f} s for {lock}: a build under way, or one that was "
                "killed, left it",
                file=sys.stderr,
            )
        time.sleep(0.5)
        waited = True
    return waited


def _build_folder(root: Path) -> Path:
    """The folder under `root` of this installation's build, per torch version, CPU and source file: ninja rebuilds
    a library whose recorded source path changed, so two installations (two venvs, a checkout and its clone) sharing
    one folder rebuilt it over each other at every process's first use (~15-30 s each time, waiting on each other's
    lock), and one could load the library the other had just built from another version of the source."""
    source = hashlib.sha256(str(SOURCE.resolve()).encode()).hexdigest()[:8]
    return root / f"{NAME}-torch{torch.__version__}-{_cpu_tag()}-src{source}"


def _cpu_tag(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The machine and a hash of its CPU's instruction-set flags (x86's `flags`, ARM's `Features`): a build for one CPU
    (-march=native) is never loaded on another that shares the cache folder (a cluster's network home)."""
    flags = (
        next((line for line in cpuinfo.read_text().splitlines() if line.startswith(("flags", "Features"))), "")
        if cpuinfo.exists()
        else ""
    )
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"


def _grouped_experts_shape(
    x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    return x.new_empty(x.shape)


def _rows_linear_shape(x: torch.Tensor, weight: torch.Tensor, panels: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _route_rows_shape(
    scores: torch.Tensor, bias: torch.Tensor | None, n_group: int, topk_group: int, group_top2: bool, top_k: int
) -> torch.Tensor:
    return scores.new_empty(scores.shape[0], top_k, dtype=torch.long)


def _latent_attention_rows_shape(
    query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scale: float, value_width: int
) -> torch.Tensor:
    return query.new_empty(*query.shape[:-1], value_width)
