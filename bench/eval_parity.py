"""Our lm_eval backend against lm_eval's HF backend on the same checkpoint: per-request log-likelihoods of the
local tasks' requests (max |difference|, is-greedy agreement), their greedy next lines (identical texts), the task
scores of both, and wall times.

    .venv/bin/python bench/eval_parity.py --model runs/eval_demo/train --corpus runs/demo/corpus --limit 40
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from options import checkpoint_folder, corpus_folder, positive_int  # noqa: E402
from peers import peer_missing  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=checkpoint_folder, required=True, help="checkpoint directory or run out_dir")
    parser.add_argument("--corpus", type=corpus_folder, default="runs/demo/corpus")
    parser.add_argument("--limit", type=positive_int, default=40, help="documents per task")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument(
        "--device",
        default=None,
        help="where both backends run (cuda, cuda:1, cpu); default cuda when available, else cpu",
    )
    parser.add_argument("--out", default=None, help="folder for results.json/.md (ours) and results_hf.json/.md")
    args = parser.parse_args()
    missing = peer_missing("lm_eval's HF backend", ("lm_eval",), "pip install -e '.[eval]'")
    if missing:
        raise SystemExit(missing)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from seekstack.eval.evaluate import documents_scored, evaluate, write_results
    from seekstack.eval.harness import SeekstackLM, resolve_device
    from seekstack.eval.tasks import PERPLEXITY_CHARS, held_out_modules, next_line_docs, task_configs

    torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))  # one device for both: their timings compare the backends alone
    modules = held_out_modules(args.corpus)
    questions = next_line_docs(modules)[: args.limit]
    pairs = [(q["context"], choice) for q in questions for choice in q["choices"]]
    texts = [(m["text"][:PERPLEXITY_CHARS],) for m in modules[: args.limit]]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    rolling = [Instance("loglikelihood_rolling", {}, text, i) for i, text in enumerate(texts)]
    [next_line] = task_configs(args.corpus, ("code_next_line",))  # its generation kwargs: greedy, until a newline
    lines = [
        Instance("generate_until", {}, (q["prompt"], dict(next_line["generation_kwargs"])), i)
        for i, q in enumerate(questions)
    ]

    ours = SeekstackLM(pretrained=args.model, batch_size=args.batch_size, device=device)
    theirs = HFLM(pretrained=str(args.model), device=device, batch_size=args.batch_size, dtype="float32")
    timings, outputs = {}, {}
    for name, lm in (("seekstack", ours), ("hf", theirs)):
        started = time.perf_counter()
        outputs[name] = (lm.loglikelihood(requests), lm.loglikelihood_rolling(rolling), lm.generate_until(lines))
        timings[name] = time.perf_counter() - started
    (ours_ll, ours_rolling, ours_lines), (hf_ll, hf_rolling, hf_lines) = outputs["seekstack"], outputs["hf"]
    ll_diff = max(abs(a[0] - b[0]) for a, b in zip(ours_ll, hf_ll, strict=True))
    rolling_diff = max(abs(a - b) for a, b in zip(ours_rolling, hf_rolling, strict=True))
    greedy_agree = sum(a[1] == b[1] for a, b in zip(ours_ll, hf_ll, strict=True))
    print(f"checkpoint {args.model}, both backends on {device}")
    print(f"loglikelihood: {len(pairs)} requests, max |ours - hf| = {ll_diff:.2e}, is_greedy agrees {greedy_agree}"
          f"/{len(pairs)}")  # fmt: skip
    print(f"loglikelihood_rolling: {len(texts)} documents, max |ours - hf| = {rolling_diff:.2e} "
          f"(totals {min(hf_rolling):.1f} .. {max(hf_rolling):.1f})")  # fmt: skip
    same_lines = sum(a == b for a, b in zip(ours_lines, hf_lines, strict=True))
    print(f"generate_until: {len(lines)} greedy next lines, identical texts {same_lines}/{len(lines)}")
    print(f"wall time of these requests: ours {timings['seekstack']:.1f} s, hf {timings['hf']:.1f} s, "
          f"ratio {timings['hf'] / timings['seekstack']:.2f}x")  # fmt: skip
    del ours, theirs

    reports = {
        backend: evaluate(
            args.model, corpus=args.corpus, backend=backend, batch_size=args.batch_size, limit=args.limit, device=device
        )
        for backend in ("seekstack", "hf")
    }
    if args.out:
        for backend, name in (("seekstack", "results"), ("hf", "results_hf")):
            write_results(reports[backend], f"{args.out}/{name}")
    print("\n| task | metric | seekstack | hf (transformers) | n |\n|---|---|---|---|---|")
    for task, metrics in sorted(reports["seekstack"]["results"].items()):
        for metric, value in metrics.items():
            if not metric.endswith("_stderr"):
                theirs, n = reports["hf"]["results"][task][metric], documents_scored(reports["seekstack"])[task]
                print(f"| {task} | {metric} | {_number(value)} | {_number(theirs)} | {n} |")
    print(
        f"\nwall time of the whole evaluation: seekstack {reports['seekstack']['wall_s']:.1f} s, "
        f"hf {reports['hf']['wall_s']:.1f} s"
    )


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


if __name__ == "__main__":
    main()
