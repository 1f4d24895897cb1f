"""load_pretrained as transformers' from_pretrained is called: the dtype config.json states, the keywords model
cards pass (device_map, max_memory, offload_folder, attn_implementation, local_files_only)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import seekstack
from seekstack.checkpoint import CONFIG_FILE, CheckpointError
from seekstack.infer import placement
from seekstack.infer.placement import OffloadRefused, runtime_device
from tests.conftest import micro_config
from tests.support import edited_json


@pytest.mark.parametrize(("key", "stated"), [("dtype", 5), ("dtype", "int8"), ("torch_dtype", ["bfloat16"])])
def test_auto_dtype_of_a_config_stating_no_float_dtype_is_refused_naming_the_key(tmp_path, key, stated):
    """dtype="auto" took a config.json's dtype 5, "int8" or a list as no dtype stated and loaded the embedding's
    dtype silently, where transformers' from_pretrained(dtype="auto") refuses them; a dtype given is still taken."""
    seekstack.save_pretrained(seekstack.Transformer(micro_config()).bfloat16(), tmp_path)
    with edited_json(tmp_path / CONFIG_FILE) as config:
        config.update(dtype=None, torch_dtype=None)
        config[key] = stated
    expected = f"{tmp_path / CONFIG_FILE}: {key} is {stated!r}, no float dtype a model loads in: state one of float32, "
    with pytest.raises(CheckpointError) as refused:
        seekstack.load_pretrained(tmp_path, dtype="auto")
    assert str(refused.value).startswith(expected)
    assert seekstack.load_pretrained(tmp_path, dtype="float16").embed_tokens.weight.dtype == torch.float16


def test_device_map_and_max_memory_of_a_model_card_spread_the_model_as_the_engine_does(tmp_path):
    """load_pretrained(dir, device_map=..., max_memory=...), as DeepSeek's model cards call from_pretrained, was a
    TypeError (unexpected keyword argument 'device_map'); the parts now go where the map puts them, disk parts copied
    under offload_folder as the weights are read, and the logits are the plain load's."""
    seekstack.save_pretrained(seekstack.Transformer(micro_config()), tmp_path / "model")
    plain = seekstack.load_pretrained(tmp_path / "model", dtype=torch.float16)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    spread = seekstack.load_pretrained(
        tmp_path / "model", dtype=torch.float16, device_map={"": "cpu", "model.layers.1": "disk", "lm_head": "disk"},
        offload_folder=tmp_path / "offload",
    )  # fmt: skip
    assert {part for part, device in spread.placement.items() if device == "disk"} == {
        "layers.1.self_attn", "layers.1.mlp.shared_experts", "layers.1.mlp.experts", "lm_head"
    }  # fmt: skip
    assert sorted(path.name for path in (tmp_path / "offload").iterdir()) == [
        "layers.1.mlp.experts", "layers.1.mlp.shared_experts", "layers.1.self_attn", "lm_head"
    ]  # fmt: skip
    assert torch.equal(spread(ids).logits, plain(ids).logits)
    budgeted = seekstack.load_pretrained(tmp_path / "model", device_map="sequential", max_memory={"cpu": "1GiB"})
    assert set(budgeted.placement.values()) == {"cpu"}
    with pytest.raises(ValueError, match=r"^offload_folder is given without device_map: it holds the copies"):
        seekstack.load_pretrained(tmp_path / "model", offload_folder=tmp_path / "offload")
    with pytest.raises(ValueError, match=r"^max_memory is given with device_map=None: it holds the budgets"):
        seekstack.load_pretrained(tmp_path / "model", max_memory={"cpu": "1GiB"})


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flash_attention_2"])
def test_transformers_attn_implementation_is_taken_without_effect_and_an_unknown_one_refused(tmp_path, implementation):
    """DeepSeek-V2's model card passes from_pretrained(..., attn_implementation="eager"), which load_pretrained refused
    with a TypeError; transformers' names load the same model (seekstack's MLA either way), another is named."""
    seekstack.save_pretrained(seekstack.Transformer(micro_config()), tmp_path)
    ids = torch.tensor([[2, 7, 1, 8]])
    taken = seekstack.load_pretrained(tmp_path, attn_implementation=implementation)
    assert torch.equal(taken(ids).logits, seekstack.load_pretrained(tmp_path)(ids).logits)
    with pytest.raises(
        ValueError, match=r"^attn_implementation='flash': seekstack runs its own MLA attention and takes"
    ):
        seekstack.load_pretrained(tmp_path, attn_implementation="flash")


@pytest.mark.parametrize("local_files_only", [True, False])
def test_transformers_local_files_only_is_taken_as_the_folder_is_read_and_nothing_downloaded(
    tmp_path, local_files_only
):
    """from_pretrained(folder, local_files_only=True), as offline scripts call it, was a TypeError in load_pretrained;
    the folder loads as without it, and a Hub repository's name is still refused as no such folder."""
    seekstack.save_pretrained(seekstack.Transformer(micro_config()), tmp_path)
    ids = torch.tensor([[4, 2, 8]])
    loaded = seekstack.load_pretrained(tmp_path, local_files_only=local_files_only)
    assert torch.equal(loaded(ids).logits, seekstack.load_pretrained(tmp_path)(ids).logits)
    with pytest.raises(CheckpointError, match=r"^deepseek-ai/DeepSeek-V3: no such folder; .* download it first"):
        seekstack.load_pretrained("deepseek-ai/DeepSeek-V3", local_files_only=local_files_only)


def test_a_load_spread_by_a_device_map_warns_at_the_callers_line_as_a_plain_load(tmp_path):
    """2969838 loaded a device_map by calling load_pretrained again, so its warnings named load.py's line, not the
    caller's: Python's filters and a user's log both point at the wrong file."""
    seekstack.save_pretrained(seekstack.Transformer(micro_config()), tmp_path)
    (tmp_path / "generation_config.json").write_text("[1]")  # damaged: loading warns and goes on
    with pytest.warns(UserWarning, match="generation_config.json: expected a JSON object") as warned:
        seekstack.load_pretrained(tmp_path, device_map={"": "cpu"})
    assert [warning.filename for warning in warned] == [__file__]


def test_a_disk_copy_placing_writes_after_the_read_is_refused_naming_offload_folder(tmp_path, monkeypatch):
    """A tied lm_head is never read (it is the embedding), so its disk copy is written when the model is placed, after
    the read loop: ae95002 placed it outside the refusal's renaming, and a folder that cannot be written was named
    `offload_dir=`, a keyword load_pretrained does not take."""
    seekstack.save_pretrained(seekstack.Transformer(micro_config(tie_word_embeddings=True)), tmp_path / "model")

    def refuse(*args, **kwargs):
        raise OffloadRefused("no room for the copy: choose another folder with", None)

    monkeypatch.setattr(placement, "_write_copy", refuse)
    with pytest.raises(OffloadRefused) as refused:
        seekstack.load_pretrained(tmp_path / "model", dtype=torch.float16, device_map={"": "cpu", "lm_head": "disk"})
    assert str(refused.value) == "no room for the copy: choose another folder with offload_folder="


def test_a_hub_revision_is_refused_as_engine_from_pretrained_refuses_it(tmp_path):
    """load_pretrained(dir, revision="main"), transformers' keyword, was a TypeError (an unexpected keyword argument)
    where Engine.from_pretrained refuses it with advice: both now refuse it with refuse_a_revision."""
    seekstack.save_pretrained(seekstack.Transformer(micro_config()), tmp_path)
    with pytest.raises(ValueError) as refused:
        seekstack.load_pretrained(tmp_path, revision="main")
    assert str(refused.value) == (
        f"revision='main' names a revision of a Hugging Face Hub repository, but seekstack reads the folder {tmp_path} "
        "as it is on disk and downloads nothing: fetch that revision with `hf download REPO --revision main "
        "--local-dir FOLDER`, give FOLDER and leave revision out"
    )


@pytest.mark.parametrize("placement", [{}, {"device_map": {"": "cpu"}}])
def test_a_device_torch_does_not_know_is_refused_naming_it(tmp_path, placement):
    """load_pretrained(dir, device="gpu") (or beside a device map, read as the engine reads a device, as
    Engine.from_pretrained checks it too) was torch's bare RuntimeError "Expected one of cpu, cuda, ipu, ... device
    type at start of device string: gpu"."""
    seekstack.save_pretrained(seekstack.Transformer(micro_config()), tmp_path)
    with pytest.raises(ValueError, match=r"^device='gpu': give cpu, cuda, cuda:N or auto$"):
        seekstack.load_pretrained(tmp_path, device="gpu", **placement)


@pytest.mark.parametrize("device", ["CPU", " cpu", "cpu:0", "auto", None])
def test_a_device_is_read_as_the_engine_reads_it(tmp_path, device):
    """load_pretrained(dir, device="CPU") was refused as "device='CPU' is no device torch knows" where
    Engine.from_pretrained(dir, device="CPU") takes it: both read a device through runtime_device (auto: cuda:0 where
    torch reaches a GPU, else cpu); device=None, the engine's cpu, was refused as "device=None: give cpu, ..."."""
    seekstack.save_pretrained(seekstack.Transformer(micro_config()), tmp_path)
    model = seekstack.load_pretrained(tmp_path, device=device)
    assert model.embed_tokens.weight.device == runtime_device(device or "cpu")


@pytest.mark.parametrize("device", ["meta", f"cuda:{torch.cuda.device_count()}", torch.cuda.device_count()])
def test_a_device_no_weight_can_be_loaded_onto_is_refused_before_any_weight_is_read(tmp_path, device):
    """load_pretrained(dir, device="cuda") on a torch without CUDA raised torch's bare AssertionError (device_map=
    "cuda" is refused naming the device), and device="meta" returned a model whose weights were never read,
    silently. An int is a CUDA index, as torch.device reads it: past the last GPU it is refused the same way (the
    check read str(0), no device string, refusing device=0 on a machine with a GPU)."""
    seekstack.save_pretrained(seekstack.Transformer(micro_config()), tmp_path)
    with pytest.raises(ValueError) as refused:
        seekstack.load_pretrained(tmp_path, device=device)
    if device == "meta":
        assert str(refused.value) == (
            "device='meta' holds no weights: the model would be returned with none read; load on a device (cpu, "
            "cuda) or, for its shapes alone, build Transformer(loaded_config(directory)) under "
            "`with torch.device('meta'):`"
        )
    else:
        assert str(refused.value).startswith(
            f"device={device!r}: torch cannot reach cuda:{torch.cuda.device_count()} here ("
        )


@pytest.mark.parametrize("stacked_experts", [True, False], ids=["stacked", "per-expert"])
@pytest.mark.parametrize("damage", ["config", "expert"])
def test_weights_unlike_the_config_are_refused_naming_the_key_and_both_shapes_before_the_model_is_allocated(
    tmp_path, monkeypatch, stacked_experts, damage
):
    """A bigger model's config.json beside small weights (vocab_size 40960000000) failed allocating the model, a raw
    DefaultCPUAllocator RuntimeError (20 TB), and a smaller mismatch was named only once the whole model was allocated;
    every stored shape is now checked from the headers first: the file, the key and both shapes, nothing allocated."""
    seekstack.save_pretrained(seekstack.Transformer(micro_config()), tmp_path, stacked_experts=stacked_experts)
    if damage == "config":
        with edited_json(tmp_path / CONFIG_FILE) as config:
            config["vocab_size"] = 40_960_000_000
        key, shapes = "model.embed_tokens.weight", "has shape (128, 64), the config"
    else:  # an expert's up projection one row short
        key = "model.layers.1.mlp.experts." + ("gate_up_proj" if stacked_experts else "3.up_proj.weight")
        tensors = load_file(tmp_path / "model.safetensors")
        tensors[key] = tensors[key][..., :-1, :].clone()
        save_file(tensors, tmp_path / "model.safetensors")
        shapes = "has shape (8, 63, 64), the config" if stacked_experts else "has shape (31, 64), the config"
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda *_, **__: pytest.fail("the model was allocated"))
    with pytest.raises(CheckpointError) as refused:
        seekstack.load_pretrained(tmp_path)
    assert str(refused.value).startswith(f"{tmp_path / 'model.safetensors'}: key {key!r} {shapes}")
    implied = {"config": "(40960000000, 64)", "expert": "(8, 64, 64)" if stacked_experts else "(32, 64)"}[damage]
    assert f"{tmp_path / CONFIG_FILE} implies {implied}; use the {CONFIG_FILE} saved with these weights" in str(
        refused.value
    )


@pytest.mark.parametrize("keyword", ["dequantize", "mtp", "trust_remote_code", "low_cpu_mem_usage", "local_files_only"])
@pytest.mark.parametrize("value", ["no", "false", 1, None])
def test_a_switch_given_as_anything_but_a_bool_is_refused_not_read_as_true(tmp_path, keyword, value):
    """load_pretrained(dir, dequantize="no") (a setting read from a file or the environment as text) dequantized the
    quantized layers, silently, and mtp="no" loaded the MTP modules: every non-empty text is true; refused before
    anything is read, as the engine's switches are. transformers' keywords taken without effect were taken whatever
    their value (trust_remote_code="no", low_cpu_mem_usage=None): refused the same way."""
    with pytest.raises(ValueError, match=rf"^{keyword}={value!r} must be True or False$"):
        seekstack.load_pretrained(tmp_path / "not-read", **{keyword: value})


def test_ignore_mismatched_sizes_is_refused_saying_other_shapes_always_are(tmp_path):
    """load_pretrained(dir, ignore_mismatched_sizes=True), as transformers' from_pretrained takes it, was Python's
    bare "unexpected keyword argument" TypeError; False, what is done here, is taken."""
    with pytest.raises(ValueError) as refused:
        seekstack.load_pretrained(tmp_path / "not-read", ignore_mismatched_sizes=True)
    assert str(refused.value).startswith("ignore_mismatched_sizes=True is transformers' from_pretrained keyword")
    assert "is always refused" in str(refused.value)
    with pytest.raises(CheckpointError, match="not-read"):  # past the keywords, to the missing folder
        seekstack.load_pretrained(tmp_path / "not-read", ignore_mismatched_sizes=False)
