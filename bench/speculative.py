"""MTP speculative decoding against plain greedy decoding on a trained model: acceptance rate and speed-up.

The model is, in order of preference: `--model DIR`; the newest checkpoint of the demo run
(runs/demo/train, from `make demo`); or a `tiny` model this script trains itself for `--train-steps`
steps on the demo token shards (building them first, as `make demo` does, if they are missing).

Both engines load the same checkpoint. Prompts are the openings of held-out documents: the val.jsonl of
`--corpus`, a `seekstack data build` folder (by default the demo run's). Each prompt is
decoded greedily by both, the outputs are checked to be token-for-token identical, and timed runs of
the two alternate (median over repetitions). Every engine runs in `--dtype`, by default the engine's (`auto`:
bfloat16 where the CPU runs it fast). The `default` rows are an engine with the speculative settings a user
gets from `--speculative` alone (EngineOptions: up to 3 drafts a step, the count chosen from the acceptance measured
so far at each draft depth and the batch size, seekstack.infer.speculative.DraftCount, drafts scored over the 1024
most frequent tokens, seekstack.infer.draft_vocab); each fixed number of drafts per step in `--draft-tokens` gets an
engine and rows too, and so does the default with each other draft vocabulary in `--draft-vocab` (`v0`: the whole
vocabulary). `accept` is the share of drafted tokens accepted,
`accept by depth` each draft depth's share of its checks passed / its checks (depth d is checked once d - 1 passed),
`drafts/tok` the drafts made per generated token.

    decode tok/s = sequences x (new_tokens - 1) / (t(new_tokens) - t(1 new token)), nan where t(new_tokens) is not
                   above t(1 new token): the decode time is within timing noise (raise --new-tokens or --reps)

    python bench/speculative.py                     # trains first if there is no demo checkpoint (~10 min)
    python bench/speculative.py --model runs/demo/train/checkpoints/step_450
    python bench/speculative.py --model runs/tiny --corpus data/corpus   # prompts from another corpus's val.jsonl
    python bench/speculative.py --prompts 2 --new-tokens 32 --reps 2 --draft-tokens   # quick check, default only
    python bench/speculative.py --threads 1 --clock cpu   # on a machine others are using: this process's CPU seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import CLOCKS, add_machine_options, decode_rate, print_noise_notice
from options import non_negative_int, positive_int, whole_number

from seekstack.infer import Engine, EngineOptions, SamplingParams
from seekstack.infer.draft_vocab import token_ranking
from seekstack.infer.params import DTYPES
from seekstack.tokenizer import Tokenizer
from seekstack.train.config import TrainConfig
from seekstack.train.runs import list_checkpoints
from seekstack.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "runs" / "demo"
OWN_RUN = ROOT / "runs" / "bench_speculative"
VAL_FILE = "val.jsonl"  # the held-out documents of a `data build` folder


def trained_model() -> Path | None:
    """The demo run's newest checkpoint, else this benchmark's own; None when neither run has one."""
    for run in (DEMO / "train", OWN_RUN):
        if list_checkpoints(run):
            return list_checkpoints(run)[-1]
    return None


def demo_data_missing() -> bool:
    """Whether `train_own_model` builds the demo data (its corpus among them) before training: no demo shards."""
    return not (DEMO / "tokens" / "train_index.json").is_file()


def train_own_model(train_steps: int) -> Path:
    """A `tiny` model trained for `train_steps` steps on the demo shards (built first when missing): this benchmark's
    own run's newest checkpoint."""
    if demo_data_missing():
        seekstack = [sys.executable, "-m", "seekstack.cli"]
        print("no demo data: building it as `make demo` does", flush=True)
        subprocess.run(
            [*seekstack, "data", "build", "--out", str(DEMO / "corpus"), "--val-fraction", "0.05"], check=True
        )
        subprocess.run([*seekstack, "tokenizer", "train", "--corpus", str(DEMO / "corpus"), "--vocab-size", "4096",
                        "--out", str(DEMO / "tokenizer")], check=True)  # fmt: skip
        subprocess.run([*seekstack, "data", "tokenize", "--corpus", str(DEMO / "corpus"), "--tokenizer",
                        str(DEMO / "tokenizer"), "--out", str(DEMO / "tokens")], check=True)  # fmt: skip
    print(f"no trained model: training tiny for {train_steps} steps into {OWN_RUN}", flush=True)
    config = TrainConfig(
        model="tiny", data_dir=str(DEMO / "tokens"), out_dir=str(OWN_RUN), max_steps=train_steps, batch_size=16,
        seq_len=256, warmup_steps=min(40, train_steps // 5), eval_every=0, save_every=train_steps,
    )  # fmt: skip
    start = time.perf_counter()
    result = train(config)
    print(f"trained {result.step} steps in {time.perf_counter() - start:.0f} s, loss {result.losses[-1]:.3f}")
    return list_checkpoints(OWN_RUN)[-1]


def held_out_prompts(corpus: Path, tokenizer: Tokenizer, count: int, length: int) -> list[list[int]]:
    """The first `length` tokens of the first `count` documents of `corpus`/val.jsonl long enough to have them;
    ValueError naming the file when it has none."""
    prompts = []
    with open(corpus / VAL_FILE, encoding="utf-8") as lines:
        for line in lines:
            ids = tokenizer.encode(json.loads(line)["text"])
            if len(ids) >= length:
                prompts.append(ids[:length])
            if len(prompts) == count:
                break
    if not prompts:
        raise ValueError(f"{corpus / VAL_FILE} has no document of {length} tokens or more: lower --prompt-len")
    return prompts


def timed(
    engine: Engine, prompts: list[list[int]], new_tokens: int, clock: Callable[[], float]
) -> tuple[float, list[list[int]]]:
    """Seconds on `clock` (CLOCKS: --clock's) to decode `new_tokens` greedy tokens for each prompt, and the tokens."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = clock()
    completions = engine.generate(prompts, params)
    return clock() - start, [c.token_ids for c in completions]


def compare(
    plain: Engine,
    speculative: Engine,
    prompts: list[list[int]],
    new_tokens: int,
    reps: int,
    clock: Callable[[], float],
) -> dict:
    """Interleaved medians of both engines at 1 and `new_tokens` new tokens, timed on `clock`; acceptance over the
    timed runs."""
    _, plain_tokens = timed(plain, prompts, new_tokens, clock)
    _, speculative_tokens = timed(speculative, prompts, new_tokens, clock)
    drafted, accepted = speculative.stats().spec_drafted, speculative.stats().spec_accepted
    counts = speculative.draft_count
    passed_before, checked_before = list(counts.passed), list(counts.checked)
    runs = {"plain": plain, "speculative": speculative}
    seconds: dict[str, list[float]] = {f"{name}_{n}": [] for name in runs for n in (1, new_tokens)}
    for rep in range(reps):
        order = list(runs.items()) if rep % 2 == 0 else list(runs.items())[::-1]
        for name, engine in order:
            for n in (1, new_tokens):
                seconds[f"{name}_{n}"].append(timed(engine, prompts, n, clock)[0])
    median = {key: statistics.median(values) for key, values in seconds.items()}
    stats = speculative.stats()
    return {
        "identical": plain_tokens == speculative_tokens,
        "accept_rate": (stats.spec_accepted - accepted) / max(stats.spec_drafted - drafted, 1),
        "drafts_per_token": (stats.spec_drafted - drafted) / (len(prompts) * reps * (new_tokens + 1)),
        "passed_by_depth": [after - before for after, before in zip(counts.passed, passed_before, strict=True)],
        "checked_by_depth": [after - before for after, before in zip(counts.checked, checked_before, strict=True)],
        **{f"{name}_tok_s": decode_rate(median, name, len(prompts), new_tokens) for name in runs},
    }


def depth_acceptance(rows: list[dict]) -> str:
    """Draft d's share of checks passed, over the checks made at depth d (reached once all before it passed)."""
    passed = [sum(depths) for depths in zip(*(r["passed_by_depth"] for r in rows), strict=True)]
    checked = [sum(depths) for depths in zip(*(r["checked_by_depth"] for r in rows), strict=True)]
    return " ".join(f"{p / c:.0%}/{c}" if c else "-" for p, c in zip(passed, checked, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: demo run, else train one)")
    parser.add_argument(
        "--corpus", type=Path, default=DEMO / "corpus", help="`data build` folder whose val.jsonl gives the prompts"
    )
    parser.add_argument(
        "--train-steps", type=positive_int, default=600, help="steps when the script trains its own model"
    )
    parser.add_argument("--prompts", type=positive_int, default=4)
    parser.add_argument("--prompt-len", type=positive_int, default=32)
    parser.add_argument(
        "--new-tokens", type=functools.partial(whole_number, least=2), default=64,
        help="at least 2: the decode rate is t(N new tokens) - t(1 new token)",
    )  # fmt: skip
    parser.add_argument(
        "--batches", nargs="+", type=positive_int, default=[1, 4, 16], help="sequences decoded together"
    )
    parser.add_argument(
        "--draft-tokens", nargs="*", type=positive_int, default=[1, 3], help="fixed MTP drafts per step"
    )
    parser.add_argument(
        "--draft-vocab",
        nargs="*",
        type=non_negative_int,
        default=[0],
        help="default engines with these draft vocabularies too",
    )
    parser.add_argument("--reps", type=positive_int, default=3)
    add_machine_options(parser)  # --threads, --clock
    parser.add_argument("--compile", action="store_true", help="both engines decode with torch.compile")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=EngineOptions.dtype, help="every engine's (default: %(default)s)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or trained_model()
    # checked before any work: only the demo corpus is built here, and only on the way to a model of the script's own
    built_here = model_dir is None and demo_data_missing() and args.corpus.resolve() == (DEMO / "corpus").resolve()
    if not (args.corpus / VAL_FILE).is_file() and not built_here:
        parser.error(f"--corpus {args.corpus}: no {VAL_FILE} there, whose held-out documents give the prompts; give a "
                     "`seekstack data build` folder (make demo builds runs/demo/corpus)")  # fmt: skip
    model_dir = model_dir or train_own_model(args.train_steps)
    default = EngineOptions(speculative=True, max_batch_size=max(args.batches), compile=args.compile, dtype=args.dtype)
    try:  # the first reads of --model: a folder that is no checkpoint, or one without an MTP module, is one line
        dtype_name, why = default.resolved_dtype(model_dir)
        dtype = default.engine_kwargs(model_dir)["dtype"]  # every engine in the dtype the default picks (auto)
        plain = Engine.from_pretrained(model_dir, max_batch_size=max(args.batches), compile=args.compile, dtype=dtype)
        speculative = {"default": Engine.from_pretrained(model_dir, **default.engine_kwargs(model_dir))}
    except ValueError as error:
        parser.error(f"--model {model_dir}: {error}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model {model_dir}, {dtype_name} ({why})")
    for size in args.draft_vocab:
        options = dataclasses.replace(default, draft_vocab=size)
        speculative[f"v{size}"] = Engine.from_pretrained(model_dir, **options.engine_kwargs(model_dir))
    for k in args.draft_tokens:
        speculative[str(k)] = Engine.from_pretrained(
            model_dir, max_batch_size=max(args.batches), speculative=True, draft_tokens=k, adaptive_drafts=False,
            compile=args.compile, dtype=dtype,
        )  # fmt: skip
    try:
        prompts = held_out_prompts(args.corpus, plain.tokenizer, args.prompts * max(args.batches), args.prompt_len)
    except ValueError as error:
        parser.error(str(error))
    decode = "compiled" if args.compile else "eager"
    groups = {}  # `--prompts` full groups of each batch size while the held-out documents last (one at least)
    for batch in args.batches:
        full = [prompts[i : i + batch] for i in range(0, len(prompts) - batch + 1, batch)][: args.prompts]
        groups[batch] = full or [prompts]
        if len(full) < args.prompts:
            print(
                f"batch {batch}: {len(groups[batch])} group(s) of {len(groups[batch][0])} prompts (too few documents)"
            )
    print(
        f"{len(prompts)} held-out prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, {decode}, "
        f"{args.clock} clock"
    )
    mode = "adaptive" if default.adaptive_drafts else "fixed"
    _, ranking = token_ranking(model_dir, plain.config.vocab_size)
    print(f"default: draft_tokens={default.draft_tokens} ({mode}), draft_vocab={default.draft_vocab} ({ranking}),")
    print(f"measured step costs (of a plain step of as many rows; load average {os.getloadavg()[0]:.2f}):")
    for k, engine in speculative.items():
        costs = engine.draft_count.costs
        if engine.draft_count.adaptive:
            print(f"  {k}: " + ", ".join(
                f"batch {batch} draft {draft:.2f} verify " + "/".join(f"{v:.2f}" for v in verify[1:])
                for batch, draft, verify in zip(costs.batches, costs.draft, costs.verify, strict=True)
            ))  # fmt: skip
    header = (
        f"{'batch':>5s} {'drafts':>8s} {'plain tok/s':>12s} {'MTP spec tok/s':>15s} {'speed-up':>9s} "
        f"{'accept':>7s} {'drafts/tok':>10s} {'identical':>10s}  accept by depth"
    )
    print(header + "\n" + "-" * len(header))
    with torch.inference_mode():
        for batch in args.batches:
            for k, engine in speculative.items():
                rows = [
                    compare(plain, engine, group, args.new_tokens, args.reps, CLOCKS[args.clock])
                    for group in groups[batch]
                ]
                plain_rate = statistics.mean(r["plain_tok_s"] for r in rows)
                speculative_rate = statistics.mean(r["speculative_tok_s"] for r in rows)
                accept = statistics.mean(r["accept_rate"] for r in rows)
                drafts_per_token = statistics.mean(r["drafts_per_token"] for r in rows)
                identical = all(r["identical"] for r in rows)
                by_depth = depth_acceptance(rows)
                print(
                    f"{batch:5d} {k:>8s} {plain_rate:12.1f} {speculative_rate:15.1f} "
                    f"{speculative_rate / plain_rate:8.2f}x {accept:7.0%} {drafts_per_token:10.2f} "
                    f"{str(identical):>10s}  {by_depth}",
                    flush=True,
                )
                print_noise_notice([plain_rate, speculative_rate])
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
