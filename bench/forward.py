"""Forward throughput of seekstack against transformers' DeepseekV3ForCausalLM on the same weights.

For each preset a model with random weights is saved with `seekstack.save_pretrained`, then loaded both
by `seekstack.load_pretrained` and by `transformers.AutoModelForCausalLM` once per experts x attention
implementation. Every implementation's logits are checked against ours before it is timed. Timed
forwards of ours and transformers' alternate, and the median over repetitions is reported, so that load
from other processes on the machine falls on both sides alike. A profile then attributes each model's
time to its components (attention projections, routed experts, ...) and lists the costliest aten ops.

Ours runs in `--dtype`, by default `auto`: the dtype `generate`, `chat` and `serve` pick for the model on this CPU
(seekstack/infer/precision.py: bfloat16 on a CPU with avx512_bf16 or amx_bf16 for a model of 16M parameters or more,
else float32). theirs(default) is what `from_pretrained` picks unasked (float32). Of the experts x attention
implementations, each in float32, and in bfloat16 too where this machine's measured bfloat16 matmul peak is above its
float32 one or ours runs bfloat16 (screened with a few forwards each, then confirmed by the interleaved measurement),
theirs(same dtype) is the fastest in ours' dtype, the like-for-like ratio, and theirs(any dtype) the fastest in any,
what a user after speed would pick. A user after speed picks ours' dtype too: ours also runs in each other dtype
transformers is timed in, in the same interleaved measurement, and ours(fastest) against theirs(any dtype) compares
each side's fastest. Ratio = ours tok/s / theirs tok/s: above 1 means seekstack is faster.
max|dlogit| is ours against the transformers implementations in ours' dtype; each implementation's own is in the
screening lines.

    python bench/forward.py                                   # full run, a few minutes on 2 cores
    python bench/forward.py --presets tiny --seq-lens 128 --reps 3 --no-profile   # quick check
    python bench/forward.py --threads 1 --clock cpu --no-profile   # on a machine others are using
    python bench/forward.py --dtype float32 --no-profile   # like for like in float32 wherever auto picks bfloat16

Shapes: B batch, T tokens per sequence.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from machine import CLOCKS, add_machine_options, matmul_peaks, prepare_machine, share_of_peak
from options import check_context, positive_int
from torch import nn
from transformers import AutoModelForCausalLM

import seekstack
from seekstack.accounting import forward_flops_per_token, main_parameters
from seekstack.infer.precision import auto_dtype

DEFAULT_SEQ_LENS = {"tiny": [128, 512, 1024], "small": [128, 512]}
# transformers' implementations that run on a CPU; deepgemm, sonicmoe and flash_attention_* need CUDA.
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
# batched_mm gathers one copy of an expert's three matrices per (token, expert) pair; above this many
# bytes it would take minutes and most of the machine's memory, so it is reported as skipped.
BATCHED_MM_GATHER_LIMIT = 2 * 2**30
PARITY_ATOL = 1e-3
# Where either side runs bfloat16 (8 mantissa bits), against float32 logits of magnitude ~5: `small`, T = 512, max
# |difference| 0.36 for ours and 0.42 for transformers in bfloat16; a model computing another function differs by
# about the logits' own size.
BF16_PARITY_ATOL = 1.0
SCREEN_ROUNDS = 3  # timed forwards per transformers implementation when looking for the fastest
LABEL = "§"  # prefix of the profiler ranges that name model components


# ---------------------------------------------------------------------------------------- models
@dataclass
class Contender:
    """One model under test: a name for the table and a function from input ids (B, T) to logits (B, T, V)."""

    name: str
    model: nn.Module
    logits: Callable[[torch.Tensor], torch.Tensor]
    dtype: torch.dtype = torch.float32
    note: str = ""  # why it could not run, when it could not


@dataclass
class Setting:
    """The models of one preset, all holding the same weights."""

    preset: str
    config: seekstack.ModelConfig
    ours: Contender  # in `--dtype`
    theirs: dict[str, Contender]  # "experts+attention" -> model loaded with those implementations
    default: str  # the key transformers picks when not asked for anything
    # ours in each other dtype transformers runs in, for ours(fastest)
    ours_other_dtypes: list[Contender] = field(default_factory=list)
    fastest: dict[int, dict[str, str]] = field(default_factory=dict)  # T -> {"same dtype"/"any dtype": key}


def ours_dtype(config: seekstack.ModelConfig, asked: str) -> tuple[torch.dtype, str]:
    """The dtype ours runs in for `--dtype` `asked`, and why: `auto` decides as the inference engine does."""
    if asked != "auto":
        return getattr(torch, asked), "asked"
    name, why = auto_dtype(["cpu"], main_parameters(config).total)
    return getattr(torch, name), f"auto: {why}"


def build_setting(preset: str, directory: Path, dtype: torch.dtype, their_dtypes: list[torch.dtype]) -> Setting:
    """Random weights saved once; ours (in `dtype`, and in each other of `their_dtypes`) and every transformers
    implementation in each of `their_dtypes` load them from disk."""
    # Forward without labels never runs MTP, and transformers does not load MTP layers: leave them out.
    config = seekstack.preset(preset, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    seekstack.save_pretrained(seekstack.Transformer(config), directory)
    ours = _ours_contender("ours", directory, dtype)
    ours_other_dtypes = [
        _ours_contender(f"ours {str(other).removeprefix('torch.')}", directory, other)
        for other in their_dtypes
        if other != dtype
    ]

    theirs = {}
    default_model = _load_transformers(directory, torch.float32)
    default = _implementation_key(default_model, torch.float32)
    theirs[default] = _transformers_contender(default, default_model, torch.float32)
    for their_dtype in their_dtypes:
        for experts in EXPERTS_IMPLEMENTATIONS:
            for attention in ATTENTION_IMPLEMENTATIONS:
                implementations = {"experts_implementation": experts, "attn_implementation": attention}
                key = _implementation_key(None, their_dtype, **implementations)
                if key not in theirs:
                    model = _load_transformers(directory, their_dtype, **implementations)
                    theirs[key] = _transformers_contender(key, model, their_dtype)
    return Setting(preset, config, ours, theirs, default, ours_other_dtypes)


def _ours_contender(name: str, directory: Path, dtype: torch.dtype) -> Contender:
    model = seekstack.load_pretrained(directory).eval().to(dtype)
    return Contender(name, model, lambda ids: model(ids).logits, dtype)


def _load_transformers(directory: Path, dtype: torch.dtype, **implementations: str) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **implementations)
    return model.eval()


def _implementation_key(
    model: nn.Module | None, dtype: torch.dtype, experts_implementation: str = "", attn_implementation: str = ""
) -> str:
    """'experts+attention', with ' bf16' for a bfloat16 model: of `model`, or of the implementations named."""
    if model is not None:
        experts_implementation = model.config._experts_implementation
        attn_implementation = model.config._attn_implementation
    suffix = " bf16" if dtype == torch.bfloat16 else ""
    return f"{experts_implementation}+{attn_implementation}{suffix}"


def _transformers_contender(key: str, model: nn.Module, dtype: torch.dtype) -> Contender:
    return Contender(key, model, lambda ids: model(input_ids=ids, use_cache=False).logits, dtype)


def batched_mm_gather_bytes(config: seekstack.ModelConfig, batch: int, seq_len: int) -> int:
    """Bytes of expert weights transformers' batched_mm copies for one MoE layer: 3 I x D floats per pair."""
    pairs = batch * seq_len * (config.num_experts_per_tok or 0)
    return pairs * 3 * config.moe_intermediate_size * config.hidden_size * 4


# ---------------------------------------------------------------------------------------- timing
def timed_forward(contender: Contender, input_ids: torch.Tensor, clock: str) -> float:
    """Seconds for one forward pass on `clock` (machine.CLOCKS)."""
    start = CLOCKS[clock]()
    contender.logits(input_ids)
    return CLOCKS[clock]() - start


def check_parity(setting: Setting, contender: Contender, logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Max |logit difference| to ours; raises when the two models do not compute the same function (within what
    bfloat16 allows where either side runs it)."""
    difference = (logits.float() - reference.float()).abs().max().item()
    float32 = contender.dtype == setting.ours.dtype == torch.float32
    tolerance = PARITY_ATOL if float32 else BF16_PARITY_ATOL
    assert difference < tolerance, (
        f"{setting.preset}, T={reference.shape[1]}: {contender.name}'s logits ({contender.dtype}) differ from "
        f"seekstack's in {setting.ours.dtype} by {difference:.2e} (> {tolerance}); the two models no longer compute "
        "the same function"
    )
    return difference


def screen(
    setting: Setting, input_ids: torch.Tensor, reference: torch.Tensor, warmup: int, clock: str
) -> tuple[dict[str, float], dict[str, float]]:
    """Warm up and parity-check every transformers implementation, time each; return each one's best seconds per
    forward and its max |logit difference| to ours."""
    B, T = input_ids.shape
    candidates, differences = [], {}
    for contender in setting.theirs.values():
        contender.note = ""
        if (
            contender.name.startswith("batched_mm")
            and (gather := batched_mm_gather_bytes(setting.config, B, T)) > BATCHED_MM_GATHER_LIMIT
        ):
            contender.note = f"skipped: would gather {gather / 2**30:.1f} GiB of expert weights per layer"
            continue
        try:
            for _ in range(warmup):
                logits = contender.logits(input_ids)
        except Exception as error:  # an implementation transformers offers but cannot run here
            contender.note = f"could not run: {type(error).__name__}: {str(error).splitlines()[0][:100]}"
            continue
        differences[contender.name] = check_parity(setting, contender, logits, reference)
        candidates.append(contender)
    best: dict[str, float] = {}
    for _ in range(SCREEN_ROUNDS):
        for contender in candidates:
            seconds = timed_forward(contender, input_ids, clock)
            best[contender.name] = min(best.get(contender.name, seconds), seconds)
    for contender in setting.theirs.values():
        if contender.name in best:
            result = f"{B * T / best[contender.name]:10.0f} tok/s, max|dlogit| {differences[contender.name]:.1e}"
        else:
            result = contender.note
        print(f"    {contender.name:28s} {result}", flush=True)
    return best, differences


def interleaved_medians(
    contenders: list[Contender], input_ids: torch.Tensor, reps: int, clock: str
) -> dict[str, float]:
    """Median seconds per forward; each repetition runs every contender once, starting with a different one."""
    seconds: dict[str, list[float]] = defaultdict(list)
    for rep in range(reps):
        shift = rep % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            seconds[contender.name].append(timed_forward(contender, input_ids, clock))
    return {name: statistics.median(values) for name, values in seconds.items()}


def benchmark(setting: Setting, seq_len: int, batch: int, reps: int, warmup: int, clock: str) -> dict[str, object]:
    """One table row: tok/s of ours, of transformers' default and of its fastest implementation at (batch, seq_len)."""
    generator = torch.Generator().manual_seed(seq_len)
    input_ids = torch.randint(0, setting.config.vocab_size, (batch, seq_len), generator=generator)
    for _ in range(warmup):
        reference = setting.ours.logits(input_ids)
    for other in setting.ours_other_dtypes:
        for _ in range(warmup):
            logits = other.logits(input_ids)
        print(
            f"    {other.name}: max|dlogit| {check_parity(setting, other, logits, reference):.1e} to ours", flush=True
        )
    print(f"  {setting.preset} T={seq_len}: screening transformers implementations", flush=True)
    best, differences = screen(setting, input_ids, reference, warmup, clock)
    # Like for like: a bfloat16 implementation's rounding and speed say nothing of ours in float32, and back.
    same_dtype = [name for name in best if setting.theirs[name].dtype == setting.ours.dtype]
    default = setting.theirs[setting.default]
    picks = {"same dtype": same_dtype, "any dtype": list(best)}
    picks = {kind: min(names, key=best.__getitem__) for kind, names in picks.items() if names}
    timed_theirs = [default] + [setting.theirs[n] for n in dict.fromkeys(picks.values()) if n != default.name]
    ours_all = [setting.ours, *setting.ours_other_dtypes]
    medians = interleaved_medians(ours_all + timed_theirs, input_ids, reps, clock)
    # The careful measurement has the last word over the screen: of the implementations it ran (the default and the
    # screen's picks), the fastest in ours' dtype and the fastest overall.
    picks = {
        kind: min(
            (c.name for c in timed_theirs if kind == "any dtype" or c.dtype == setting.ours.dtype),
            key=medians.__getitem__,
        )
        for kind in picks
    }
    setting.fastest[seq_len] = picks
    ours_fastest = min(ours_all, key=lambda contender: medians[contender.name])
    tokens = batch * seq_len
    return {
        "preset": setting.preset,
        "T": seq_len,
        "ours": tokens / medians["ours"],
        "ours fastest": (str(ours_fastest.dtype).removeprefix("torch."), tokens / medians[ours_fastest.name]),
        "default": tokens / medians[default.name],
        **{kind: (name, tokens / medians[name]) for kind, name in picks.items()},
        "max_difference": max((differences[name] for name in same_dtype), default=float("nan")),
    }


def print_table(rows: list[dict[str, object]], batch: int, settings: list[Setting], peaks: dict[str, float]) -> None:
    """The throughput table: one row per (preset, T), ours also as matmul FLOP/s against the measured peak in its
    dtype."""
    default_names = {s.preset: s.default for s in settings}
    configs = {s.preset: s.config for s in settings}
    dtypes = {s.preset: str(s.ours.dtype).removeprefix("torch.") for s in settings}
    print(f"\nForward throughput, batch {batch}, torch threads {torch.get_num_threads()}, ours in " +
          ", ".join(f"{preset}: {dtype}" for preset, dtype in dtypes.items()))  # fmt: skip
    print("transformers default per preset: " + ", ".join(f"{p}: {n}" for p, n in default_names.items()))
    print("max|dlogit|: ours against the transformers implementations in ours' dtype (nan: none ran in it)")
    print("theirs(same dtype): its fastest in ours' dtype (like for like); theirs(any dtype): its fastest overall")
    print("ours(fastest): ours in its fastest dtype; its ratio is against theirs(any dtype), each side's fastest")
    kinds = ("same dtype", "any dtype")
    header = (
        f"{'preset':7s} {'T':>5s} {'ours tok/s':>11s} {'theirs(default)':>16s} {'ratio':>6s} "
        + "".join(f"{f'theirs({kind})':>18s} {'which':30s} {'ratio':>6s} " for kind in kinds)
        + f"{'ours(fastest)':>14s} {'dtype':9s} {'ratio':>6s} {'max|dlogit|':>11s}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        picks = "".join(
            f"{row[kind][1]:18.0f} {row[kind][0]:30s} {row['ours'] / row[kind][1]:6.2f} "
            if kind in row
            else f"{'none ran':>18s} {'':30s} {'':>6s} "
            for kind in kinds
        )
        fastest_dtype, fastest = row["ours fastest"]
        against_fastest = f"{fastest / row['any dtype'][1]:6.2f}" if "any dtype" in row else f"{'':>6s}"
        print(
            f"{row['preset']:7s} {row['T']:5d} {row['ours']:11.0f} {row['default']:16.0f} "
            f"{row['ours'] / row['default']:6.2f} {picks}{fastest:14.0f} {fastest_dtype:9s} {against_fastest} "
            f"{row['max_difference']:11.1e}"
        )
    print("ours as matmul FLOP/s against the peak in its dtype (seekstack.accounting: all keys count, as PaLM's MFU):")
    for row in rows:
        flops_per_token = forward_flops_per_token(configs[row["preset"]], row["T"])
        peak = peaks[dtypes[row["preset"]]]
        print(f"  {row['preset']:7s} T={row['T']:<5d} {share_of_peak(row['ours'], flops_per_token, peak)}")


# ---------------------------------------------------------------------------------------- profile
def component_of(name: str, module: nn.Module) -> str | None:
    """The component a module's own ops are charged to; None charges them to the enclosing component.

    Ours and transformers' classes map to the same names so the two profiles line up row by row.
    """
    kind = type(module).__name__
    if name == "" or kind == "DeepseekV3Model":
        return "model glue (positions, masks)"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        if name.endswith("lm_head"):
            return "lm_head"
        return "attention projections" if ".self_attn." in name else None  # FFN matrices count in their FFN
    components = {
        "RMSNorm": "RMSNorm",
        "DeepseekV3RMSNorm": "RMSNorm",
        "RotaryEmbedding": "rope tables",
        "DeepseekV3RotaryEmbedding": "rope tables",
        "MultiHeadLatentAttention": "attention core (rope, concat, SDPA)",
        "DeepseekV3Attention": "attention core (rope, concat, SDPA)",
        "Router": "router",
        "DeepseekV3TopkRouter": "router",
        "RoutedExperts": "routed experts (dispatch + GEMMs)",
        "DeepseekV3Experts": "routed experts (dispatch + GEMMs)",
        "FeedForward": "dense + shared FFN",
        "DeepseekV3MLP": "dense + shared FFN",
        "MoE": "MoE glue",
        "DeepseekV3MoE": "MoE glue",
        "DecoderBlock": "residual adds",
        "DeepseekV3DecoderLayer": "residual adds",
    }
    return components.get(kind)


def label_components(model: nn.Module, tag: str) -> list[torch.utils.hooks.RemovableHandle]:
    """Open a profiler range named `§tag|component` around every module with a component; returns the hooks."""
    handles, open_ranges = [], []
    for name, module in model.named_modules():
        component = component_of(name, module)
        if component is None:
            continue

        def enter(_module: nn.Module, _args: object, label: str = f"{LABEL}{tag}|{component}") -> None:
            open_ranges.append(torch.profiler.record_function(label).__enter__())

        def leave(_module: nn.Module, _args: object, _output: object) -> None:
            open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


@dataclass
class Attribution:
    """Milliseconds per forward of one model, by component and by aten op."""

    component_ms: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    python_ms: float = 0.0  # time inside component ranges but outside any op: interpreter and dispatch
    op_ms: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # "component: op" -> ms
    op_calls: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def attribute(events: list, forwards: int) -> dict[str, Attribution]:
    """Per tag: each component's exclusive time (its range minus the component ranges inside it) and op times."""
    result: dict[str, Attribution] = defaultdict(Attribution)
    for event in events:
        if event.name.startswith(LABEL):
            tag, component = event.name[len(LABEL) :].split("|", 1)
            inner = sum(child.cpu_time_total for child in _nearest_labelled(event))
            result[tag].component_ms[component] += (event.cpu_time_total - inner) / 1e3 / forwards
            result[tag].python_ms += event.self_cpu_time_total / 1e3 / forwards
            continue
        owner = event.cpu_parent
        while owner is not None and not owner.name.startswith(LABEL):
            owner = owner.cpu_parent
        if owner is not None:
            tag, component = owner.name[len(LABEL) :].split("|", 1)
            op = f"{component}: {_short_op_name(event.name)}"
            result[tag].op_ms[op] += event.self_cpu_time_total / 1e3 / forwards
            result[tag].op_calls[op] += 1 / forwards
    return result


def _short_op_name(name: str) -> str:
    """Inductor's `## Call CompiledFxGraph <hash> ##` (flex attention) without the hash."""
    return "compiled graph (flex attention)" if "CompiledFxGraph" in name else name


def _nearest_labelled(event):  # the component ranges directly inside `event`, at any depth of plain ops
    for child in event.cpu_children:
        if child.name.startswith(LABEL):
            yield child
        else:
            yield from _nearest_labelled(child)


def profile(setting: Setting, seq_len: int, batch: int, reps: int) -> None:
    """Profile ours, transformers' default and its fastest implementations, interleaved, and print where time goes."""
    input_ids = torch.randint(
        0, setting.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1)
    )
    names = dict.fromkeys([setting.default, *setting.fastest[seq_len].values()])
    contenders = [setting.ours] + [setting.theirs[name] for name in names]
    handles = [handle for c in contenders for handle in label_components(c.model, c.name)]
    for contender in contenders:
        contender.logits(input_ids)  # warm
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(reps):
            for contender in contenders:
                contender.logits(input_ids)
    for handle in handles:
        handle.remove()
    by_tag = attribute(profiler.events(), reps)

    names = [c.name for c in contenders]
    print(f"\nProfile {setting.preset}, B={batch} T={seq_len}: ms per forward, each component's own time")
    print(f"{'component':38s}" + "".join(f"{n:>28s}" for n in names))
    components = sorted(
        {k for n in names for k in by_tag[n].component_ms}, key=lambda k: -by_tag["ours"].component_ms[k]
    )
    for component in components:
        print(f"{component:38s}" + "".join(f"{by_tag[n].component_ms[component]:28.1f}" for n in names))
    print(f"{'total':38s}" + "".join(f"{sum(by_tag[n].component_ms.values()):28.1f}" for n in names))
    print(f"{'  of it outside aten ops (Python)':38s}" + "".join(f"{by_tag[n].python_ms:28.1f}" for n in names))
    for name in names:
        ops = by_tag[name].op_ms
        print(f"\n  top ops of {name} by self time: component: op, ms per forward, calls per forward")
        for op in sorted(ops, key=ops.__getitem__, reverse=True)[:14]:
            print(f"    {op:70s} {ops[op]:8.1f} {by_tag[name].op_calls[op]:6.0f}")


# ---------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_SEQ_LENS), choices=list(DEFAULT_SEQ_LENS))
    parser.add_argument("--seq-lens", nargs="+", type=positive_int, help="tokens per sequence (default: per preset)")
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--reps", type=positive_int, default=5, help="timed forwards per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per model, the first checks parity")
    parser.add_argument("--profile-seq-len", type=positive_int, default=512, help="T of the profile")
    parser.add_argument("--profile-reps", type=positive_int, default=2, help="profiled forwards per model")
    parser.add_argument("--no-profile", action="store_true", help="only the throughput table")
    parser.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="ours' dtype (default: %(default)s)"
    )
    add_machine_options(parser)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: the first untimed forward is the parity check")
    for preset in args.presets:  # positions past a preset's context it has none for: refused, as seekstack train does
        context = seekstack.preset(preset).max_position_embeddings
        timed = [("--seq-lens", seq_len) for seq_len in args.seq_lens or []]
        profiled = [] if args.no_profile else [("--profile-seq-len", args.profile_seq_len)]
        for option, seq_len in timed + profiled:
            check_context(parser, option, seq_len, context, f"preset {preset}'s")
    prepare_machine(args)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    peaks = matmul_peaks(args.clock)
    faster_bf16 = [torch.bfloat16] if peaks["bfloat16"] > peaks["float32"] else []

    rows, settings = [], []
    with tempfile.TemporaryDirectory() as root, torch.inference_mode():
        for preset in args.presets:
            dtype, why = ours_dtype(seekstack.preset(preset), args.dtype)
            print(f"{preset}: ours in {str(dtype).removeprefix('torch.')} ({why})", flush=True)
            their_dtypes = list(dict.fromkeys([torch.float32, *faster_bf16, dtype]))  # ours' dtype: like for like
            setting = build_setting(preset, Path(root) / preset, dtype, their_dtypes)
            settings.append(setting)
            for seq_len in args.seq_lens or DEFAULT_SEQ_LENS[preset]:
                rows.append(benchmark(setting, seq_len, args.batch, args.reps, args.warmup, args.clock))
        print_table(rows, args.batch, settings, peaks)
        if not args.no_profile:
            for setting in settings:
                if args.profile_seq_len not in setting.fastest:
                    benchmark(setting, args.profile_seq_len, args.batch, 1, args.warmup, args.clock)
                profile(setting, args.profile_seq_len, args.batch, args.profile_reps)


if __name__ == "__main__":
    main()
