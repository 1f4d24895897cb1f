"""Loading and unloading LoRA adapters at run time: admin keys only, /v1/models follows, answers as a startup load."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from seekstack.adapters.config import AdapterConfig
from seekstack.adapters.files import ADAPTER_WEIGHTS_FILE
from seekstack.infer import Engine, SamplingParams
from seekstack.serve import adapter_routes
from seekstack.serve.app import create_app
from seekstack.serve.database import open_database
from seekstack.serve.errors import parse_body
from seekstack.serve.keys import KeyStore
from tests.adapters.support import write_random_adapter
from tests.serve.server import error_of, make_model_dir, run, running_server

MODEL = "model"
GREEDY_BODY = dict(temperature=0, extra_body={"ignore_eos": True})
GREEDY = dict(max_tokens=8, **GREEDY_BODY)
ENGINE_GREEDY = dict(max_new_tokens=8, temperature=0.0, ignore_eos=True)
HEAD_ROWS = list(range(3, 300, 3))  # the output-head rows a head_tokens adapter trains in full
PROMPT = "The quick brown"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server started with adapters `legal` and `poem`, an admin key and a plain key; its model folder."""
    root = tmp_path_factory.mktemp("adapter_routes")
    model_dir = make_model_dir(root)
    adapters = {name: write_random_adapter(model_dir, root / name, seed) for name, seed in (("legal", 1), ("poem", 2))}
    database = root / "serve.db"
    keys = KeyStore(open_database(database))
    admin, user = keys.create("admin", admin=True), keys.create("user")
    flags = [flag for name, folder in adapters.items() for flag in ("--adapter", f"{name}={folder}")]
    with running_server(model_dir, database, *flags) as server:
        api = openai.OpenAI(base_url=f"{server.url}/v1", api_key=user, max_retries=0, timeout=120)
        yield server.url, api, admin, user, adapters, model_dir


def post(url: str, key: str, route: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/{route}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def load(url: str, key: str, name: str, folder) -> int:
    return post(url, key, "load_lora_adapter", lora_name=name, lora_path=str(folder)).status_code


def complete(api: openai.OpenAI, model: str) -> str:
    return api.completions.create(model=model, prompt=PROMPT, **GREEDY).choices[0].text


def test_an_adapter_loaded_at_run_time_answers_as_one_loaded_at_startup_and_unloads(served):
    url, api, admin, _, adapters, _ = served
    time.sleep(1.1)  # a second after the server started, at the least
    before = int(time.time())
    loaded = post(url, admin, "load_lora_adapter", lora_name="poem-2", lora_path=str(adapters["poem"]))
    assert loaded.status_code == 200, loaded.text
    assert (loaded.json()["id"], loaded.json()["parent"]) == ("poem-2", MODEL)
    cards = api.models.list().data
    assert [card.id for card in cards] == [MODEL, "legal", "poem", "poem-2"]
    assert cards[-1].created >= before > cards[0].created  # when it was loaded, not when the server started
    assert complete(api, "poem-2") == complete(api, "poem") != complete(api, MODEL)
    unloaded = post(url, admin, "unload_lora_adapter", lora_name="poem-2", lora_int_id=None)  # vLLM's body
    assert unloaded.json() == {"id": "poem-2", "object": "model", "deleted": True}
    assert [card.id for card in api.models.list().data] == [MODEL, "legal", "poem"]
    with pytest.raises(openai.NotFoundError):
        complete(api, "poem-2")


def test_a_reused_slot_does_not_answer_from_the_previous_adapters_cached_prompt(served):
    url, api, admin, _, adapters, _ = served
    assert load(url, admin, "first", adapters["poem"]) == 200
    complete(api, "first")  # its prompt's keys and values, computed with poem's weights, go to the prefix cache
    assert post(url, admin, "unload_lora_adapter", lora_name="first").status_code == 200
    assert load(url, admin, "second", adapters["legal"]) == 200
    assert complete(api, "second") == complete(api, "legal")
    assert post(url, admin, "unload_lora_adapter", lora_name="second").status_code == 200


def test_unloading_an_adapter_in_use_is_refused_until_its_requests_end(served):
    url, api, admin, _, adapters, _ = served
    assert load(url, admin, "busy", adapters["legal"]) == 200
    stream = api.completions.create(model="busy", prompt=PROMPT, max_tokens=200, stream=True, **GREEDY_BODY)
    next(iter(stream))  # the request runs
    refused = post(url, admin, "unload_lora_adapter", lora_name="busy")
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "adapter_in_use")
    assert "serves 1 unfinished request" in refused.json()["error"]["message"]
    stream.close()  # the server aborts the request
    for _ in range(50):
        if post(url, admin, "unload_lora_adapter", lora_name="busy").status_code == 200:
            break
        time.sleep(0.1)
    assert "busy" not in [card.id for card in api.models.list().data]


def test_load_inplace_replaces_a_loaded_adapters_weights_unless_requests_use_it(served):
    """vLLM's load_inplace: the name keeps serving, from the new folder, and never from the old weights' cached
    prompt; without it a loaded name is refused, and while a request uses the adapter the replacement is."""
    url, api, admin, _, adapters, _ = served
    assert load(url, admin, "tuned", adapters["poem"]) == 200
    assert complete(api, "tuned") == complete(api, "poem")  # its prompt's keys and values go to the prefix cache
    refused = post(url, admin, "load_lora_adapter", lora_name="tuned", lora_path=str(adapters["legal"]))
    assert refused.status_code == 409 and "load_inplace=true" in refused.json()["error"]["message"]
    replaced = post(url, admin, "load_lora_adapter", lora_name="tuned", lora_path=str(adapters["legal"]),
                    load_inplace=True)  # fmt: skip
    assert (replaced.status_code, replaced.json()["root"]) == (200, str(adapters["legal"]))
    assert complete(api, "tuned") == complete(api, "legal") != complete(api, "poem")
    assert [card.id for card in api.models.list().data].count("tuned") == 1
    stream = api.completions.create(model="tuned", prompt=PROMPT, max_tokens=200, stream=True, **GREEDY_BODY)
    next(iter(stream))  # the request runs
    busy = post(url, admin, "load_lora_adapter", lora_name="tuned", lora_path=str(adapters["poem"]), load_inplace=True)
    assert (busy.status_code, busy.json()["error"]["code"]) == (409, "adapter_in_use")
    stream.close()
    for _ in range(50):
        if post(url, admin, "unload_lora_adapter", lora_name="tuned").status_code == 200:
            break
        time.sleep(0.1)
    fresh = post(url, admin, "load_lora_adapter", lora_name="fresh", lora_path=str(adapters["poem"]), load_inplace=True)
    assert fresh.status_code == 200  # a name not loaded yet is loaded, as vLLM does
    assert post(url, admin, "unload_lora_adapter", lora_name="fresh").status_code == 200


def test_admin_routes_refuse_plain_keys_unknown_names_names_in_use_and_folders_without_an_adapter(served, tmp_path):
    url, _, admin, user, adapters, _ = served

    def error(response: httpx.Response) -> tuple[int, str]:
        return response.status_code, response.json()["error"]["code"]

    assert error(post(url, user, "load_lora_adapter", lora_name="x", lora_path=str(adapters["poem"]))) == (
        403, "admin_required",
    )  # fmt: skip
    assert error(post(url, admin, "unload_lora_adapter", lora_name="medical")) == (404, "model_not_found")
    assert error(post(url, admin, "load_lora_adapter", lora_name="legal", lora_path=str(adapters["poem"]))) == (
        409, "adapter_exists",
    )  # fmt: skip
    assert error(post(url, admin, "load_lora_adapter", lora_name=MODEL, lora_path=str(adapters["poem"]))) == (
        409, "adapter_exists",
    )  # fmt: skip
    too_long = post(url, admin, "load_lora_adapter", lora_name="x", lora_path="/" + "x" * 5000)  # was a 500
    assert error(too_long) == (400, "invalid_adapter")
    assert too_long.json()["error"]["message"].endswith("... (5,001 characters) cannot be read: File name too long")
    empty = post(url, admin, "load_lora_adapter", lora_name="empty", lora_path=str(tmp_path))
    assert error(empty) == (400, "invalid_adapter") and "adapter_config.json" in empty.json()["error"]["message"]
    assert error(post(url, admin, "load_lora_adapter", lora_name="x")) == (400, "invalid_value")  # no lora_path
    spaced = post(url, admin, "load_lora_adapter", lora_name="x y", lora_path=str(adapters["poem"]))
    assert error(spaced) == (400, "invalid_value") and spaced.json()["error"]["param"] == "lora_name"
    damaged = tmp_path / "damaged"
    shutil.copytree(adapters["poem"], damaged)
    (damaged / ADAPTER_WEIGHTS_FILE).write_bytes((damaged / ADAPTER_WEIGHTS_FILE).read_bytes()[:3000])
    truncated = post(url, admin, "load_lora_adapter", lora_name="damaged", lora_path=str(damaged))
    assert error(truncated) == (400, "invalid_adapter")
    assert f"{damaged / ADAPTER_WEIGHTS_FILE}: not a valid safetensors file" in truncated.json()["error"]["message"]


def test_an_adapter_loaded_under_a_long_name_is_listed_by_its_start_in_later_refusals(served):
    """vLLM takes a lora_name of any length, and so does the server; the refusals that list the served models (a
    request's 404, an unload's) show a long one by its start, as they show a long name asked for. A request it serves
    is answered and recorded under its whole name, as /v1/models lists it."""
    url, api, admin, _, adapters, model_dir = served
    name = "x" * 5000
    assert load(url, admin, name, adapters["poem"]) == 200
    try:
        assert api.completions.create(model=name, prompt=PROMPT, max_tokens=1).model == name
        ledger = sqlite3.connect(model_dir.parent / "serve.db")
        assert ledger.execute("SELECT model FROM usage ORDER BY id DESC LIMIT 1").fetchone() == (name,)
        with pytest.raises(openai.NotFoundError) as refused:
            complete(api, "medical")
        unload = error_of(post(url, admin, "unload_lora_adapter", lora_name="medical"), 404)
    finally:
        assert post(url, admin, "unload_lora_adapter", lora_name=name).status_code == 200
    assert refused.value.message.endswith(f"you may use 'model', 'legal', 'poem', '{'x' * 79}... (5,000 characters)")
    assert unload["message"] == f"no adapter 'medical'; loaded: legal, poem, {'x' * 80}... (5,000 characters)"


def test_a_head_rows_adapter_loaded_at_run_time_answers_as_merged_into_the_base(served, tmp_path):
    """An adapter with trained output-head rows (lora.head_tokens) beside LoRA serves per row, as its merge does."""
    url, api, admin, _, _, model_dir = served
    recipe = AdapterConfig(rank=4, feed_forward=(), experts=(), head_tokens=len(HEAD_ROWS))
    rows = write_random_adapter(model_dir, tmp_path / "rows", 3, recipe, HEAD_ROWS)
    assert load(url, admin, "rows", rows) == 200
    merged = Engine.from_pretrained(model_dir, adapter=rows).generate([PROMPT], SamplingParams(**ENGINE_GREEDY))
    with ThreadPoolExecutor(3) as pool:  # in one batch with the base and another adapter
        answers = list(pool.map(lambda model: complete(api, model), ["rows", MODEL, "legal"]))
    assert answers[0] == merged[0].text != answers[1]
    assert post(url, admin, "unload_lora_adapter", lora_name="rows").status_code == 200


def test_load_and_unload_bodies_are_parsed_off_the_event_loop(tmp_path, monkeypatch):
    """Their bodies (up to --max-body-bytes, 4 MiB of JSON by default) were parsed on the event loop, as the
    generation, moderation and tokenize routes' no longer are: every stream and /health waited for it."""
    model_dir = make_model_dir(tmp_path)
    folder = write_random_adapter(model_dir, tmp_path / "poem", seed=2)
    parsed_on_the_loop = []  # the event loop runs in the main thread (`run`)

    def parse_body_noting_its_thread(schema, raw):
        parsed_on_the_loop.append(threading.current_thread() is threading.main_thread())
        return parse_body(schema, raw)

    monkeypatch.setattr(adapter_routes, "parse_body", parse_body_noting_its_thread)
    app = create_app(Engine.from_pretrained(model_dir), open_database(tmp_path / "db"))  # open: loopback JSON only

    async def scenario(client):
        loaded = await client.post("/v1/load_lora_adapter", json={"lora_name": "poem", "lora_path": str(folder)})
        return loaded, await client.post("/v1/unload_lora_adapter", json={"lora_name": "poem"})

    loaded, unloaded = run(app, scenario)
    assert loaded.json()["id"] == "poem" and unloaded.json() == {"id": "poem", "object": "model", "deleted": True}
    assert parsed_on_the_loop == [False, False]  # was: [True, True]
