"""Loss-curve regression: the first steps of a seeded micro run match the losses committed beside this file.

A change that alters training numerics (model, losses, routing and its bias update, optimizer, schedule, data
order) moves these numbers; a refactor that should not must leave them within float noise. The run is a micro
DeepSeek-V3 (MLA, DeepSeekMoE with the bias update, MTP) on synthetic shards, float32 on CPU with a fixed thread
count, so it is bit-for-bit repeatable on one machine; the tolerance only absorbs other CPUs and libraries.

When a change is meant to alter the numerics, regenerate the reference and say why in the commit:

    .venv/bin/python tests/train/test_loss_curve.py              # rewrites loss_curve_reference.json
    PYTHONPATH=/path/to/other/checkout .venv/bin/python tests/train/test_loss_curve.py   # from another commit

The script uses only `seekstack.train.trainer.train` and `seekstack.train.config.TrainConfig`, and writes the
shards itself with numpy, so it runs against older checkouts too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from seekstack.train.config import TrainConfig
from seekstack.train.trainer import train

REFERENCE = Path(__file__).with_name("loss_curve_reference.json")
VOCAB = 96
THREADS = 1  # intra-op threads: the float summation order, and so the exact numbers, depend on it
STEPS = 10
COMPARED = ("loss", "lm_loss", "mtp_loss")  # per step, from metrics.jsonl
RTOL, ATOL = 1e-4, 1e-5  # a real numerics change moves the losses by >1e-3; float noise by <1e-6
MICRO_MODEL = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
)  # fmt: skip
SETTINGS = dict(
    model="tiny", model_overrides=MICRO_MODEL, seq_len=32, batch_size=4, grad_accum_steps=2, max_steps=STEPS,
    lr=1e-2, min_lr=1e-3, warmup_steps=3, eval_every=0, save_every=0, seed=1234, dtype="float32",
)  # fmt: skip
TRAIN_TOKENS, DATA_SEED = 20_000, 7


def write_train_shard(data_dir: Path) -> None:
    """One uint16 shard and its index, in the format the trainer reads: a noisy repeating pattern to learn."""
    rng = np.random.default_rng(DATA_SEED)
    ids = (np.arange(TRAIN_TOKENS) * 7 % VOCAB + rng.integers(0, 3, TRAIN_TOKENS)) % VOCAB
    data_dir.mkdir(parents=True, exist_ok=True)
    ids.astype("<u2").tofile(data_dir / "train_00000.bin")
    index = {
        "version": 1, "split": "train", "source": "synthetic", "dtype": "uint16",
        "shards": [{"file": "train_00000.bin", "tokens": TRAIN_TOKENS}], "documents": 1,
        "total_tokens": TRAIN_TOKENS, "text_bytes": TRAIN_TOKENS * 4, "bos": False,
        "tokenizer": {"vocab_size": VOCAB, "sha256": "synthetic", "bos_id": 0, "eos_id": 1},
    }  # fmt: skip
    (data_dir / "train_index.json").write_text(json.dumps(index))


def micro_run_losses(work_dir: Path) -> dict[str, list[float]]:
    """Train the micro run in `work_dir`; the per-step values of COMPARED, as metrics.jsonl logged them."""
    write_train_shard(work_dir / "shards")
    config = TrainConfig(**SETTINGS, data_dir=str(work_dir / "shards"), out_dir=str(work_dir / "run"))
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        train(config)
    finally:
        torch.set_num_threads(threads)
    lines = (work_dir / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [record for record in map(json.loads, lines) if "loss" in record]
    assert [record["step"] for record in steps] == list(range(1, STEPS + 1))
    return {name: [record[name] for record in steps] for name in COMPARED}


def test_micro_run_reproduces_the_reference_loss_curve(tmp_path):
    reference = json.loads(REFERENCE.read_text())
    assert reference["settings"] == json.loads(json.dumps(SETTINGS)), "settings changed: regenerate the reference"
    losses = micro_run_losses(tmp_path)
    for name in COMPARED:
        torch.testing.assert_close(
            torch.tensor(losses[name], dtype=torch.float64),
            torch.tensor(reference["losses"][name], dtype=torch.float64),
            rtol=RTOL,
            atol=ATOL,
            msg=lambda text, name=name: (
                f"{name} per step differs from {REFERENCE.name}:\n{text}\n"
                f"now:       {losses[name]}\nreference: {reference['losses'][name]}"
            ),
        )
    assert losses["loss"][-1] < losses["loss"][0] - 0.5  # the reference itself is a run that learns


def _source_revision() -> str:
    """The commit of the checkout seekstack was imported from, with '+dirty' if its tree has changes."""
    import seekstack

    root = Path(seekstack.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "seekstack") else "")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as work_dir:
        losses = micro_run_losses(Path(work_dir))
    record = {
        "made_by": "python tests/train/test_loss_curve.py (see its docstring)",
        "seekstack_commit": _source_revision(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "device": "cpu",
        "threads": THREADS,
        "data": {"train_tokens": TRAIN_TOKENS, "seed": DATA_SEED, "vocab_size": VOCAB},
        "settings": SETTINGS,
        "losses": losses,
    }
    REFERENCE.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {REFERENCE}: loss {[round(x, 6) for x in losses['loss']]}")
