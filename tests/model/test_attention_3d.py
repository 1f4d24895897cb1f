"""The 3D-attention ablation: starts as plain MLA, stays causal, learns its extra terms, and never leaves the
project as a Hugging Face checkpoint or through the engine."""

from __future__ import annotations

import json

import pytest
import torch

from seekstack.checkpoint import CheckpointError, load_pretrained, save_pretrained, write_pretrained_files
from seekstack.infer.engine import Engine
from seekstack.model.attention_3d import SpatioTemporalAttention
from seekstack.model.transformer import Transformer
from tests.conftest import micro_config
from tests.infer.support import VOCAB, tiny_tokenizer


def _pair() -> tuple[Transformer, Transformer]:
    plain = Transformer(micro_config(vocab_size=VOCAB)).eval()
    variant = Transformer(micro_config(vocab_size=VOCAB, attention_variant="3d")).eval()
    missing, unexpected = variant.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("channel_" in key or "temporal_conv" in key for key in missing)
    return plain, variant


def test_fresh_3d_attention_computes_plain_mla():
    plain, variant = _pair()
    assert all(isinstance(layer.self_attn, SpatioTemporalAttention) for layer in variant.layers)
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, variant(ids).logits)


def test_3d_attention_refuses_an_attention_mask_whose_padding_its_convolution_would_read():
    _, variant = _pair()
    ids = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(NotImplementedError, match="attention_variant='3d' takes no attention_mask"):
        variant(ids, attention_mask=torch.ones_like(ids))


def test_3d_attention_is_causal():
    _, variant = _pair()
    for name, param in variant.named_parameters():  # give the zero-initialised terms something to say
        if "channel_up" in name or "temporal_conv" in name:
            torch.nn.init.normal_(param, std=0.5)
    ids = torch.randint(0, VOCAB, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % VOCAB
    with torch.no_grad():
        before, after = variant(ids).logits, variant(changed).logits
    assert torch.allclose(before[:, :12], after[:, :12], atol=1e-6)
    assert not torch.allclose(before[:, 12:], after[:, 12:], atol=1e-3)


def test_3d_terms_receive_gradients():
    _, variant = _pair()
    variant.train()
    ids = torch.randint(0, VOCAB, (2, 16))
    variant(ids, labels=ids).loss.backward()
    for layer in variant.layers:
        assert layer.self_attn.channel_up.weight.grad.abs().sum() > 0
        assert layer.self_attn.temporal_conv.weight.grad.abs().sum() > 0


def test_3d_model_saves_as_training_checkpoint_but_not_as_hf_export(tmp_path):
    _, variant = _pair()
    with pytest.raises(CheckpointError, match="attention_variant='3d'.*nothing was written"):
        save_pretrained(variant, tmp_path / "export")
    assert not (tmp_path / "export").exists()

    (tmp_path / "train_ckpt").mkdir()
    write_pretrained_files(variant, tmp_path / "train_ckpt")
    assert json.loads((tmp_path / "train_ckpt" / "config.json").read_text())["attention_variant"] == "3d"
    reloaded = load_pretrained(tmp_path / "train_ckpt").eval()
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, variant(ids).logits)


def test_plain_config_json_has_no_seekstack_only_field(tmp_path):
    plain, _ = _pair()
    save_pretrained(plain, tmp_path / "plain")
    assert "attention_variant" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_engine_refuses_3d_attention(tmp_path):
    _, variant = _pair()
    tokenizer = tiny_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="training ablation"):
        Engine(variant, tokenizer)
