"""/openapi.json says what the server does: a body the schema allows is served, one it forbids is refused, null is
allowed where OpenAI documents a field "or null" and read as the field's default, and each operation has an id of
its own. The schema's verdict comes from jsonschema_rs, the validator schemathesis checks requests with.

In process, through the app's ASGI interface with its engine thread running."""

from __future__ import annotations

import warnings

import jsonschema_rs
import pytest

from seekstack.infer.engine import Engine
from seekstack.serve.app import create_app
from seekstack.serve.database import open_database
from tests.serve.server import error_of, make_model_dir, run

GREEDY = {"model": "model", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
CHAT = {**GREEDY, "messages": [{"role": "user", "content": "Hello"}]}
COMPLETION = {**GREEDY, "prompt": "The quick brown"}
# OpenAI's fields documented "or null" (and vLLM's extras) that the greedy bodies above leave to their defaults
SHARED_NULLABLE = ["n", "stream", "stream_options", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
                   "logit_bias", "user", "top_k", "min_p", "repetition_penalty", "skip_special_tokens"]  # fmt: skip
CHAT_NULLABLE = [*SHARED_NULLABLE, "logprobs", "top_logprobs", "max_completion_tokens", "response_format"]
COMPLETION_NULLABLE = [*SHARED_NULLABLE, "logprobs", "echo", "best_of", "suffix"]
SET_BY_GREEDY = ["temperature", "max_tokens", "ignore_eos"]  # nullable too, but a null would change the reply
USER_NULL = {**CHAT, "messages": [{"role": "user", "content": None}]}
ASSISTANT_NULL = {**CHAT, "messages": [*CHAT["messages"], {"role": "assistant", "content": None}, *CHAT["messages"]]}
CALL = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": ""}}]}
RESULT = {"role": "tool", "tool_call_id": "c1", "content": "5"}
TOOL_RESULT = {**CHAT, "messages": [*CHAT["messages"], CALL, RESULT]}
NAMELESS_RESULT = {**CHAT, "messages": [*CHAT["messages"], CALL, {"role": "tool", "content": "5"}]}
CALL_WITHOUT_CONTENT = {**CHAT, "messages": [*CHAT["messages"], {"role": "assistant", "tool_calls": CALL["tool_calls"]},
                                             RESULT]}  # fmt: skip


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    return Engine.from_pretrained(make_model_dir(tmp_path_factory.mktemp("conformance")))


@pytest.fixture
def app(engine, tmp_path):
    return create_app(engine, open_database(tmp_path / "db"))


def post_each(app, requests: list[tuple[str, dict | None]]) -> list:
    """Each (route, JSON body, or None for an empty one) posted in turn to `app`; the responses."""

    async def post(client, route: str, body: dict | None):
        if body is None:
            return await client.post(route, content=b"", headers={"Content-Type": "application/json"})
        return await client.post(route, json=body)

    async def scenario(client):
        return [await post(client, route, body) for route, body in requests]

    return run(app, scenario)


def request_schema(document: dict, route: str) -> dict:
    """The JSON Schema of `route`'s request body, its references resolvable."""
    body = document["paths"][route]["post"]["requestBody"]
    assert body["required"], route
    return {**body["content"]["application/json"]["schema"], "components": document["components"]}


def schema_allows(document: dict, route: str, body: dict | None) -> bool:
    return body is not None and jsonschema_rs.Draft202012Validator(request_schema(document, route)).is_valid(body)


@pytest.mark.parametrize(
    "route, body, nullable",
    [("/v1/chat/completions", CHAT, CHAT_NULLABLE), ("/v1/completions", COMPLETION, COMPLETION_NULLABLE)],
)
def test_null_is_allowed_and_read_as_the_default_for_every_nullable_field(app, route, body, nullable):
    document = app.openapi()
    for field in [*nullable, *SET_BY_GREEDY]:
        assert schema_allows(document, route, {**body, field: None}), field
    nulls = {field: None for field in nullable}
    plain, with_nulls = post_each(app, [(route, body), (route, {**body, **nulls})])
    assert with_nulls.status_code == 200, with_nulls.text
    assert with_nulls.json()["choices"] == plain.json()["choices"]
    assert with_nulls.json()["usage"] == plain.json()["usage"]


def test_a_completion_with_max_tokens_null_gets_the_default_16_tokens_not_the_whole_context(app):
    """max_tokens null ran to the context's end (254 tokens of 256), 16 times what a call without it gets."""
    body = {field: value for field, value in COMPLETION.items() if field != "max_tokens"}
    null, absent = post_each(app, [("/v1/completions", {**body, "max_tokens": None}), ("/v1/completions", body)])
    assert null.json()["usage"]["completion_tokens"] == absent.json()["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize(
    "route, body, allowed",
    [
        ("/v1/moderations", {"input": []}, False),
        ("/v1/moderations", {"input": ""}, False),
        ("/v1/moderations", {"input": ["fine"]}, True),
        ("/v1/moderations", {"input": ["fine", ""]}, False),  # was: "" refused alone, answered unflagged in a list
        ("/v1/moderations", {"input": [{"type": "text", "text": "fine"}]}, True),
        ("/v1/chat/completions", USER_NULL, False),
        ("/v1/chat/completions", ASSISTANT_NULL, True),
        ("/v1/chat/completions", TOOL_RESULT, True),
        ("/v1/chat/completions", NAMELESS_RESULT, False),  # was: served, where OpenAI requires tool_call_id
        ("/v1/chat/completions", CALL_WITHOUT_CONTENT, True),  # was: refused, where OpenAI needs none
        # a refusal in place of the reply: content null or empty beside it, none else (the schema allowed any)
        *(
            (
                "/v1/chat/completions",
                {
                    **CHAT,
                    "messages": [
                        *CHAT["messages"],
                        {"role": "assistant", "content": content, "refusal": "No."},
                        *CHAT["messages"],
                    ],
                },
                allowed,
            )
            for content, allowed in (
                (None, True),
                ("", True),
                ([], False),  # was: allowed, where OpenAI refuses an empty array
                ("Sure.", False),
                ([{"type": "text", "text": "Sure."}], False),
            )
        ),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, False),
        ("/v1/completions", {**COMPLETION, "suffix": ""}, True),
        ("/v1/completions", {**COMPLETION, "echo": None}, True),
        ("/v1/chat/completions", {**CHAT, "n": None, "stream": None, "logprobs": None}, True),
        ("/v1/load_lora_adapter", None, False),
        ("/v1/load_lora_adapter", {"lora_name": "", "lora_path": "folder"}, False),
        ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "folder", "extra": 1}, False),
        ("/v1/unload_lora_adapter", {}, False),
        ("/v1/unload_lora_adapter", {"lora_name": ""}, False),
        ("/v1/unload_lora_adapter", {"lora_name": "absent"}, True),  # 404: a valid request, for no adapter
    ],
)
def test_the_schema_allows_exactly_the_bodies_the_server_reads(app, route, body, allowed):
    [response] = post_each(app, [(route, body)])
    assert schema_allows(app.openapi(), route, body) == allowed
    assert (response.status_code != 400) == allowed, response.text


def test_a_body_the_adapter_routes_refuse_gets_an_openai_error_naming_the_field(app):
    empty_name, wrong_type = post_each(
        app, [("/v1/unload_lora_adapter", {"lora_name": ""}), ("/v1/load_lora_adapter", {"lora_name": 1})]
    )
    assert error_of(empty_name, 400)["param"] == "lora_name"
    error = error_of(wrong_type, 400)
    assert (error["param"], error["code"]) == ("lora_name", "invalid_value")
    assert "lora_path: Field required" in error["message"]


def test_the_adapter_routes_document_their_json_bodies(app):
    document = app.openapi()
    load = request_schema(document, "/v1/load_lora_adapter")
    unload = request_schema(document, "/v1/unload_lora_adapter")
    assert (load["required"], unload["required"]) == (["lora_name", "lora_path"], ["lora_name"])
    assert load["properties"]["lora_path"] == {"type": "string", "minLength": 1, "title": "Lora Path"}


def test_every_operation_has_an_id_of_its_own_and_health_answers_get_and_head(app):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FastAPI warns "Duplicate Operation ID"
        document = app.openapi()
    ids = [operation["operationId"] for path in document["paths"].values() for operation in path.values()]
    assert len(ids) == len(set(ids)), ids
    assert set(document["paths"]["/health"]) == {"get", "head"}
    assert set(document["paths"]["/ping"]) == {"get", "post"}  # vLLM's (were 404)

    async def scenario(client):
        return [(await client.get("/health")).status_code, (await client.head("/health")).status_code]

    assert run(app, scenario) == [200, 200]


def test_vllms_ping_answers_as_health_and_version_gives_seekstacks(app):
    """vLLM's GET/POST /ping (SageMaker's probe) and GET /version answered 404."""
    from importlib.metadata import version

    async def scenario(client):
        return [await client.get("/health"), await client.get("/ping"), await client.post("/ping"),
                await client.get("/version")]  # fmt: skip

    health, get_ping, post_ping, server_version = run(app, scenario)
    assert get_ping.status_code == post_ping.status_code == 200 and get_ping.json() == post_ping.json() == health.json()
    assert server_version.json() == {"version": version("seekstack")}


def test_usage_since_and_until_are_documented_as_the_dates_they_must_be(app):
    parameters = {p["name"]: p for p in app.openapi()["paths"]["/v1/admin/usage"]["get"]["parameters"]}
    assert parameters["since"]["schema"]["format"] == parameters["until"]["schema"]["format"] == "date"

    async def scenario(client):
        asked = [{"since": "2024-02-29"}, {"since": "yesterday"}, {"until": "2024-02-30"}, {"since": "2024-03-02",
                 "until": "2024-03-01"}, {"since": "2024-03-01", "until": "2024-03-01"}]  # fmt: skip
        return [await client.get("/v1/admin/usage", params=params) for params in asked]

    day, not_a_day, not_a_date, backwards, one_day = run(app, scenario)
    assert day.status_code == one_day.status_code == 200, day.text
    assert error_of(not_a_day, 400)["param"] == "since"
    assert error_of(not_a_date, 400)["param"] == "until"  # was: until unknown, ignored
    assert error_of(backwards, 400) == {
        "message": "since 2024-03-02 is after until 2024-03-01: no day is in between", "type": "invalid_request_error",
        "param": "until", "code": "invalid_value",
    }  # fmt: skip
