"""Device maps: parsed and written back, planned on the meta device within budgets, and a placed model (parts on
the CPU, memory-mapped from disk, or on a GPU) computing the logits of the model on one device."""

from __future__ import annotations

import collections
import contextlib
import copy
import fcntl
import itertools
import json
import os
import re

import pytest
import torch

import seekstack
from seekstack.accounting import main_parameters, mtp_parameters
from seekstack.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    checkpoint_key,
    read_config,
    read_safetensors,
    stored_tensor_bytes,
)
from seekstack.compress.quantize import QuantConfig, quantize_model
from seekstack.infer import Engine, EngineOptions, SamplingParams
from seekstack.infer.params import parse_bytes
from seekstack.infer.placement import (
    _inputs_to,
    _outputs_to,
    device_map_for,
    device_map_text,
    disk_parts_note,
    format_device_map,
    layer_devices,
    mapped_file,
    model_tensor_bytes,
    offload_while_loading,
    parse_budgets,
    parse_device_map,
    place,
    plan_placement,
    tensor_bytes_at_width,
    units,
)
from seekstack.infer.precision import map_devices
from seekstack.infer.threads import running_on
from seekstack.schema import ConfigError
from tests.infer.support import micro_model, model_dir, read_only_folder, tiny_tokenizer
from tests.support import edited_json

KTRANSFORMERS_SPLIT = "*=cuda:0,embed_tokens=cpu,layers.*.mlp.experts=cpu"


def test_later_entries_override_earlier_ones_and_ranges_pick_layers(model):
    names = list(units(model))  # 3 layers: a dense one, then two MoE layers; one MTP module
    placement = parse_device_map("*=cpu,layers.1-2.mlp.experts=disk,mtp.0=disk", names)
    assert [name for name, device in placement.items() if device == "disk"] == [
        "layers.1.mlp.experts", "layers.2.mlp.experts", "mtp.0",
    ]  # fmt: skip
    assert parse_device_map(format_device_map(placement), names) == placement
    assert format_device_map(placement).endswith("layers.1-2.mlp.experts=disk")
    with pytest.raises(ValueError) as unplaced:
        parse_device_map("embed_tokens=cpu", names)
    assert str(unplaced.value) == (  # it said "layers.0.self_attn (and 10 more parts)", naming no other
        "the device map places no device for mtp.0, norm, lm_head, layers.0-2.self_attn, layers.0.mlp, "
        "layers.1-2.mlp.shared_experts, layers.1-2.mlp.experts: add an entry for each, or *=device first"
    )
    with pytest.raises(ValueError, match="'layers.9=cpu' matches no part"):
        parse_device_map("*=cpu,layers.9=cpu", names)
    with pytest.raises(ValueError, match="'gpu7' is not cpu, disk, cuda:N or a GPU number N"):
        parse_device_map("*=gpu7", names)


def test_an_entry_finer_than_a_part_is_refused_listing_the_parts_a_map_places(model):
    """accelerate places modules down to one expert (model.layers.1.mlp.experts.3); here such an entry was refused
    as matching no part "(parts: embed_tokens, ...)", the one part it named telling nothing of the others."""
    with pytest.raises(ValueError) as refusal:
        parse_device_map("*=cpu,layers.1.mlp.experts.3=disk", list(units(model)))
    assert str(refusal.value) == (
        "device map entry 'layers.1.mlp.experts.3=disk' matches no part of the model; each is placed whole: "
        "embed_tokens, mtp.0, norm, lm_head, layers.0-2.self_attn, layers.0.mlp, layers.1-2.mlp.shared_experts, "
        "layers.1-2.mlp.experts"
    )


def test_the_plan_puts_the_bytes_read_most_per_token_on_the_fastest_device():
    config = seekstack.preset("deepseek-v3")
    plan = plan_placement(config, parse_budgets("cuda:0=141GiB,cpu=512GiB"), tensor_bytes_at_width(config, 1.0))
    placement = plan.placement
    assert all(placement[f"layers.{i}.self_attn"] == "cuda:0" for i in range(config.num_hidden_layers))
    assert all(placement[f"layers.{i}.mlp.shared_experts"] == "cuda:0" for i in range(3, config.num_hidden_layers))
    on_gpu = [i for i in range(3, config.num_hidden_layers) if placement[f"layers.{i}.mlp.experts"] == "cuda:0"]
    assert on_gpu == list(range(3, 3 + len(on_gpu))) and 0 < len(on_gpu) < 58  # the first experts that fit
    assert plan.resident_bytes["cuda:0"] <= 141 * 2**30 and plan.resident_bytes["disk"] == 0
    # What is resident sums to the parameters at one byte each: the main model's 671B and the MTP module's.
    parameters = main_parameters(config).total + mtp_parameters(config).total
    assert sum(plan.resident_bytes.values()) == parameters
    lite = seekstack.preset("deepseek-v2-lite")
    tight = plan_placement(lite, parse_budgets("cuda:0=8GiB,cpu=12GiB"), tensor_bytes_at_width(lite, 2.0))
    assert tight.resident_bytes["cuda:0"] <= 8 * 2**30 and tight.resident_bytes["cpu"] <= 12 * 2**30
    assert tight.resident_bytes["disk"] > 10 * 2**30 and tight.placement["layers.26.mlp.experts"] == "disk"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a device this machine lacks")
def test_placing_parts_on_a_device_this_torch_cannot_reach_is_refused_naming_it(model):
    placement = parse_device_map("*=cpu,layers.1.mlp.experts=cuda:0", list(units(model)))
    with pytest.raises(ValueError, match="puts parts on cuda:0, which this torch cannot reach"):
        place(copy.deepcopy(model), placement)


def test_a_device_map_naming_a_device_this_torch_cannot_reach_is_refused_before_any_weight_is_read(tmp_path):
    directory = model_dir(tmp_path / "model")
    unreachable = f"cuda:{torch.cuda.device_count()}"  # cuda:0 without CUDA, past the last GPU with it
    options = EngineOptions(device_map=f"*=disk,layers.1.mlp.experts={unreachable}", kv_cache_memory="1MiB")
    with pytest.raises(ValueError, match=f"puts parts on {unreachable}, which this torch cannot reach"):
        Engine.from_pretrained(directory, **options.engine_kwargs())
    assert not (directory / "offload").exists()  # no disk part was written: a large model's take hours


@torch.inference_mode()
def test_parts_in_memory_and_memory_mapped_from_disk_compute_the_same_logits(model, tmp_path):
    tokens = torch.randint(5, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    expected = model(tokens).logits
    placed = place(copy.deepcopy(model), parse_device_map("*=cpu,layers.*.mlp.experts=disk,embed_tokens=disk",
                                                           list(units(model))), offload_dir=tmp_path)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "embed_tokens",
        "layers.1.mlp.experts",
        "layers.2.mlp.experts",
    ]
    experts = placed.layers[1].mlp.experts.gate_up_proj
    assert experts.untyped_storage().nbytes() == experts.numel() * 4  # a view of the file, not a copy in memory
    torch.testing.assert_close(placed(tokens).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@torch.inference_mode()
def test_quantized_parts_placed_on_disk_run_their_kernels_on_the_disk_copies(tmp_path, scheme):
    from seekstack.compress.linear import QuantizedWeight

    model = micro_model(**INT4_TILEABLE)
    quantize_model(model, QuantConfig(scheme=scheme))
    tokens = torch.randint(5, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    expected = model(tokens).logits
    placed = place(model, parse_device_map("*=disk", list(units(model))), offload_dir=tmp_path)
    weights = [m for m in placed.modules() if isinstance(m, QuantizedWeight)]
    operands = [t for w in weights for t in [*w.operands, *itertools.chain(*w.expert_operands)]]
    assert any(w.expert_operands for w in weights)  # the routed experts' stacks, viewed per expert
    assert all(mapped_file(operand) is not None for operand in operands)  # not the in-memory stacks they replace
    torch.testing.assert_close(placed(tokens).logits, expected, rtol=0, atol=0)


def test_an_engine_on_a_placed_model_generates_the_tokens_of_the_whole_model(model, tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    prompt = torch.randint(5, 512, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    expected = Engine(model, tokenizer).generate([prompt], params)[0].token_ids
    placed = place(
        copy.deepcopy(model), parse_device_map("*=cpu,layers.1-2=disk", list(units(model))), tmp_path / "off"
    )
    assert Engine(placed, tokenizer).generate([prompt], params)[0].token_ids == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.inference_mode()
def test_attention_on_the_gpu_and_routed_experts_on_the_cpu_give_the_logits_of_one_device(model, tmp_path):
    tokens = torch.randint(5, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    expected = model(tokens).logits
    placed = place(copy.deepcopy(model), parse_device_map(KTRANSFORMERS_SPLIT, list(units(model))))
    assert placed.layers[1].self_attn.o_proj.weight.is_cuda and not placed.layers[1].mlp.experts.down_proj.is_cuda
    torch.testing.assert_close(placed(tokens).logits, expected, rtol=1e-4, atol=1e-4)
    assert layer_devices(placed)[0].type == "cuda"
    tokenizer = tiny_tokenizer(tmp_path)
    prompt = tokens[0].tolist()
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    assert (
        Engine(placed, tokenizer).generate([prompt], params)[0].token_ids
        == Engine(model, tokenizer).generate([prompt], params)[0].token_ids
    )


def test_results_copied_back_to_the_cpu_wait_for_their_data_and_inputs_sent_to_a_gpu_need_not(monkeypatch):
    # A non-blocking GPU->CPU copy returns before its data arrives; the CPU norms and routers read it at once.
    copies = []

    def recorded_copy(tensor, device, non_blocking=False):
        copies.append((torch.device(device).type, non_blocking))
        return tensor

    monkeypatch.setattr(torch.Tensor, "to", recorded_copy)
    activation = torch.ones(2)
    _outputs_to(torch.device("cpu"))(None, (), (activation, {"kv_latent": activation}))
    _inputs_to(torch.device("cuda:0"))(None, (activation,), {})
    assert copies == [("cpu", False), ("cpu", False), ("cuda", True)]


def test_from_pretrained_places_the_parts_a_device_map_names(tmp_path):
    directory = model_dir(tmp_path / "model")
    prompt = torch.randint(5, 512, (7,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    expected = Engine.from_pretrained(directory).generate([prompt], params)[0].token_ids
    options = EngineOptions(device_map="*=cpu,layers.*.mlp.experts=disk", kv_cache_memory="1MiB", dtype="float32")
    engine = Engine.from_pretrained(directory, **options.engine_kwargs())
    assert engine.model.placement["layers.1.mlp.experts"] == "disk" and (directory / "offload").is_dir()
    assert engine.generate([prompt], params)[0].token_ids == expected


def test_a_device_map_with_the_mtp_module_places_an_engine_that_loads_it_and_one_that_does_not(tmp_path):
    """A plan prices the MTP module, which only a drafting engine loads: its entry places nothing on the other."""
    directory = model_dir(tmp_path / "model")
    device_map = "*=cpu,layers.*.mlp.experts=disk,mtp.0=disk"
    for speculative in (False, True):
        options = EngineOptions(device_map=device_map, kv_cache_memory="1MiB", dtype="float32", speculative=speculative)
        engine = Engine.from_pretrained(directory, **options.engine_kwargs())
        assert ("mtp.0" in engine.model.placement) == speculative
        assert engine.model.placement["layers.1.mlp.experts"] == "disk"
    with pytest.raises(ValueError, match="'mtp.1=disk' matches no part"):  # a model with one MTP module: none at 1
        parse_device_map("*=cpu,mtp.1=disk", list(units(micro_model())))


def disk_run_tokens(directory, dtype: str, device_map: str | None = "*=cpu,layers.*.mlp.experts=disk") -> list[int]:
    """The greedy tokens of the checkpoint in `directory` in `dtype`, its routed experts on disk (or all in memory)."""
    prompt = torch.randint(5, 512, (7,), generator=torch.Generator().manual_seed(2)).tolist()
    options = EngineOptions(device_map=device_map, kv_cache_memory="1MiB", dtype=dtype)
    engine = Engine.from_pretrained(directory, **options.engine_kwargs())
    return engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))[0].token_ids


def test_disk_copies_of_another_dtype_or_of_weights_since_changed_are_not_read(tmp_path):
    directory = model_dir(tmp_path / "model")
    offload = directory / "offload" / "layers.1.mlp.experts"
    assert disk_run_tokens(directory, "float32") == disk_run_tokens(directory, "float32", device_map=None)
    float32_copies = sorted(offload.iterdir())
    assert disk_run_tokens(directory, "bfloat16") == disk_run_tokens(directory, "bfloat16", device_map=None)
    bfloat16_copies = sorted(offload.iterdir())
    assert len(bfloat16_copies) == len(float32_copies) and not set(bfloat16_copies) & set(float32_copies)  # replaced
    assert disk_run_tokens(directory, "float32") == disk_run_tokens(directory, "float32", device_map=None)
    old_tokens = disk_run_tokens(directory, "float32")
    changed = micro_model()
    with torch.no_grad():
        for block in changed.layers[1:]:
            block.mlp.experts.down_proj.mul_(-30)
    seekstack.save_pretrained(changed, tmp_path / "changed")
    (tmp_path / "changed" / SINGLE_FILE).replace(directory / SINGLE_FILE)
    expected = disk_run_tokens(directory, "float32", device_map=None)
    assert expected != old_tokens and disk_run_tokens(directory, "float32") == expected


@torch.inference_mode()
def test_a_half_written_disk_copy_is_never_read(model, tmp_path, monkeypatch):
    from seekstack import atomic
    from seekstack.infer import placement

    tokens = torch.randint(5, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    expected = model(tokens).logits
    disk_experts = parse_device_map("*=cpu,layers.*.mlp.experts=disk", list(units(model)))

    @contextlib.contextmanager
    def killed_mid_write(folder):
        with atomic.staged_files(folder) as staged:
            yield staged
            for temporary in staged.hidden.values():
                os.truncate(temporary, temporary.stat().st_size // 2)
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(placement, "staged_files", killed_mid_write)
        with pytest.raises(KeyboardInterrupt):
            place(copy.deepcopy(model), disk_experts, offload_dir=tmp_path)
    assert not list(tmp_path.rglob("*.bin*"))  # nothing left under a name a later run would read
    killed, writing = (tmp_path / "layers.1.mlp.experts" / f".{name}.0123456789abcdef.bin.89abcdef.tmp"
                       for name in ("gate_up_proj", "down_proj"))  # fmt: skip
    killed.parent.mkdir()  # the folder of an earlier, finished write
    killed.write_bytes(b"the part a SIGKILL-ed write left")
    writing.write_bytes(b"another process's write under way")
    with writing.open("rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)  # what its writer holds until it is done
        place(copy.deepcopy(model), disk_experts, offload_dir=tmp_path)
    assert not killed.exists() and writing.exists()  # the next write of the tensor clears a killed one's part only
    for copied in tmp_path.glob("*/*.bin"):  # cut short at their own names (as by a full disk)
        copied.write_bytes(copied.read_bytes()[: copied.stat().st_size // 2])
    placed = place(copy.deepcopy(model), disk_experts, offload_dir=tmp_path)
    torch.testing.assert_close(placed(tokens).logits, expected, rtol=0, atol=0)


@torch.inference_mode()
def test_a_disk_copy_another_process_is_mapping_is_not_deleted_by_a_run_writing_other_values(model, tmp_path):
    disk_experts = parse_device_map("*=cpu,layers.*.mlp.experts=disk", list(units(model)))
    place(copy.deepcopy(model), disk_experts, offload_dir=tmp_path)
    float32_copies = sorted(tmp_path.glob("*/*.bin"))
    mapping = float32_copies[0]
    with mapping.open("rb") as mapper:
        fcntl.flock(mapper, fcntl.LOCK_SH)  # what another run holds on it between finding it and mapping it
        place(copy.deepcopy(model).to(torch.bfloat16), disk_experts, offload_dir=tmp_path)
    assert mapping.exists() and not any(path.exists() for path in float32_copies[1:])
    assert len(list(tmp_path.glob("*/*.bin"))) == len(float32_copies) + 1  # the bfloat16 copies beside it


@torch.inference_mode()
def test_a_disk_copy_is_locked_until_mapped_and_written_again_when_another_process_deleted_it_first(
    model, tmp_path, monkeypatch
):
    from seekstack.infer import placement

    tokens = torch.randint(5, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    disk_experts = parse_device_map("*=cpu,layers.*.mlp.experts=disk", list(units(model)))
    deleted, from_file, write_copy = [], torch.from_file, placement._write_copy

    def deleted_once_written(*args):
        path = write_copy(*args)
        if not deleted:  # another run's `_delete_copies` got there before this one mapped it
            deleted.append(path)
            path.unlink()
        return path

    def mapped_while_locked(name, *args, **kwargs):
        with open(name, "rb") as deleter, pytest.raises(BlockingIOError):
            fcntl.flock(deleter, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as `_delete_copies` of another run tries
        return from_file(name, *args, **kwargs)

    monkeypatch.setattr(placement, "_write_copy", deleted_once_written)
    monkeypatch.setattr(torch, "from_file", mapped_while_locked)
    placed = place(copy.deepcopy(model), disk_experts, offload_dir=tmp_path)
    assert deleted and deleted[0].exists()  # written again
    torch.testing.assert_close(placed(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_a_disk_copy_the_storage_refuses_is_named_with_its_size_and_the_offload_folder(model, tmp_path):
    from seekstack.atomic import WriteRefused
    from tests.test_atomic import file_size_limit

    disk_experts = parse_device_map("*=cpu,layers.*.mlp.experts=disk", list(units(model)))
    experts = model.layers[1].mlp.experts.gate_up_proj
    with pytest.raises(WriteRefused) as refused, file_size_limit(experts.nbytes // 2):
        place(copy.deepcopy(model), disk_experts, offload_dir=tmp_path / "offload")
    copy_path = next(iter((tmp_path / "offload" / "layers.1.mlp.experts").glob("*")), None)
    message = str(refused.value)
    assert copy_path is None and message.startswith(f"{tmp_path / 'offload' / 'layers.1.mlp.experts'}/gate_up_proj.")
    assert f"({experts.nbytes:,} B) was not written (File too large)" in message
    # the commands' --offload-dir was named to Python callers too (the command's words: test_cli)
    assert message.endswith(f"the offload folder {tmp_path / 'offload'} is full or refuses a file this large; free "
                            "room there or choose another folder with offload_dir=")  # fmt: skip


def test_an_offload_folder_that_cannot_be_written_is_refused_naming_offload_dir(model, tmp_path, monkeypatch):
    """It said "choose another with --offload-dir" to Python callers, who pass offload_dir=."""
    disk_experts = parse_device_map("*=cpu,layers.*.mlp.experts=disk", list(units(model)))
    folder = read_only_folder(monkeypatch, tmp_path / "read_only")
    with pytest.raises(OSError) as refused:
        place(copy.deepcopy(model), disk_experts, offload_dir=folder)
    assert str(refused.value) == (
        f"{folder}: the copies of the parts placed on disk go in this offload folder, which cannot be written "
        "(Permission denied); choose another with offload_dir="
    )


def test_the_plan_command_prints_resident_bytes_and_a_device_map_that_parses(model):
    from typer.testing import CliRunner

    from seekstack.cli import app
    from seekstack.cli.common import size

    result = CliRunner().invoke(app, ["plan", "tiny", "--memory", "cpu=1MiB", "--weights", "float32"])
    assert result.exit_code == 0, result.output
    device_map = result.output.splitlines()[-1].removeprefix("--device-map ")
    config = seekstack.preset("tiny")
    expected = plan_placement(config, {"cpu": 2**20}, tensor_bytes_at_width(config, 4.0))
    with torch.device("meta"):
        names = list(units(seekstack.Transformer(config)))
    assert parse_device_map(device_map, names) == expected.placement and "disk" in device_map
    header, *rows, unplaced = result.output.splitlines()[1:-1]  # the rows ended in spaces padding the last column
    assert header == "device      parts  resident                        read per token"
    assert [row.split("  ")[0] for row in rows] == ["cpu", "disk"]
    assert [row for row in [header, *rows] if row != row.rstrip()] == []
    assert unplaced == (
        f"cpu's resident and read per token include {size(expected.unplaced_bytes)} of norms and routers, in no part: "
        "they stay on the CPU whatever the budgets"
    )
    for option, value, message in (
        ("--memory", "cpu=lots", "memory entry 'cpu=lots': size 'lots': expected a number with an optional unit"),
        ("--memory", "cpu=0", "memory entry 'cpu=0': size '0' must be at least one byte"),
        ("--weights", "fp4", "'fp4': choose one of float32, bfloat16, float16, float8, int8, int4"),
    ):  # a value refused is a usage error (exit 2), as every command's; it was "error: ..." with exit 1
        budget = [] if option == "--memory" else ["--memory", "cpu=1GiB"]  # repeated, --memory adds budgets
        bad = CliRunner().invoke(app, ["plan", "nope", *budget, option, value])
        assert (bad.exit_code, bad.stdout) == (2, ""), bad.output
        assert f"Error: Invalid value for '{option}': {message}" in bad.stderr, bad.stderr


def test_the_plan_says_which_of_the_cpus_bytes_are_the_norms_and_routers_no_part_holds(model):
    """The CPU's row counted the norms and routers, which no part holds and which stay on the CPU, among its resident
    bytes and those read per token without saying so: with every part on disk, it held bytes and no part."""
    from typer.testing import CliRunner

    from seekstack.cli import app
    from seekstack.cli.common import size

    config = seekstack.preset("tiny")
    expected = plan_placement(config, {"cpu": 1024}, tensor_bytes_at_width(config, 2.0))
    assert expected.resident_bytes["cpu"] == expected.active_bytes["cpu"] == expected.unplaced_bytes > 0
    lines = CliRunner().invoke(app, ["plan", "tiny", "--memory", "cpu=1KiB"]).stdout.splitlines()
    assert lines[2].split() == ["cpu", "0", *size(expected.unplaced_bytes).split() * 2]
    assert f"include {size(expected.unplaced_bytes)} of norms and routers, in no part: they stay on" in lines[-2]


def test_the_plan_warns_by_how_much_the_norms_and_routers_overrun_a_cpu_budget_too_small_for_them(model):
    from typer.testing import CliRunner

    from seekstack.cli import app
    from seekstack.cli.common import size

    config = seekstack.preset("tiny")
    held = plan_placement(config, {"cpu": 1024}, tensor_bytes_at_width(config, 2.0)).resident_bytes["cpu"]
    result = CliRunner().invoke(app, ["plan", "tiny", "--memory", "cpu=1KiB"])
    assert result.exit_code == 0, result.output
    warning = (
        f"warning: cpu holds {size(held)}, {size(held - 1024)} past its budget of {size(1024)}: the norms and "
        "routers, which stay on the CPU, do not fit in it"
    )
    assert held > 1024 and warning in result.stderr
    assert "warning" not in CliRunner().invoke(app, ["plan", "tiny", "--memory", "cpu=1MiB"]).stderr


@pytest.mark.parametrize("budgets", ["", " , "])
def test_no_budget_at_all_is_refused_rather_than_everything_put_on_disk(model, budgets):
    from typer.testing import CliRunner

    from seekstack.cli import app

    with pytest.raises(ValueError, match=f"memory budgets {budgets!r}: none given; expected device=size entries"):
        device_map_for(model, f"auto:{budgets}")
    result = CliRunner().invoke(app, ["plan", "tiny", "--memory", budgets])  # a usage error (dc7639e)
    assert result.exit_code == 2 and "Invalid value for '--memory'" in result.stderr and "none given" in result.stderr


@pytest.mark.parametrize(
    "stored, weights, bytes_per_param",
    [({"torch_dtype": "float32"}, "float32", 4.0), ({"torch_dtype": "bfloat16"}, "bfloat16", 2.0),
     ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
         "group_0": {"weights": {"num_bits": 4}}, "group_1": {"weights": {"num_bits": 8}}}}}, "int8", 1.0),
     # a transform_config alone (rotations fused into float weights, as compressed-tensors writes them): the floats'
     ({"torch_dtype": "float32", "quantization_config": {"quant_method": "compressed-tensors", "sparsity_config": {},
       "transform_config": {"config_groups": {"u": {"type": "hadamard", "apply": [
           {"targets": ["re:.*down_proj$"], "location": "weight_input"}]}}}}}, "float32", 4.0)],
)  # fmt: skip
def test_a_config_without_weights_is_planned_at_the_width_it_states(tmp_path, stored, weights, bytes_per_param):
    from typer.testing import CliRunner

    from seekstack.cli import app

    config = seekstack.preset("tiny")
    (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(), **stored}))
    result = CliRunner().invoke(app, ["plan", str(tmp_path), "--memory", "cpu=1MiB"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith(f"{tmp_path}, {weights} weights as stored")
    expected = plan_placement(config, {"cpu": 2**20}, tensor_bytes_at_width(config, bytes_per_param))
    assert result.output.splitlines()[-1] == f"--device-map {expected.device_map()}"
    assert f"({expected.resident_bytes['disk']:,} B)" in result.output
    overridden = CliRunner().invoke(app, ["plan", str(tmp_path), "--memory", "cpu=1MiB", "--weights", "int4"])
    assert overridden.output.startswith(f"{tmp_path}, int4 weights (")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_an_fp8_config_without_weights_is_planned_as_loading_deepseeks_release_layout_holds(tmp_path, dtype):
    from typer.testing import CliRunner

    from seekstack.cli import app

    seekstack.save_pretrained(micro_model().to(dtype), tmp_path / "fp8", fp8_block=(16, 16))
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_bytes((tmp_path / "fp8" / "config.json").read_bytes())
    folders = (tmp_path / "fp8", tmp_path / "config_only")
    planned = [CliRunner().invoke(app, ["plan", str(folder), "--memory", "cpu=1GiB"]) for folder in folders]
    assert all(result.exit_code == 0 for result in planned), planned[1].output
    float_dtype = str(dtype).removeprefix("torch.")
    assert f"float8 weights as stored (config.json), {float_dtype} where DeepSeek's" in planned[1].output
    held = [int(re.search(r"^cpu .*\(([\d,]+) B\)", r.output, re.MULTILINE)[1].replace(",", "")) for r in planned]
    loaded = seekstack.load_pretrained(tmp_path / "fp8", dtype=dtype)
    routing_bias = sum(b.nbytes for n, b in loaded.named_buffers() if n.endswith("e_score_correction_bias"))
    assert held[1] == held[0] - routing_bias  # the config alone prices parameters only: the float32 biases are ~0


def test_a_config_with_only_its_shard_index_is_planned_at_the_width_it_states(tmp_path):
    from typer.testing import CliRunner

    from seekstack.cli import app

    config = seekstack.preset("tiny")
    (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(), "torch_dtype": "bfloat16"}))
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    result = CliRunner().invoke(app, ["plan", str(tmp_path), "--memory", "cpu=1MiB"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{tmp_path}, bfloat16 weights as stored (config.json)")
    expected = plan_placement(config, {"cpu": 2**20}, tensor_bytes_at_width(config, 2.0))
    assert result.output.splitlines()[-1] == f"--device-map {expected.device_map()}"


def test_a_checkpoint_whose_index_leaves_out_keys_the_model_needs_is_refused_naming_them(tmp_path):
    """Priced from the headers of the keys its index names, it was planned without them; loading refuses it."""
    from typer.testing import CliRunner

    from seekstack.cli import app

    seekstack.save_pretrained(micro_model(), tmp_path, max_shard_bytes=100_000)  # experts stored per expert
    keys = ("model.layers.0.self_attn.o_proj.weight", "model.layers.2.mlp.experts.1.up_proj.weight")
    with edited_json(tmp_path / INDEX_FILE) as index:  # the shards still hold the keys
        unlisted = ", ".join(f"{key!r} (in {index['weight_map'].pop(key)})" for key in keys)
    result = CliRunner().invoke(app, ["plan", str(tmp_path), "--memory", "cpu=1GiB"])
    assert result.exit_code == 1 and "--device-map" not in result.output
    assert (
        f"{tmp_path / INDEX_FILE}: does not list key {unlisted}, which its shards hold; the index does not match its "
        "shards"
    ) in " ".join(result.output.split())
    assert "--weights float32" in result.output  # the way to plan it anyway


def test_a_clone_without_git_lfs_is_planned_as_its_config_states_with_its_pointers_for_weights(tmp_path):
    from typer.testing import CliRunner

    from seekstack.cli import app

    seekstack.save_pretrained(micro_model(), tmp_path / "fp8", fp8_block=(16, 16), max_shard_bytes=100_000)
    (tmp_path / "clone").mkdir()
    for file in (tmp_path / "fp8").iterdir():  # GIT_LFS_SKIP_SMUDGE=1 git clone: each weight file a pointer
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{'0' * 64}\nsize {file.stat().st_size}\n"
        text = file.suffix == ".json"
        (tmp_path / "clone" / file.name).write_bytes(file.read_bytes() if text else pointer.encode())
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "clone"), "--memory", "cpu=1GiB"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{tmp_path / 'clone'}, float8 weights as stored (config.json)")
    config = seekstack.ModelConfig.from_json(tmp_path / "fp8" / "config.json")
    expected = plan_placement(config, {"cpu": 2**30}, tensor_bytes_at_width(config, 4.0, (16, 16)))
    assert f"({expected.resident_bytes['cpu']:,} B)" in result.output


INT4_TILEABLE = dict(hidden_size=64, moe_intermediate_size=32, intermediate_size=128, kv_lora_rank=24)


def checkpoint_in(directory, scheme: str) -> seekstack.Transformer:
    """The micro model saved under `directory` as `scheme` (float32, or quantized as `seekstack quantize` does:
    embedding, head, norms, routers, kv_b_proj left in float32), and loaded back as generate/serve load it."""
    model = micro_model(**INT4_TILEABLE)
    if scheme != "float32":
        quantize_model(model, QuantConfig(scheme=scheme))
    seekstack.save_pretrained(model, directory)
    return seekstack.load_pretrained(directory)


@pytest.mark.parametrize("scheme", ["float32", "int8", "int4", "fp8"])
def test_the_plan_of_a_checkpoint_holds_what_loading_it_holds(tmp_path, scheme):
    from typer.testing import CliRunner

    from seekstack.cli import app

    loaded = checkpoint_in(tmp_path, scheme)
    result = CliRunner().invoke(app, ["plan", str(tmp_path), "--memory", "cpu=1GiB"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{tmp_path}, weights as stored in its safetensors files")
    plan = plan_placement(read_config(tmp_path), {"cpu": 2**30}, stored_tensor_bytes(tmp_path))
    assert f"({plan.resident_bytes['cpu']:,} B)" in result.output
    # The loaded model holds the files' tensors and the rotary frequencies it computes: nothing else, nothing less.
    assert plan.resident_bytes["cpu"] == sum(model_tensor_bytes(loaded).values()) - loaded.rotary.inv_freq.nbytes
    copies = ("model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight")  # MTP's; unread
    stored = read_safetensors(tmp_path / SINGLE_FILE)
    file_bytes = sum(tensor.nbytes for key, tensor in stored.items() if key not in copies and "_shape" not in key)
    # int4's scales are held with a zero point each (the kernel's table): at 32 columns a group, 1/9 more.
    assert file_bytes <= plan.resident_bytes["cpu"] <= file_bytes * 1.12


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_an_auto_device_map_of_a_quantized_model_fills_its_budget_and_no_more(tmp_path, scheme):
    loaded = checkpoint_in(tmp_path, scheme)
    held = {name: sum(t.nbytes for t in [*part.parameters(), *part.buffers()]) for name, part in units(loaded).items()}
    budget = sum(held.values()) // 2
    placement = device_map_for(loaded, f"auto:cuda:0={budget},cpu=1GiB")
    room_left = budget - sum(held[name] for name, device in placement.items() if device == "cuda:0")
    # Within the budget, and every part the GPU did not get would have overfilled it.
    assert 0 <= room_left < min(held[name] for name, device in placement.items() if device != "cuda:0")


def test_the_plan_of_a_checkpoint_quantized_in_an_unknown_way_asks_for_the_width(tmp_path):
    from typer.testing import CliRunner

    from seekstack.cli import app

    quantization = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(
        json.dumps({**seekstack.preset("tiny").to_dict(), "quantization_config": quantization})
    )
    result = CliRunner().invoke(app, ["plan", str(tmp_path), "--memory", "cpu=1MiB"])
    assert result.exit_code == 1
    assert f"{tmp_path / 'config.json'}: quantization_config" in result.output and "--weights" in result.output


def test_the_plan_of_a_float_quantized_config_alone_prices_the_float_weights_loading_holds(tmp_path):
    """compressed-tensors' float-quantized fp8 (num_bits 8, type float) was priced as int8, a byte a weight, where
    loading dequantizes those layers to the float dtype config.json states."""
    from typer.testing import CliRunner

    from seekstack.cli import app

    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
    quantization = {"quant_method": "compressed-tensors", "format": "float-quantized",
                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}  # fmt: skip
    config = {**seekstack.preset("tiny").to_dict(), "torch_dtype": "bfloat16", "quantization_config": quantization}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["plan", str(tmp_path), "--memory", "cpu=1GiB"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{tmp_path}, bfloat16 weights")
    expected = plan_placement(read_config(tmp_path), {"cpu": 2**30}, tensor_bytes_at_width(read_config(tmp_path), 2.0))
    assert f"({expected.resident_bytes['cpu']:,} B)" in result.output


def test_a_device_given_two_budgets_is_refused_naming_it():
    from typer.testing import CliRunner

    from seekstack.cli import app

    result = CliRunner().invoke(app, ["plan", "tiny", "--memory", "cpu=1MiB, cuda:0=1GiB,cpu=100GiB"])
    assert result.exit_code == 2 and "cpu named twice" in result.output and "--device-map" not in result.output
    assert "Invalid value for '--memory'" in result.output  # a usage error naming the option (dc7639e)
    with pytest.raises(ValueError, match="'cpu=2GiB': cpu named twice"):
        parse_budgets("cpu=1MiB,cpu=2GiB")  # --device-map auto:... in generate, chat and serve too


@pytest.mark.parametrize(
    "memory, message",
    [("gpu=1MiB", "'gpu=1MiB': 'gpu' is not cpu, disk, cuda:N or a GPU number N"),
     ("meta=1GiB", "'meta' is not cpu, disk, cuda:N or a GPU number N"),
     ("mps=1GiB", "'mps' is not cpu, disk, cuda:N or a GPU number N"),
     ("CPU=10GiB,cpu=1GiB", "'cpu=1GiB': cpu named twice \\(also in 'CPU=10GiB'\\)"),
     ("cuda=10GiB,cuda:0=10GiB", "'cuda:0=10GiB': cuda:0 named twice \\(also in 'cuda=10GiB'\\)"),
     ("cuda:0=infGiB", "'cuda:0=infGiB': size 'infGiB' is not a finite number of bytes"),
     ("cpu=nanGiB", "'cpu=nanGiB': size 'nanGiB' is not a finite number of bytes"),
     ("cpu=1e400", "size '1e400' is not a finite"), ("cpu=0.5", "size '0.5' must be at least one byte"),
     ("cuda:0", "'cuda:0': expected device=size, e.g. cuda:0=80GiB$"), ("cpu=", "'cpu=': expected device=size, e.g. "
     "cuda:0=80GiB$")],
)  # fmt: skip
def test_budgets_name_a_device_that_is_not_one_or_a_size_that_is_not_finite(memory, message):
    with pytest.raises(ValueError, match=message):
        parse_budgets(memory)


@pytest.mark.parametrize("memory, disk", [("cpu=1GiB,disk=1TB", "disk=1TB"), ("Disk=1TB,0=1GiB", "Disk=1TB"),
                                          ("cpu=1GiB,disk", "disk")])  # fmt: skip
def test_a_disk_budget_is_refused_saying_the_disk_takes_what_fits_nowhere_else(memory, disk):
    """accelerate's max_memory takes a "disk" entry; given one, budgets were refused as "expected device=size, e.g.
    cuda:0=80GiB (disk needs no size)", for an entry written as device=size, or a disk given no size."""
    with pytest.raises(ValueError, match=f"^memory entry '{disk}': disk takes no budget: the parts that fit in none "
                       "of the others go to disk; leave it out$"):  # fmt: skip
        parse_budgets(memory)


def test_the_gpus_are_filled_before_the_cpu_in_whatever_order_the_budgets_are_given():
    config = seekstack.preset("deepseek-v2-lite")
    gpu_first, cpu_first = (
        plan_placement(config, parse_budgets(memory), tensor_bytes_at_width(config, 2.0))
        for memory in ("cuda:1=10GiB,cuda:0=10GiB,cpu=20GiB", "cpu=20GiB,cuda:1=10GiB,cuda:0=10GiB")
    )
    assert cpu_first == gpu_first  # as accelerate's max_memory: the CPU is never taken before a GPU
    assert all(gpu_first.placement[f"layers.{i}.self_attn"] == "cuda:1" for i in range(config.num_hidden_layers))
    assert gpu_first.placement["layers.26.mlp.experts"] == "cpu"


def test_budget_and_map_devices_are_written_one_way():
    assert parse_budgets(" CPU=1GiB, Cuda=2GiB,cuda:1=3GiB") == {"cpu": 2**30, "cuda:0": 2 * 2**30, "cuda:1": 3 * 2**30}
    names = ["embed_tokens", "norm", "lm_head"]
    assert parse_device_map("*=CPU,norm=Disk,lm_head=cuda", names) == {
        "embed_tokens": "cpu", "norm": "disk", "lm_head": "cuda:0",
    }  # fmt: skip
    with pytest.raises(ValueError, match="'lm_head=meta': 'meta' is not cpu, disk, cuda:N or a GPU number N"):
        parse_device_map("*=cpu,lm_head=meta", names)


def test_a_bare_gpu_number_names_that_cuda_device_as_accelerate_takes_it():
    """accelerate's max_memory={0: "10GiB", "cpu": "20GiB"} and device_map={"": 0} name GPUs by number."""
    assert parse_budgets("0=10GiB,cpu=20GiB,1=5GiB") == {"cuda:0": 10 * 2**30, "cuda:1": 5 * 2**30, "cpu": 20 * 2**30}
    with pytest.raises(ValueError, match="'cuda:0=1GiB': cuda:0 named twice \\(also in '0=2GiB'\\)"):
        parse_budgets("0=2GiB,cuda:0=1GiB")
    names = ["embed_tokens", "norm", "lm_head"]
    assert parse_device_map("*=cpu,lm_head=1", names)["lm_head"] == "cuda:1"
    assert map_devices("auto:0=10GiB,cpu=1GiB") == ["cpu", "cuda:0"]  # what auto dtype and the reach check see
    assert map_devices("*=cpu,lm_head=1") == ["cpu", "cuda:1"]
    with pytest.raises(ValueError, match="'-1' is not cpu, disk, cuda:N or a GPU number N"):
        parse_budgets("-1=1GiB")


def test_a_device_alone_places_the_whole_model_and_accelerates_auto_is_refused_asking_for_budgets(tmp_path):
    """transformers' device_map="cpu" (or "cuda:0", 0) puts the whole model there, and accelerate's device_map="auto"
    plans from free memory; here both were refused as "device map entry 'auto': '' is not cpu, disk, cuda:N or a GPU
    number N", which names no way on."""
    names = ["embed_tokens", "norm", "lm_head"]
    assert parse_device_map("cpu", names) == dict.fromkeys(names, "cpu")
    assert parse_device_map("0,lm_head=cpu", names) == {"embed_tokens": "cuda:0", "norm": "cuda:0", "lm_head": "cpu"}
    assert map_devices("Cuda") == ["cuda:0"]
    for strategy in ("auto", "balanced"):
        with pytest.raises(ValueError, match=rf"^device map '{strategy}': seekstack plans within the budgets you give"
                                             r".*auto:cuda:0=70GiB,cpu=100GiB"):  # fmt: skip
            map_devices(strategy)
    with pytest.raises(ConfigError, match=r"device map entry 'layers.0': expected pattern=device.*or a device alone"):
        EngineOptions(device_map="layers.0").validate()
    model_dir(tmp_path)
    engine = Engine.from_pretrained(tmp_path, device_map="cpu")
    assert set(engine.model.placement.values()) == {"cpu"}


def test_accelerates_dict_of_transformers_module_names_places_the_parts_it_names(tmp_path, model):
    """accelerate's device_map is a dict, {"": 0} or {"model.layers.3": "cpu", ...}, keyed by transformers' module
    names; Engine.from_pretrained raised AttributeError: 'dict' object has no attribute 'startswith'."""
    hf_names = {"": "cpu", "model.layers": "disk", "model.layers.1.mlp.experts": 0, "model.norm": "disk"}
    placement = parse_device_map(device_map_text(hf_names), list(units(model)))
    assert [name for name, device in placement.items() if device == "cuda:0"] == ["layers.1.mlp.experts"]
    assert placement["layers.0.self_attn"] == placement["layers.2.mlp.experts"] == placement["norm"] == "disk"
    assert placement["embed_tokens"] == placement["mtp.0"] == placement["lm_head"] == "cpu"
    with pytest.raises(TypeError, match=r"^device_map \['cpu'\]: give pattern=device text, a device"):
        device_map_text(["cpu"])
    model_dir(tmp_path)
    engine = Engine.from_pretrained(tmp_path, device_map={"": "cpu", "model.layers.2.mlp.experts": "disk"})
    assert [name for name, device in engine.model.placement.items() if device != "cpu"] == ["layers.2.mlp.experts"]


def test_accelerates_model_key_places_every_part_of_transformers_base_model_but_the_head(tmp_path, model):
    """transformers' DeepseekV3ForCausalLM holds "model" (the base model) and "lm_head", so accelerate's device_map
    {"model": 0, "lm_head": "cpu"} places it whole; here "model" read as a part of that name, matching none."""
    placement = parse_device_map(device_map_text({"model": 0, "lm_head": "cpu"}), list(units(model)))
    assert [name for name, device in placement.items() if device == "cpu"] == ["lm_head"]
    assert set(placement.values()) == {"cuda:0", "cpu"} and placement["mtp.0"] == "cuda:0"
    with pytest.raises(ValueError, match=r"^the device map places no device for lm_head: add an entry for each"):
        parse_device_map(device_map_text({"model": "cpu"}), list(units(model)))  # as accelerate, the head unplaced
    model_dir(tmp_path)
    engine = Engine.from_pretrained(tmp_path, device_map={"lm_head": "disk", "model": "cpu"})
    assert [name for name, device in engine.model.placement.items() if device != "cpu"] == ["lm_head"]


def test_a_device_map_transformers_wrote_places_the_model_its_rotary_module_placing_nothing(tmp_path):
    """transformers' model.hf_device_map (accelerate's infer_auto_device_map) places model.rotary_emb, a module of no
    weights, beside the layers; here that entry was refused ("'model.rotary_emb=cpu' matches no part of the model")."""
    hf_device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    hf_device_map |= {"model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model_dir(tmp_path)
    engine = Engine.from_pretrained(tmp_path, device_map=hf_device_map)
    on_disk = [name for name, device in engine.model.placement.items() if device == "disk"]
    assert on_disk == ["layers.1.self_attn", "layers.1.mlp.shared_experts", "layers.1.mlp.experts"]
    with pytest.raises(ValueError, match=r"^device map entry 'rotary=cpu' matches no part"):
        parse_device_map("*=cpu,rotary=cpu", ["embed_tokens", "lm_head"])  # only transformers' name is read so


def test_transformers_names_torch_dtype_and_offload_folder_are_dtype_and_offload_dir(tmp_path):
    """transformers' from_pretrained(torch_dtype=torch.bfloat16, device_map=..., offload_folder="offload") was a
    TypeError here ("Engine.__init__() got an unexpected keyword argument 'torch_dtype'")."""
    model_dir(tmp_path / "model")
    experts_on_disk = {"": "cpu", "model.layers.1.mlp.experts": "disk"}
    engine = Engine.from_pretrained(
        tmp_path / "model", torch_dtype=torch.bfloat16, device_map=experts_on_disk, offload_folder=tmp_path / "copies"
    )
    assert engine.model.embed_tokens.weight.dtype == torch.bfloat16
    assert any((tmp_path / "copies").iterdir()) and not (tmp_path / "model" / "offload").exists()
    with pytest.raises(ValueError, match=r"^torch_dtype=torch.bfloat16 beside dtype=torch.float16: it is trans"):
        Engine.from_pretrained(tmp_path / "model", torch_dtype=torch.bfloat16, dtype=torch.float16)


@pytest.mark.parametrize(
    ("given", "loaded"),
    [
        ({"torch_dtype": "bfloat16", "dtype": torch.bfloat16}, torch.bfloat16),
        ({"torch_dtype": "auto", "dtype": torch.bfloat16}, torch.bfloat16),
        ({"torch_dtype": torch.bfloat16, "dtype": "auto"}, torch.bfloat16),
        ({"dtype": torch.float32, "torch_dtype": torch.float16}, "they load float16 and float32"),
        ({"torch_dtype": "auto", "dtype": torch.float32}, "they load bfloat16 and float32"),
    ],
)
def test_torch_dtype_beside_dtype_is_compared_as_the_dtype_each_loads(tmp_path, given, loaded):
    """torch_dtype="bfloat16" beside dtype=torch.bfloat16 was refused as unequal (a name against a dtype), and
    torch_dtype="auto" beside any dtype; dtype=torch.float32 given read as not given, so torch_dtype=torch.float16
    beside it loaded float16, unsaid. Both go to load_pretrained, which compares the dtypes they resolve to."""
    seekstack.save_pretrained(micro_model().bfloat16(), tmp_path)  # its config states bfloat16: what "auto" loads
    tiny_tokenizer(tmp_path)
    if isinstance(loaded, str):
        with pytest.raises(ValueError, match=rf"^torch_dtype=.* beside dtype=.*: it is transformers' name .*{loaded}"):
            Engine.from_pretrained(tmp_path, **given)
    else:
        assert Engine.from_pretrained(tmp_path, **given).model.embed_tokens.weight.dtype == loaded


def test_a_torch_device_places_the_whole_model_as_transformers_device_map_takes_one(tmp_path):
    """transformers' from_pretrained(device_map=torch.device("cuda:1")) places the whole model there; here it was a
    TypeError ("give pattern=device text, a device (cpu, cuda:0, 0) or a dict of them")."""
    assert device_map_text(torch.device("cuda", 1)) == "cuda:1"
    assert map_devices(device_map_text(torch.device("cuda"))) == ["cuda:0"]
    assert device_map_text({"": torch.device("cpu"), "lm_head": torch.device("cuda:2")}) == "=cpu,lm_head=cuda:2"
    model_dir(tmp_path)
    engine = Engine.from_pretrained(tmp_path, device_map=torch.device("cpu"))
    assert set(engine.model.placement.values()) == {"cpu"} and "lm_head" in engine.model.placement


def test_accelerates_auto_with_max_memory_plans_within_those_budgets(tmp_path):
    """transformers' from_pretrained(device_map="auto", max_memory={0: "10GiB", "cpu": "30GiB"}) places the model
    within those budgets; here max_memory was no argument and "auto" was refused asking for budgets it had given."""
    assert device_map_text("auto", {0: "10GiB", "cpu": 30_000}) == "auto:0=10GiB,cpu=30000"
    assert map_devices(device_map_text("sequential", {"cuda:1": "1GB", "cpu": "2GB"})) == ["cpu", "cuda:1"]
    with pytest.raises(ValueError, match=r"^max_memory is given with device_map='cpu': it holds the budgets of"):
        device_map_text("cpu", {"cpu": "1GiB"})
    model_dir(tmp_path)
    whole = Engine.from_pretrained(tmp_path, device_map="auto", max_memory={"cpu": "1GiB"})
    assert set(whole.model.placement.values()) == {"cpu"}
    tight = Engine.from_pretrained(tmp_path, device_map="auto", max_memory={"cpu": 100_000})
    assert set(tight.model.placement.values()) == {"cpu", "disk"}  # what fits nowhere goes to disk, as accelerate's
    greedy = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    assert tight.generate([[5, 6]], greedy)[0].token_ids == whole.generate([[5, 6]], greedy)[0].token_ids
    with pytest.raises(ValueError, match=r"^max_memory is given with device_map=None: it holds the budgets of"):
        Engine.from_pretrained(tmp_path, max_memory={"cpu": "1GiB"})


def test_the_note_of_an_auto_plan_names_the_parts_it_put_on_disk_for_any_caller_of_the_engine(tmp_path):
    """Only `seekstack generate` and chat said which parts an `auto:` plan put on disk (a private function of
    cli/generate.py): disk_parts_note says it for any command holding an engine (serve too), of its placed model."""
    model_dir(tmp_path)
    options = EngineOptions(device_map="auto:cpu=100000", kv_cache_memory="1MiB", offload_dir=str(tmp_path / "copies"))
    tight = Engine.from_pretrained(tmp_path, **options.engine_kwargs())
    on_disk = {part: device for part, device in tight.model.placement.items() if device == "disk"}
    assert disk_parts_note(options.device_map, tight.model) == (
        f"note: --device-map auto:cpu=100000 puts {len(on_disk)} part(s) on disk, which fit in none of its budgets: "
        f"{format_device_map(on_disk)}; they are read from disk as each step runs them (raise a budget to hold them "
        "in memory)"
    )
    assert disk_parts_note("*=cpu,layers.*.mlp.experts=disk", tight.model) is None  # disk as the map itself asks
    whole = Engine.from_pretrained(tmp_path, device_map="auto:cpu=1GiB", kv_cache_memory=1 << 20)
    assert disk_parts_note("auto:cpu=1GiB", whole.model) is None
    assert disk_parts_note(None, Engine.from_pretrained(tmp_path, kv_cache_memory=1 << 20).model) is None


def test_from_pretrained_with_accelerates_auto_and_no_max_memory_is_told_to_give_max_memory(tmp_path):
    """from_pretrained(device_map="auto") without max_memory was refused in the words of --device-map's text, to write
    "auto:cuda:0=70GiB,cpu=100GiB", where the caller's way on is the max_memory= keyword from_pretrained takes."""
    model_dir(tmp_path)
    for strategy in ("auto", "balanced", "sequential"):
        with pytest.raises(ValueError) as refused:
            Engine.from_pretrained(tmp_path, device_map=strategy)
        assert str(refused.value) == (
            f"device_map={strategy!r} without max_memory: seekstack plans within the budgets you give, not from free "
            "memory as accelerate's: give device_map='auto' with max_memory={0: '70GiB', 'cpu': '100GiB'} (`seekstack "
            "plan` shows the placement), or the device of each part ({'': 'cpu', 'lm_head': 'disk'})"
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a GPU this machine lacks")
def test_an_engine_mapped_to_a_gpu_number_without_cuda_is_refused_naming_the_gpu(tmp_path):
    model_dir(tmp_path)
    with pytest.raises(ValueError, match="puts parts on cuda:0, which this torch cannot reach"):
        Engine.from_pretrained(tmp_path, device_map="auto:0=10GiB,cpu=1GiB")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_engine_mapped_to_gpu_number_0_runs_its_parts_there(tmp_path):
    model_dir(tmp_path)
    engine = Engine.from_pretrained(tmp_path, device_map="*=0,embed_tokens=cpu,norm=cpu,lm_head=cpu")
    assert engine.model.layers[0].self_attn.kv_a_layernorm.weight.device == torch.device("cuda:0")


def test_a_size_that_is_not_finite_is_refused_naming_it():
    with pytest.raises(ValueError, match="size 'nanGiB' is not a finite number of bytes"):
        parse_bytes("nanGiB")
    with pytest.raises(ConfigError, match="kv_cache_memory.*'inf' is not a finite number"):
        EngineOptions(kv_cache_memory="inf").validate()
    assert parse_bytes("1.5KiB") == 1536


def test_a_budget_in_tebibytes_is_read_as_every_other_binary_unit_is():
    assert parse_bytes("1TiB") == 2**40 and parse_bytes("0.5tib") == 2**39
    assert parse_budgets("cpu=1TiB,cuda:0=141GiB") == {"cuda:0": 141 * 2**30, "cpu": 2**40}


def test_disk_parts_already_memory_mapped_from_the_checkpoint_are_used_in_place(tmp_path):
    directory = tmp_path / "model"
    seekstack.save_pretrained(micro_model(), directory, stacked_experts=True)
    tiny_tokenizer(directory)
    prompt = torch.randint(5, 512, (7,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    expected = Engine.from_pretrained(directory).generate([prompt], params)[0].token_ids
    options = EngineOptions(
        device_map="*=cpu,layers.*.mlp.experts=disk,embed_tokens=disk",
        kv_cache_memory="1MiB",
        dtype="float32",  # the checkpoint's: its disk parts map in place
    )
    engine = Engine.from_pretrained(directory, **options.engine_kwargs())
    experts = engine.model.layers[1].mlp.experts
    assert mapped_file(experts.gate_up_proj) == mapped_file(engine.model.embed_tokens.weight) == directory / SINGLE_FILE
    assert not (directory / "offload").exists()  # nothing copied out
    assert engine.generate([prompt], params)[0].token_ids == expected


EXPERT_HEAVY = dict(hidden_size=128, moe_intermediate_size=256, n_routed_experts=64)  # float32 experts: 75 of 82 MB
PEAK_ANON_LOAD = """
import sys, threading, torch
from seekstack.infer import Engine

def anonymous_bytes():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["RssAnon"].split()[0]) * 1024

directory, tokenizer, logits_path = sys.argv[1:]
before, peak, done = anonymous_bytes(), [0], threading.Event()
def sample():
    while not done.wait(0.001):
        peak[0] = max(peak[0], anonymous_bytes())
sampler = threading.Thread(target=sample)
sampler.start()
try:
    engine = Engine.from_pretrained(directory, tokenizer=tokenizer, device_map="*=disk", kv_cache_memory=2**20)
finally:
    done.set()
    sampler.join()
with torch.inference_mode():
    torch.save(engine.model(torch.arange(5, 16)[None]).logits, logits_path)
print(max(peak[0], anonymous_bytes()) - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssAnon (Linux)")
@pytest.mark.parametrize(
    "overrides, fp8_block",
    [(EXPERT_HEAVY, None), ({**EXPERT_HEAVY, "moe_intermediate_size": 1024, "n_routed_experts": 128}, (128, 128))],
    ids=["float32", "fp8 (DeepSeek-V3's release: e4m3 codes and block scales per expert)"],
)
def test_disk_parts_are_written_to_their_copies_as_the_checkpoint_is_read_never_whole_in_memory(
    tmp_path, overrides, fp8_block
):
    import subprocess
    import sys

    # Routed experts per expert, as the releases store them.
    seekstack.save_pretrained(micro_model(**overrides), tmp_path / "model", fp8_block=fp8_block)
    tiny_tokenizer(tmp_path / "tokenizer")
    experts = sum(size for key, size in stored_tensor_bytes(tmp_path / "model").items() if ".experts." in key)
    arguments = [str(tmp_path / name) for name in ("model", "tokenizer", "logits.pt")]
    loaded = subprocess.run(
        [sys.executable, "-c", PEAK_ANON_LOAD, *arguments],
        capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    peak_rise = int(loaded.stdout.split()[-1])
    # Anonymous memory grew by the engine's own (~11 MB) and an expert's tensors at a time, not by the experts'.
    assert peak_rise < experts / 4, (peak_rise, experts)
    copies = tmp_path / "model" / "offload" / "layers.1.mlp.experts"
    written = {copy: copy.stat().st_mtime_ns for copy in copies.iterdir()}
    offload = offload_while_loading("*=disk", tmp_path / "model" / "offload")
    # On the subprocess's one thread: a second thread splits the matmuls' sums otherwise (last bits differ).
    with torch.inference_mode(), running_on(1):
        expected = seekstack.load_pretrained(tmp_path / "model").eval()(torch.arange(5, 16)[None]).logits
        reloaded = seekstack.load_pretrained(tmp_path / "model", offload=offload).layers[1].mlp.experts
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=0)
    # Each stacked tensor (fp8: codes and scales) is mapped from its copy, which a second load reuses as it is.
    assert {mapped_file(tensor) for tensor in [*reloaded.parameters(), *reloaded.buffers()]} == set(written)
    assert {copy: copy.stat().st_mtime_ns for copy in copies.iterdir()} == written


def counted_reads(monkeypatch) -> collections.Counter:
    """How many times each checkpoint key is read from here on (CheckpointReader.read counted)."""
    from seekstack.checkpoint import CheckpointReader

    reads, read = collections.Counter(), CheckpointReader.read

    def counted(reader, key, *args, **kwargs):
        reads[key] += 1
        return read(reader, key, *args, **kwargs)

    monkeypatch.setattr(CheckpointReader, "read", counted)
    return reads


def test_a_tensor_of_a_part_placed_on_disk_is_read_from_the_checkpoint_once_per_load(tmp_path, monkeypatch):
    seekstack.save_pretrained(micro_model(), tmp_path / "model")
    reads = counted_reads(monkeypatch)
    offload = offload_while_loading("*=cpu,layers.*.mlp.experts=disk", tmp_path / "offload")
    expert = "model.layers.1.mlp.experts.0.gate_proj.weight"  # converted (to bfloat16) and stacked on the way
    loaded = seekstack.load_pretrained(tmp_path / "model", dtype=torch.bfloat16, offload=offload)
    assert reads[expert] == 1  # hashed as it is written, not read once for the digest and again to write
    written = {copy: copy.stat().st_mtime_ns for copy in (tmp_path / "offload").rglob("*.bin")}
    reused = seekstack.load_pretrained(tmp_path / "model", dtype=torch.bfloat16, offload=offload)
    assert reads[expert] == 2  # once for the digest naming the copy to reuse
    assert {copy: copy.stat().st_mtime_ns for copy in (tmp_path / "offload").rglob("*.bin")} == written
    in_memory = seekstack.load_pretrained(tmp_path / "model", dtype=torch.bfloat16).layers[1].mlp.experts
    for experts in (loaded.layers[1].mlp.experts, reused.layers[1].mlp.experts):
        assert mapped_file(experts.gate_up_proj) in written
        assert torch.equal(experts.gate_up_proj, in_memory.gate_up_proj)


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4"])
def test_a_quantized_expert_stored_per_expert_is_read_once_per_load_into_memory_or_into_its_disk_copy(
    tmp_path, monkeypatch, scheme
):
    model = micro_model(**INT4_TILEABLE)
    if scheme != "fp8":
        quantize_model(model, QuantConfig(scheme=scheme))
    fp8_block = (32, 32) if scheme == "fp8" else None
    seekstack.save_pretrained(model, tmp_path / "model", fp8_block=fp8_block, stacked_experts=False)
    reads = counted_reads(monkeypatch)
    offload = offload_while_loading("*=disk", tmp_path / "offload")
    loaded = {}
    for where, options in {"memory": {}, "disk": {"offload": offload}}.items():
        reads.clear()
        loaded[where] = seekstack.load_pretrained(tmp_path / "model", **options).layers[1].mlp.experts
        per_expert = {key: count for key, count in reads.items() if ".mlp.experts." in key}
        layers = {key.rpartition(".")[0] for key in per_expert}
        assert {"model.layers.1.mlp.experts.0.down_proj", "model.layers.1.mlp.experts.3.up_proj"} <= layers
        assert set(per_expert.values()) == {1}, (where, per_expert)  # each stored tensor built into its stack once
    for (name, on_disk), in_memory in zip(loaded["disk"].named_buffers(), loaded["memory"].buffers(), strict=True):
        assert mapped_file(on_disk) is not None and torch.equal(on_disk, in_memory), name


def test_an_adapter_merged_into_parts_placed_on_disk_gives_the_tokens_of_the_merged_model(tmp_path):
    from tests.adapters.support import write_base, write_random_adapter

    base = write_base(tmp_path / "base", with_tokenizer=True)
    adapter = write_random_adapter(base, tmp_path / "adapter", seed=1)
    prompt = torch.randint(5, 512, (7,), generator=torch.Generator().manual_seed(4)).tolist()
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)

    def tokens(adapter, device_map=None):
        engine = Engine.from_pretrained(base, adapter=adapter, device_map=device_map, kv_cache_memory=2**20)
        return engine.generate([prompt], params)[0].token_ids, engine.model

    merged, _ = tokens(adapter)
    placed, model = tokens(adapter, "*=cpu,layers.*.mlp.experts=disk")
    assert placed == merged != tokens(None)[0]
    experts = model.layers[1].mlp.experts.gate_up_proj  # adapted (lora.experts): its copy holds the merged values
    copied = mapped_file(experts)
    assert copied is not None and copied.parent == base / "offload" / "layers.1.mlp.experts"
    assert torch.equal(torch.from_file(str(copied), size=experts.numel()).view_as(experts), experts)
    stored = read_safetensors(base / SINGLE_FILE)
    on_disk, model = tokens(adapter, "*=disk")
    assert on_disk == merged
    for name, tensor in model.named_parameters():  # an adapted weight the checkpoint's pages held is copied merged
        key = checkpoint_key(name, model.config.num_hidden_layers)
        source = mapped_file(tensor)
        assert source is not None and (source.name != SINGLE_FILE or torch.equal(stored[key], tensor)), name


def test_a_copy_whose_pieces_do_not_fill_its_tensor_is_refused_naming_both_sizes_not_rewritten_for_ever(tmp_path):
    """Experts stored unlike one another (int4 group sizes) can give a stack fewer bytes than it holds: the copy would
    never be whole, and `_mapped_copy` wrote it again and again."""
    from seekstack.infer.placement import _mapped_copy

    stack = torch.empty(2, 4, 8)
    pieces = lambda: [torch.ones(4, 8), torch.ones(2, 8)]  # noqa: E731 - the second expert stored at half the rows
    with pytest.raises(ValueError, match=r"experts: its parts in the checkpoint hold 192 B, where the \(2, 4, 8\)"):
        _mapped_copy(stack, pieces, tmp_path / "offload", "experts")
    assert not (tmp_path / "offload").exists()  # no copy, no temporary, nor the folder the failed write made


@pytest.mark.parametrize("keyword", ["offload_folder", "offload_dir"])
def test_an_unwritable_offload_folder_is_refused_naming_the_keyword_from_pretrained_was_given(
    keyword, tmp_path, monkeypatch
):
    """transformers' offload_folder= (read as offload_dir=) was refused "...; choose another with offload_dir=", a
    keyword the caller never wrote."""
    model_dir(tmp_path / "model")
    folder = read_only_folder(monkeypatch, tmp_path / "read_only")
    experts_on_disk = {"": "cpu", "model.layers.1.mlp.experts": "disk"}
    with pytest.raises(OSError) as refused:
        Engine.from_pretrained(tmp_path / "model", device_map=experts_on_disk, **{keyword: folder})
    assert str(refused.value) == (
        f"{folder}: the copies of the parts placed on disk go in this offload folder, which cannot be written "
        f"(Permission denied); choose another with {keyword}="
    )
    assert isinstance(refused.value.__cause__, PermissionError)


@pytest.mark.parametrize("keyword", ["offload_folder", "offload_dir"])
def test_an_offload_folder_without_a_device_map_is_refused_naming_the_keyword(keyword, tmp_path):
    """Engine.from_pretrained(offload_folder=...) without device_map= was taken and the folder left unused, silently,
    where EngineOptions and --offload-dir refuse an offload folder without a device map (as from_pretrained refuses
    max_memory without one)."""
    model_dir(tmp_path / "model")
    with pytest.raises(ValueError) as refused:
        Engine.from_pretrained(tmp_path / "model", **{keyword: tmp_path / "copies"})
    assert str(refused.value) == (
        f"{keyword} is given without device_map: it holds the copies of parts placed on disk; give device_map= "
        "placing some on disk ({'': 'cpu', 'lm_head': 'disk'}) or leave it out"
    )
    assert not (tmp_path / "copies").exists()


def test_a_device_beside_a_device_map_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    """Engine.from_pretrained(dir, device_map=..., device=...) read every weight before Engine.__init__ refused the
    device, where load_pretrained refuses it first: both check the placement asked for with placement_asked. The CPU
    however Engine(model, tokenizer, device=) takes it ("CPU", " cpu") is taken beside a map (it was refused as "no
    device torch knows")."""
    model_dir(tmp_path / "model")
    reads = counted_reads(monkeypatch)
    with pytest.raises(ValueError) as refused:
        Engine.from_pretrained(tmp_path / "model", device_map={"": "cpu"}, device="auto")
    assert str(refused.value) == (
        "device='auto' beside device_map={'': 'cpu'}: the device map places every part; give one of them"
    )
    with pytest.raises(ValueError, match=r"^device='meta': give cpu, cuda, cuda:N or auto$"):
        Engine.from_pretrained(tmp_path / "model", device_map={"": "cpu"}, device="meta")
    assert sum(reads.values()) == 0
    for device in ("CPU", " cpu"):
        engine = Engine.from_pretrained(tmp_path / "model", device_map={"": "cpu"}, device=device)
        assert engine.device == torch.device("cpu") and engine.model.embed_tokens.weight.device.type == "cpu"


def test_an_engine_runs_on_auto_as_the_cli_does_and_a_device_it_cannot_use_is_refused_before_any_weight_is_read(
    tmp_path, monkeypatch, tokenizer
):
    """Engine(model, tokenizer, device="auto") and from_pretrained(device="auto") raised torch's bare "Expected one of
    cpu, cuda, ... device type at start of device string: auto"; from_pretrained(device=0) read every weight onto the
    CPU (`or "cpu"` took 0 for none) before torch's RuntimeError moving them, and device="cpu:0" beside a device map
    was refused after they were read (the engine compared "cpu" as text). auto is `--device auto`'s (cuda:0 where
    torch reaches a GPU, else cpu), cpu:0 is the CPU, and a name torch knows no device by or cannot reach is refused
    naming device= before any weight is read."""
    model_dir(tmp_path / "model")
    auto = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert Engine(micro_model(), tokenizer, device="auto").device == auto
    assert Engine.from_pretrained(tmp_path / "model", device="auto").device == auto
    placed = Engine.from_pretrained(tmp_path / "model", device="cpu:0", device_map={"": "cpu"})
    assert placed.device == torch.device("cpu") and placed.model.placement is not None
    reads = counted_reads(monkeypatch)
    with pytest.raises(ValueError, match=r"^device='gpu': give cpu, cuda, cuda:N or auto$"):
        Engine.from_pretrained(tmp_path / "model", device="gpu")
    with pytest.raises(ValueError, match=r"^device='gpu': give cpu, cuda, cuda:N or auto$"):
        Engine(micro_model(), tokenizer, device="gpu")
    unreachable = torch.cuda.device_count()  # a CUDA index past the last GPU (0 without one)
    with pytest.raises(ValueError, match=rf"^device={unreachable}: torch cannot reach cuda:{unreachable} here \("):
        Engine.from_pretrained(tmp_path / "model", device=unreachable)
    assert sum(reads.values()) == 0


@pytest.mark.parametrize("device", ["CPU", " cpu", "cpu:0", "0", 0, "CUDA", torch.device("cpu"), "meta", "disk", "mps"])
def test_an_engine_and_device_read_a_device_the_same_way(tokenizer, device):
    """Engine(..., device="CPU"), " cpu" and "0" were refused as no device while `--device` took them, and "cpu:0"
    taken while `--device cpu:0` was refused; device="meta" got load_pretrained's advice to build the model under
    `with torch.device('meta')`. Both read a device through one resolver, so they take and refuse the same names."""
    try:
        asked = EngineOptions(device=str(device)).resolved_device()
    except ConfigError as refused:  # meta, disk, mps; and where torch reaches no GPU, a cuda:0 it cannot reach
        with pytest.raises(ValueError, match=r"^device=") as engine_refused:
            Engine(micro_model(), tokenizer, device=device)
        assert str(engine_refused.value).split(": ", 1)[1] in str(refused)  # the same reason after the value
    else:
        assert str(Engine(micro_model(), tokenizer, device=device).device) == asked
