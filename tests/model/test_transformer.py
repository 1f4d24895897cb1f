"""The Transformer's forward: what it accepts as input_ids, labels and attention_mask, and padded and packed batches."""

from __future__ import annotations

import json
import re

import pytest
import torch

from seekstack.model.attention import ContiguousLatentCache
from seekstack.model.transformer import Transformer
from tests.conftest import micro_config


@pytest.mark.parametrize("labels_shape", [(1, 7), (1, 3), (1, 12), (2, 8)])
def test_forward_refuses_labels_not_aligned_with_the_inputs(labels_shape):
    model = Transformer(micro_config())
    ids = torch.randint(0, 128, (1, 8))
    with pytest.raises(ValueError, match=re.escape(f"labels have shape {labels_shape}, input_ids (1, 8)")):
        model(ids, labels=torch.randint(0, 128, labels_shape))


def test_the_output_is_read_by_key_index_and_unpacking_as_transformers_model_output_is():
    model = Transformer(micro_config()).eval()
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        plain, labelled = model(ids), model(ids, labels=ids)
    assert plain[0] is plain.logits and plain["logits"] is plain.logits and "loss" not in plain
    assert labelled[0] is labelled.loss and labelled["lm_loss"] is labelled.lm_loss  # what transformers' Trainer reads
    keys = ["loss", "logits", "hidden_states", "expert_load", "lm_loss", "mtp_loss"]
    assert list(labelled) == labelled.keys() == keys  # iterated as a mapping, as transformers' (an OrderedDict)
    loss, logits = labelled.to_tuple()[:2]
    assert loss is labelled.loss and logits is labelled.logits
    with pytest.raises(KeyError, match="balance_loss"):  # None in eval mode: not a key, as in transformers
        labelled["balance_loss"]


def padded_batch(rows: list[torch.Tensor], width: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows padded with id 0 to `width` on the left or the right, and transformers' attention_mask for them."""
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        place = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, place], mask[i, place] = row, 1
    return ids, mask


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_a_padded_batch_with_its_attention_mask_gives_each_row_the_logits_and_losses_of_the_row_alone(left):
    torch.manual_seed(0)
    model = Transformer(micro_config()).eval()
    rows = [torch.randint(1, 128, (length,)) for length in (12, 7, 4)]
    ids, mask = padded_batch(rows, 12, left)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = model(row[None], labels=row[None])
            place = slice(12 - len(row), 12) if left else slice(0, len(row))
            assert torch.allclose(logits[i, place], alone.logits[0], atol=1e-5), i
            padded = model(ids[i : i + 1], labels=ids[i : i + 1], attention_mask=mask[i : i + 1])
            assert torch.allclose(padded.lm_loss, alone.lm_loss, atol=1e-5), i
            assert torch.allclose(padded.mtp_loss, alone.mtp_loss, atol=1e-5), i
        unmasked = model(ids).logits  # what the mask changes: the left-padded rows read their padding without it
    if left:
        assert (unmasked[1, 5:] - logits[1, 5:]).abs().max() > 1e-3
    assert not logits.isnan().any()  # padding positions, which see no token, are no NaN that could spread


@pytest.mark.parametrize(
    "config", [micro_config().to_dict(), "runs/demo/train/checkpoints/step_450"], ids=["dict", "path"]
)
def test_a_transformer_built_from_no_model_config_is_refused_naming_how_to_build_or_load_one(config):
    with pytest.raises(
        TypeError, match=r"takes a ModelConfig, got (dict|str): .*ModelConfig.from_dict.*load_pretrained"
    ):
        Transformer(config)


def test_positions_given_per_row_give_the_losses_of_the_same_positions_shared():
    model = Transformer(micro_config(num_nextn_predict_layers=2)).eval()
    ids = torch.randint(0, 128, (3, 10))
    with torch.no_grad():
        shared = model(ids, labels=ids, positions=torch.arange(4, 14))
        per_row = model(ids, labels=ids, positions=torch.arange(4, 14).expand(3, -1))
    assert torch.allclose(per_row.lm_loss, shared.lm_loss, atol=1e-6)
    assert torch.allclose(per_row.mtp_loss, shared.mtp_loss, atol=1e-6)


def test_sequences_packed_in_a_row_by_their_positions_never_see_each_other():
    """Positions restarting at 0 mid-row start another sequence (transformers' packed position_ids): its logits are
    those it has alone, and changing the sequence before it changes none of them."""
    model = Transformer(micro_config()).eval()
    first, second = torch.randint(0, 128, (1, 7)), torch.randint(0, 128, (1, 5))
    positions = torch.cat((torch.arange(7), torch.arange(5)))[None]
    with torch.no_grad():
        alone = model(second).logits
        packed = model(torch.cat((first, second), dim=1), positions=positions).logits
        other_first = model(torch.cat((first.flip(1), second), dim=1), positions=positions).logits
    torch.testing.assert_close(packed[:, 7:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other_first[:, 7:], packed[:, 7:], rtol=0, atol=0)


def test_a_packed_row_has_the_losses_gradients_and_expert_load_of_its_sequences_padded():
    """Two sequences packed in a row, then padding: the lm, MTP and balance losses (a mean over sequences, not rows),
    their gradients and the expert load are those of the two padded in two rows."""
    model = Transformer(micro_config(aux_loss_alpha=0.1, num_nextn_predict_layers=2))
    first, second = torch.randint(0, 128, (9,)), torch.randint(0, 128, (6,))
    padded = torch.stack((first, torch.cat((second, torch.zeros(3, dtype=torch.long)))))
    padded_counted = torch.arange(9) < torch.tensor([[9], [6]])
    packed = torch.cat((first, second, torch.zeros(4, dtype=torch.long)))[None]
    packed_positions = torch.cat((torch.arange(9), torch.arange(10)))[None]  # the padding goes on from the last
    packed_counted = (torch.arange(19) < 15)[None]

    def step(ids, counted, positions=None):
        model.zero_grad()
        labels = ids.masked_fill(~counted, -100)
        out = model(ids, labels=labels, positions=positions, counted=counted)
        out.loss.backward()
        return out, [parameter.grad.clone() for parameter in model.parameters() if parameter.grad is not None]

    (rows, row_grads), (pack, pack_grads) = step(padded, padded_counted), step(packed, packed_counted, packed_positions)
    for name in ["loss", "lm_loss", "mtp_loss", "balance_loss", "expert_load"]:
        torch.testing.assert_close(getattr(pack, name), getattr(rows, name), rtol=1e-5, atol=1e-6)
    for grad, reference in zip(pack_grads, row_grads, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6)


def test_transformers_position_ids_are_positions_a_flattened_batch_packs_by():
    """TRL's padding-free collator (DataCollatorWithFlattening) gives input_ids, labels and position_ids, which peft's
    wrapper passes on as keywords: the forward takes them as its `positions`."""
    model = Transformer(micro_config()).eval()
    ids = torch.randint(0, 128, (1, 10))
    positions = torch.cat((torch.arange(6), torch.arange(4)))[None]
    with torch.no_grad():
        named = model(ids, labels=ids, position_ids=positions)
        ours = model(ids, labels=ids, positions=positions)
    torch.testing.assert_close(named.logits, ours.logits, rtol=0, atol=0)
    assert named.lm_loss == ours.lm_loss
    with pytest.raises(ValueError, match="positions and position_ids are one argument under two names"):
        model(ids, positions=positions, position_ids=positions)


def test_transformers_use_cache_false_is_taken_and_true_refused_as_no_cache_is_returned():
    """model(ids, use_cache=False), as scripts and TRL's SFTTrainer call a transformers model, was a TypeError."""
    model = Transformer(micro_config()).eval()
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        plain = model(ids, labels=ids)
        for use_cache in (False, None):
            given = model(ids, labels=ids, use_cache=use_cache)
            torch.testing.assert_close(given.logits, plain.logits, rtol=0, atol=0)
            assert given.keys() == plain.keys() and given.loss == plain.loss
    with pytest.raises(ValueError, match=r"^use_cache=True: the forward returns no past_key_values; decoding steps"):
        model(ids, use_cache=True)


def test_forward_refuses_input_ids_that_are_not_a_batch_and_an_attention_mask_of_another_shape():
    model = Transformer(micro_config())
    with pytest.raises(ValueError, match=re.escape("input_ids have shape (8,): expected (batch, seq_len)")):
        model(torch.randint(0, 128, (8,)))
    with pytest.raises(ValueError, match=re.escape("attention_mask has shape (1, 7), input_ids (1, 8)")):
        model(torch.randint(0, 128, (1, 8)), attention_mask=torch.ones(1, 7, dtype=torch.long))
    cache = ContiguousLatentCache(model.config, 1, 16)
    with pytest.raises(ValueError, match="attention_mask with a cache"):
        model(torch.randint(0, 128, (1, 8)), attention_mask=torch.ones(1, 8, dtype=torch.long), cache=cache)


def test_forward_refuses_logits_at_that_is_not_one_position_or_s_positions_a_row():
    """A flat logits_at of B x S positions was read as (B, S) by a reshape: batch 2 given [0, 1, 2, 3] returned
    (2, 2, V) logits of positions it was never given for those rows."""
    model = Transformer(micro_config()).eval()
    ids = torch.randint(0, 128, (2, 8))
    for logits_at in (torch.tensor([0, 1, 2, 3]), torch.zeros(2, 1, 1, dtype=torch.long), torch.tensor([[3]])):
        expected = f"logits_at has shape {tuple(logits_at.shape)}, input_ids (2, 8): expected (batch,)"
        with pytest.raises(ValueError, match=re.escape(expected)):
            model(ids, logits_at=logits_at)
    with torch.no_grad():
        whole = model(ids).logits
        one = model(ids, logits_at=torch.tensor([7, 5])).logits  # the head's matmul over fewer rows: float32 rounding
        several = model(ids, logits_at=torch.tensor([[1, 6], [1, 6]])).logits
    torch.testing.assert_close(one, whole[[0, 1], [7, 5]][:, None], rtol=0, atol=1e-5)
    torch.testing.assert_close(several, whole[:, [1, 6]], rtol=0, atol=1e-5)


def test_device_and_dtype_read_as_transformers_model_device_and_dtype_do():
    model = Transformer(micro_config()).eval()
    assert (model.device, model.dtype) == (torch.device("cpu"), torch.float32)
    model = model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16  # the routing biases stay float32 and do not count
    assert any(b.dtype == torch.float32 for name, b in model.named_buffers() if name.endswith("correction_bias"))
    input_ids = torch.tensor([[3, 4, 5]]).to(model.device)  # as a transformers user moves inputs
    assert model(input_ids).logits.dtype == model.dtype


def test_transformers_generation_config_set_on_a_model_is_saved_as_its_own_save_writes_it(tmp_path):
    """model.generation_config = GenerationConfig(...), as transformers users set it, made save_pretrained fail with
    "TypeError: Object of type GenerationConfig is not JSON serializable"; it is kept as the file transformers
    writes."""
    from transformers import GenerationConfig

    import seekstack

    model = Transformer(micro_config())
    settings = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, eos_token_id=1)
    model.generation_config = settings
    seekstack.save_pretrained(model, tmp_path / "model")
    settings.save_pretrained(tmp_path / "theirs")
    written = json.loads((tmp_path / "model" / "generation_config.json").read_text())
    assert written == json.loads((tmp_path / "theirs" / "generation_config.json").read_text())
    assert seekstack.load_pretrained(tmp_path / "model").generation_config == written
    assert written["temperature"] == 0.6
    with pytest.raises(TypeError, match=r"^model.generation_config = str: give a dict of generation_config.json's"):
        model.generation_config = "greedy"


def test_save_pretrained_and_from_pretrained_are_called_on_the_model_as_transformers_users_call_them(tmp_path):
    """model.save_pretrained(folder) and Transformer.from_pretrained(folder, dtype=...), transformers' calls, failed
    with AttributeError: 'Transformer' object has no attribute 'save_pretrained'; they are seekstack's save and load."""
    import seekstack

    model = Transformer(micro_config()).eval()
    model.save_pretrained(tmp_path / "method", max_shard_size="100KB")
    seekstack.save_pretrained(model, tmp_path / "function", max_shard_size="100KB")
    method, function = tmp_path / "method", tmp_path / "function"
    files = sorted(path.name for path in function.iterdir())
    assert len(files) > 4 and sorted(path.name for path in method.iterdir()) == files
    assert all((method / name).read_bytes() == (function / name).read_bytes() for name in files)
    loaded = Transformer.from_pretrained(tmp_path / "method", dtype="bfloat16")
    ids = torch.tensor([[5, 3, 9, 1]])
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded(ids).logits, model.bfloat16()(ids).logits)


def test_model_generate_is_refused_naming_the_engine_whose_call_generates(tmp_path):
    """model.generate(input_ids, ...), which transformers users call, raised "'Transformer' object has no attribute
    'generate'", naming nothing to use; it now names the engine's call, which generates from a 2-D tensor of ids."""
    from seekstack.infer import Engine, SamplingParams
    from tests.infer.support import micro_model, tiny_tokenizer

    model, ids = micro_model(), torch.tensor([[5, 3, 9], [7, 2, 4]])
    with pytest.raises(AttributeError) as refused:
        model.generate(ids, max_new_tokens=3)
    assert str(refused.value) == (
        "Transformer.generate: seekstack generates with its engine (vLLM's API), not transformers' model.generate: "
        "seekstack.infer.Engine(model, tokenizer).generate(input_ids, SamplingParams(max_new_tokens=N)) (a 2-D tensor "
        "of input_ids is a prompt per row; each Completion's token_ids and text), or Engine.from_pretrained(folder) "
        "for a saved checkpoint"
    )
    completions = Engine(model, tiny_tokenizer(tmp_path)).generate(ids, SamplingParams(max_new_tokens=3, temperature=0))
    assert [len(completion.token_ids) for completion in completions] == [3, 3]


def test_the_model_package_loads_without_the_inference_package():
    """seekstack/model/transformer.py imported GenerationConfig from seekstack.infer, so the model (which the engine
    imports) loaded the inference package with it; the model's generation settings live in seekstack.config. Checked
    in this process (a fresh interpreter spent ~8 s importing torch): seekstack's modules are imported anew with the
    inference package blocked, then put back."""
    import importlib
    import sys

    def seekstacks() -> list[str]:
        return [name for name in sys.modules if name.partition(".")[0] == "seekstack"]

    loaded = {name: sys.modules.pop(name) for name in seekstacks()}
    try:
        sys.modules["seekstack.infer"] = None  # type: ignore[assignment]  # importing it, or a module in it, fails
        importlib.import_module("seekstack.model.transformer")
    finally:
        for name in seekstacks():
            del sys.modules[name]
        sys.modules.update(loaded)


def test_input_ids_of_no_token_or_not_a_tensor_are_refused_naming_what_is_expected():
    """A (1, 0) input was torch's bare "cannot reshape tensor of 0 elements into shape [0, 4, -1]" from attention,
    and a list of ids "AttributeError: 'list' object has no attribute 'dim'"."""
    model = Transformer(micro_config()).eval()
    for empty in torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long):
        with pytest.raises(ValueError) as refused:
            model(empty)
        assert str(refused.value) == (
            f"input_ids have shape {tuple(empty.shape)}: expected (batch, seq_len) token ids, at least one sequence "
            "of one token; one sequence is input_ids[None]"
        )
    with pytest.raises(TypeError, match=r"^input_ids is a list: expected a \(batch, seq_len\) tensor of token ids"):
        model([[1, 2, 3]])


def test_an_input_id_outside_the_vocabulary_is_named_with_the_vocabulary():
    """An id past the embedding (a tokenizer larger than the model's vocabulary) or a negative one was torch's bare
    "IndexError: index out of range in self", naming neither the id nor the vocabulary."""
    model = Transformer(micro_config()).eval()
    vocab = model.config.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(IndexError) as refused, torch.no_grad():
            model(torch.tensor([[1, 2, bad]]))
        assert str(refused.value) == (
            f"input_ids hold {bad}, outside the model's vocabulary of {vocab} ids (0 to {vocab - 1}): encode with the "
            "model's own tokenizer"
        )
