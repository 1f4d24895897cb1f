"""bench/lora_domain.py: the full fine-tune that the LoRA runs are measured against trains with their optimizer."""

import sys

from tests.bench.support import BENCH

sys.path.insert(0, str(BENCH))  # its siblings (options.py), as when run
from bench.lora_domain import full_fine_tune_settings  # noqa: E402


def test_the_full_fine_tune_trains_with_the_lora_runs_adam_betas(tmp_path):
    """A LoRA run trains with Adam's beta1 at 0.5 (adapters/config.py's LORA_BETAS); the full fine-tune at
    pretraining's 0.9 gained 9% less on the bench's shift, and each adapter's share of its gain was overstated."""
    from seekstack.adapters.training import lora_train_config
    from seekstack.train.config import resolve_train_config
    from tests.bench.test_peers import micro_checkpoint
    from tests.train.test_trainer import write_split

    base = micro_checkpoint(tmp_path / "base")
    write_split(tmp_path / "tokens", "train", 2_000, seed=1)
    lora = lora_train_config(base, tmp_path / "tokens", tmp_path / "adapter").config
    full = resolve_train_config(None, [*full_fine_tune_settings(1e-3), f"init_from={base}"])
    assert full.betas == lora.betas == (0.5, 0.95)
    assert (full.lr, full.weight_decay, full.bias_update_rate) == (1e-3, 0.0, 0.0)
