"""Schemathesis over the server's own /openapi.json: generated requests (valid and invalid) for every operation,
the generation endpoints included, never get a 5xx, always get an answer the schema declares (status, content
type, body), and every error comes in OpenAI's shape.

In process (ASGI) on a tiny random-weight model with a 32-token context, so a generated request generates at
most 31 tokens per choice; `MAX_EXAMPLES` per operation and mode bounds the run."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from seekstack.infer.engine import Engine
from seekstack.serve.app import create_app
from seekstack.serve.database import open_database
from seekstack.serve.keys import KeyStore
from tests.serve.server import make_model_dir

MAX_EXAMPLES = 25  # per operation and mode: up to 6 x 2 x 25 = 300 cases
ERROR_FIELDS = {"message", "type", "param", "code"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def served_api(tmp_path_factory):
    """The app's schema on a tiny model, its engine thread running, and an admin key."""
    folder = tmp_path_factory.mktemp("fuzz")
    database = open_database(folder / "fuzz.db")
    key = KeyStore(database).create("fuzzer", admin=True)
    app = create_app(Engine.from_pretrained(make_model_dir(folder), max_model_len=32), database)
    app.state.server.bridge.start()
    yield schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Authorization": f"Bearer {key}"}), key
    app.state.server.bridge.stop()


def fuzz(operation, mode: GenerationMode, key: str, statuses: Counter) -> None:
    """Up to `MAX_EXAMPLES` generated requests to `operation`, each checked; `statuses` counts the answers."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)  # fmt: skip
    def answers_as_declared(case):
        response = case.call(headers={"Authorization": f"Bearer {key}"})
        case.validate_response(response, checks=CHECKS)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == ERROR_FIELDS, response.text
        statuses[response.status_code] += 1

    answers_as_declared()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_get_declared_answers_and_openai_errors(served_api, mode):
    schema, key = served_api
    answered: dict[str, Counter] = {}
    for operation in (result.ok() for result in schema.get_all_operations()):
        if mode == GenerationMode.NEGATIVE and not (len(operation.body) or len(operation.query)):
            continue  # nothing to get wrong in a request without parameters
        fuzz(operation, mode, key, answered.setdefault(operation.label, Counter()))
    summary = "; ".join(f"{label} {dict(counts)}" for label, counts in answered.items())
    print(f"\nschemathesis, {mode.value}: {summary}")
    assert all(sum(counts.values()) >= 1 for counts in answered.values())
    if mode == GenerationMode.POSITIVE:  # the generation endpoints were reached, not only refused
        assert answered["POST /v1/completions"][200] and answered["POST /v1/chat/completions"][200]
