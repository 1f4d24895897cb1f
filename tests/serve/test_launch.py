"""Building the server of `seekstack serve` (seekstack.serve.launch): what it refuses before serving."""

from __future__ import annotations

import dataclasses

import llguidance
import pytest
from typer.testing import CliRunner

from seekstack.adapters import registry
from seekstack.cli import app
from seekstack.infer.json_mode import JsonFormat
from seekstack.infer.params import EngineOptions
from seekstack.infer.placement import disk_parts_note
from seekstack.serve.launch import ServeOptions, build_server
from tests.adapters.support import write_random_adapter
from tests.serve.server import free_port, make_model_dir, run

CACHE_OF_10_BLOCKS = "60KiB"  # micro_config: (16 + 8) latent values x 4 layers x 4 bytes x 16 tokens = 6 KiB a block


def serve_options(tmp_path, max_model_len: int | None = None) -> ServeOptions:
    engine = EngineOptions(dtype="float32", kv_cache_memory=CACHE_OF_10_BLOCKS, max_model_len=max_model_len)
    return ServeOptions(port=free_port(), database=str(tmp_path / "serve.db"), engine=engine)


def test_serve_refuses_a_context_longer_than_the_cache_holds_naming_both_options(tmp_path):
    model_dir = make_model_dir(tmp_path, max_position_embeddings=256)
    with pytest.raises(ValueError) as refused:
        build_server(model_dir, serve_options(tmp_path))
    assert str(refused.value) == (
        "max_model_len 256 (the model's context; --max-model-len) is more than the latent cache holds: "
        "--kv-cache-memory 60KiB holds 12 blocks of 16 tokens, requests of at most 192 tokens; lower --max-model-len "
        "to 192 or raise --kv-cache-memory"
    )
    with pytest.raises(ValueError, match="^--max-model-len 200 is more than the latent cache holds"):
        build_server(model_dir, serve_options(tmp_path, max_model_len=200))


def test_serve_builds_json_modes_token_trie_before_the_first_json_request(tmp_path, monkeypatch):
    """llguidance's token trie of a 129k vocabulary takes ~1 s, holding the GIL: built at the first JSON request, it
    stalled every stream as long (a 1.0 s gap between two tokens of a concurrent stream). The server builds it as it
    starts."""
    app, _ = build_server(make_model_dir(tmp_path, max_position_embeddings=256), serve_options(tmp_path, 144))
    monkeypatch.setattr(llguidance, "LLTokenizer", lambda *args, **kwargs: pytest.fail("built at the JSON request"))
    engine = app.state.server.engine
    assert JsonFormat(engine.tokenizer).constraint().allowed(engine.config.vocab_size).any()


def test_serve_with_a_context_the_cache_holds_answers_a_chat_without_max_tokens(tmp_path, monkeypatch):
    """A chat without max_tokens fills the context the cache holds. The server's first line names the URL it listens
    on, an IPv6 address in brackets (it said http://::1:PORT, which no browser or curl takes)."""
    options = dataclasses.replace(serve_options(tmp_path, 144), host="::1")
    monkeypatch.setattr("seekstack.serve.launch.check_listenable", lambda host, port: None)  # a machine without IPv6
    app, said = build_server(make_model_dir(tmp_path, max_position_embeddings=256), options)
    assert said.startswith(f"serving 'model' on http://[::1]:{options.port} (chat page at /); OPEN: ")
    chat = {"model": "model", "messages": [{"role": "user", "content": "Hello"}], "ignore_eos": True}

    async def scenario(client):
        return (await client.get("/v1/models")).json(), await client.post("/v1/chat/completions", json=chat)

    models, answer = run(app, scenario)
    assert [card["max_model_len"] for card in models["data"]] == [144]
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 144  # the default fills the context


def test_serve_on_port_0_says_the_system_picks_the_port_not_a_url_of_port_0(tmp_path):
    options = dataclasses.replace(serve_options(tmp_path, 144), port=0)
    _, said = build_server(make_model_dir(tmp_path, max_position_embeddings=256), options)
    assert said.startswith("serving 'model' on http://127.0.0.1 (a free port: see \"Uvicorn running on\" below) (")


@pytest.mark.parametrize(
    ("place", "message"),
    [
        (["--host", "not a host"], "error: --host not a host: not an address or a host name this machine resolves"),
        (["--port", "-1"], "error: --port -1: must be between 0 and 65535"),
    ],
)
def test_serve_refuses_a_host_or_port_it_cannot_listen_on_naming_it_before_reading_the_model(
    tmp_path, monkeypatch, place, message
):
    monkeypatch.setattr("seekstack.serve.launch.build_server", lambda *args, **kw: pytest.fail("read the model"))
    model_dir = make_model_dir(tmp_path)
    refused = CliRunner().invoke(app, ["serve", "--model", str(model_dir), "--db", str(tmp_path / "k.db"), *place])
    assert refused.exit_code == 1 and message in refused.stderr, refused.output
    assert "note: dtype" not in refused.stderr


@pytest.mark.parametrize("name", ["", " "])
def test_serve_refuses_a_blank_served_model_name_naming_the_option_before_reading_the_model(
    tmp_path, monkeypatch, name
):
    """`--served-model-name "$NAME"`, the variable unset, served the model under its folder's name without a word, so
    requests naming the id meant got 404 (vLLM's get_served_model_name falls back alike, to the model's path)."""
    monkeypatch.setattr("seekstack.serve.launch.build_server", lambda *args, **kw: pytest.fail("read the model"))
    refused = CliRunner().invoke(
        app, ["serve", "--model", str(tmp_path), "--db", str(tmp_path / "k.db"), "--served-model-name", name]
    )
    assert refused.exit_code == 2, refused.output
    assert " ".join(refused.stderr.replace("│", "").split()).endswith(
        f"Invalid value for '--served-model-name': {name!r}, a blank model id (a shell variable left unset?): give the "
        "id requests name as their model, or leave the option out to serve under the folder's name"
    )


@pytest.mark.parametrize(("option", "each"), [("--adapter", True), ("--lora-modules", True), ("--lora-modules", False)])
def test_serve_refuses_fewer_max_loras_than_adapters_given_naming_both_before_reading_the_model(
    tmp_path, monkeypatch, option, each
):
    """The engine loaded the model and then refused the first adapter past --max-loras as a load at run time:
    "cannot load adapter 'c': all max_loras=2 adapter slots are taken (loaded: a, b); unload one first, ..."."""
    monkeypatch.setattr("seekstack.serve.launch.build_server", lambda *args, **kw: pytest.fail("read the model"))
    values = [f"{name}={tmp_path / name}" for name in "abc"]
    # vLLM's --lora-modules takes several values after one flag as well as the flag before each
    adapters = [flag for value in values for flag in (option, value)] if each else [option, *values]
    refused = CliRunner().invoke(
        app, ["serve", "--model", str(tmp_path), "--db", str(tmp_path / "k.db"), *adapters, "--max-loras", "2"]
    )
    assert refused.exit_code == 2, refused.output
    assert " ".join(refused.stderr.replace("│", "").split()).endswith(
        "Invalid value for '--max-loras': 2 is fewer than the 3 --adapter folders given (a, b, c), each served from "
        "the start: give --max-loras 3 or more, or fewer --adapter"
    )


def test_serve_refuses_fewer_max_loras_than_many_adapters_naming_them_by_their_start(tmp_path, monkeypatch):
    """300 --adapter folders past --max-loras 2 were all named in the refusal (3,788 characters of names)."""
    monkeypatch.setattr("seekstack.serve.launch.build_server", lambda *args, **kw: pytest.fail("read the model"))
    many = [flag for i in range(300) for flag in ("--adapter", f"adapter_{i}={tmp_path}")]
    refused = CliRunner().invoke(
        app, ["serve", "--model", str(tmp_path), "--db", str(tmp_path / "k.db"), *many, "--max-loras", "2"]
    )
    assert refused.exit_code == 2, refused.output
    listed = ", ".join(f"adapter_{i}" for i in range(300))[:80] + "... (3,788 characters)"
    assert f"the 300 --adapter folders given ({listed}), each served" in " ".join(refused.stderr.split())


def test_serve_takes_vllms_json_form_of_an_adapter_and_explains_a_malformed_one(tmp_path, monkeypatch):
    """vLLM's --lora-modules '{"name": ..., "path": ..., "base_model_name": ...}' serves the folder under the name, as
    NAME=DIR does; JSON that is no such module is refused naming the form (it was told to give NAME=DIR)."""
    served = {}

    def build_server(model, options, before_loading):
        served.update(options.adapters)
        raise SystemExit(0)  # the adapters read, no model

    monkeypatch.setattr("seekstack.serve.launch.build_server", build_server)
    serve = ["serve", "--model", str(tmp_path), "--db", str(tmp_path / "k.db"), "--port", "0"]
    module = f'{{"name": "legal", "path": "{tmp_path / "legal"}", "base_model_name": "base"}}'
    assert CliRunner().invoke(app, [*serve, "--lora-modules", module]).exit_code == 0
    assert served == {"legal": tmp_path / "legal"}
    for given in ('{"name": "legal"}', '{"name": "legal", "path": 1}', '{"name": "legal", "paths": "x"}'):
        refused = CliRunner().invoke(app, [*serve, "--lora-modules", given])
        assert refused.exit_code == 1 and 'expected {"name": NAME, "path": DIR} (vLLM\'s form' in refused.stderr
    refused = CliRunner().invoke(app, [*serve, "--lora-modules", "{name: legal}"])
    assert refused.exit_code == 1 and "--adapter '{name: legal}': not JSON (Expecting property name" in refused.stderr


def test_serve_refuses_an_adapter_past_max_lora_rank_naming_the_option_before_reading_the_model(tmp_path, monkeypatch):
    """`serve --adapter legal=DIR --max-lora-rank 2`, the adapter of rank 4, loaded the weights and then failed naming
    the engine's keyword: "... more than max_lora_rank=2 this engine was started with; start it with a larger
    max_lora_rank"."""
    monkeypatch.setattr("seekstack.infer.engine.Engine.from_pretrained", lambda *args, **kw: pytest.fail("read it"))
    model_dir = make_model_dir(tmp_path)
    adapter = write_random_adapter(model_dir, tmp_path / "legal", seed=1)  # rank 4
    serve = ["serve", "--model", str(model_dir), "--db", str(tmp_path / "k.db"), "--adapter", f"legal={adapter}"]
    refused = CliRunner().invoke(app, [*serve, "--max-lora-rank", "2"])
    assert refused.exit_code == 1, refused.output
    assert " ".join(refused.stderr.split()) == (
        f"error: --max-lora-rank is 2, less than the rank 4 of adapter 'legal' ({adapter}), and is fixed as the engine "
        "starts: start it with 4 or more"
    )


def test_serve_refuses_a_capacity_past_free_memory_naming_the_option_before_reading_the_model(tmp_path, monkeypatch):
    """`serve --adapter legal=DIR --max-loras 1000000000000` read the weights, then ended in torch's unnamed
    "DefaultCPUAllocator: can't allocate memory" (--max-lora-rank too) as the adapters' stacks were made."""
    monkeypatch.setattr("seekstack.infer.engine.Engine.from_pretrained", lambda *args, **kw: pytest.fail("read it"))
    model_dir = make_model_dir(tmp_path)
    adapter = write_random_adapter(model_dir, tmp_path / "legal", seed=1)
    serve = ["serve", "--model", str(model_dir), "--db", str(tmp_path / "k.db"), "--adapter", f"legal={adapter}"]
    refused = CliRunner().invoke(app, [*serve, "--max-loras", "1000000000000"])
    assert refused.exit_code == 1, refused.output
    said = " ".join(refused.stderr.split())
    assert said.startswith("error: --max-loras is 1000000000000: the adapted layers' stacks at that capacity")
    assert said.endswith("bytes free on cpu: start the engine with a smaller value")
    assert not (tmp_path / "k.db").exists()


def test_serve_reads_each_adapter_once_and_checks_the_capacity_once_before_the_weights(tmp_path, monkeypatch):
    """`serve --adapter legal=DIR` read each adapter three times as it started (~0.18 s a read of a small one: serve's
    capacity check, Engine.from_pretrained's, the engine's attach), and checked the capacity before the weights twice;
    after them, the load checks the stacks in the model's dtype."""
    reads, checks = [], []
    read, check = registry.read_factors, registry.refuse_stacks_past_free_memory
    monkeypatch.setattr(registry, "read_factors", lambda config, folder: reads.append(folder) or read(config, folder))
    monkeypatch.setattr(
        registry, "refuse_stacks_past_free_memory", lambda *args: checks.append(args[5]) or check(*args)
    )
    model_dir = make_model_dir(tmp_path, max_position_embeddings=256)
    adapter = write_random_adapter(model_dir, tmp_path / "legal", seed=1)
    options = dataclasses.replace(serve_options(tmp_path, 144), adapters={"legal": adapter})
    app, said = build_server(model_dir, options)
    assert reads == [adapter] and checks == [registry.FEWEST_STACK_BYTES, 4]  # float32 stacks once loaded
    assert app.state.server.engine.lora.folders == {"legal": adapter} and "with adapters 'legal'" in said


def test_serve_refuses_a_capacity_the_weights_left_no_memory_for_naming_the_option(tmp_path, monkeypatch):
    """A capacity that fit the memory free before the weights loaded but not what they left was refused by the
    engine's load in its keyword's words, "field 'max_lora_rank' is 16: ...", where serve names its options."""
    frees = iter([10**15])  # before the weights; 1000 bytes once they have loaded
    monkeypatch.setattr(registry, "free_memory", lambda device: next(frees, 1000))
    model_dir = make_model_dir(tmp_path, max_position_embeddings=256)
    adapter = write_random_adapter(model_dir, tmp_path / "legal", seed=1)
    options = dataclasses.replace(serve_options(tmp_path, 144), adapters={"legal": adapter})
    refused = r"^--max-lora-rank is 16: the adapted layers' stacks at that capacity .* than the 1000 bytes free on cpu"
    with pytest.raises(ValueError, match=refused):
        build_server(model_dir, options)


def test_serve_with_a_device_map_refuses_a_capacity_the_gpu_a_layer_goes_to_has_no_memory_for(tmp_path, monkeypatch):
    """`serve --device-map ... --adapter` checked the capacity before the weights against the CPU's free memory for
    every layer, so a layer the map puts on a GPU without room for its stacks went on to the load; refused naming the
    option and the GPU (no GPU needed: the refusal comes before anything is placed)."""
    monkeypatch.setattr(registry, "free_memory", lambda device: 1000 if device.type == "cuda" else 10**15)
    model_dir = make_model_dir(tmp_path, max_position_embeddings=256)
    adapter = write_random_adapter(model_dir, tmp_path / "legal", seed=1)
    options = serve_options(tmp_path, 144)
    engine = dataclasses.replace(options.engine, device_map="*=cpu,layers.1.self_attn=cuda:1")
    options = dataclasses.replace(options, engine=engine, adapters={"legal": adapter})
    refused = r"^--max-lora-rank is 16: the adapted layers' stacks .* than the 1000 bytes free on cuda:1: start"
    with pytest.raises(ValueError, match=refused):
        build_server(model_dir, options)
    assert not (tmp_path / "serve.db").exists()


def test_serve_refuses_a_mistyped_adapter_folder_before_reading_the_model_or_making_the_database(tmp_path, monkeypatch):
    """`serve --adapter legal=TYPO` without --max-lora-rank read the adapters only once the weights had loaded (minutes
    for a large model), and left the new database behind."""
    monkeypatch.setattr("seekstack.infer.engine.Engine.from_pretrained", lambda *args, **kw: pytest.fail("read it"))
    model_dir = make_model_dir(tmp_path)
    serve = ["serve", "--model", str(model_dir), "--db", str(tmp_path / "k.db"), "--adapter", f"legal={tmp_path}/typo"]
    refused = CliRunner().invoke(app, serve)
    assert refused.exit_code == 1, refused.output
    assert " ".join(refused.stderr.split()).startswith(f"error: {tmp_path}/typo does not exist; give an adapter folder")
    assert not (tmp_path / "k.db").exists()


@pytest.mark.parametrize(
    ("given", "blank"),
    [("legal=", "folder"), ("legal= ", "folder"), ("=runs/legal", "name"), ('{"name": "legal", "path": ""}', "folder"),
     ('{"name": " ", "path": "runs/legal"}', "name")],
)  # fmt: skip
def test_serve_refuses_an_adapter_whose_name_or_folder_is_blank_saying_which_in_either_form(
    tmp_path, monkeypatch, given, blank
):
    """vLLM's form with an empty path was told 'expected NAME=DIR', of the other form, with nothing about the path;
    `legal= ` was refused only once the weights had loaded ("adapter folder ' ': a blank path")."""
    monkeypatch.setattr("seekstack.serve.launch.build_server", lambda *args, **kw: pytest.fail("read the model"))
    serve = ["serve", "--model", str(tmp_path), "--db", str(tmp_path / "k.db")]
    refused = CliRunner().invoke(app, [*serve, "--adapter", given])
    assert refused.exit_code == 1, refused.output
    assert refused.stderr == (
        f"error: --adapter {given!r}: the adapter's {blank} is blank (a shell variable left unset?); give NAME=DIR, "
        'e.g. --adapter legal=runs/legal, or vLLM\'s {"name": NAME, "path": DIR}\n'
    )


@pytest.mark.parametrize("origin", ["https://app.example/", "app.example", "https://App.example", "null"])
def test_serve_refuses_a_cors_origin_no_browser_sends_naming_it_before_reading_the_model(tmp_path, origin):
    options = ServeOptions(port=free_port(), database=str(tmp_path / "k.db"), cors_origins=(origin,))
    with pytest.raises(ValueError, match=f"--cors-origin '{origin}': not a web origin as browsers send it"):
        build_server(tmp_path / "no model here", options)  # was: served, every page refused by CORS without a word


@pytest.mark.parametrize("missing", ["checkpoint", "tokenizer"])
def test_serve_refuses_a_model_folder_without_a_checkpoint_before_it_makes_a_database(tmp_path, monkeypatch, missing):
    """`seekstack serve --model TYPO` created its database (seekstack.db in the working directory, by default) and only
    then found no checkpoint, or (a folder with config.json) no tokenizer.json: every failed start left a new, empty
    database file behind. The missing tokenizer's way out is the command's option, as generate's: it was the Python
    keyword ("pass tokenizer= the path ...")."""
    if missing == "checkpoint":
        model_dir, refusal = tmp_path / "no model here", f"{tmp_path / 'no model here'}: no such folder"
    else:
        model_dir = make_model_dir(tmp_path / "made")
        (model_dir / "tokenizer.json").unlink()
        refusal = f"{model_dir} has no tokenizer.json: give the tokenizer's path with --tokenizer PATH"
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("SEEKSTACK_DB", raising=False)  # the default database: ./seekstack.db
    refused = CliRunner().invoke(app, ["serve", "--model", str(model_dir)])
    assert refused.exit_code == 1
    assert refusal in refused.output
    assert sorted(path.name for path in workdir.iterdir()) == []  # was: ['seekstack.db', ...]


def test_serve_refuses_an_invalid_moderation_policy_as_a_bad_option_value_before_reading_the_model(
    tmp_path, monkeypatch
):
    monkeypatch.setattr("seekstack.infer.engine.Engine.from_pretrained", lambda *args, **kw: pytest.fail("read it"))
    policy = tmp_path / "policy.yaml"
    policy.write_text("categories:\n  x:\n    terms: [foo]\n    threshold: 1.5\n")
    model_dir = make_model_dir(tmp_path)
    refused = CliRunner().invoke(
        app, ["serve", "--model", str(model_dir), "--db", str(tmp_path / "k.db"), "--moderation-policy", str(policy)]
    )
    assert refused.exit_code == 2, refused.output  # was 1: a usage error, as a bad --kv-cache-memory
    assert f"Invalid value for '--moderation-policy': {policy}: field 'categories.x.threshold'" in refused.stderr
    assert "note: dtype" not in refused.stderr  # the usage error alone: the dtype note of the weights came first


@pytest.mark.parametrize("option", ["--max-batch-size", "--max-num-seqs"])
def test_serve_takes_vllms_max_num_seqs_for_the_requests_decoded_together(tmp_path, monkeypatch, option):
    built = []
    monkeypatch.setattr(
        "seekstack.serve.launch.build_server", lambda model, options, **kw: built.append(options) or (None, "")
    )
    monkeypatch.setattr("seekstack.serve.launch.run_server", lambda *args: None)
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--db", str(tmp_path / "k.db"), option, "3"])
    assert result.exit_code == 0 and [options.engine.max_batch_size for options in built] == [3], result.output


def test_serve_names_a_runs_model_after_the_run_given_as_its_out_dir_or_its_checkpoints_folder(tmp_path, monkeypatch):
    """`seekstack serve RUN/checkpoints` (the folder standing for its newest step, as RUN does) served the model as
    "checkpoints", the folder's own name, which every run has; it is named after the run, as for RUN."""
    step = tmp_path / "prose_run" / "checkpoints" / "step_7"
    step.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "train_state.pt"):
        (step / name).write_text("{}")
    built = []
    monkeypatch.setattr(
        "seekstack.serve.launch.build_server", lambda model, options, **kw: built.append(options) or (None, "")
    )
    monkeypatch.setattr("seekstack.serve.launch.run_server", lambda *args: None)
    for given in (step.parent.parent, step.parent):
        result = CliRunner().invoke(app, ["serve", "--model", str(given), "--db", str(tmp_path / "k.db")])
        assert result.exit_code == 0, result.output
    assert [options.served_model_name for options in built] == ["prose_run", "prose_run"]


@pytest.mark.parametrize(("options", "keep_alive_s"), [([], 5.0), (["--timeout-keep-alive", "75"], 75.0)])
def test_serve_keeps_idle_connections_open_for_timeout_keep_alive_seconds(tmp_path, monkeypatch, options, keep_alive_s):
    """Behind a load balancer whose idle timeout is longer than uvicorn's 5 s, the balancer reuses connections the
    server has closed (502s); vLLM's --timeout-keep-alive raises it, and so does ours."""
    configs = []

    def started(server, *args):
        configs.append(server.config)
        server.started = True

    monkeypatch.setattr("seekstack.serve.launch.build_server", lambda model, options, **kw: (None, ""))
    monkeypatch.setattr("seekstack.serve.launch.QuietCutOffs.run", started)
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--db", str(tmp_path / "k.db"), *options])
    assert result.exit_code == 0, result.output
    assert [config.timeout_keep_alive for config in configs] == [keep_alive_s]


@pytest.mark.parametrize(
    ("options", "log_requests", "log_stats"),
    [([], False, True), (["--enable-log-requests", "--disable-log-stats"], True, False),
     (["--disable-log-requests"], False, True)],
)  # fmt: skip
def test_serve_takes_vllms_options_for_request_and_stats_lines_and_logs_them_through_uvicorn(
    tmp_path, monkeypatch, options, log_requests, log_stats
):
    """vLLM logs a stats line every 10 s (--disable-log-stats) and, asked, each request (--enable-log-requests; the
    older --disable-log-requests too); the server had neither option, and its INFO lines went nowhere."""
    built, configs = [], []

    def started(server, *args):
        configs.append(server.config)
        server.started = True

    monkeypatch.setattr(
        "seekstack.serve.launch.build_server", lambda model, options, **kw: built.append(options) or (None, "")
    )
    monkeypatch.setattr("seekstack.serve.launch.QuietCutOffs.run", started)
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--db", str(tmp_path / "k.db"), *options])
    assert result.exit_code == 0, result.output
    assert [(options.log_requests, options.log_stats) for options in built] == [(log_requests, log_stats)]
    [config] = configs
    assert config.log_config["loggers"]["seekstack.serve"] == {"handlers": ["default"], "level": "INFO",
                                                                "propagate": False}  # fmt: skip


@pytest.mark.parametrize(
    ("option", "instead"),
    [
        ("--api-key", "`seekstack keys create --name NAME` prints one"),
        ("--allowed-origins", "--cors-origin ORIGIN"),
        ("--enable-auto-tool-choice", "tool calling is always on"),
        ("--tool-call-parser", "the tool-call parser is always DeepSeek-V3's (vLLM's deepseek_v3)"),
        ("--generation-config", "the checkpoint's generation_config.json always gives"),
        ("--enable-request-id-headers", "every response carries an X-Request-Id header"),
        ("--enable-lora", "adapters are always on: give each with --adapter NAME=DIR (vLLM's --lora-modules)"),
        ("--max-cpu-loras", "every loaded adapter stays on the model's device, up to --max-loras"),
        ("--lora-dtype", "adapters are served in the model's dtype (--dtype)"),
        ("--fully-sharded-loras", "serve runs in one process without tensor parallelism"),
    ],
)
def test_serve_refuses_vllms_options_it_does_otherwise_saying_what_to_do_instead(tmp_path, option, instead):
    """A vLLM launch line's --api-key or --allowed-origins got click's 'No such option' alone (or a guess at a
    near name), with no word of the keys database or --cors-origin; so did vLLM's DeepSeek tool-calling options
    (--enable-auto-tool-choice --tool-call-parser deepseek_v3), --generation-config, --enable-request-id-headers and
    --enable-lora (vLLM's multi-LoRA launch line), whose work seekstack always does, and vLLM's LoRA tuning options
    --max-cpu-loras, --lora-dtype and --fully-sharded-loras, which have nothing to tune here."""
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), option, "x"])
    assert result.exit_code == 2
    assert f"No such option: {option} (vLLM's); " in result.output and instead in result.output


def test_serve_says_which_parts_an_auto_device_map_put_on_disk_as_generate_says_it(tmp_path, monkeypatch):
    """`seekstack generate` and chat print a note naming the parts an `auto:` device map's budgets hold nowhere (they
    run from disk, slowly); `seekstack serve` with the same placement said nothing. It now prints the same note."""
    model_dir = make_model_dir(tmp_path / "model")
    built = []
    monkeypatch.setattr("seekstack.serve.launch.run_server", lambda app, *args: built.append(app))
    options = ["--device-map", "auto:cpu=100000", "--kv-cache-memory", "1MiB", "--offload-dir", str(tmp_path / "off")]
    result = CliRunner().invoke(app, ["serve", "--model", str(model_dir), "--db", str(tmp_path / "k.db"), *options])
    assert result.exit_code == 0, result.output
    [served] = built
    note = disk_parts_note("auto:cpu=100000", served.state.server.engine.model)
    assert note is not None and note in result.stderr.splitlines()
