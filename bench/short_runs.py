"""Short training runs of `tiny` on the demo token shards, for the studies that compare training settings.

Every run shares the seed, data order, model and schedule; only the fields a study changes differ. A run's
summary: validation loss and bits per byte over the whole validation split at the end, and MaxVio over the
last quarter of its steps (each step's MaxVio is over that step's whole batch), averaged and per MoE layer,
and MaxVio over the whole validation split (Wang et al. 2024's MaxVio_global), averaged over layers.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from seekstack.tokens.shards import load_index
from seekstack.train.config import TrainConfig
from seekstack.train.trainer import METRICS_FILE, train

BASE = dict(
    model="tiny", seq_len=256, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=30, save_every=0, seed=0
)  # fmt: skip


def fresh_out_dir(out_dir: Path) -> Path:
    """`out_dir` emptied: a run of a study starts afresh, as train refuses a new run into a folder holding one."""
    shutil.rmtree(out_dir, ignore_errors=True)
    return out_dir


def short_run(data_dir: Path, out_dir: Path, steps: int, **changes: Any) -> dict[str, Any]:
    """Train for `steps` with the BASE settings plus `changes`; return the run's summary."""
    settings = {**BASE, **changes}
    val_windows = load_index(data_dir, "val")["total_tokens"] // settings["seq_len"]
    eval_batches = -(-val_windows // settings["batch_size"])  # the whole validation split
    config = TrainConfig(
        **settings, data_dir=str(data_dir), out_dir=str(out_dir), max_steps=steps,
        eval_every=steps, eval_batches=eval_batches,
    ).validate()  # fmt: skip
    fresh_out_dir(out_dir)
    train(config)
    records = [json.loads(line) for line in (out_dir / METRICS_FILE).read_text().splitlines()]
    steps_logged = [r for r in records if "loss" in r]
    tail = steps_logged[-max(len(steps_logged) // 4, 1) :]
    layers = list(tail[0]["maxvio_per_layer"])
    final = [r for r in records if "val_loss" in r][-1]
    return {
        "val_loss": final["val_loss"],
        "val_bpb": final["val_bpb"],
        "train_loss_tail": statistics.mean(r["lm_loss"] for r in tail),
        "maxvio": statistics.mean(r["maxvio"] for r in tail),
        "maxvio_per_layer": {layer: statistics.mean(r["maxvio_per_layer"][layer] for r in tail) for layer in layers},
        "val_maxvio": final["val_maxvio"],  # over the whole validation split's tokens
    }
