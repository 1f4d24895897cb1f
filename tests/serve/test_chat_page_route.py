"""The chat page's route, in process: its content type and Content-Security-Policy, and the routes its script calls."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from seekstack.infer.engine import Engine
from seekstack.serve.app import create_app
from seekstack.serve.chat_page import inline_source
from seekstack.serve.database import open_database
from tests.serve.server import make_model_dir, run


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    return Engine.from_pretrained(make_model_dir(tmp_path_factory.mktemp("page")))


def page_of(engine: Engine, database_path):
    app = create_app(engine, open_database(database_path))

    async def scenario(client):
        return await client.get("/")

    return app, run(app, scenario)


def sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_page_runs_only_its_own_script_and_style_and_fetches_only_its_server(engine, tmp_path):
    """The page's policy was frame-ancestors alone: any script or inline handler that reached the page as HTML would
    have run, with the API key the page holds."""
    _, page = page_of(engine, tmp_path / "db")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    policy = dict(directive.split(" ", 1) for directive in page.headers["content-security-policy"].split("; "))
    assert policy == {
        "default-src": "'none'",
        "script-src": sha256_source(inline_source(page.text, "script")),
        "style-src": sha256_source(inline_source(page.text, "style")),
        "connect-src": "'self'",
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }
    markup = re.sub(r"<script>.*</script>", "", page.text, flags=re.DOTALL)
    assert not re.search(r"\s(on\w+|style)=", markup)  # inline handlers and styles the policy would refuse


def test_every_path_the_page_fetches_is_a_route_of_the_server(engine, tmp_path):
    app, page = page_of(engine, tmp_path / "db")
    fetched = re.findall(r'fetch\("([^"]+)"', inline_source(page.text, "script"))
    assert sorted(fetched) == ["/v1/chat/completions", "/v1/models"]
    routes = {route.path for route in app.routes}
    assert set(fetched) <= routes
