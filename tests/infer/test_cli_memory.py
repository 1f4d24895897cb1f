"""`seekstack generate` and `chat` with a latent-cache budget (--kv-cache-memory) and a placement (--device-map)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from seekstack.cli import app
from seekstack.infer import Engine, SamplingParams
from tests.infer.support import model_dir

runner = CliRunner()
PROMPT = "def main():"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("model") / "micro")


def generate(checkpoint, *options: str):
    return runner.invoke(app, ["generate", "--model", str(checkpoint), PROMPT, "--temperature", "0",
                               "--max-new-tokens", "12", "--ignore-eos", *options])  # fmt: skip


def test_generate_with_a_cache_budget_and_experts_on_disk_gives_the_text_of_the_default_engine(checkpoint):
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    expected = Engine.from_pretrained(checkpoint).generate([PROMPT], params)[0].text
    result = generate(checkpoint, "--kv-cache-memory", "256KiB", "--device-map", "*=cpu,layers.*.mlp.experts=disk")
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


def test_a_cache_budget_too_small_for_the_request_is_told_with_the_option_to_raise(checkpoint):
    """It was told with the Python keyword ("kv_cache_memory=2048 bytes holds ...: raise kv_cache_memory")."""
    result = generate(checkpoint, "--kv-cache-memory", "2KiB")
    assert result.exit_code == 1
    assert "error: --kv-cache-memory 2048 bytes holds " in result.stderr
    assert result.stderr.endswith("(block 0 is reserved): raise --kv-cache-memory\n")


@pytest.mark.parametrize(
    ("options", "message", "exit_code"),
    [
        (["--kv-cache-memory", "lots"], "Invalid value for '--kv-cache-memory'", 2),  # a usage error, as the parser's
        (["--device-map", "layers.*.nothing=cpu"], "matches no part of the model", 1),
        (
            ["--device-map", "*=tpu:0"],
            "Invalid value for '--device-map': device map entry '*=tpu:0': 'tpu:0' is not cpu, disk, cuda:N or a GPU "
            "number N",
            2,
        ),  # a usage error, as --device's, before the weights load
        (["--device-map", "auto:cpu=lots"], "Invalid value for '--device-map': memory entry 'cpu=lots': size", 2),
    ],
)
def test_bad_budgets_and_device_maps_are_named(checkpoint, options, message, exit_code):
    result = generate(checkpoint, *options)
    assert result.exit_code == exit_code
    assert message in result.stderr


def test_chat_takes_the_cache_budget_and_the_device_map(checkpoint):
    options = ["--kv-cache-memory", "256KiB", "--device-map", "*=cpu", "--temperature", "0", "--max-new-tokens", "4"]
    result = runner.invoke(app, ["chat", "--model", str(checkpoint), *options], input="hello\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    result = runner.invoke(app, ["chat", "--model", str(checkpoint), "--kv-cache-memory", "lots"], input="hello\n")
    assert result.exit_code == 2 and "Invalid value for '--kv-cache-memory'" in result.stderr
