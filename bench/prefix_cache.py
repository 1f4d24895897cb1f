"""Time to first token with and without automatic prefix caching, in one run.

A preset with random weights serves 16 requests that share a 512-token system prompt, each with its own question,
after one earlier request with the same system prompt (the prefix a server has already seen). Two engines on the
same model, one with `prefix_caching=False`: each rep builds both afresh and alternates which goes first, so load
from other processes falls on both alike. Reported: median over reps of the mean and the worst time to first token
of the 16, prompt tokens computed, tokens served from the cache, and the ratio without / with. The first tokens of
both engines are compared first (greedy: they must be equal).

    python bench/prefix_cache.py                  # about a minute on 2 cores
    python bench/prefix_cache.py --reps 1 --requests 4 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from options import non_negative_int, positive_int

import seekstack
from seekstack.config import PRESETS
from seekstack.infer import Engine, SamplingParams
from seekstack.tokenizer import train_tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "seekstack"  # our own source: enough text for a small BPE


def run(engine: Engine, warmup: list[int], prompts: list[list[int]], params: SamplingParams) -> dict[str, float]:
    """One earlier request with the system prompt, then all `prompts` at once; their times to first token."""
    engine.generate([warmup], params)
    computed_before = engine.stats().prefill_tokens
    completions = engine.generate(prompts, params)
    ttft = [c.timings["time_to_first_token_s"] for c in completions]
    return {
        "mean_ttft_s": statistics.mean(ttft),
        "max_ttft_s": max(ttft),
        "prompt_tokens_computed": engine.stats().prefill_tokens - computed_before,
        "first_tokens": [c.token_ids[0] for c in completions],
    }


def alternating_runs(engine: Callable[[bool], Engine], timed: Callable[[Engine], dict], reps: int) -> dict:
    """caching -> `reps` results of `timed` on a fresh engine of each kind, alternating which goes first, after an
    untimed run of each: the process's first batch of each kind is slow (its first prefill after a cached prefix
    too), which fell on the cached engine in rep 0 (--reps 1 gave it 5x the uncached TTFT on a 64-token prefix)."""
    for caching in (True, False):
        timed(engine(caching))
    results: dict[bool, list[dict]] = {False: [], True: []}
    for rep in range(reps):
        for caching in (rep % 2 == 0, rep % 2 == 1):
            results[caching].append(timed(engine(caching)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--requests", type=positive_int, default=16)
    parser.add_argument("--system-tokens", type=positive_int, default=512, help="the prompt all requests share")
    parser.add_argument("--question-tokens", type=non_negative_int, default=32, help="each request's own after it")
    parser.add_argument("--reps", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    config = seekstack.preset(args.preset)
    if args.system_tokens + args.question_tokens + 1 > config.max_position_embeddings:  # the prompt and its token
        parser.error(
            f"--system-tokens {args.system_tokens} + --question-tokens {args.question_tokens} + 1 new token: past "
            f"preset {args.preset}'s context of {config.max_position_embeddings} tokens"
        )
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = seekstack.Transformer(config).eval()
    texts = [path.read_text() for path in sorted(CORPUS.rglob("*.py"))]
    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size, out_path=Path(tempfile.mkdtemp()))
    generator = torch.Generator().manual_seed(1)

    def random_tokens(n: int) -> list[int]:
        return torch.randint(5, config.vocab_size, (n,), generator=generator).tolist()

    system = random_tokens(args.system_tokens)
    warmup = system + random_tokens(args.question_tokens)
    prompts = [system + random_tokens(args.question_tokens) for _ in range(args.requests)]
    params = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    options = dict(max_batch_size=args.requests, prefill_chunk=2048)

    results = alternating_runs(lambda caching: Engine(model, tokenizer, prefix_caching=caching, **options),
                               lambda engine: run(engine, warmup, prompts, params), args.reps)  # fmt: skip
    if results[True][0]["first_tokens"] != results[False][0]["first_tokens"]:
        raise SystemExit("the first tokens differ with and without the prefix cache")

    print(f"{args.requests} requests sharing a {args.system_tokens}-token system prompt (+{args.question_tokens} "
          f"tokens each), preset {args.preset}, {args.reps} reps, medians")  # fmt: skip
    print(f"{'prefix cache':<14}{'mean TTFT ms':>14}{'max TTFT ms':>13}{'prompt tokens computed':>24}")
    summary = {}
    for caching in (False, True):
        mean = statistics.median(r["mean_ttft_s"] for r in results[caching])
        worst = statistics.median(r["max_ttft_s"] for r in results[caching])
        computed = results[caching][0]["prompt_tokens_computed"]
        summary[caching] = mean
        print(f"{'on' if caching else 'off':<14}{mean * 1e3:>14.1f}{worst * 1e3:>13.1f}{computed:>24}")
    print(f"mean TTFT without / with the cache: {summary[False] / summary[True]:.2f}x")


if __name__ == "__main__":
    main()
