"""Multi-Token Prediction: depth k reads token i+k and predicts token i+k+1, sharing embedding and head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seekstack.model.norm import RMSNorm
from seekstack.model.transformer import Transformer
from tests.conftest import micro_config


def test_mtp_loss_follows_v3_equations_for_two_depths():
    model = Transformer(micro_config(num_nextn_predict_layers=2)).eval()
    with torch.no_grad():  # gains other than 1: enorm, hnorm, the head's norm and the final norm tell apart
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    T = 12
    ids = torch.randint(0, 128, (2, T))
    out = model(ids, labels=ids)
    cos, sin = model.rotary(torch.arange(T))
    hidden, losses = out.hidden_states, []
    for k in (1, 2):
        module = model.mtp[k - 1]
        merged = module.eh_proj(
            torch.cat((module.enorm(model.embed_tokens(ids[:, k:])), module.hnorm(hidden[:, : T - k])), dim=-1)
        )
        hidden, _ = module.block(merged, cos[: T - k], sin[: T - k])
        logits = model.lm_head(module.shared_head["norm"](hidden))
        # position i at depth k predicts token i + k + 1
        losses.append(F.cross_entropy(logits[:, : T - k - 1].flatten(0, 1), ids[:, k + 1 :].flatten()))
    assert torch.allclose(out.mtp_loss, torch.stack(losses).mean(), atol=1e-6)
    assert torch.allclose(out.loss, out.lm_loss + 0.3 * out.mtp_loss)


def test_mtp_loss_weight_is_applied():
    model = Transformer(micro_config())
    ids = torch.randint(0, 128, (1, 10))
    out = model(ids, labels=ids, mtp_loss_weight=0.1)
    assert torch.allclose(out.loss, out.lm_loss + 0.1 * out.mtp_loss)


def test_mtp_gradient_reaches_shared_embedding_and_head():
    model = Transformer(micro_config())
    ids = torch.randint(0, 128, (2, 10))
    model(ids, labels=ids).mtp_loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.layers[0].self_attn.o_proj.weight.grad.abs().sum() > 0  # through h^0


def test_ignored_labels_do_not_count():
    model = Transformer(micro_config()).eval()
    ids = torch.randint(0, 128, (1, 10))
    labels = ids.clone()
    labels[:, 5:] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[0, :4], ids[0, 1:5])
    assert torch.allclose(out.lm_loss, expected, atol=1e-6)


def test_sequences_too_short_for_mtp_train_on_next_token_only():
    model = Transformer(micro_config())
    ids = torch.randint(0, 128, (1, 2))
    out = model(ids, labels=ids)
    assert out.mtp_loss is None and torch.equal(out.loss, out.lm_loss)
