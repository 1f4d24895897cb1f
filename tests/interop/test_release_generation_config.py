"""A release's generation_config.json sets the sampling a request or a command line leaves unset, as vLLM's
`--generation-config auto` and transformers' generate read it (DeepSeek-R1 ships temperature 0.6, top_p 0.95 and
asks for them); what is set stays as set. A damaged file is named with its field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seekstack.cli import app
from seekstack.infer import Engine
from seekstack.infer.generation_config import sampling_defaults
from seekstack.schema import ConfigError
from seekstack.serve.app import create_app
from seekstack.serve.database import open_database
from tests.interop.release import deepseek_v3_release
from tests.serve.server import run

R1_GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
                        "temperature": 0.6, "top_p": 0.95, "transformers_version": "4.46.3"}  # fmt: skip
R1_SAMPLING = {"temperature": 0.6, "top_p": 0.95}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return deepseek_v3_release(tmp_path_factory.mktemp("deepseek-r1"), R1_GENERATION_CONFIG)


@pytest.fixture(scope="module")
def engine(release) -> Engine:
    return Engine.from_pretrained(release)


def sampled_with(engine: Engine, monkeypatch) -> list:
    """The SamplingParams of each request `engine` is given from now on."""
    given = []
    add_request = engine.add_request

    def recording(prompt_ids, params, *args, **kwargs):
        given.append(params)
        return add_request(prompt_ids, params, *args, **kwargs)

    monkeypatch.setattr(engine, "add_request", recording)
    return given


def test_the_engine_reads_the_sampling_generation_config_sets(engine):
    assert engine.sampling_defaults == R1_SAMPLING


@pytest.mark.parametrize(
    "route, body",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]}),
        ("/v1/completions", {"prompt": "def main():"}),
    ],
)
def test_serve_samples_an_unset_temperature_and_top_p_as_generation_config_says(
    engine, tmp_path, monkeypatch, route, body
):
    given = sampled_with(engine, monkeypatch)
    request = {"model": engine.model_name, "max_tokens": 2, **body}
    requests = [request, {**request, "temperature": 1.0}]

    async def scenario(client):
        return [await client.post(route, json=request) for request in requests]

    responses = run(create_app(engine, open_database(tmp_path / "db")), scenario)
    assert [response.status_code for response in responses] == [200, 200]
    assert [(params.temperature, params.top_p) for params in given] == [(0.6, 0.95), (1.0, 0.95)]


@pytest.mark.parametrize("command, prompt", [("generate", ["def main():"]), ("chat", [])])
def test_generate_and_chat_sample_unset_options_as_generation_config_says(
    release, engine, monkeypatch, command, prompt
):
    monkeypatch.setattr("seekstack.cli.generate.load_engine", lambda *args, **kwargs: engine)
    given = sampled_with(engine, monkeypatch)
    args = [command, "--model", str(release), *prompt, "--max-new-tokens", "2"]
    unset = CliRunner().invoke(app, args, input="Hello\n")
    chosen = CliRunner().invoke(app, [*args, "--temperature", "0.9", "--top-k", "5"], input="Hello\n")
    assert (unset.exit_code, chosen.exit_code) == (0, 0), unset.output + chosen.output
    assert [(params.temperature, params.top_p, params.top_k) for params in given] == [(0.6, 0.95, 0), (0.9, 0.95, 5)]


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"temperature": "0.6"}', "field 'temperature'"),
        ('{"top_p": 1.5}', "field 'top_p'"),
        ('{"temperature": 0.6,', "not valid JSON"),
        ("[0.6]", "expected a JSON object"),
    ],
)
def test_a_damaged_generation_config_is_named_with_its_field(tmp_path, content, fragment):
    (tmp_path / "generation_config.json").write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match="generation_config.json") as raised:
        sampling_defaults(tmp_path)
    assert fragment in str(raised.value)


def test_a_folder_without_generation_config_keeps_the_commands_defaults(tmp_path):
    assert sampling_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 1, "do_sample": True}))
    assert sampling_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_length": 50}))
    assert sampling_defaults(tmp_path) == {}  # as vLLM's: transformers' prompt + reply cap; the context caps them
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 8, "do_sample": True}))
    assert sampling_defaults(tmp_path) == {"max_new_tokens": 8}  # was: {}; vLLM's max_tokens, transformers' limit


def test_a_release_that_does_not_sample_is_decoded_greedily(tmp_path):
    written = {"do_sample": False, "temperature": 0.6, "top_p": 0.95, "repetition_penalty": 1.1}
    (tmp_path / "generation_config.json").write_text(json.dumps(written))
    # was: temperature 0.6, sampled where transformers' generate decodes the release greedily
    assert sampling_defaults(tmp_path) == {"temperature": 0.0, "top_p": 0.95, "repetition_penalty": 1.1}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert sampling_defaults(tmp_path) == {"temperature": 0.0}  # was: {}, OpenAI's temperature 1


def test_quantize_and_lora_merge_keep_the_releases_generation_config(release, tmp_path):
    from seekstack.adapters.files import merge_adapter
    from tests.adapters.support import write_random_adapter

    result = CliRunner().invoke(app, ["quantize", str(release), "--out", str(tmp_path / "int8"), "--scheme", "int8"])
    assert result.exit_code == 0, result.output
    adapter = write_random_adapter(release, tmp_path / "adapter", seed=0)
    merged = merge_adapter(release, adapter, tmp_path / "merged")
    assert sampling_defaults(tmp_path / "int8") == sampling_defaults(merged) == R1_SAMPLING


def test_a_run_from_a_release_keeps_its_generation_config_in_each_checkpoint(release, tmp_path):
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "fnmatch.py", "glob.py", "shlex.py", "bisect.py", "heapq.py"):
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / name).write_bytes((stdlib / name).read_bytes())
    runner, corpus, tokens, run = CliRunner(), tmp_path / "corpus", tmp_path / "tokens", tmp_path / "run"
    steps = [
        ["data", "build", str(tmp_path / "src"), "--out", str(corpus), "--workers", "1"],
        ["data", "tokenize", "--corpus", str(corpus), "--tokenizer", str(release), "--out", str(tokens)],
        ["train", f"data_dir={tokens}", f"out_dir={run}", f"init_from={release}", "max_steps=1", "batch_size=2",
         "seq_len=32", "eval_every=0", "warmup_steps=0"],
    ]  # fmt: skip
    for args in steps:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    assert sampling_defaults(run / "checkpoints" / "step_1") == R1_SAMPLING
