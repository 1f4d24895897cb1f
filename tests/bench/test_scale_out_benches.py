"""bench/fsdp_memory.py and bench/grad_compression.py, run as the README and their docstrings say: on shards of any
vocabulary, and again into the same --out (a quick check, then the full run)."""

import sys

import pytest
import torch

from tests.bench.support import BENCH

sys.path.insert(0, str(BENCH))  # the scripts import short_runs.py as their sibling
from bench import grad_compression  # noqa: E402
from bench.fsdp_memory import first_step_memory  # noqa: E402
from seekstack.model.transformer import Transformer  # noqa: E402
from seekstack.train.config import TrainConfig  # noqa: E402
from tests.train.test_trainer import VOCAB, write_split  # noqa: E402


def test_fsdp_memory_measures_the_preset_at_the_shards_vocabulary_into_a_folder_an_earlier_run_left(tmp_path):
    """`small`'s 16,384 ids on the demo's 4,096-id shards were refused ('model vocab_size=16384 is larger than the
    tokenizer's 4096 tokens'), unseen: a CalledProcessError; and an earlier run's checkpoint made train refuse the
    next ('out_dir ... holds a run (checkpoint step_1)')."""
    write_split(tmp_path / "tokens", "train", 2_000, seed=1)
    earlier = tmp_path / "ranks_1" / "checkpoints" / "step_1"
    earlier.mkdir(parents=True)
    for name in ("train_state.pt", "config.json", "model.safetensors"):  # what a complete checkpoint holds
        (earlier / name).touch()
    memory = first_step_memory(1, "tiny", tmp_path / "tokens", tmp_path / "ranks_1")
    with torch.device("meta"):
        model = Transformer(TrainConfig(model="tiny", model_overrides={"vocab_size": VOCAB}).model_config())
    assert memory["parameters"] == 4 * sum(param.numel() for param in model.parameters())  # float32
    assert (earlier / "train_state.pt").stat().st_size > 0  # the new run's own


def test_grad_compression_refuses_too_few_steps_to_count_bytes_after_powersgds_start(tmp_path, monkeypatch, capsys):
    """--steps 10 (a quick check shorter than the docstring's 40) ran every scheme's 10 steps on 2 ranks and then
    died on an empty mean: the bytes are those of the steps after PowerSGD's start at step 10."""
    for split in ("train", "val"):  # --data is checked as it is parsed: not make demo's runs/demo/tokens
        write_split(tmp_path / "tokens", split, 600, seed=0)
    options = ["--data", str(tmp_path / "tokens"), "--steps", "10", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", ["grad_compression.py", *options])
    with pytest.raises(SystemExit) as exited:
        grad_compression.main()
    assert exited.value.code == 2 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err.endswith(
        "error: argument --steps: 10: at least 11, the bytes are those of the steps after PowerSGD's start at step 10\n"
    )
