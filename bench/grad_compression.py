"""Compressed gradient all-reduce: bytes sent per step and final validation loss of the same 2-rank DDP run
under each `grad_compression` scheme (parallel/compression.py).

`tiny` on the demo shards, the demo's batch (16 x 256, so 8 rows per rank) and schedule, 2 gloo ranks on this
machine through torchrun, one torch thread each. PowerSGD (rank 4) starts at step 10, not its default 1,000.

    python bench/grad_compression.py                 # 200 steps x 5 schemes (after make demo)
    python bench/grad_compression.py --steps 40      # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from options import positive_int, token_shards
from short_runs import BASE, fresh_out_dir

from seekstack.tokens.shards import load_index

SCHEMES = ("none", "bf16", "int8", "int8_no_ef", "powersgd")
POWERSGD_START = 10  # the step PowerSGD starts at; bytes are averaged over the steps after it


def run(scheme: str, data_dir: Path, out_dir: Path, steps: int) -> dict:
    """One 2-rank run; its mean bytes per step (after PowerSGD's start) and final validation figures."""
    val_windows = load_index(data_dir, "val")["total_tokens"] // BASE["seq_len"]
    fields = {
        **BASE, "data_dir": data_dir, "out_dir": fresh_out_dir(out_dir), "max_steps": steps, "eval_every": steps,
        "eval_batches": -(-val_windows // BASE["batch_size"]), "grad_compression": scheme,
        "powersgd_start": POWERSGD_START,
    }  # fmt: skip
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "seekstack.cli", "train"]
    command += [f"{key}={value}" for key, value in fields.items()]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    sent = [r["comm_bytes"] for r in records if "comm_bytes" in r][POWERSGD_START:]
    final = [r for r in records if "val_loss" in r][-1]
    return {"bytes": statistics.mean(sent), "val_loss": final["val_loss"], "val_bpb": final["val_bpb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=token_shards("train", "val"), default="runs/demo/tokens")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_grad_compression"))
    parser.add_argument("--steps", type=positive_int, default=200)
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    args = parser.parse_args()
    if args.steps <= POWERSGD_START:  # else no step to average the bytes over, found after every run
        parser.error(f"argument --steps: {args.steps}: at least {POWERSGD_START + 1}, the bytes are those of the "
                     f"steps after PowerSGD's start at step {POWERSGD_START}")  # fmt: skip
    results = {}
    for scheme in args.schemes:
        results[scheme] = run(scheme, args.data, args.out / scheme, args.steps)
        print(f"{scheme}: {results[scheme]}", flush=True)
    base = results.get("none")
    print(f"\ntiny, 2 ranks, {args.steps} steps x 16 x 256; bytes per rank per step after step {POWERSGD_START}")
    print(f"{'scheme':12s} {'bytes/step':>12s} {'vs none':>8s} {'val loss':>9s} {'vs none':>8s} {'val bpb':>8s}")
    for scheme, result in results.items():
        fewer = f"{base['bytes'] / result['bytes']:7.2f}x" if base else ""
        loss = f"{(result['val_loss'] / base['val_loss'] - 1) * 100:+7.2f}%" if base else ""
        print(f"{scheme:12s} {result['bytes']:12,.0f} {fewer:>8s} {result['val_loss']:9.4f} {loss:>8s} "
              f"{result['val_bpb']:8.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
