"""The chat page's route, in process: its content type and Content-Security-Policy, and the routes its script calls."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from typer.testing import CliRunner

from seekstack.cli import app as cli
from seekstack.infer.engine import Engine
from seekstack.serve.app import create_app
from seekstack.serve.chat_page import inline_source
from seekstack.serve.database import open_database
from seekstack.serve.launch import ServeOptions, build_server
from tests.serve.server import error_of, free_port, make_model_dir, run


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    return Engine.from_pretrained(make_model_dir(tmp_path_factory.mktemp("page")))


def page_of(engine: Engine, database_path, chat_page: bool = True):
    app = create_app(engine, open_database(database_path), chat_page=chat_page)

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


def test_no_chat_page_leaves_slash_to_404_as_llama_servers_no_webui(engine, tmp_path, monkeypatch):
    """The page could not be turned off: a server meant for API clients only still served it."""
    _, page = page_of(engine, tmp_path / "db", chat_page=False)
    assert error_of(page, 404)["message"] == "no route GET /"
    built = []

    def build_server(model_dir, options, **hooks):
        built.append(options)
        raise ValueError("built")

    monkeypatch.setattr("seekstack.serve.launch.build_server", build_server)
    model_dir = str(engine.model_dir)
    for flags, served in (([], True), (["--no-chat-page"], False)):
        CliRunner().invoke(cli, ["serve", "--model", model_dir, "--db", str(tmp_path / "k.db"), *flags])
        assert built.pop().chat_page is served


def test_the_servers_start_line_names_the_chat_page_only_when_it_is_served(engine, tmp_path):
    """With --no-chat-page the start line still said "(chat page at /)"."""
    for chat_page in (True, False):
        options = ServeOptions(port=free_port(), database=str(tmp_path / f"{chat_page}.db"), chat_page=chat_page)
        _, summary = build_server(engine.model_dir, options)
        assert ("(chat page at /)" in summary) is chat_page, summary
