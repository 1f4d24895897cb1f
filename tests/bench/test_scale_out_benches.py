"""bench/fsdp_memory.py and bench/grad_compression.py, run again into the same --out (the README's quick check, then
the full run): each run starts afresh, as bench/short_runs.py's do."""

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # the scripts import short_runs.py as their sibling
from bench.fsdp_memory import first_step_memory  # noqa: E402
from tests.train.test_trainer import write_split  # noqa: E402


def test_a_run_into_an_out_folder_an_earlier_run_left_measures_afresh(tmp_path):
    """The earlier run's checkpoint made train refuse the new one: 'out_dir ... holds a run (checkpoint step_1)'."""
    write_split(tmp_path / "tokens", "train", 2_000, seed=1)
    index_file = tmp_path / "tokens" / "train_index.json"
    index = json.loads(index_file.read_text())
    index["tokenizer"]["vocab_size"] = 4096  # the `tiny` preset's vocabulary
    index_file.write_text(json.dumps(index))
    earlier = tmp_path / "ranks_1" / "checkpoints" / "step_1"
    earlier.mkdir(parents=True)
    (earlier / "train_state.pt").touch()
    memory = first_step_memory(1, "tiny", tmp_path / "tokens", tmp_path / "ranks_1")
    assert memory["parameters"] == 2_818_272 * 4  # tiny's float32 weights, main model and MTP module
    assert (earlier / "train_state.pt").stat().st_size > 0  # the new run's own
