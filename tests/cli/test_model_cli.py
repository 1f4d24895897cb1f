"""`seekstack info` and `seekstack forward` count the same parameters and say which; a damaged checkpoint is one
line of error naming the file."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from seekstack.checkpoint import SINGLE_FILE, save_pretrained
from seekstack.cli import app
from seekstack.config import preset
from seekstack.model.transformer import Transformer

runner = CliRunner()


def run(*args: str):
    """Invoke the CLI with plain output wide enough that rich wraps no table cell."""
    return runner.invoke(app, list(args), env={"COLUMNS": "120", "FORCE_COLOR": None})


def exact(count: str) -> int:
    """The exact number in a count as the CLI prints it: '2.40M (2,400,768)' -> 2400768, '0' -> 0."""
    match = re.fullmatch(r"\d+|[\d.]+[KMBT] \(([\d,]+)\)", count.strip())
    assert match, count
    return int((match.group(1) or match.group(0)).replace(",", ""))


def info_params(output: str) -> dict[str, int]:
    """The 'params, ...' rows of the info table: label -> exact count."""
    rows = re.findall(r"│ (params, [^│]*?)\s*│\s*([^│]+?)\s*│", output)
    return {label: exact(value) for label, value in rows}


def forward_params(output: str) -> tuple[int, int, int]:
    """(total, main model, MTP modules) from forward's parameter line."""
    match = re.search(r"^.*: (.+) parameters = main model (.+) \+ MTP modules (.+)$", output, re.MULTILINE)
    assert match, output
    return tuple(exact(count) for count in match.groups())


def test_forward_total_is_the_main_model_plus_the_mtp_modules_that_info_prints():
    info, forward = run("info", "tiny"), run("forward", "tiny", "--seq-len", "4", "--batch", "1")
    assert info.exit_code == 0 and forward.exit_code == 0, info.output + forward.output
    rows = info_params(info.output)
    total, main, mtp = forward_params(forward.output)
    assert (main, mtp) == (rows["params, main model"], rows["params, MTP modules"])
    assert total == main + mtp == rows["params, main model + MTP modules"]
    assert total == sum(p.numel() for p in Transformer(preset("tiny")).parameters())
    assert mtp > 0 and rows["params, MTP in a checkpoint (+ emb./head copies)"] > mtp  # copies of embedding and head


def test_forward_counts_the_mtp_modules_the_checkpoint_holds(tmp_path):
    directory = save_pretrained(Transformer(preset("tiny", num_nextn_predict_layers=0)), tmp_path / "no_mtp")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    result = run("forward", str(directory), "--seq-len", "4", "--batch", "1")
    assert result.exit_code == 0, result.output
    total, main, mtp = forward_params(result.output)
    assert (total, mtp) == (main, 0)
    assert "mtp loss: n/a (the model has no MTP module)" in result.output


def test_info_and_plan_count_the_mtp_modules_the_checkpoint_holds_as_loading_builds_them(tmp_path):
    directory = save_pretrained(Transformer(preset("tiny", num_nextn_predict_layers=0)), tmp_path / "no_mtp")
    config = json.loads((directory / "config.json").read_text())  # as transformers saves DeepSeek-V3: no MTP weights
    (directory / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    info, plan = run("info", str(directory)), run("plan", str(directory), "--memory", "cpu=1GiB", "--weights", "int8")
    assert info.exit_code == 0 and plan.exit_code == 0, info.output + plan.output
    rows = info_params(info.output)
    assert rows["params, MTP modules"] == rows["params, MTP in a checkpoint (+ emb./head copies)"] == 0
    assert rows["params, main model + MTP modules"] == rows["params, main model"]
    device_map = re.search(r"^--device-map (.+)$", plan.output, re.MULTILINE)[1]
    assert "layers.0-3.self_attn=cpu" in device_map and "mtp" not in device_map


def test_info_and_plan_read_a_clone_without_git_lfs_by_its_config_even_where_loading_would_read_a_weight(tmp_path):
    model = Transformer(preset("tiny", num_nextn_predict_layers=0))
    directory = save_pretrained(model, tmp_path / "clone", max_shard_bytes=2**20)  # the head stored apart
    config = json.loads((directory / "config.json").read_text())  # tied: loading compares the head with the embedding
    (directory / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    for shard in directory.glob("*.safetensors"):
        shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    info, plan = run("info", str(directory)), run("plan", str(directory), "--memory", "cpu=1GiB")
    assert info.exit_code == 0 and plan.exit_code == 0, info.output + plan.output
    tied = Transformer(preset("tiny", num_nextn_predict_layers=0, tie_word_embeddings=True))
    assert info_params(info.output)["params, main model"] == sum(p.numel() for p in tied.parameters())


def test_info_warns_of_weights_that_loading_would_not_get_past_but_not_of_a_config_alone(tmp_path, recwarn):
    """info on a truncated safetensors file or a sharded folder missing a shard printed its table and nothing else,
    as for a sound checkpoint; generate then refused it."""
    single = save_pretrained(Transformer(preset("tiny")), tmp_path / "truncated")
    (single / SINGLE_FILE).write_bytes((single / SINGLE_FILE).read_bytes()[:-1000])
    sharded = save_pretrained(Transformer(preset("tiny")), tmp_path / "sharded", max_shard_bytes=2**20)
    missing = sorted(sharded.glob("*.safetensors"))[1]
    missing.unlink()
    for directory, problem in (
        (single, f"{single / SINGLE_FILE}: not a valid safetensors file"),
        (sharded, f"names shard '{missing.name}', which is missing from {sharded}"),
    ):
        recwarn.clear()
        result = run("info", str(directory))
        assert result.exit_code == 0 and "params, main model" in result.stdout, result.output
        [warning] = [str(w.message) for w in recwarn]
        assert problem in warning and warning.endswith("; described as its config.json states")
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text((single / "config.json").read_text())
    recwarn.clear()
    result = run("info", str(tmp_path / "config_only"))  # a config downloaded to plan before the weights
    assert result.exit_code == 0 and not recwarn


def test_forward_warns_once_of_a_config_its_weights_change(tmp_path, recwarn):
    directory = save_pretrained(Transformer(preset("tiny")), tmp_path / "every_layer_moe")
    config = json.loads((directory / "config.json").read_text())  # transformers' layout: it ignores moe_layer_freq
    (directory / "config.json").write_text(json.dumps({**config, "moe_layer_freq": 2}))
    result = run("forward", str(directory), "--seq-len", "4", "--batch", "1")
    assert result.exit_code == 0, result.output
    assert [str(w.message).count("moe_layer_freq is 2") for w in recwarn] == [1]


def test_forward_of_one_token_prints_no_next_token_loss_rather_than_zero():
    one, two = (run("forward", "tiny", "--seq-len", seq_len, "--batch", "1") for seq_len in ("1", "2"))
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    assert "lm loss: n/a (needs seq-len >= 2: no token has a next one), mtp loss: n/a" in one.output
    assert float(re.search(r"lm loss: ([\d.]+),", two.output)[1]) > 1  # random weights: about ln V


def test_forward_on_a_truncated_checkpoint_prints_one_line_naming_the_file(tmp_path):
    directory = save_pretrained(Transformer(preset("tiny")), tmp_path / "tiny")
    weights = directory / SINGLE_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run("forward", str(directory))
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {weights}: not a valid safetensors file")
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_forward_refuses_a_seq_len_longer_than_the_model_s_context_as_info_refuses_its_context():
    """It ran the model past its context (a 64-position checkpoint at --seq-len 200) and printed the losses there."""
    context = preset("tiny").max_position_embeddings
    longer = run("forward", "tiny", "--seq-len", str(context + 1), "--batch", "1")
    assert longer.exit_code == 1
    expected = f"error: --seq-len {context + 1}: longer than the model's context (max_position_embeddings {context})"
    assert expected in longer.stderr


@pytest.mark.parametrize("batch_size", [10**20, 10**15])
def test_forward_refuses_a_batch_whose_logits_exceed_the_machine_s_memory(batch_size):
    """--batch-size 10**20 failed with torch's traceback, and a typo's 100000 took the machine's memory: the float32
    logits (B x T x V) of the batch, beside the weights, are counted before anything is built."""
    refused = run("forward", "tiny", "--batch-size", str(batch_size), "--seq-len", "8")
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    said = " ".join(refused.stderr.split())
    assert (
        said.startswith("error: tiny needs ") and f"for the logits of --batch-size {batch_size} x --seq-len 8" in said
    )


def test_info_counts_flops_at_the_model_s_context_and_refuses_a_longer_one():
    context = preset("tiny").max_position_embeddings
    default, shorter, longer = (
        run("info", "tiny"),
        run("info", "tiny", "--context", "512"),
        run("info", "tiny", "--context", str(context + 1)),
    )
    assert f"forward FLOPs/token, context {context} (the model's)" in default.output, default.output
    assert f"training FLOPs/token, seq {context} (the model's)" in default.output
    assert "forward FLOPs/token, context 512 " in shorter.output
    assert longer.exit_code == 1
    expected = f"error: --context {context + 1}: longer than the model's context (max_position_embeddings {context})"
    assert expected in longer.stderr


@pytest.mark.parametrize(
    ("stated", "width"),
    [
        ({"torch_dtype": "float32", "dtype": "bfloat16"}, "bfloat16"),
        ({"dtype": "float16", "torch_dtype": "float32"}, "float16"),
        ({"dtype": None, "torch_dtype": "float32"}, "float32"),
        ({"dtype": "float64"}, "float64"),  # a float64 model's save: load_pretrained(dtype="auto") loads float64
        ({"dtype": "half"}, "float16"),  # names in torch, as load_pretrained(dtype="auto") reads them
        ({"torch_dtype": "double"}, "float64"),
    ],
)
def test_plan_reads_a_configs_dtype_before_its_legacy_torch_dtype_as_transformers_does(tmp_path, stated, width):
    """A config.json stating both (transformers 5 writes `dtype`, 4.x `torch_dtype`) was priced at torch_dtype's."""
    (tmp_path / "config.json").write_text(json.dumps({**preset("tiny").to_dict(), **stated}))
    result = run("plan", str(tmp_path), "--memory", "cpu=1GiB")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{tmp_path}, {width} weights as stored (config.json)")


@pytest.mark.parametrize("stated", [{"dtype": 5}, {"dtype": "int8"}, {"torch_dtype": ["bfloat16"]}, {"dtype": "auto"}])
def test_plan_refuses_a_configs_dtype_that_names_no_float_dtype_naming_the_key(tmp_path, stated):
    """A config.json stating dtype 5, "int8" or a list was priced as bfloat16 silently, where loading it refuses it."""
    (tmp_path / "config.json").write_text(json.dumps({**preset("tiny").to_dict(), "dtype": None, **stated}))
    result = run("plan", str(tmp_path), "--memory", "cpu=1GiB")
    [(key, value)] = stated.items()
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {tmp_path / 'config.json'}: {key} is {value!r}, no float dtype a model loads in: state one of "
        "float32, bfloat16, float16, float64 (or its name in torch: half, double), or remove it\n"
    )


def test_plan_takes_memory_repeated_as_one_budget_list_refusing_a_device_given_twice():
    """`--memory cuda:0=80GiB --memory cpu=1500GiB` planned with the last budget alone, the GPU's dropped silently."""
    repeated = run("plan", "deepseek-v3", "--memory", "cuda:0=80GiB", "--memory", "cpu=1500GiB")
    joined = run("plan", "deepseek-v3", "--memory", "cuda:0=80GiB,cpu=1500GiB")
    assert repeated.exit_code == 0, repeated.output
    assert "\ncuda:0 " in repeated.output and repeated.output == joined.output
    twice = run("plan", "deepseek-v3", "--memory", "cpu=1GiB", "--memory", "cpu=2GiB")
    assert twice.exit_code == 2 and "cpu named twice" in twice.output
