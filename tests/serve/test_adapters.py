"""Serving LoRA adapters: `--adapter NAME=DIR` models, listed, picked per request, batched together, billed by name."""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from seekstack.adapters.config import AdapterConfig
from seekstack.infer.engine import Engine
from seekstack.serve.app import UNKNOWN_MODEL, create_app
from seekstack.serve.database import open_database
from seekstack.serve.keys import KeyStore
from tests.adapters.support import write_random_adapter
from tests.serve.server import error_of, make_model_dir, run, running_server

MODEL = "model"
GREEDY = dict(max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
# a reply still running when /metrics is read: 200 tokens ran out in ~1-2 s under load, before a scrape (~0.3 s each
# beside a stream then) saw it, in 1 run of 16; a reply this long runs ~10x longer, and its request ends once closed
LONG_REPLY = 2000


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model_dir = make_model_dir(root, max_position_embeddings=LONG_REPLY + 16)
    adapters = {name: write_random_adapter(model_dir, root / name, seed) for name, seed in (("legal", 1), ("poem", 2))}
    database = root / "serve.db"
    keys = KeyStore(open_database(database))
    key = keys.create("adapters")
    flags = [flag for name, folder in adapters.items() for flag in ("--adapter", f"{name}={folder}")]
    with running_server(model_dir, database, *flags, "--max-loras", "3", "--max-lora-rank", "4") as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120), database, adapters


def complete(api: openai.OpenAI, model: str, prompt: str = "The quick brown") -> str:
    reply = api.completions.create(model=model, prompt=prompt, **GREEDY)
    assert reply.model == model
    return reply.choices[0].text


def test_models_lists_the_base_and_each_adapter_with_its_parent(served):
    api, _, adapters = served
    cards = api.models.list().data
    assert [card.id for card in cards] == [MODEL, "legal", "poem"]
    assert [getattr(card, "parent", None) for card in cards] == [None, MODEL, MODEL]
    assert getattr(cards[1], "root", None) == str(adapters["legal"])


def test_the_request_model_picks_the_adapter_and_the_ledger_records_it(served):
    api, database, _ = served
    texts = {model: complete(api, model) for model in (MODEL, "legal", "poem")}
    assert len(set(texts.values())) == 3  # each adapter changes the greedy continuation
    assert complete(api, "legal") == texts["legal"]
    rows = sqlite3.connect(database).execute("SELECT model, status FROM usage ORDER BY id DESC LIMIT 4").fetchall()
    assert rows[::-1] == [(MODEL, 200), ("legal", 200), ("poem", 200), ("legal", 200)]


def test_requests_for_different_adapters_in_one_batch_answer_as_alone(served):
    api, _, _ = served
    requests = [(MODEL, "Hello, world"), ("legal", "Hello, world"), ("poem", "def add"), ("legal", "def add")]
    alone = [complete(api, model, prompt) for model, prompt in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda request: complete(api, *request), requests * 2))
    assert together == alone * 2


def adapters_in_use_once_the_metrics_say(api: openai.OpenAI, running: str) -> dict[str, str]:
    """The labels of /metrics' lora_requests_info once its running adapters read `running` (the gauges follow the
    engine's steps, a moment after the tokens they delivered), or as they are after some seconds."""
    for _ in range(100):
        text = httpx.get(str(api.base_url).replace("/v1/", "/metrics")).text
        [labels] = [sample.labels for family in text_string_to_metric_families(text) for sample in family.samples
                    if sample.name == "seekstack:lora_requests_info"] or [{}]  # fmt: skip
        if labels.get("running_lora_adapters") == running:
            break
        time.sleep(0.05)
    return labels


def test_metrics_name_the_adapters_requests_use_as_vllms_lora_requests_info(served):
    api, _, _ = served
    long = {**GREEDY, "max_tokens": LONG_REPLY}
    stream = api.completions.create(model="poem", prompt="The quick", stream=True, **long)
    next(iter(stream))  # the request runs
    during = adapters_in_use_once_the_metrics_say(api, "poem")
    stream.close()
    complete(api, "legal")
    assert during == {"max_lora": "3", "waiting_lora_adapters": "", "running_lora_adapters": "poem"}  # --max-loras
    assert adapters_in_use_once_the_metrics_say(api, "") == {**during, "running_lora_adapters": ""}


def test_loads_past_serves_max_loras_and_max_lora_rank_are_refused_with_400(served):
    """`serve --max-loras 3 --max-lora-rank 4` (vLLM's flags): a third adapter loads beside the two given, a fourth
    and one of rank 8 are refused, naming the limit as the option that set it (they named the engine's keyword,
    max_loras=3 and max_lora_rank=4, which an HTTP user never sent); the slot refusal's param is lora_name (it gave
    lora_path: the name is what has no slot), the rank's lora_path."""
    api, database, adapters = served
    admin = KeyStore(open_database(database)).create("admin", admin=True)
    url = str(api.base_url).replace("/v1/", "/v1/load_lora_adapter")

    def load(name: str, folder) -> httpx.Response:
        body = {"lora_name": name, "lora_path": str(folder)}
        return httpx.post(url, json=body, headers={"Authorization": f"Bearer {admin}"}, timeout=120)

    wide = write_random_adapter(database.parent / "model", database.parent / "wide", 3, AdapterConfig(rank=8))
    assert load("third", adapters["legal"]).status_code == 200
    try:
        slots, rank = error_of(load("fourth", adapters["poem"]), 400), error_of(load("wide", wide), 400)
    finally:
        unloaded = httpx.post(url.replace("/load_", "/unload_"), json={"lora_name": "third"},
                              headers={"Authorization": f"Bearer {admin}"}, timeout=120)  # fmt: skip
    assert unloaded.status_code == 200
    assert slots["code"] == rank["code"] == "invalid_value"
    assert (slots["param"], rank["param"]) == ("lora_name", "lora_path")  # the slot refused is the name's
    assert slots["message"].startswith("this server's --max-loras: all 3 adapter slots are taken, so adapter 'fourth'")
    assert "(loaded: legal, poem, third)" in slots["message"]
    assert rank["message"].startswith(f"this server's --max-lora-rank is 4, less than the rank 8 of adapter 'wide' "
                                      f"({wide})")  # fmt: skip
    assert [card.id for card in api.models.list().data] == [MODEL, "legal", "poem"]


def test_an_unknown_model_gets_404_in_openai_shape_naming_the_served_ones(served):
    api, database, _ = served
    with pytest.raises(openai.NotFoundError) as refused:
        complete(api, "medical")
    assert refused.value.code == "model_not_found"
    message = "'medical' does not exist or you do not have access to it; you may use 'model', 'legal', 'poem'"
    assert message in str(refused.value)
    row = sqlite3.connect(database).execute("SELECT model, status FROM usage ORDER BY id DESC LIMIT 1").fetchone()
    assert row == (UNKNOWN_MODEL, 404)  # 'medical' in the log


def test_a_request_failing_validation_is_recorded_under_the_adapter_it_names(served):
    """A body that failed schema validation (n "many") was recorded under the base model whatever model it named;
    it is recorded under the adapter it names, or UNKNOWN_MODEL for a model not served."""
    api, database, _ = served
    for model in ("legal", "medical"):
        with pytest.raises(openai.BadRequestError):
            api.completions.create(model=model, prompt="x", max_tokens=4, extra_body={"n": "many"})
    rows = sqlite3.connect(database).execute("SELECT model, status FROM usage ORDER BY id DESC LIMIT 2").fetchall()
    assert rows[::-1] == [("legal", 400), (UNKNOWN_MODEL, 400)]


def test_a_request_whose_adapter_is_unloaded_while_it_is_admitted_gets_404_model_not_found(tmp_path):
    model_dir = make_model_dir(tmp_path)
    legal = write_random_adapter(model_dir, tmp_path / "legal", 1)
    engine = Engine.from_pretrained(model_dir, adapters={"legal": legal})
    app = create_app(engine, open_database(tmp_path / "serve.db"))
    add_request = engine.add_request

    def unloaded_first(*args, **kwargs):  # the unload lands between the request's model check and its admission
        engine.unload_adapter("legal")
        return add_request(*args, **kwargs)

    engine.add_request = unloaded_first
    request = {"model": "legal", "prompt": "The quick brown", "max_tokens": 4}
    response = run(app, lambda client: client.post("/v1/completions", json=request))
    error = error_of(response, 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert error["message"] == "the model 'legal' does not exist or you do not have access to it; you may use 'model'"
    row = sqlite3.connect(tmp_path / "serve.db").execute("SELECT model, status FROM usage").fetchall()
    assert row == [("legal", 404)]


def test_a_lora_path_starting_with_a_tilde_is_under_the_servers_home_as_in_vllm(tmp_path, monkeypatch):
    model_dir = make_model_dir(tmp_path)
    write_random_adapter(model_dir, tmp_path / "home" / "legal", 1)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    app = create_app(Engine.from_pretrained(model_dir), open_database(tmp_path / "serve.db"))
    body = {"lora_name": "legal", "lora_path": "~/legal"}
    response = run(app, lambda client: client.post("/v1/load_lora_adapter", json=body))
    assert response.status_code == 200, response.text
    assert response.json()["root"] == str(tmp_path / "home" / "legal")
    body = {"lora_name": "typo", "lora_path": "~no-such-user-here/legal"}  # of no such user: was a 500 (RuntimeError)
    missing = run(app, lambda client: client.post("/v1/load_lora_adapter", json=body))
    assert (missing.status_code, missing.json()["error"]["code"]) == (400, "invalid_adapter")
    assert missing.json()["error"]["message"].startswith("~no-such-user-here/legal does not exist; give an adapter")
