"""A LoRA run's training FLOPs (its MFU's numerator) against what torch counts the run computing: the frozen base's
weights take no gradient, so an adapter run does less than the full model's 3x its forward."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from seekstack.accounting import attention_flops_per_layer, training_flops_per_token
from seekstack.adapters.config import AdapterConfig
from seekstack.adapters.files import apply_lora
from seekstack.adapters.flops import lora_training_flops
from seekstack.config import preset
from seekstack.model.transformer import Transformer

BATCH, SEQ_LEN = 2, 32
# Dense layers throughout (the MTP block's too): the routed experts' kernel is a custom op torch's counter cannot see
CONFIG = preset("tiny", first_k_dense_replace=5, vocab_size=512)


def counted_flops(model: torch.nn.Module) -> int:
    """The matrix FLOPs torch counts in one training step's forward and backward on random tokens (attention's
    scores and values, computed by SDPA, are not among them on the CPU)."""
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids, keep_logits=False).loss.backward()
    return counter.get_total_flops()


def attention_flops(passes: float) -> float:
    """Attention's scores and values over the step's tokens, `passes` times the forward's, in every block."""
    blocks = CONFIG.num_hidden_layers + CONFIG.num_nextn_predict_layers
    return passes * blocks * attention_flops_per_layer(CONFIG, SEQ_LEN) * BATCH * SEQ_LEN


@pytest.mark.parametrize(
    ("adapter", "attention_passes"),
    [
        (AdapterConfig(), 3),  # attention modules; FFN parameters, whose W + s B A takes its gradient
        (AdapterConfig(feed_forward=(), experts=()), 3),  # attention only: no weight gradient of the base at all
        (AdapterConfig(attention=(), feed_forward=(), experts=(), vocabulary=("lm_head",)), 1),  # no backward below
    ],
    ids=["default", "attention", "head"],
)
def test_a_lora_runs_training_flops_are_those_torch_counts_not_the_full_models(adapter, attention_passes):
    """The MFU of a LoRA run counted the full model's training FLOPs, a weight gradient for every base weight."""
    torch.manual_seed(0)
    full = counted_flops(Transformer(CONFIG))
    torch.manual_seed(0)
    lora = counted_flops(apply_lora(Transformer(CONFIG), adapter))
    full_said = training_flops_per_token(CONFIG, SEQ_LEN) * BATCH * SEQ_LEN - attention_flops(3)
    lora_said = lora_training_flops(CONFIG, adapter, SEQ_LEN, BATCH * SEQ_LEN) - attention_flops(attention_passes)
    assert lora_said == pytest.approx(lora, rel=0.04) and full_said == pytest.approx(full, rel=0.04)
    assert full_said / lora_said == pytest.approx(full / lora, rel=0.02)
    assert lora < full


def test_a_lora_runs_logged_mfu_counts_the_adapter_runs_flops(base, tmp_path):
    """The progress line's and metrics.jsonl's MFU of a LoRA run counted the full model's training FLOPs."""
    import json

    from seekstack.adapters.training import lora_train_config, train_adapter
    from seekstack.checkpoint import read_config

    (tmp_path / "prose.txt").write_text("A few words of prose to adapt to. " * 200)
    run = ["seq_len=32", "batch_size=2", "max_steps=2", "eval_every=0", "peak_flops=1e9"]
    train_adapter(*lora_train_config(base, tmp_path / "prose.txt", tmp_path / "adapter", run))
    step = json.loads((tmp_path / "adapter" / "metrics.jsonl").read_text().splitlines()[-1])
    config, tokens = read_config(base), 2 * 32
    expected = lora_training_flops(config, AdapterConfig(), 32, tokens) / tokens
    assert step["mfu"] * 1e9 / step["tokens_per_s"] == pytest.approx(expected, rel=1e-6)
    assert expected < training_flops_per_token(config, 32)
