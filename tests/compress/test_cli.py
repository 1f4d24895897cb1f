"""`seekstack quantize` end to end: a checkpoint in, a smaller quantized checkpoint out that loads and runs."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import seekstack
from seekstack.cli import app
from seekstack.compress.linear import Int4Weight, QuantizedLinear
from tests.compress.test_quantized_model import INPUT_IDS, logits, model_for_tests


def test_quantize_command_writes_a_smaller_checkpoint_that_loads_quantized(tmp_path):
    model = model_for_tests()
    seekstack.save_pretrained(model, tmp_path / "float")
    (tmp_path / "float" / "tokenizer.json").write_text("{}")
    result = CliRunner().invoke(
        app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "int4"), "--scheme", "int4", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["bytes_after"] < report["bytes_before"]
    assert report["assignment"]["layers.0.self_attn.o_proj"] == "int4 g32"
    assert (tmp_path / "int4" / "tokenizer.json").exists()
    loaded = seekstack.load_pretrained(tmp_path / "int4")
    assert isinstance(loaded.layers[0].self_attn.o_proj, QuantizedLinear)
    assert isinstance(loaded.layers[0].self_attn.o_proj.qweight, Int4Weight)
    reference = logits(model, INPUT_IDS)
    assert ((logits(loaded, INPUT_IDS) - reference).norm() / reference.norm()).item() < 0.25


def test_quantize_command_names_a_wrong_scheme_and_a_missing_data_folder(tmp_path):
    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    wrong = CliRunner().invoke(
        app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--scheme", "int3"]
    )
    assert wrong.exit_code == 1 and "scheme" in wrong.output and "int3" in wrong.output
    no_data = CliRunner().invoke(
        app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--progressive"]
    )
    assert no_data.exit_code == 1 and "--progressive needs --data" in no_data.output
    assert not (tmp_path / "q").exists()
