"""Healing: a short fine-tune of a pruned checkpoint on the train split, run by the project's trainer
(seekstack.train) with `init_from`, so it has the pre-training losses, bias balancing and checkpoints as they are."""

from __future__ import annotations

from pathlib import Path

from seekstack.checkpoint import read_config
from seekstack.train.config import TrainConfig
from seekstack.train.trainer import train


def heal(
    pruned: str | Path,
    data_dir: str | Path,
    steps: int,
    work_dir: str | Path,
    lr: float = 1e-4,
    batch_size: int = 8,
    seq_len: int = 256,
) -> Path:
    """Fine-tune checkpoint `pruned` for `steps` steps on `data_dir`'s train split (cosine from `lr` to lr/10 after a
    short warmup), on windows of `seq_len` tokens or of the model's context where that is shorter; returns the
    checkpoint folder the trainer wrote under `work_dir`."""
    tokenizer = Path(pruned) / "tokenizer.json"
    seq_len = min(seq_len, read_config(pruned).max_position_embeddings)
    config = TrainConfig(
        init_from=str(pruned), data_dir=str(data_dir), out_dir=str(work_dir), tokenizer=str(tokenizer) if
        tokenizer.is_file() else "", max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 10),
        batch_size=batch_size, seq_len=seq_len, eval_every=0, save_every=0, keep_checkpoints=1,
    )  # fmt: skip
    result = train(config, resumable=False)  # an interrupt ends the command (`seekstack prune` says so)
    assert result.checkpoint is not None  # the trainer always saves the last step
    return result.checkpoint
