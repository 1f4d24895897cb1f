"""`lora train` under torchrun on text: rank 0 alone tokenizes it into the adapter folder, every rank trains on those
shards, and an error rank 0 meets stops every rank (two gloo ranks on CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from seekstack.schema import ConfigError
from tests.support import free_port, spawn

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")


def _rank_main(rank: int, port: int, base: Path, text: Path, out: Path, outcomes: Path) -> None:
    """lora_train_config as `lora train` calls it on this rank; writes which ranks tokenized and what each got."""
    import torch.distributed as dist

    from seekstack.adapters import training

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    prepare_data = training.prepare_data

    def prepare_data_told(*args):
        (outcomes / f"tokenized_by_{rank}").touch()
        return prepare_data(*args)

    training.prepare_data = prepare_data_told
    try:
        run = training.lora_train_config(base, text, out, ["max_steps=1", "seq_len=32"])
        outcome = f"data_dir {run.config.data_dir}"
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    (outcomes / f"rank_{rank}").write_text(outcome)
    if dist.is_initialized():  # the process group a rank would hold, run or not, until its process ends
        (outcomes / f"group_kept_by_{rank}").touch()
        dist.destroy_process_group()


def _run_two_ranks(base: Path, text: Path, tmp_path: Path) -> dict[str, str]:
    outcomes = tmp_path / "outcomes"
    outcomes.mkdir()
    spawn(_rank_main, (free_port(), base, text, tmp_path / "adapter", outcomes))
    return {path.name: path.read_text() for path in outcomes.iterdir()}


def test_rank_0_alone_tokenizes_the_text_and_every_rank_trains_on_its_shards(base, tmp_path):
    """Every rank tokenized the text into ADAPTER/data at once, one deleting the shards another was reading."""
    text = tmp_path / "prose.txt"
    text.write_text("A few words of prose to adapt to. " * 200)
    outcomes = _run_two_ranks(base, text, tmp_path)
    tokens = tmp_path / "adapter" / "data"
    assert outcomes == {"tokenized_by_0": "", "rank_0": f"data_dir {tokens}", "rank_1": f"data_dir {tokens}"}


def test_an_error_rank_0_meets_preparing_the_data_stops_every_rank(base, tmp_path):
    outcomes = _run_two_ranks(base, tmp_path / "missing.txt", tmp_path)
    assert outcomes["rank_0"].startswith("DataSourceError: ") and "missing.txt" in outcomes["rank_0"]
    assert outcomes["rank_1"] == f"{ConfigError.__name__}: {outcomes['rank_0'].replace(': ', ' on rank 0: ', 1)}"
    assert "group_kept_by_0" not in outcomes and "group_kept_by_1" not in outcomes  # left on the error, as train() does
