"""Adapters on disk: peft's format, a lossless round trip, transformers + peft agree with us, merging is exact."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

import seekstack
from seekstack.adapters.config import AdapterConfig
from seekstack.adapters.files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    is_adapter_parameter,
    load_adapter,
    merge_adapter,
    merged_model,
    read_lora_config,
)
from seekstack.adapters.registry import read_factors
from seekstack.checkpoint import CheckpointError
from seekstack.schema import ConfigError
from tests.adapters.support import TINY, prompt_ids, write_base, write_random_adapter

PEFT_ATOL = 1e-4  # ours vs transformers + peft
MERGE_ATOL = 1e-5  # merged weights vs base + adapter, float32


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return write_random_adapter(base, tmp_path_factory.mktemp("adapter") / "adapter", seed=1)


def logits_with_adapter(base, adapter, ids):
    with torch.no_grad():
        return load_adapter(seekstack.load_pretrained(base), adapter)(ids).logits


def test_the_adapter_config_lists_its_targets_sorted_whatever_the_hash_seed(adapter):
    """peft keeps target_modules and target_parameters as sets, which adapter_config.json listed in their hash order:
    the same run wrote another file under another PYTHONHASHSEED (its weights the same)."""
    config = json.loads((adapter / ADAPTER_CONFIG_FILE).read_text())
    for name in ("target_modules", "target_parameters"):
        assert len(config[name]) > 5 and config[name] == sorted(config[name])


def test_adapter_is_written_in_peft_format_with_transformers_module_names(adapter):
    config = json.loads((adapter / ADAPTER_CONFIG_FILE).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 16.0)
    assert "layers.1.mlp.experts.gate_up_proj" in config["target_parameters"]
    assert not any(name.startswith("mtp") for name in config["target_modules"] + config["target_parameters"])
    with safe_open(adapter / ADAPTER_WEIGHTS_FILE, "pt") as weights:
        keys = set(weights.keys())
        experts = "base_model.model.model.layers.1.mlp.experts"
        stacked = [weights.get_tensor(f"{experts}{nested}.lora_A.weight").shape for nested in ("", ".base_layer")]
    # one (rank x experts, in) factor per stacked parameter: gate_up_proj reads D=32, down_proj reads I=16
    assert sorted(stacked) == [(16, 16), (16, 32)]
    assert "base_model.model.model.layers.0.self_attn.kv_b_proj.lora_B.weight" in keys
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in keys  # dense FFN
    assert "base_model.model.model.layers.1.mlp.shared_experts.down_proj.lora_B.weight" in keys
    assert {"base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.lm_head.lora_B.weight"} <= keys
    assert all(key.startswith(("base_model.model.model.", "base_model.model.lm_head.")) for key in keys)


def test_adapter_round_trip_gives_the_same_logits_and_differs_from_the_base(base, adapter):
    ids = prompt_ids()
    first, again = logits_with_adapter(base, adapter, ids), logits_with_adapter(base, adapter, ids)
    assert torch.equal(first, again)
    with torch.no_grad():
        plain = seekstack.load_pretrained(base)(ids).logits
    assert (first - plain).abs().max() > 100 * PEFT_ATOL


def test_peft_loads_the_adapter_on_the_transformers_model_with_our_logits(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = prompt_ids()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    with torch.no_grad():
        theirs = reference(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(ids).logits
    ours = logits_with_adapter(base, adapter, ids)
    assert (ours - theirs).abs().max() < PEFT_ATOL
    assert (plain - theirs).abs().max() > 100 * PEFT_ATOL  # peft applied the adapter on their side too


def test_peft_auto_class_loads_the_adapter_from_its_folder_alone_with_our_logits(base, adapter):
    """AutoPeftModelForCausalLM.from_pretrained(ADAPTER), as TRL's guides load an SFT adapter, reads the base from
    adapter_config.json and the class from its task_type, which the adapter lacked ('Cannot infer the auto class')."""
    from peft import AutoPeftModelForCausalLM

    assert json.loads((adapter / ADAPTER_CONFIG_FILE).read_text())["task_type"] == "CAUSAL_LM"
    reference = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32)
    ids = prompt_ids()
    with torch.no_grad():
        theirs = reference(ids).logits
        merged = reference.merge_and_unload()(ids).logits
    ours = logits_with_adapter(base, adapter, ids)
    assert (ours - theirs).abs().max() < PEFT_ATOL and (merged - theirs).abs().max() < MERGE_ATOL


def test_peft_with_task_type_causal_lm_wraps_our_model_trains_and_reloads(base, tmp_path):
    """LoraConfig(task_type="CAUSAL_LM"), as peft users write it, on our model: it was refused ('Transformer' object
    has no attribute 'prepare_inputs_for_generation'); its wrapper trains, saves and loads back with the logits."""
    from peft import LoraConfig, PeftModel, get_peft_model

    ids = prompt_ids()
    tuned = get_peft_model(
        seekstack.load_pretrained(base), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["o_proj"])
    )
    out = tuned(input_ids=ids, labels=ids)  # the keywords peft passes on: inputs_embeds, return_dict, ... all None
    assert out[0] is out.loss and out.loss > 0
    out.loss.backward()
    assert all(p.grad is not None for name, p in tuned.named_parameters() if "lora_B" in name)
    with torch.no_grad():
        next(p for name, p in tuned.named_parameters() if "lora_B" in name).fill_(0.1)
        adapted = tuned(ids).logits
    tuned.save_pretrained(tmp_path / "causal")
    loaded = PeftModel.from_pretrained(seekstack.load_pretrained(base), tmp_path / "causal")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, adapted)
        assert torch.equal(loaded(ids, return_dict=False)[0], adapted)  # a tuple, as transformers returns it


def test_an_adapter_peft_saved_from_our_model_is_refused_naming_our_module_and_what_to_do(base, tmp_path):
    """peft's save_pretrained of a PeftModel on seekstack's model keys the modules as ours names them (`layers.N...`),
    not as transformers' model does, which an adapter folder holds: serve, generate and merge refuse it saying so and
    what to do."""
    from peft import LoraConfig, get_peft_model

    get_peft_model(seekstack.load_pretrained(base), LoraConfig(r=2, target_modules=["o_proj"])).save_pretrained(
        tmp_path / "ours"
    )
    with pytest.raises(
        CheckpointError,
        match=r"names module 'layers\.0\.self_attn\.o_proj' as seekstack's model names it, where an adapter folder "
        r"names it as transformers' model does \('model\.layers\.0\.self_attn\.o_proj'\).*PeftModel\.from_pretrained",
    ):
        read_factors(seekstack.load_pretrained(base).config, tmp_path / "ours")


def test_the_fused_head_and_loss_scores_the_adapted_head(base, adapter):
    ids = prompt_ids(seed=2)
    with torch.no_grad():
        tuned = load_adapter(seekstack.load_pretrained(base), adapter)
        fused = tuned(ids, labels=ids, keep_logits=False).lm_loss
        logits = tuned(ids).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert (fused - expected).abs() < 1e-5


@pytest.mark.parametrize("writer", ["lora merge", "quantize"])
def test_a_written_model_folder_gives_its_tokenizer_config_the_models_context(base, adapter, tmp_path, writer):
    """A tokenizer_config.json copied from a checkpoint written before model_max_length followed the model (4096 for
    a 1024-token model) gets the model's context, as `checkpoint export` gives it."""
    from seekstack.compress.quantize import save_with_tokenizer

    source = tmp_path / "source"
    source.mkdir()
    for entry in base.iterdir():
        (source / entry.name).write_bytes(entry.read_bytes())
    (source / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    if writer == "lora merge":
        out = merge_adapter(source, adapter, tmp_path / "out")
    else:
        out = save_with_tokenizer(seekstack.load_pretrained(source), source, tmp_path / "out")
    context = json.loads((out / "config.json").read_text())["max_position_embeddings"]
    assert context != 4096 and json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == context


def test_merged_checkpoint_equals_base_plus_adapter(base, adapter, tmp_path):
    merged_dir = merge_adapter(base, adapter, tmp_path / "merged")
    assert not (merged_dir / ADAPTER_CONFIG_FILE).exists()
    ids = prompt_ids(seed=3)
    with torch.no_grad():
        merged = seekstack.load_pretrained(merged_dir)(ids).logits
    assert (merged - logits_with_adapter(base, adapter, ids)).abs().max() < MERGE_ATOL


def test_a_bfloat16_base_merges_into_a_bfloat16_checkpoint_rounded_once(base, tmp_path):
    """peft's merge_and_unload keeps the base's dtype; `lora merge` loaded the base in float32 and wrote the merged
    checkpoint so, twice the size of a bfloat16 base. It merges in float32 and writes the base's dtype, each merged
    weight W + alpha/r B A rounded to bfloat16 once (the float32 routing biases stay float32)."""
    half = seekstack.save_pretrained(seekstack.load_pretrained(base).to(torch.bfloat16), tmp_path / "half")
    adapter = write_random_adapter(half, tmp_path / "adapter", seed=1)
    merged_dir = merge_adapter(half, adapter, tmp_path / "merged")
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        expected = merged_model(seekstack.load_pretrained(half), adapter).to(torch.bfloat16).state_dict()
    merged = seekstack.load_pretrained(merged_dir, dtype="auto").state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        assert merged[name].dtype == tensor.dtype and torch.equal(merged[name], tensor), name
    assert {str(t.dtype) for t in merged.values()} == {"torch.bfloat16", "torch.float32"}


def test_a_float64_base_merges_in_float64_keeping_every_weight_it_does_not_adapt(base, tmp_path):
    """96c8f5c merged every base in float32 and wrote the base's dtype: a float64 base came out float64 on disk with
    each weight, adapted or not, rounded to float32's precision."""
    torch.manual_seed(0)
    model = seekstack.load_pretrained(base).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-10)  # below float32's precision
    wide = seekstack.save_pretrained(model, tmp_path / "wide")
    only = AdapterConfig(rank=4, attention=["o_proj"], feed_forward=[], experts=[])
    adapter = write_random_adapter(wide, tmp_path / "adapter", seed=1, config=only)
    merged = seekstack.load_pretrained(merge_adapter(wide, adapter, tmp_path / "merged"), dtype="auto").state_dict()
    original = seekstack.load_pretrained(wide, dtype="auto").state_dict()
    untouched = [name for name in original if "o_proj" not in name]
    assert untouched and all(merged[name].dtype == original[name].dtype for name in original)
    assert all(torch.equal(merged[name], original[name]) for name in untouched)


def test_a_float16_merge_past_its_largest_value_is_refused_naming_the_weight(base, tmp_path):
    """Merged in float32, a weight W + alpha/r B A past float16's 65504 came out infinite in a float16 checkpoint."""
    half = seekstack.save_pretrained(seekstack.load_pretrained(base).to(torch.float16), tmp_path / "half")
    only = AdapterConfig(rank=4, attention=["o_proj"], feed_forward=[], experts=[])
    adapter = write_random_adapter(half, tmp_path / "adapter", seed=1, config=only)
    weights = load_safetensors((adapter / ADAPTER_WEIGHTS_FILE).read_bytes())
    large = {k: torch.full_like(v, 100.0) if ".layers.1." in k else v for k, v in weights.items()}
    (adapter / ADAPTER_WEIGHTS_FILE).write_bytes(save_safetensors(large))  # 4 x 100 x 100 x 16/4 = 160000
    message = r"the merged layers\.1\.self_attn\.o_proj\.weight overflows the base's float16"
    with pytest.raises(CheckpointError, match=message):
        merge_adapter(half, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    ("vocabulary", "attention", "still_tied"),
    [(["lm_head"], [], False), (["embed_tokens"], [], False), (["embed_tokens", "lm_head"], [], False),
     ([], ["o_proj"], True)],
)  # fmt: skip
def test_a_merged_adapter_on_the_head_or_embedding_of_a_tied_base_keeps_both(
    tmp_path, vocabulary, attention, still_tied
):
    """A base whose head is its embedding (tie_word_embeddings): the merged head and embedding differ, and the merged
    checkpoint was written tied, its one matrix the merged embedding (other logits than base + adapter, by 5); an
    adapter on neither leaves them one matrix."""
    torch.manual_seed(0)
    tied = seekstack.save_pretrained(
        seekstack.Transformer(seekstack.preset("tiny", **TINY, tie_word_embeddings=True)), tmp_path / "tied"
    )
    only_these = AdapterConfig(rank=4, vocabulary=vocabulary, attention=attention, feed_forward=[], experts=[])
    adapter = write_random_adapter(tied, tmp_path / "adapter", seed=2, config=only_these)
    merged_dir = merge_adapter(tied, adapter, tmp_path / "merged")
    assert json.loads((merged_dir / "config.json").read_text())["tie_word_embeddings"] is still_tied
    ids = prompt_ids(seed=3)
    with torch.no_grad():
        merged = seekstack.load_pretrained(merged_dir)(ids).logits
    assert (merged - logits_with_adapter(tied, adapter, ids)).abs().max() < MERGE_ATOL


def test_an_adapter_peft_cannot_apply_leaves_the_tied_model_it_was_merged_into_as_it_was(tmp_path):
    """merged_model unties the head before peft reads the adapter's weights: a refusal there (a rank that disagrees
    with the weights) left the caller's model untied under a config that says tied, with peft's layers in it."""
    torch.manual_seed(0)
    tied = seekstack.save_pretrained(
        seekstack.Transformer(seekstack.preset("tiny", **TINY, tie_word_embeddings=True)), tmp_path / "tied"
    )
    only = AdapterConfig(rank=4, vocabulary=["lm_head"], attention=["o_proj"], feed_forward=[], experts=[])
    adapter = write_random_adapter(tied, tmp_path / "adapter", seed=2, config=only)
    config_file = adapter / ADAPTER_CONFIG_FILE
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "r": 2}))
    model, ids = seekstack.load_pretrained(tied), prompt_ids()
    given = model.config
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(CheckpointError, match=f"rank 2 of {ADAPTER_CONFIG_FILE}"):
        merged_model(model, adapter)
    assert model.lm_head.weight is model.embed_tokens.weight and model.config is given and given.tie_word_embeddings
    assert type(model.lm_head) is torch.nn.Linear and not any(
        is_adapter_parameter(n) for n, _ in model.named_parameters()
    )
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_an_adapter_whose_merge_overflows_leaves_the_model_it_was_merged_into_as_it_was(tmp_path):
    """Finite factors whose alpha/r B A overflows in layer 1's o_proj: peft's safe_merge refuses that layer after it
    merged layer 0's, which left the caller's model with layer 0 merged, layer 1 a lora.Linear and NaN logits, and the
    error peft's bare ValueError. The merge is all or nothing, the refusal naming the module and the file."""
    torch.manual_seed(0)
    tied = seekstack.save_pretrained(
        seekstack.Transformer(seekstack.preset("tiny", **TINY, tie_word_embeddings=True)), tmp_path / "tied"
    )
    only = AdapterConfig(rank=4, vocabulary=["lm_head"], attention=["o_proj"], feed_forward=[], experts=[])
    adapter = write_random_adapter(tied, tmp_path / "adapter", seed=2, config=only)
    weights = load_safetensors((adapter / ADAPTER_WEIGHTS_FILE).read_bytes())
    overflowing = {k: torch.full_like(v, 1e20) if ".layers.1." in k else v for k, v in weights.items()}
    (adapter / ADAPTER_WEIGHTS_FILE).write_bytes(save_safetensors(overflowing))
    model, ids = seekstack.load_pretrained(tied), prompt_ids()
    given, before = model.config, {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        logits = model(ids).logits
    with pytest.raises(CheckpointError, match=r"into layers\.1\.self_attn\.o_proj gives NaN or infinite weights"):
        merged_model(model, adapter)
    assert model.lm_head.weight is model.embed_tokens.weight and model.config is given
    assert type(model.layers[0].self_attn.o_proj) is torch.nn.Linear
    assert type(model.layers[1].self_attn.o_proj) is torch.nn.Linear
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], p) for n, p in before.items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


def test_peft_is_required_within_the_versions_the_merge_was_tested_on():
    """The project asked for peft>=0.21, unbounded, and peft 0.22.0 changed safe_merge (the merged weight copied
    back into the tensor it had), which broke the all-or-nothing merge until _merged_whole gave each weight a tensor
    of its own: the overflow test above and tests/infer/test_placement.py's
    test_an_adapter_merged_into_parts_placed_on_disk_gives_the_tokens_of_the_merged_model caught it. The requirement
    is bounded to the versions they ran on, 0.21 and 0.22, and this environment's peft is one of them."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(seekstack.__file__).parents[1] / "pyproject.toml").read_text())
    [peft] = [req for req in map(Requirement, pyproject["project"]["dependencies"]) if req.name == "peft"]
    tried = ("0.20.1", "0.21.0", "0.22.0", "0.22.9", "0.23.0", "1.0.0")
    assert [release for release in tried if release in peft.specifier] == ["0.21.0", "0.22.0", "0.22.9"]
    assert version("peft") in peft.specifier


def test_merging_over_an_input_a_file_or_a_folder_of_other_files_is_refused_and_loses_nothing(base, adapter, tmp_path):
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for out, message in [
        (copy, "is the input folder"),
        (base, "is the input folder"),
        (tmp_path, "holds adapter/, file and notes.txt besides the files this command writes"),
        (tmp_path / "file", "is a file"),
    ]:
        with pytest.raises(FileExistsError, match=message):
            merge_adapter(base, copy, out)
    assert (copy / ADAPTER_WEIGHTS_FILE).is_file() and (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "file").read_text() == "mine" and (base / "config.json").is_file()
    first = merge_adapter(base, copy, tmp_path / "merged")
    assert merge_adapter(base, copy, first) == first  # a checkpoint folder is replaced by the new one
    (first / "README.md").write_text("a model card")  # or a training state, an eval/ folder: kept, not replaced
    with pytest.raises(FileExistsError, match="holds README.md besides the files this command writes"):
        merge_adapter(base, copy, first)
    assert (first / "README.md").read_text() == "a model card"


def test_a_folder_without_an_adapter_config_is_refused_saying_so(base, adapter, tmp_path):
    shutil.copytree(adapter, tmp_path / "bare")
    (tmp_path / "bare" / ADAPTER_CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"no {ADAPTER_CONFIG_FILE}; an adapter folder holds it"):
        load_adapter(seekstack.load_pretrained(base), tmp_path / "bare")


def test_a_key_that_is_no_adapter_weight_is_refused_naming_the_weights_file_and_the_whole_key(base, adapter, tmp_path):
    """A damaged key was refused naming the folder alone and the key without its `base_model.model.` prefix, a key
    the file does not hold."""
    shutil.copytree(adapter, tmp_path / "damaged")
    weights = tmp_path / "damaged" / ADAPTER_WEIGHTS_FILE
    tensors = load_safetensors(weights.read_bytes())
    key = next(key for key in sorted(tensors) if "lora_A" in key)
    tensors[key.replace("lora_A", "lora_Q")] = tensors.pop(key)
    weights.write_bytes(save_safetensors(tensors))
    damaged = re.escape(f"{weights}: {key.replace('lora_A', 'lora_Q')!r} is not an adapter weight key")
    with pytest.raises(CheckpointError, match=damaged):
        load_adapter(seekstack.load_pretrained(base), tmp_path / "damaged")


def test_an_adapter_peft_saved_pickled_is_refused_saying_how_to_re_save_it(base, adapter, tmp_path):
    """peft's save_pretrained(safe_serialization=False) writes adapter_model.bin, which PeftModel.from_pretrained
    reads; the refusal said only that the folder held no adapter_model.safetensors."""
    shutil.copytree(adapter, tmp_path / "pickled")
    torch.save(
        load_safetensors((adapter / ADAPTER_WEIGHTS_FILE).read_bytes()), tmp_path / "pickled" / "adapter_model.bin"
    )
    (tmp_path / "pickled" / ADAPTER_WEIGHTS_FILE).unlink()
    model = seekstack.load_pretrained(base)
    for load in (
        lambda: load_adapter(model, tmp_path / "pickled"),
        lambda: read_factors(model.config, tmp_path / "pickled"),
    ):
        with pytest.raises(
            CheckpointError,
            match=r"no adapter_model\.safetensors; it holds adapter_model\.bin.*safe_serialization=True",
        ):
            load()


HEAD_TOKENS = [5, 17, 2, 40]


HEAD_ROWS_CONFIGS = {
    "attention": AdapterConfig(rank=2, feed_forward=(), experts=(), head_tokens=len(HEAD_TOKENS)),
    # bench/lora_domain.py's `head_tokens_ffn0_r8`: the first layer's dense FFN (gate and up) as parameter targets
    "first_ffn": AdapterConfig(
        attention=(), feed_forward=("gate_proj", "up_proj"), experts=(), layers=(0,), head_tokens=len(HEAD_TOKENS)
    ),
}


@pytest.fixture(scope="module", params=list(HEAD_ROWS_CONFIGS))
def head_rows_adapter(base, tmp_path_factory, request):
    """LoRA plus the head's rows of HEAD_TOKENS trained in full (lora.head_tokens)."""
    config = HEAD_ROWS_CONFIGS[request.param]
    return write_random_adapter(base, tmp_path_factory.mktemp("rows") / "rows", 4, config, HEAD_TOKENS)


def test_head_rows_are_written_in_peft_format_and_scored_by_the_fused_loss(base, head_rows_adapter):
    config = json.loads((head_rows_adapter / ADAPTER_CONFIG_FILE).read_text())
    assert config["trainable_token_indices"] == {"lm_head": HEAD_TOKENS}
    with safe_open(head_rows_adapter / ADAPTER_WEIGHTS_FILE, "pt") as weights:
        rows = weights.get_tensor("base_model.model.lm_head.token_adapter.trainable_tokens_delta")
    assert rows.shape == (len(HEAD_TOKENS), TINY["hidden_size"])
    ids = prompt_ids(seed=4)
    tuned = load_adapter(seekstack.load_pretrained(base), head_rows_adapter)
    with torch.no_grad():
        logits = tuned(ids).logits
        fused = tuned(ids, labels=ids, keep_logits=False).lm_loss
    assert torch.equal(tuned.get_base_model().lm_head.weight[HEAD_TOKENS], rows)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert (fused - expected).abs() < 1e-5


def test_head_rows_load_in_peft_on_transformers_and_merge_exactly(base, head_rows_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = prompt_ids(seed=5)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), head_rows_adapter
    )
    with torch.no_grad():
        theirs = reference(ids).logits
        merged = seekstack.load_pretrained(merge_adapter(base, head_rows_adapter, tmp_path / "merged"))(ids).logits
    ours = logits_with_adapter(base, head_rows_adapter, ids)
    assert (ours - theirs).abs().max() < PEFT_ATOL
    assert (merged - ours).abs().max() < MERGE_ATOL


def test_serving_reads_the_head_rows_and_refuses_them_on_a_tied_head_naming_the_file(base, head_rows_adapter):
    config = seekstack.load_pretrained(base).config
    weights = read_factors(config, head_rows_adapter)
    with safe_open(head_rows_adapter / ADAPTER_WEIGHTS_FILE, "pt") as stored:
        rows = stored.get_tensor("base_model.model.lm_head.token_adapter.trainable_tokens_delta")
    [(ids, trained)] = weights.token_rows.values()
    assert list(weights.token_rows) == ["lm_head"] and ids.tolist() == HEAD_TOKENS and torch.equal(trained, rows)
    assert weights.factors and not any(module == "lm_head" for module, _ in weights.factors)
    with pytest.raises(CheckpointError, match=f"{ADAPTER_CONFIG_FILE}.*tied.*seekstack lora merge"):
        read_factors(dataclasses.replace(config, tie_word_embeddings=True), head_rows_adapter)


def test_head_rows_beside_a_lora_head_or_without_targets_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="head_tokens"):
        AdapterConfig(head_tokens=8, vocabulary=("lm_head",)).validate()
    with pytest.raises(ConfigError, match="at least one LoRA target"):
        AdapterConfig(attention=(), feed_forward=(), experts=(), head_tokens=8).validate()


def test_layers_restrict_the_block_targets_and_are_checked_against_the_model():
    model_config = seekstack.preset("tiny", **TINY)  # layer 0 dense, layer 1 MoE
    modules, parameters = AdapterConfig(layers=(1,), vocabulary=("lm_head",)).targets(model_config)
    assert "lm_head" in modules and all(name.startswith("layers.1.") for name in modules[1:] + parameters)
    assert "layers.1.mlp.experts.gate_up_proj" in parameters
    with pytest.raises(ConfigError, match="'layers'.*below 2.*not \\[2\\]"):
        AdapterConfig(layers=(0, 2)).validate().targets(model_config)
    for wrong in ((1, 1), (-1,)):
        with pytest.raises(ConfigError, match="'layers'.*distinct main layer numbers, from 0"):
            AdapterConfig(layers=wrong).validate()
    experts_only = AdapterConfig(attention=(), feed_forward=(), layers=(0,)).validate()
    with pytest.raises(ConfigError, match="'layers'.*have none"):
        experts_only.peft_config(model_config)  # the routed experts live in layer 1 only


@pytest.mark.parametrize(("rslora", "scale"), [(False, 8.0 / 4), (True, 8.0 / 4**0.5)])
def test_every_adapted_layer_is_scaled_by_alpha_over_rank_or_over_its_root_with_rslora(rslora, scale):
    from peft import get_peft_model

    model_config = seekstack.preset("tiny", **TINY)
    lora = AdapterConfig(rank=4, alpha=8.0, rslora=rslora).validate().peft_config(model_config)
    model = get_peft_model(seekstack.Transformer(model_config), lora)
    adapted = [module for module in model.modules() if isinstance(getattr(module, "scaling", None), dict)]
    assert adapted and all(module.scaling["default"] == pytest.approx(scale) for module in adapted)


def test_every_adapted_layer_drops_its_inputs_at_the_configured_rate():
    from peft import get_peft_model

    model_config = seekstack.preset("tiny", **TINY)
    lora = AdapterConfig(dropout=0.1, feed_forward=(), experts=()).validate().peft_config(model_config)
    model = get_peft_model(seekstack.Transformer(model_config), lora)
    adapted = [module for module in model.modules() if isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict)]
    assert adapted and all(module.lora_dropout["default"].p == 0.1 for module in adapted)


def test_serving_reads_the_factors_of_the_adapted_layers_only(base, tmp_path):
    folder = write_random_adapter(base, tmp_path / "second", 6, AdapterConfig(rank=2, layers=(1,)))
    factors = read_factors(seekstack.load_pretrained(base).config, folder).factors
    assert (("layers.1.mlp.experts", "gate_up_proj") in factors) and all(m.startswith("layers.1.") for m, _ in factors)


def test_an_adapter_of_another_base_is_refused_naming_the_file(adapter, tmp_path):
    other = write_base(tmp_path / "other", seed=0)
    config = json.loads((other / "config.json").read_text())
    config["hidden_size"], config["q_lora_rank"] = 48, 24  # same layers, other shapes
    (other / "config.json").write_text(json.dumps(config))
    wider = seekstack.Transformer(seekstack.ModelConfig.from_dict(config))
    with pytest.raises(CheckpointError, match=f"{ADAPTER_WEIGHTS_FILE}.*another base"):
        load_adapter(wider, adapter)


def with_a_nan(data: bytes) -> bytes:
    """The adapter weights with one value of its last tensor NaN (what a diverged training writes)."""
    tensors = load_safetensors(data)
    tensors[sorted(tensors)[-1]].view(-1)[0] = float("nan")
    return save_safetensors(tensors)


DAMAGES = {  # file -> (what is written over it, what the error says)
    "weights NaN": (ADAPTER_WEIGHTS_FILE, with_a_nan, "holds NaN or infinite values"),
    "weights truncated": (ADAPTER_WEIGHTS_FILE, lambda data: data[:3000], "not a valid safetensors file"),
    "weights empty": (ADAPTER_WEIGHTS_FILE, lambda data: b"", "not a valid safetensors file"),
    "config truncated": (ADAPTER_CONFIG_FILE, lambda data: data[:9], "not valid JSON"),
    "config a list": (ADAPTER_CONFIG_FILE, lambda data: b"[8]", "not an object"),
    "config field of the wrong type": (
        ADAPTER_CONFIG_FILE,
        lambda data: json.dumps({**json.loads(data), "target_modules": 3}).encode(),
        "peft cannot apply",
    ),
    "config rank a string": (  # peft failed at wrapping: "'<=' not supported between instances of 'str' and 'int'"
        ADAPTER_CONFIG_FILE,
        lambda data: json.dumps({**json.loads(data), "r": "8"}).encode(),
        r"field 'r' must be an integer \(the rank\), not '8'",
    ),
    "config alpha a list": (
        ADAPTER_CONFIG_FILE,
        lambda data: json.dumps({**json.loads(data), "lora_alpha": [16]}).encode(),
        r"field 'lora_alpha' must be a finite number .*, not \[16\]",
    ),
    "config alpha NaN": (  # Python's JSON reads NaN: every logit of the adapter's requests was NaN
        ADAPTER_CONFIG_FILE,
        lambda data: json.dumps({**json.loads(data), "lora_alpha": float("nan")}).encode(),
        r"field 'lora_alpha' must be a finite number \(the scale is alpha/r\), not nan",
    ),
    "config alpha past float's range": (  # an integer of 400 digits: math.isfinite's OverflowError
        ADAPTER_CONFIG_FILE,
        lambda data: json.dumps({**json.loads(data), "lora_alpha": 10**400}).encode(),
        r"field 'lora_alpha' must be a finite number \(the scale is alpha/r\), not 1000",
    ),
    "config rank pattern a list": (  # peft's AttributeError: 'list' object has no attribute 'keys'
        ADAPTER_CONFIG_FILE,
        lambda data: json.dumps({**json.loads(data), "rank_pattern": [4]}).encode(),
        r"field 'rank_pattern' must map module names to an integer \(the rank\), not \[4\]",
    ),
    "config alpha pattern of a string": (
        ADAPTER_CONFIG_FILE,
        lambda data: json.dumps({**json.loads(data), "alpha_pattern": {"o_proj": "4"}}).encode(),
        r"field 'alpha_pattern' must map module names to a finite number .*, not \{'o_proj': '4'\}",
    ),
    "config alpha pattern infinite": (
        ADAPTER_CONFIG_FILE,
        lambda data: json.dumps({**json.loads(data), "alpha_pattern": {"o_proj": float("inf")}}).encode(),
        r"field 'alpha_pattern' must map module names to a finite number .*, not \{'o_proj': inf\}",
    ),
    "another peft method": (
        ADAPTER_CONFIG_FILE,
        lambda data: json.dumps({**json.loads(data), "peft_type": "IA3"}).encode(),
        "peft_type 'IA3', not LoRA",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_a_damaged_adapter_file_is_refused_naming_the_file(base, adapter, tmp_path, damage):
    name, rewrite, message = DAMAGES[damage]
    damaged = tmp_path / "damaged"
    shutil.copytree(adapter, damaged)
    (damaged / name).write_bytes(rewrite((damaged / name).read_bytes()))
    model = seekstack.load_pretrained(base)
    with pytest.raises(CheckpointError, match=f"{damaged / name}.*{message}"):
        read_factors(model.config, damaged)  # what serving reads
    with pytest.raises(CheckpointError, match=f"{damaged / name}.*{message}"):
        load_adapter(model, damaged)  # what generate and chat read


FIRST_B = "base_model.model.model.layers.0.self_attn.kv_a_proj_with_mqa.lora_B.weight"  # (out, r): rank 4


def with_rank_widened(data: bytes) -> bytes:
    """The adapter weights with FIRST_B's rank widened from 4 to 6 (a factor that its config's r does not size)."""
    tensors = load_safetensors(data)
    tensors[FIRST_B] = torch.cat([tensors[FIRST_B], torch.zeros(tensors[FIRST_B].shape[0], 2)], dim=1)
    return save_safetensors(tensors)


def without_first_b(data: bytes) -> bytes:
    return save_safetensors({key: t for key, t in load_safetensors(data).items() if key != FIRST_B})


MISMATCHES = {  # file -> (what is written over it, what the error says, naming the file's key)
    "config rank above the weights'": (
        ADAPTER_CONFIG_FILE,
        lambda data: json.dumps({**json.loads(data), "r": 8}).encode(),
        r"key 'base_model\.model\.lm_head\.lora_A\.weight' has shape \(4, \d+\), where rank 8 of adapter_config\.json "
        r"\(r / rank_pattern\) needs \(8, \d+\): the rank in adapter_config\.json disagrees with the weights",
    ),
    "one factor of another rank": (
        ADAPTER_WEIGHTS_FILE,
        with_rank_widened,
        rf"key '{FIRST_B}' has shape \(\d+, 6\), where rank 4 of adapter_config\.json \(r / rank_pattern\) needs "
        r"\(\d+, 4\): the rank in adapter_config\.json disagrees",
    ),
    "a factor missing": (ADAPTER_WEIGHTS_FILE, without_first_b, rf"missing \['{FIRST_B}'\], unexpected \[\]"),
}


@pytest.mark.parametrize("mismatch", MISMATCHES, ids=list(MISMATCHES))
def test_weights_that_do_not_match_the_adapter_config_are_refused_naming_the_files_key(
    base, adapter, tmp_path, mismatch
):
    name, rewrite, message = MISMATCHES[mismatch]
    mismatched = tmp_path / "mismatched"
    shutil.copytree(adapter, mismatched)
    (mismatched / name).write_bytes(rewrite((mismatched / name).read_bytes()))
    with pytest.raises(CheckpointError, match=f"{mismatched / ADAPTER_WEIGHTS_FILE}: .*{message}") as refusal:
        read_factors(seekstack.load_pretrained(base).config, mismatched)
    assert "another base" not in str(refusal.value)


def test_dropout_with_parameter_targets_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="dropout"):
        AdapterConfig(dropout=0.1).validate()
    attention_only = AdapterConfig(dropout=0.1, feed_forward=(), experts=()).validate()
    modules, parameters = attention_only.targets(seekstack.preset("tiny", **TINY))
    assert parameters == [] and "layers.1.self_attn.kv_b_proj" in modules


def test_an_adapter_on_a_quantized_base_is_refused_naming_the_scheme(base, adapter):
    from seekstack.adapters.registry import attach_adapters
    from seekstack.compress.quantize import QuantConfig, quantize_model

    quantized = seekstack.load_pretrained(base)
    quantize_model(quantized, QuantConfig(scheme="int8"))
    with pytest.raises(CheckpointError, match=f"{adapter}: the base model is quantized \\(int8\\)"):
        load_adapter(quantized, adapter)  # generate, chat, merge
    with pytest.raises(CheckpointError, match="the base model is quantized"):
        attach_adapters(quantized, {"domain": adapter})  # serve


def write_peft_adapter(base, folder, **lora_fields):
    """An adapter made by peft itself on transformers' model of `base`, its lora_B factors and token rows random (a
    fresh one's are zero), saved as peft saves it by default."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(**lora_fields))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "trainable_tokens_delta" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(folder)
    return folder


def peft_logits(base, adapter, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        return plain(ids).logits, PeftModel.from_pretrained(plain, adapter)(ids).logits


MAIN_LAYER_ATTENTION = [f"layers.{layer}.self_attn.{name}" for layer in (0, 1) for name in ("q_a_proj", "o_proj")]
PEFT_CONFIGS = {  # LoraConfig fields of adapters users make with peft on transformers' model of our base
    "patterns naming transformers' modules": dict(
        target_modules=MAIN_LAYER_ATTENTION,
        rank_pattern={"model.layers.0.self_attn.o_proj": 2},
        alpha_pattern={"model.layers.1.self_attn.q_a_proj": 32},
    ),
    "patterns as regexes on transformers' names": dict(
        target_modules=MAIN_LAYER_ATTENTION,
        rank_pattern={r"^model\.layers\.0\.self_attn\.o_proj": 2},
        alpha_pattern={r"^model\.layers\.1\.self_attn\.q_a_proj": 32},
    ),
    "short names": dict(target_modules=["q_a_proj", "o_proj"]),
    "all-linear": dict(target_modules="all-linear"),
    "expert parameters by suffix": dict(target_modules=[], target_parameters=["mlp.experts.gate_up_proj"]),
    "gaussian init": dict(target_modules=["kv_b_proj"], init_lora_weights="gaussian"),
    "transformers' full module paths": dict(
        target_modules=["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_a_proj"]
    ),
    "layers_to_transform without layers_pattern": dict(target_modules=["o_proj"], layers_to_transform=[1]),
    "exclude_modules by transformers' name": dict(
        target_modules=["kv_b_proj"], exclude_modules=["model.layers.0.self_attn.kv_b_proj"]
    ),
    "exclude_modules as a regex": dict(target_modules=["o_proj", "kv_b_proj"], exclude_modules=r".*layers\.0\..*"),
    "layers_to_transform with layers_pattern": dict(
        target_modules=["o_proj", "q_a_proj"], layers_to_transform=[1], layers_pattern="layers"
    ),
    "token rows of the embedding and the head": dict(
        target_modules=["o_proj"], trainable_token_indices={"embed_tokens": [3, 5, 7], "lm_head": [4, 9]}
    ),
    "head and embedding with their base weights saved": dict(target_modules=["lm_head", "embed_tokens"]),
    "task_type CAUSAL_LM, as peft's guides write it": dict(target_modules=["o_proj"], task_type="CAUSAL_LM"),
}


@pytest.mark.parametrize("fields", PEFT_CONFIGS.values(), ids=list(PEFT_CONFIGS))
def test_an_adapter_peft_made_on_transformers_model_loads_and_merges_with_peft_logits(base, tmp_path, fields):
    adapter = write_peft_adapter(base, tmp_path / "peft", r=4, lora_alpha=8, **{"init_lora_weights": False, **fields})
    ids = prompt_ids(seed=6)
    plain, theirs = peft_logits(base, adapter, ids)
    assert (plain - theirs).abs().max() > 100 * PEFT_ATOL  # the adapter changes peft's logits
    assert (logits_with_adapter(base, adapter, ids) - theirs).abs().max() < PEFT_ATOL  # generate, chat
    with torch.no_grad():
        merged = seekstack.load_pretrained(merge_adapter(base, adapter, tmp_path / "merged"))(ids).logits
    assert (merged - theirs).abs().max() < PEFT_ATOL
    if fields.get("target_modules") == "all-linear":
        return  # it adapts the MoE routers, which serving refuses (the test below)
    factors = read_factors(seekstack.load_pretrained(base).config, adapter).factors  # serve
    assert factors and not any(module.startswith("mtp.") for module, _ in factors)


def test_a_block_diagonal_adapter_loads_with_peft_logits_and_serving_refuses_it_naming_the_file(base, tmp_path):
    """peft's BD-LoRA keeps o_proj's A and q_a_proj's B as diagonal blocks: peft applies them (generate, chat, merge),
    where serving's per-row layers multiplied the blocks as whole factors and stopped inside a forward ("mat1 and
    mat2 shapes cannot be multiplied")."""
    blocks = dict(target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_a_proj"], nblocks=2)
    fields = dict(target_modules=["o_proj", "q_a_proj"], use_bdlora=blocks)
    adapter = write_peft_adapter(base, tmp_path / "peft", r=4, lora_alpha=8, init_lora_weights=False, **fields)
    ids = prompt_ids(seed=6)
    plain, theirs = peft_logits(base, adapter, ids)
    assert (plain - theirs).abs().max() > 100 * PEFT_ATOL
    assert (logits_with_adapter(base, adapter, ids) - theirs).abs().max() < PEFT_ATOL
    with torch.no_grad():
        merged = seekstack.load_pretrained(merge_adapter(base, adapter, tmp_path / "merged"))(ids).logits
    assert (merged - theirs).abs().max() < PEFT_ATOL
    message = rf"{adapter / ADAPTER_CONFIG_FILE}: a block-diagonal .*\(use_bdlora\).*`seekstack lora merge` instead$"
    with pytest.raises(CheckpointError, match=message):
        read_factors(seekstack.load_pretrained(base).config, adapter)


def test_serving_refuses_an_adapter_on_the_moe_router_naming_the_file_and_the_router(base, tmp_path):
    adapter = write_peft_adapter(base, tmp_path / "peft", r=4, lora_alpha=8, **PEFT_CONFIGS["all-linear"])
    with pytest.raises(
        CheckpointError, match=rf"{adapter / ADAPTER_CONFIG_FILE}: .*MoE router \(layers\.1\.mlp\.gate\.weight"
    ):
        read_factors(seekstack.load_pretrained(base).config, adapter)


def test_serving_scales_each_factor_by_the_alpha_peft_gives_its_module(base, tmp_path):
    fields = PEFT_CONFIGS["patterns as regexes on transformers' names"]
    adapter = write_peft_adapter(base, tmp_path / "peft", r=4, lora_alpha=8, init_lora_weights=False, **fields)
    factors = read_factors(seekstack.load_pretrained(base).config, adapter).factors
    with safe_open(adapter / ADAPTER_WEIGHTS_FILE, "pt") as stored:
        up = {layer: stored.get_tensor(f"base_model.model.model.layers.{layer}.self_attn.q_a_proj.lora_B.weight")
              for layer in (0, 1)}  # fmt: skip
    assert torch.allclose(factors[("layers.0.self_attn.q_a_proj", "weight")][1], up[0] * 8 / 4)
    assert torch.allclose(factors[("layers.1.self_attn.q_a_proj", "weight")][1], up[1] * 32 / 4)  # alpha_pattern
    assert factors[("layers.0.self_attn.o_proj", "weight")][0].shape[0] == 2  # rank_pattern


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_serving_refuses_an_adapter_peft_saved_for_a_residual_base_naming_the_file_and_the_init(base, tmp_path, init):
    """peft loads a PiSSA / OLoRA adapter saved unconverted on W - s B0 A0, which it recomputes from the base (generate
    and merge do, through peft); serving added its factors to W itself, silently other logits."""
    adapter = write_peft_adapter(
        base, tmp_path / "peft", r=4, lora_alpha=8, target_modules=["o_proj"], init_lora_weights=init
    )
    with pytest.raises(
        CheckpointError, match=rf"{adapter / ADAPTER_CONFIG_FILE}: init_lora_weights='{init}'.*converted"
    ):
        read_factors(seekstack.load_pretrained(base).config, adapter)


UNSUPPORTED_PEFT_OPTIONS = {
    "lora_bias": dict(target_modules=["o_proj"], lora_bias=True),
    "modules_to_save": dict(target_modules=["o_proj"], modules_to_save=["lm_head"]),
    "alora_invocation_tokens": dict(target_modules=["o_proj"], alora_invocation_tokens=[5, 17]),
    "layer_replication": dict(target_modules=["o_proj"], layer_replication=[[0, 2], [1, 2]]),
    # LoRA variants whose extra weights (lora_diag, lora_velora_embed, lora_monteclora_sampler...) were refused as
    # "not an adapter weight key", naming neither the field nor the variant
    "kasa_config": dict(target_modules=["o_proj"], kasa_config={}),
    "velora_config": dict(target_modules=["o_proj"], velora_config={}),
    "monteclora_config": dict(target_modules=["o_proj"], monteclora_config={}),
    "arrow_config": dict(target_modules=["o_proj"]),  # the test writes arrow_config into the saved config
}


@pytest.mark.parametrize("option", UNSUPPORTED_PEFT_OPTIONS)
def test_a_peft_option_seekstack_does_not_apply_is_refused_naming_it(base, tmp_path, option):
    fields = UNSUPPORTED_PEFT_OPTIONS[option]
    adapter = write_peft_adapter(base, tmp_path / "peft", r=4, lora_alpha=8, init_lora_weights=False, **fields)
    if option == "arrow_config":  # peft makes an Arrow adapter from several task adapters, not one: its config, edited
        config = json.loads((adapter / ADAPTER_CONFIG_FILE).read_text())
        (adapter / ADAPTER_CONFIG_FILE).write_text(json.dumps({**config, "arrow_config": {"top_k": 1}}))
    model = seekstack.load_pretrained(base)
    for load in (lambda: load_adapter(model, adapter), lambda: read_factors(model.config, adapter)):
        with pytest.raises(CheckpointError, match=f"{adapter / ADAPTER_CONFIG_FILE}: peft's {option}=.*not supported"):
            load()


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_base_biases_peft_trained_beside_the_factors_are_refused_naming_the_key_and_the_field(tmp_path, bias):
    """peft's bias="all" / "lora_only" on a base with biases (attention_bias) saves those biases, trained, beside the
    factors: generate, merge and serve refused them as "not an adapter weight key", naming neither field nor cure."""
    torch.manual_seed(0)
    base = tmp_path / "base"
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **TINY, attention_bias=True)), base)
    adapter = write_peft_adapter(base, tmp_path / "peft", r=4, lora_alpha=8, target_modules=["o_proj"], bias=bias)
    model = seekstack.load_pretrained(base)
    message = (
        rf"^{adapter / ADAPTER_WEIGHTS_FILE}: key '.*\.bias' is a base layer's bias trained beside the factors "
        rf"\(peft's bias='{bias}' in adapter_config\.json\), .* retrain the adapter with bias='none'$"
    )
    for load in (lambda: load_adapter(model, adapter), lambda: read_factors(model.config, adapter)):
        with pytest.raises(CheckpointError, match=message):
            load()


def test_token_rows_outside_the_bases_vocabulary_are_refused_naming_the_file_and_the_ids(base, tmp_path):
    fields = dict(target_modules=["o_proj"], trainable_token_indices={"lm_head": [3, 5], "embed_tokens": [7]})
    adapter = write_peft_adapter(base, tmp_path / "peft", r=4, lora_alpha=8, **fields)
    config = json.loads((adapter / ADAPTER_CONFIG_FILE).read_text())
    config["trainable_token_indices"]["lm_head"] = [3, TINY["vocab_size"] + 4]  # made on a resized vocabulary
    (adapter / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
    model = seekstack.load_pretrained(base)
    message = rf"{adapter / ADAPTER_CONFIG_FILE}: trainable_token_indices of 'lm_head' hold token ids \[100\] outside"
    for load in (lambda: load_adapter(model, adapter), lambda: read_factors(model.config, adapter)):
        with pytest.raises(CheckpointError, match=message):
            load()


def test_a_saved_head_base_weight_of_another_base_is_refused_naming_the_key(base, tmp_path):
    fields = PEFT_CONFIGS["head and embedding with their base weights saved"]
    adapter = write_peft_adapter(base, tmp_path / "peft", r=4, lora_alpha=8, init_lora_weights=False, **fields)
    tensors = load_safetensors((adapter / ADAPTER_WEIGHTS_FILE).read_bytes())
    tensors["base_model.model.lm_head.base_layer.weight"] += 0.01
    (adapter / ADAPTER_WEIGHTS_FILE).write_bytes(save_safetensors(tensors))
    with pytest.raises(CheckpointError, match="'base_model.model.lm_head.base_layer.weight'.*differs.*another base"):
        load_adapter(seekstack.load_pretrained(base), adapter)


def test_a_head_and_embedding_peft_saved_whole_beside_the_adapter_are_checked_against_the_base(base, tmp_path):
    """peft saves the head and embedding whole (`lm_head.weight`) beside an adapter that leaves them alone where the
    vocabulary was resized, or when asked (save_embedding_layers=True): generate, merge and serve refused either as
    "'lm_head.weight' is not an adapter weight key"; the base's own serve with peft's logits, a resized one is refused
    naming the key and the resize."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    transformers_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], init_lora_weights=False)
    get_peft_model(transformers_model, lora).save_pretrained(tmp_path / "asked", save_embedding_layers=True)
    ids = prompt_ids(seed=6)
    _, theirs = peft_logits(base, tmp_path / "asked", ids)
    assert (logits_with_adapter(base, tmp_path / "asked", ids) - theirs).abs().max() < PEFT_ATOL
    assert read_factors(seekstack.load_pretrained(base).config, tmp_path / "asked").factors
    resized = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    resized.resize_token_embeddings(TINY["vocab_size"] + 8)  # tokens added: peft saves both whole
    get_peft_model(resized, lora).save_pretrained(tmp_path / "resized")
    key = r"'base_model\.model\.(lm_head|model\.embed_tokens)\.weight'"
    with pytest.raises(CheckpointError, match=rf"{key}.*\(shape \(104, 32\), this base's \(96, 32\)\): .* on resized"):
        load_adapter(seekstack.load_pretrained(base), tmp_path / "resized")


def test_a_folder_holding_no_lora_config_is_refused_before_peft_is_imported(tmp_path, monkeypatch):
    """peft's import (seconds: transformers, torchao) came first: the first /v1/load_lora_adapter of a mistyped path
    took 7.5 s on a loaded machine to refuse it, past the 10 s read timeout of the serve fuzz test in a loaded run."""
    monkeypatch.setitem(sys.modules, "peft", None)  # importing peft now raises ImportError
    with pytest.raises(CheckpointError, match=f"no {ADAPTER_CONFIG_FILE}"):
        read_lora_config(tmp_path)
    (tmp_path / ADAPTER_CONFIG_FILE).write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(CheckpointError, match="not LoRA"):
        read_lora_config(tmp_path)
