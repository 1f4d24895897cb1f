"""Memory per rank under FSDP2 (ZeRO-3): bytes of parameters, gradients and AdamW state each rank holds after
the first step, for one process and for 2 gloo ranks (torchrun), at the same global batch.

    python bench/fsdp_memory.py                       # `small` on the demo shards (after make demo)
    python bench/fsdp_memory.py --model tiny
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from options import token_shards
from short_runs import fresh_out_dir

from seekstack.tokens.shards import load_index


def first_step_memory(ranks: int, model: str, data_dir: Path, out_dir: Path) -> dict:
    """Rank 0's bytes after the first step of `model`, its vocabulary the shards' tokenizer's (as a run needs)."""
    vocab_size = load_index(data_dir, "train")["tokenizer"]["vocab_size"]
    fields = {
        "model": model, "model.vocab_size": vocab_size, "data_dir": data_dir, "out_dir": fresh_out_dir(out_dir),
        "max_steps": 1, "batch_size": 2, "seq_len": 128, "eval_every": 0, "save_every": 0, "parallel": "fsdp",
    }  # fmt: skip
    overrides = [f"{key}={value}" for key, value in fields.items()]
    if ranks == 1:
        command = [sys.executable, "-m", "seekstack.cli", "train", *overrides]
    else:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        command = [torchrun, "--standalone", "--nproc-per-node", str(ranks), "-m", "seekstack.cli", "train", *overrides]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    first = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[0])
    return first["rank_memory"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=token_shards("train"), default="runs/demo/tokens")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_fsdp_memory"))
    parser.add_argument("--model", default="small")
    args = parser.parse_args()
    print(f"{args.model}: bytes held by rank 0 after the first step (float32 weights, AdamW)")
    print(f"{'ranks':>5s} {'parameters':>14s} {'gradients':>14s} {'optimizer':>14s} {'total':>14s} {'vs 1':>6s}")
    whole = None
    for ranks in (1, 2):
        memory = first_step_memory(ranks, args.model, args.data, args.out / f"ranks_{ranks}")
        total = sum(memory.values())
        whole = whole or total
        print(
            f"{ranks:5d} {memory['parameters']:14,d} {memory['gradients']:14,d} {memory['optimizer']:14,d} "
            f"{total:14,d} {total / whole:6.2f}"
        )


if __name__ == "__main__":
    main()
