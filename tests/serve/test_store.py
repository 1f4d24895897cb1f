"""Keys, price plans, the usage ledger and rate limits, without a server."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seekstack.cli import app
from seekstack.serve import billing
from seekstack.serve import database as database_module
from seekstack.serve import ledger as ledger_module
from seekstack.serve.billing import BILL_EVERY_TOKENS, Bill
from seekstack.serve.database import Database, cost_amount, open_database
from seekstack.serve.keys import (
    KEY_PREFIX,
    MAX_BILLED_TOKENS,
    MAX_LIMIT,
    Budget,
    KeyStore,
    KeyStoreError,
    Plan,
    hash_key,
    utc_time,
)
from seekstack.serve.ledger import Ledger, UsageRecord, parse_day
from seekstack.serve.ratelimit import Charge, NeverFits, RateLimited, RateLimiter
from tests.serve.server import free_port, new_postgres_database, postgres_or_skip


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[str]:
    with postgres_or_skip() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_location(request, tmp_path) -> str:
    """The same tests on both backends: a SQLite file, and a fresh database on the PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "serve.db")
    return new_postgres_database(request.getfixturevalue("postgres_server"))


@pytest.fixture
def database(database_location) -> Database:
    return open_database(database_location)


def usage(key_name: str | None, prompt: int, completion: int, status: int = 200, model: str = "tiny") -> UsageRecord:
    return UsageRecord(key_name, model, "/v1/chat/completions", prompt, completion, 0.25, status)


def test_key_is_stored_only_as_its_hash(tmp_path):
    key = KeyStore(open_database(tmp_path / "serve.db")).create("alice")
    assert key.startswith("sk-ss-") and len(key) > 40
    raw = (tmp_path / "serve.db").read_bytes() + (tmp_path / "serve.db-wal").read_bytes()
    assert key.encode() not in raw
    assert hash_key(key).encode() in raw


def test_a_postgresql_url_is_shown_without_its_passwords():
    pytest.importorskip("psycopg")
    port = free_port()
    url = f"postgresql://bob:in-netloc@127.0.0.1:{port}/seek?password=in-query&sslpassword=for-the-key"
    with pytest.raises(ValueError) as refused:  # nothing listens there: the message names the database
        open_database(url)
    message = str(refused.value)
    assert f"postgresql://bob:***@127.0.0.1:{port}/seek?password=***&sslpassword=***" in message
    assert not any(secret in message for secret in ("in-netloc", "in-query", "for-the-key"))  # was: in-query shown


def test_verify_accepts_the_key_until_it_is_revoked(database):
    keys = KeyStore(database)
    key = keys.create("bob", rpm=10, tpm=1000, plan="default")
    found = keys.verify(key)
    assert (found.name, found.rpm, found.tpm, found.plan, found.admin) == ("bob", 10, 1000, "default", False)
    assert keys.verify(key + "x") is None
    keys.revoke("bob")
    assert keys.verify(key) is None
    assert keys.any_keys()  # a revoked key still closes the server: revoking the last key must not open it
    assert [k.name for k in keys.list()] == ["bob"] and keys.list()[0].revoked_at is not None


def test_key_errors_name_the_key_or_plan(database):
    keys = KeyStore(database)
    keys.create("carol")
    with pytest.raises(KeyStoreError, match="'carol' already exists"):
        keys.create("carol")
    with pytest.raises(KeyStoreError, match="no plan 'gold'"):
        keys.create("dave", plan="gold")
    with pytest.raises(KeyStoreError, match="rpm must be a whole number between 1 and"):
        keys.create("erin", rpm=0)
    for admin in ("no", "1"):  # int(admin): "no" was a bare ValueError, "1" an admin key
        with pytest.raises(KeyStoreError, match=re.escape(f"admin={admin!r} must be True or False")):
            keys.create("erin", admin=admin)
    with pytest.raises(KeyStoreError, match="no key named 'nobody' was ever created"):
        keys.revoke("nobody")
    for name in ("white space", "团队"):  # a Chinese name was told 'must be 1-64 letters', which it is
        with pytest.raises(KeyStoreError, match=f"^key name {name!r} must be 1-64 ASCII letters, digits or _.@- "):
            keys.create(name)
    for name, shown in ((None, "None"), ("e" * 5000, f"'{'e' * 79}... (5,000 characters)")):  # None: a bare TypeError
        with pytest.raises(KeyStoreError, match=re.escape(f"key name {shown} must be 1-64 ASCII letters")):
            keys.create(name)
    # an unknown name of 5,000 characters was echoed whole (twice, in a command to run): cut as the key name above
    long, shown, typed = "p" * 5000, f"'{'p' * 79}... (5,000 characters)", f"{'p' * 80}... (5,000 characters)"
    for refused, told in (
        (lambda: keys.create("erin", plan=long), f"no plan {shown}; create it with `seekstack keys plan {typed} "),
        (lambda: keys.set_plan(long, float("nan"), 1.0), f"prompt price of plan {shown} must be a finite number"),
        (lambda: keys.revoke(long), f"no key named {shown} was ever created;"),
        (lambda: keys.rotate(long), f"no active key named {shown} to rotate; `seekstack keys create --name {typed}`"),
    ):
        with pytest.raises(KeyStoreError) as error:
            refused()
        assert str(error.value).startswith(told)


def test_a_key_or_plan_name_beginning_with_a_dash_is_refused_as_the_command_line_reads_it_as_an_option(tmp_path):
    keys = KeyStore(open_database(tmp_path / "serve.db"))
    for refused in (lambda: keys.create("-x"), lambda: keys.set_plan("-gold", prompt_per_1k=1, completion_per_1k=1)):
        with pytest.raises(KeyStoreError, match="not beginning with -"):
            refused()
    # `keys create --name --admin` (the name forgotten) would make a key that `keys revoke --admin` cannot name
    created = CliRunner().invoke(app, ["keys", "create", "--name", "--admin", "--db", str(tmp_path / "cli.db")])
    assert created.exit_code != 0 and "key name '--admin' must be" in created.output, created.output
    assert keys.verify(keys.create("a-b.c@d_e")).name == "a-b.c@d_e"  # a dash after the first character is kept


def test_a_limit_beyond_the_database_integer_is_refused_naming_the_field_and_bound(tmp_path):
    keys = KeyStore(open_database(tmp_path / "serve.db"))
    for field in ("rpm", "tpm"):
        # "5" was Python's bare TypeError, 1.5 and True were stored
        for limit in (MAX_LIMIT + 1, "5", 1.5, True):
            told = rf"{field} must be a whole number between 1 and {MAX_LIMIT} .* got"
            with pytest.raises(KeyStoreError, match=told):
                keys.create("erin", **{field: limit})
    assert keys.verify(keys.create("erin", rpm=MAX_LIMIT, tpm=MAX_LIMIT)).rpm == MAX_LIMIT
    runner, db = CliRunner(), str(tmp_path / "cli.db")
    for flag, value in (("--rpm", "9223372036854775808"), ("--tpm", "99999999999999999999999")):
        refused = runner.invoke(app, ["keys", "create", "--name", "e2", flag, value, "--db", db])
        assert refused.exit_code == 2 and flag in refused.output and str(MAX_LIMIT) in refused.output, refused.output


def test_a_new_plan_name_is_refused_when_malformed_and_a_key_needs_a_plan_name(database):
    keys = KeyStore(database)
    for plan in ("", "white space", "x" * 65):
        with pytest.raises(KeyStoreError, match=f"plan name {plan!r} must be 1-64"):
            keys.set_plan(plan, prompt_per_1k=1, completion_per_1k=1)
    with pytest.raises(KeyStoreError, match="a key's plan name must not be empty"):
        keys.create("hank", plan="")
    with pytest.raises(KeyStoreError, match="no plan 'white space'"):
        keys.create("hank", plan="white space")
    assert not keys.any_keys() and [plan.name for plan in keys.plans()] == ["default"]


def test_a_plan_an_earlier_seekstack_named_freely_still_takes_new_keys_and_prices(database):
    keys = KeyStore(database)
    with database.transaction() as connection:  # names were not checked before: "Pro tier" may be in a database
        connection.execute("INSERT INTO plans (name, prompt_per_1k, completion_per_1k) VALUES ('Pro tier', 1, 2)")
    assert keys.set_plan("Pro tier", prompt_per_1k=3, completion_per_1k=4) == Plan("Pro tier", 3, 4)
    key = keys.create("ivan", plan="Pro tier")
    assert keys.verify(key).plan == "Pro tier"
    assert {plan.name: plan.prompt_per_1k for plan in keys.plans()} == {"Pro tier": 3, "default": 0.002}


def test_a_verified_key_comes_with_its_plans_prices_as_they_are_now(database):
    keys = KeyStore(database)
    gold = keys.set_plan("gold", prompt_per_1k=0.01, completion_per_1k=0.03, cached_prompt_per_1k=0.005)
    key = keys.create("judy", plan="gold")
    assert keys.verify(key).prices == gold  # read with the key: a request reads no plan apart
    repriced = keys.set_plan("gold", prompt_per_1k=0.02, completion_per_1k=0.06)
    assert keys.verify(key).prices == repriced


def test_a_key_may_name_any_served_model_but_not_an_empty_or_padded_one(database):
    keys = KeyStore(database)
    for model in ("", "   ", " tiny", "tiny\n", 1):  # 1 was Python's bare AttributeError ('int' ... 'strip')
        with pytest.raises(KeyStoreError, match=re.escape(f"model {model!r}: a model name must be a str, not empty")):
            keys.create("dave", models=("tiny", model))
    with pytest.raises(KeyStoreError, match=re.escape("models='legal' is one name: give a tuple of names, models=")):
        keys.create("dave", models="legal")  # was a key for the models 'l', 'e', 'g', 'a' and 'l'
    assert not keys.any_keys()
    key = keys.create("dave", models=("DeepSeek V3", "legal-v2", "org/base:1"))  # a folder's name may hold spaces
    assert keys.verify(key).models == ("DeepSeek V3", "legal-v2", "org/base:1")


def test_a_name_whose_keys_are_revoked_can_be_given_a_new_key(database):
    keys, ledger = KeyStore(database), Ledger(database)
    keys.set_plan("gold", prompt_per_1k=0.01, completion_per_1k=0.03)
    old = keys.create("late")
    ledger.record(usage("late", 1000, 0))
    keys.revoke("late")
    new = keys.create("late", plan="gold")  # was: "a key named 'late' already exists"
    with pytest.raises(KeyStoreError, match="an active key named 'late' already exists; rotate it"):
        keys.create("late")
    assert keys.verify(old) is None and keys.verify(new).plan == "gold"
    assert [(key.name, key.revoked_at is None) for key in keys.list()] == [("late", False), ("late", True)]
    assert ledger.record(usage("late", 1000, 0)) == pytest.approx(0.01)  # priced by the name's active key
    (day,) = ledger.daily("late")
    assert (day.requests, day.prompt_tokens) == (2, 2000)


def test_rotate_revokes_the_key_and_gives_its_name_a_new_one_with_its_settings(database):
    keys = KeyStore(database)
    keys.set_plan("gold", prompt_per_1k=0.01, completion_per_1k=0.03)
    old = keys.create("leaky", plan="gold", rpm=7, tpm=900, admin=True, models=("legal",))
    new = keys.rotate("leaky")
    assert keys.verify(old) is None and new != old
    rotated = keys.verify(new)
    assert (rotated.name, rotated.plan, rotated.rpm, rotated.tpm, rotated.admin, rotated.models) == (
        "leaky", "gold", 7, 900, True, ("legal",),
    )  # fmt: skip
    assert [key.revoked_at is None for key in keys.list()] == [False, True]
    keys.revoke("leaky")
    with pytest.raises(KeyStoreError, match="no active key named 'leaky' to rotate"):
        keys.rotate("leaky")


def test_a_key_given_a_term_expires_with_it_and_rotating_keeps_the_term(database, database_location, monkeypatch):
    """LiteLLM's keys take a `duration`; ours had none, so a contractor's key worked until someone revoked it."""
    keys, now = KeyStore(database), time.time()
    contractor = keys.create("contractor", rpm=5, expires_at=now + 3600)
    term = keys.verify(contractor).expires_at
    assert term == pytest.approx(now + 3600) and not keys.verify(contractor).expired(now + 3599)
    assert keys.verify(contractor).expired(now + 3600)  # refused from the instant it is due on
    assert keys.verify(keys.rotate("contractor")).expires_at == term  # a leaked key's successor ends when it would
    with pytest.raises(KeyStoreError, match="key 'late' would expire at .* UTC, which has passed"):
        keys.create("late", expires_at=now - 1)
    # a NaN was stored as NULL: a key that never expires; 10**400 was Python's OverflowError, "tomorrow" a TypeError
    for far in (1e30, float("nan"), float("-inf"), 10**400, "tomorrow"):
        with pytest.raises(KeyStoreError, match=re.escape(f"key 'far': expires_at={far!r} is not a Unix time within")):
            keys.create("far", expires_at=far)
    monkeypatch.setattr(time, "time", lambda: now + 7200)
    with pytest.raises(KeyStoreError, match="key 'contractor' expired at .* UTC: create a new one"):
        keys.rotate("contractor")  # its new key would be expired too
    renewed = keys.create("contractor", expires_at=now + 9000)  # was: 'an active key named 'contractor' already exists'
    assert keys.verify(renewed).expires_at == now + 9000
    assert [key.revoked_at is not None for key in keys.list() if key.name == "contractor"] == [True, True, False]
    assert keys.verify(keys.create("forever")).expires_at is None


def test_keys_create_expires_in_takes_litellms_durations_and_list_shows_the_expiry(tmp_path):
    runner, db = CliRunner(), str(tmp_path / "cli.db")
    created = runner.invoke(app, ["keys", "create", "--name", "trial", "--expires-in", "90d", "--db", db])
    day = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 90 * 86400))
    assert created.exit_code == 0 and f"; active, expires {day} " in created.stderr
    assert f"active, expires {day} " in runner.invoke(app, ["keys", "list", "--db", db], env={"COLUMNS": "60"}).stdout
    for wrong in ("1y", "90 days", "-5m"):
        refused = runner.invoke(app, ["keys", "create", "--name", "x", "--expires-in", wrong, "--db", db])
        assert refused.exit_code == 1 and f"--expires-in {wrong!r}: give a whole number of seconds" in refused.stderr
    zero = runner.invoke(app, ["keys", "create", "--name", "x", "--expires-in", "0s", "--db", db])  # 0 is whole
    assert zero.exit_code == 1 and "--expires-in '0s': give a duration longer than 0: 30s, 15m" in zero.stderr
    for option in ("--expires-in", "--budget-duration"):  # the key was stored, then its date overflowed: a traceback
        far = runner.invoke(app, ["keys", "create", "--name", "x", option, "99999999999999999999d", "--max-budget", "1",
                                  "--db", db])  # fmt: skip
        assert far.exit_code == 1 and f"{option} '99999999999999999999d': give at most 36500d (100 years)" in far.stderr
        digits = runner.invoke(app, ["keys", "create", "--name", "x", option, "9" * 5000 + "d", "--max-budget", "1",
                                     "--db", db])  # fmt: skip
        assert digits.exit_code == 1 and f"{option} '99999" in digits.stderr and "(5,001 characters)" in digits.stderr
    listed = runner.invoke(app, ["keys", "list", "--json", "--db", db])
    assert listed.exit_code == 0 and [key["name"] for key in json.loads(listed.stdout)] == ["trial"]


def test_a_keys_budget_is_stored_kept_by_rotate_and_its_spend_read_over_its_period(database, monkeypatch):
    keys, ledger = KeyStore(database), Ledger(database)
    keys.create("team", budget=Budget(10.0, period_s=30 * 86400))
    assert keys.verify(keys.rotate("team")).budget == Budget(10.0, 30 * 86400)  # LiteLLM's max_budget, budget_duration
    assert keys.verify(keys.create("unbounded")).budget is None
    # 10**400 was Python's OverflowError, "10" and None its TypeError
    for amount in (0.0, -1.0, float("nan"), float("inf"), 10**400, "10", None):
        with pytest.raises(KeyStoreError, match="the budget of key 'x' must be a finite amount above 0, got"):
            keys.create("x", budget=Budget(amount))
    # 0 or less counted no spend: a key spending without a limit; "30d" was Python's TypeError
    for period_s in (0, -86400, float("nan"), 10**400, "30d"):
        with pytest.raises(KeyStoreError, match=rf"the budget period of key 'x' must be above 0 .* got {period_s!r}$"):
            keys.create("x", budget=Budget(10.0, period_s))
    now = time.time()
    for age_s, prompt in ((40 * 86400, 1000), (86400, 500), (0, 250)):  # 0.002 per 1k tokens: 0.002, 0.001, 0.0005
        monkeypatch.setattr(ledger_module, "time", types.SimpleNamespace(time=lambda age_s=age_s: now - age_s))
        ledger.record(usage("team", prompt, 0))
    assert ledger.spent("team") == pytest.approx(0.0035)
    assert ledger.spent("team", since=now - 30 * 86400) == pytest.approx(0.0015)
    assert ledger.spent("nobody") == 0


def test_keys_create_max_budget_and_budget_duration_and_list_shows_them(tmp_path):
    runner, db = CliRunner(), str(tmp_path / "cli.db")
    created = runner.invoke(app, ["keys", "create", "--name", "team", "--max-budget", "25", "--budget-duration", "30d",
                                  "--db", db])  # fmt: skip
    assert created.exit_code == 0 and created.stderr.splitlines()[-1].endswith(", budget 25 per 30d")
    runner.invoke(app, ["keys", "create", "--name", "free", "--db", db])
    table = runner.invoke(app, ["keys", "list", "--db", db], env={"COLUMNS": "200"}).stdout
    header = next(cells(line, "┃") for line in table.splitlines() if "budget" in line)
    rows = [dict(zip(header, cells(line, "│"), strict=True)) for line in table.splitlines() if line.startswith("│")]
    assert [(row["name"], row["budget"]) for row in rows] == [("team", "25 per 30d"), ("free", "-")]
    alone = runner.invoke(app, ["keys", "create", "--name", "x", "--budget-duration", "30d", "--db", db])
    assert alone.exit_code == 1 and "--budget-duration is the period of a budget: give --max-budget too" in alone.stderr


OLD_KEYS_SCHEMA = (  # a database from before a name could be given a new key: its name the primary key, no models
    "CREATE TABLE plans (name TEXT PRIMARY KEY, prompt_per_1k DOUBLE PRECISION NOT NULL, "
    "completion_per_1k DOUBLE PRECISION NOT NULL)",
    "INSERT INTO plans VALUES ('default', 0.002, 0.002)",
    "CREATE TABLE keys (name TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL, "
    "plan TEXT NOT NULL REFERENCES plans(name), rpm INTEGER, tpm INTEGER, admin INTEGER NOT NULL DEFAULT 0, "
    "created_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION)",
    f"INSERT INTO keys VALUES ('old', '{hash_key('sk-ss-old')}', 'sk-ss-old', 'default', 3, NULL, 1, 100.0, NULL)",
)


def execute_each(location: str, statements: Iterable[str]) -> None:
    """Run SQL `statements` on the database at `location` (PostgreSQL or SQLite) as written, as an earlier seekstack
    would have."""
    if location.startswith("postgresql"):
        import psycopg

        with psycopg.connect(location, autocommit=True) as connection:
            for statement in statements:
                connection.execute(statement)
    else:
        with sqlite3.connect(location) as connection:
            for statement in statements:
                connection.execute(statement)


def test_a_database_from_before_names_were_reusable_keeps_its_keys_and_frees_revoked_names(database_location):
    execute_each(database_location, OLD_KEYS_SCHEMA)
    keys = KeyStore(open_database(database_location))
    kept = keys.verify("sk-ss-old")
    assert (kept.name, kept.rpm, kept.admin, kept.created_at, kept.models) == ("old", 3, True, 100.0, None)
    new = keys.rotate("old")
    assert keys.verify("sk-ss-old") is None and keys.verify(new).rpm == 3
    keys.revoke("old")
    keys.create("old")
    reopened = KeyStore(open_database(database_location))  # a second open finds nothing left to do
    assert [key.revoked_at is None for key in reopened.list()] == [False, False, True]


def test_opening_an_earlier_seekstacks_database_says_what_it_changed_and_that_older_ones_may_refuse_it(
    database_location, capsys
):
    """The database as seekstack wrote it before 2026-11-30 (OLD_KEYS_SCHEMA): opening it, even to read `usage`,
    adds columns that such a seekstack then refuses ('table plans has 4 columns but 3 values were supplied'); that
    happened without a word. A new database, and one opened again, say nothing."""
    open_database(database_location)
    assert capsys.readouterr().err == ""
    if database_location.startswith("postgresql"):  # the same database, its tables as an earlier seekstack made them
        import psycopg

        old = database_location
        with psycopg.connect(old, autocommit=True) as connection:
            for table in ("rate_charges", "usage", "keys", "plans"):
                connection.execute(f"DROP TABLE {table}")
            for statement in OLD_KEYS_SCHEMA:
                connection.execute(statement)
    else:
        old = database_location + ".old"
        with sqlite3.connect(old) as connection:
            for statement in OLD_KEYS_SCHEMA:
                connection.execute(statement)
        Path(old).chmod(0o600)  # as seekstack made it: no warning of a file others may read
    opened = open_database(old)
    told = capsys.readouterr().err
    assert told.startswith(f"note: {opened.location} was upgraded for this seekstack (column plans.cached_prompt")
    assert "keys rebuilt so that a name whose keys are revoked may be given a new one" in told
    assert "an earlier seekstack may no longer open it" in told
    open_database(old)
    assert capsys.readouterr().err == ""


def test_cost_follows_the_plan_of_the_key_when_recorded(database):
    keys, ledger = KeyStore(database), Ledger(database)
    keys.set_plan("gold", prompt_per_1k=0.01, completion_per_1k=0.03)
    keys.create("payer", plan="gold")
    keys.create("basic")
    assert ledger.record(usage("payer", 1000, 2000)) == pytest.approx(0.01 + 0.06)
    assert ledger.record(usage("basic", 500, 500)) == pytest.approx(0.002)  # default 0.002 per 1k tokens
    assert ledger.record(usage(None, 1000, 0)) == pytest.approx(0.002)  # open server: default plan
    keys.set_plan("gold", prompt_per_1k=1.0, completion_per_1k=1.0)
    assert ledger.records("payer")[0]["cost"] == pytest.approx(0.07)  # a price change does not rewrite history


def test_cached_prompt_tokens_cost_the_cached_price_or_the_prompt_price_when_the_plan_sets_none(database):
    keys, ledger = KeyStore(database), Ledger(database)
    keys.set_plan("cache", prompt_per_1k=1.0, completion_per_1k=3.0, cached_prompt_per_1k=0.1)
    keys.set_plan("flat", prompt_per_1k=1.0, completion_per_1k=3.0)
    keys.create("cached", plan="cache")
    keys.create("uncached", plan="flat")
    request = dict(model="tiny", endpoint="/v1/completions", prompt_tokens=1000, completion_tokens=500, latency_s=0.1,
                   status=200, cached_tokens=800)  # fmt: skip
    assert ledger.record(UsageRecord("cached", **request)) == pytest.approx((200 * 1.0 + 800 * 0.1 + 500 * 3.0) / 1000)
    assert ledger.record(UsageRecord("uncached", **request)) == pytest.approx((1000 * 1.0 + 500 * 3.0) / 1000)


def test_a_streams_row_is_brought_up_to_date_once_it_is_bill_every_tokens_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(billing, "BILL_EVERY_S", 3600.0)  # the token count alone decides here
    ledger = Ledger(open_database(tmp_path / "serve.db"))

    async def stream() -> list[int]:
        bill = Bill(ledger, None, "tiny", "/v1/completions", time.perf_counter(), prompt_tokens=5)
        bill.open()
        billed = []
        for generated in (BILL_EVERY_TOKENS - 1, BILL_EVERY_TOKENS, 2 * BILL_EVERY_TOKENS - 1):
            bill.completion_tokens = generated
            bill.update_soon()
            await asyncio.gather(*(task for task in asyncio.all_tasks() if task is not asyncio.current_task()))
            billed.append(ledger.records()[0]["completion_tokens"])
        return billed

    assert asyncio.run(stream()) == [0, BILL_EVERY_TOKENS, BILL_EVERY_TOKENS]


def test_a_request_the_server_failed_is_recorded_but_not_charged(database):
    ledger = Ledger(database)
    assert ledger.record(usage("k", 1000, 500, status=500)) == 0.0
    assert ledger.record(usage("k", 1000, 500, status=503)) == 0.0
    assert ledger.record(usage("k", 1000, 500, status=499)) == pytest.approx(0.003)  # the client left: billed
    rows = ledger.records("k")
    assert [(row["status"], row["prompt_tokens"], row["completion_tokens"]) for row in rows] == [
        (500, 1000, 500), (503, 1000, 500), (499, 1000, 500),
    ]  # fmt: skip
    (day,) = ledger.daily("k")
    assert (day.requests, day.failed, day.cost) == (3, 2, pytest.approx(0.003))


def test_daily_totals_per_key_and_since_filter(database):
    ledger = Ledger(database)
    KeyStore(database).create("k1")
    for prompt, completion in ((10, 20), (30, 40)):
        ledger.record(usage("k1", prompt, completion))
    ledger.record(usage("k2", 5, 5, status=429))
    today = dt.datetime.now(dt.UTC).date()
    days = {d.key_name: d for d in ledger.daily()}
    assert (days["k1"].day, days["k1"].requests, days["k1"].prompt_tokens, days["k1"].completion_tokens) == (
        today.isoformat(), 2, 40, 60,
    )  # fmt: skip
    assert days["k1"].cost == pytest.approx(100 * 0.002 / 1000)
    assert [d.key_name for d in ledger.daily(key_name="k2")] == ["k2"]
    assert ledger.daily(since=today + dt.timedelta(days=1)) == []
    assert len(ledger.daily(since=today)) == 2


def test_usage_until_the_calendars_last_day_counts_every_day_not_a_500(database, database_location):
    """`until` 9999-12-31 (a day that reads as "no end") overflowed working out the day after it: /v1/admin/usage
    answered 500 and `seekstack usage` ended in a traceback (OverflowError: date value out of range)."""
    ledger = Ledger(database)
    ledger.record(usage("k", 10, 20))
    [day] = ledger.daily(until=dt.date.max)
    assert (day.key_name, day.requests, day.prompt_tokens) == ("k", 1, 10)
    printed = CliRunner().invoke(app, ["usage", "--until", "9999-12-31", "--json", "--db", database_location])
    assert printed.exit_code == 0, printed.output
    assert [(row["key_name"], row["requests"]) for row in json.loads(printed.stdout)] == [("k", 1)]


def test_daily_totals_are_kept_apart_per_model_the_base_and_each_adapter(database, database_location):
    """A server of one base and LoRA adapters bills each model's requests as its own row, as the ledger records
    which model served each; `model=` reads one."""
    ledger = Ledger(database)
    for model, prompt in (("tiny", 10), ("legal", 20), ("legal", 30), ("poem", 40)):
        ledger.record(usage("k", prompt, 1, model=model))
    rows = {(d.key_name, d.model): (d.requests, d.prompt_tokens) for d in ledger.daily()}
    assert rows == {("k", "legal"): (2, 50), ("k", "poem"): (1, 40), ("k", "tiny"): (1, 10)}
    assert [(d.model, d.requests) for d in ledger.daily("k", model="legal")] == [("legal", 2)]
    assert ledger.daily(model="nosuch") == []
    table = CliRunner().invoke(app, ["usage", "--db", database_location], env={"COLUMNS": "120"}).stdout
    lines = table.splitlines()
    header = next(cells(line, "┃") for line in lines if "requests" in line)
    rows = [dict(zip(header, cells(line, "│"), strict=True)) for line in lines if line.startswith("│")]
    assert [(row["model"], row["requests"]) for row in rows] == [
        ("legal", "2"),
        ("poem", "1"),
        ("tiny", "1"),
        ("", "4"),
    ]
    mistyped = CliRunner().invoke(app, ["usage", "--model", "legl", "--db", database_location])
    assert mistyped.exit_code == 0 and mistyped.stdout == "no usage recorded for model 'legl'\n"  # not a table of 0s


def test_usage_reports_count_the_cached_prompt_tokens_their_cost_is_priced_at(database, database_location):
    """The ledger kept each request's cached prompt tokens and billed them at the plan's cached price, but the daily
    totals, `seekstack usage` and its --json left them out: a cost that no count in the report explained."""
    keys, ledger = KeyStore(database), Ledger(database)
    keys.set_plan("cache", prompt_per_1k=1.0, completion_per_1k=3.0, cached_prompt_per_1k=0.1)
    keys.create("k", plan="cache")
    for cached in (0, 800):
        ledger.record(UsageRecord("k", "tiny", "/v1/completions", 1000, 500, 0.1, 200, cached_tokens=cached))
    (day,) = ledger.daily("k")
    assert (day.prompt_tokens, day.cached_tokens, day.completion_tokens) == (2000, 800, 1000)
    assert day.cost == pytest.approx((1200 * 1.0 + 800 * 0.1 + 1000 * 3.0) / 1000)
    as_json = CliRunner().invoke(app, ["usage", "--json", "--db", database_location])
    assert [(row["prompt_tokens"], row["cached_tokens"]) for row in json.loads(as_json.stdout)] == [(2000, 800)]
    table = CliRunner().invoke(app, ["usage", "--db", database_location], env={"COLUMNS": "120"}).stdout
    header_lines = [cells(line, "┃") for line in table.splitlines() if line.startswith("┃")]
    header = [" ".join(filter(None, words)) for words in zip(*header_lines, strict=True)]
    rows = [dict(zip(header, cells(line, "│"), strict=True)) for line in table.splitlines() if line.startswith("│")]
    assert [(row["prompt tokens"], row["of them cached"]) for row in rows] == [("2,000", "800")] * 2  # day, total


def test_the_usage_table_total_is_the_total_cost_the_admin_usage_reports(database, database_location):
    """`seekstack usage` summed its rows' costs as floats, not as /v1/admin/usage's total_cost
    does: 0.0000001 + 0.0000023 + 0.0000001 is 2.4999999999999998e-06, whose total showed as 0.000002, not the
    0.000003 that the 0.0000025 spent rounds to."""
    keys, ledger = KeyStore(database), Ledger(database)
    keys.set_plan("fine", prompt_per_1k=0.0001, completion_per_1k=0.0001)
    keys.create("k", plan="fine")
    for model, prompt in (("a", 1), ("b", 23), ("c", 1)):
        ledger.record(usage("k", prompt, 0, model=model))
    days = ledger.daily()
    assert [day.cost for day in days] == [1e-07, 2.3e-06, 1e-07]
    assert ledger_module.total_cost(days) == 2.5e-06
    table = CliRunner().invoke(app, ["usage", "--db", database_location], env={"COLUMNS": "120"}).stdout
    header = next(cells(line, "┃") for line in table.splitlines() if "requests" in line)
    rows = [dict(zip(header, cells(line, "│"), strict=True)) for line in table.splitlines() if line.startswith("│")]
    assert [(row["day"], row["cost"]) for row in rows][-1] == ("total", "0.000003")


def test_a_sum_of_costs_past_twelve_significant_digits_is_exact(database):
    """Costs were floats rounded to 12 significant digits in a DOUBLE PRECISION column, so a key that spent 1000 and
    then 1.23e-7 was reported to have spent 1000.00000012 (the sum needs 13 digits). They are whole 1e-12 of the
    currency."""
    keys, ledger = KeyStore(database), Ledger(database)
    keys.set_plan("bulk", prompt_per_1k=1.0, completion_per_1k=0.000123)
    keys.create("k", plan="bulk")
    assert ledger.record(usage("k", 1_000_000, 0)) == 1000.0
    assert ledger.record(usage("k", 0, 1)) == 1.23e-07
    days = ledger.daily()
    assert (days[0].cost, ledger_module.total_cost(days), ledger.spent("k")) == (1000.000000123,) * 3
    assert [day.cost_pico for day in days] == [1_000_000_000_123_000]
    assert days[0].to_dict()["cost"] == 1000.000000123 and "cost_pico" not in days[0].to_dict()


def test_a_keys_costs_summed_past_nine_million_are_exact_not_an_overflow(database):
    """SQLite sums 64-bit integers, and a key's costs in 1e-12 of the currency pass 2**63 - 1 at 9.2 million: its
    budget check, /v1/admin/usage and `seekstack usage` failed with "integer overflow"."""
    keys, ledger = KeyStore(database), Ledger(database)
    keys.set_plan("pricey", prompt_per_1k=500.0, completion_per_1k=500.0)  # a token costs 0.5
    keys.create("k", plan="pricey")
    for _ in range(2):
        ledger.record(usage("k", 10_000_000, 2))
    assert ledger.spent("k") == ledger_module.total_cost(ledger.daily()) == 10_000_002.0
    assert [day.cost_pico for day in ledger.daily()] == [10_000_002 * 10**12]


def test_a_keys_largest_requests_at_the_highest_price_sum_exactly_not_an_overflow(database):
    """SQLite summed each row's whole units in one 64-bit SUM, which two requests of MAX_BILLED_TOKENS at a price near
    the highest taken pass (9.2e18): what the key spent and the daily totals failed with "integer overflow", and every
    request of a key with a budget with it (500)."""
    keys, ledger = KeyStore(database), Ledger(database)
    top = keys.set_plan("top", prompt_per_1k=549755813887999.9, completion_per_1k=549755813887999.9)
    keys.create("k", plan="top")
    for _ in range(3):
        ledger.record(usage("k", MAX_BILLED_TOKENS - 1, 1))
    largest = top.cost_pico(MAX_BILLED_TOKENS, 0)
    assert largest == 9_223_372_036_854_774_130_278_400_000_000
    assert [day.cost_pico for day in ledger.daily()] == [3 * largest]
    assert ledger.spent("k") == cost_amount(3 * largest) == 2.7670116110564323e19
    assert ledger_module.total_cost(ledger.daily()) == ledger.spent("k")


def test_a_price_whose_largest_request_would_cost_past_what_the_ledger_holds_is_refused_naming_it(database):
    """A request's cost is kept as 64-bit whole units of the currency and the 1e-12 below them: a price that let one
    pass 9.2e18 would fail (500) unbilled writing its row."""
    keys, ledger = KeyStore(database), Ledger(database)
    top = keys.set_plan("top", prompt_per_1k=549755813887999.9, completion_per_1k=549755813887999.9)
    keys.create("k", plan="top")
    ledger.record(usage("k", MAX_BILLED_TOKENS - 1, 1))  # the largest request at the highest price is billed
    assert top.cost_pico(MAX_BILLED_TOKENS, 0) == 9_223_372_036_854_774_130_278_400_000_000
    assert ledger.spent("k") == cost_amount(top.cost_pico(MAX_BILLED_TOKENS, 0))
    for prices in [(549755813888000.0, 1.0, None), (1.0, 1e15, None), (1.0, 1.0, 6e14)]:
        with pytest.raises(KeyStoreError) as refused:
            keys.set_plan("top", *prices)
        assert re.fullmatch(
            r"(prompt|completion|cached prompt) price of plan 'top' is "
            r"(549755813888000.0|1000000000000000.0|600000000000000.0) per 1k tokens; at most "
            r"549755813887999.999999 is taken: a request of up to 16777216 tokens must cost at most "
            r"9.223372036854776e\+18, the most the usage ledger holds \(a 64-bit count of whole units of the "
            r"currency\)",
            str(refused.value),
        )
    assert keys.plans()[-1] == top  # kept as it was


def test_a_plan_priced_in_a_currency_of_small_units_is_saved_and_bills_every_request_exactly(database):
    """Costs were one 64-bit count of 1e-12 of the currency, so a price was refused above 549.755813 per 1k tokens:
    a plan in Vietnamese dong or Indonesian rupiah (750 per 1k) could not be saved, and one an older database held
    at such a price billed a large request with an overflow (500, its usage row lost)."""
    keys, ledger = KeyStore(database), Ledger(database)
    dong = keys.set_plan("dong", prompt_per_1k=750.0, completion_per_1k=1500.000001, cached_prompt_per_1k=75.5)
    keys.create("k", plan="dong")
    assert ledger.record(usage("k", 100_000, 0)) == 75_000.0
    ledger.record(usage("k", MAX_BILLED_TOKENS - 1, 1))  # 12582911.25 + 1.500000001
    assert ledger.record(usage("k", 0, 3)) == 4.500000003
    stored = database.query("SELECT cost_units, cost_pico FROM usage ORDER BY id")
    assert [(row["cost_units"], row["cost_pico"]) for row in stored] == [
        (75_000, 0), (12_582_912, 750_000_001_000), (4, 500_000_003_000)
    ]  # fmt: skip
    assert [day.cost_pico for day in ledger.daily()] == [12_657_917_250_000_004_000]
    assert ledger.spent("k") == ledger_module.total_cost(ledger.daily()) == cost_amount(12_657_917_250_000_004_000)
    assert keys.plans()[1] == dong and dong.cost_pico(1000, 0, 1000) == 75_500_000_000_000


def old_usage_database(location: str, costs: list, cost_column: str = "cost DOUBLE PRECISION") -> None:
    """A database as an earlier seekstack wrote it: its usage table keeps each cost in `cost_column` (a float
    usage.cost, or the whole cost in 1e-12 as usage.cost_pico BIGINT), one row per cost of `costs` (written as SQL),
    without the cached_tokens and moderation columns added since."""
    postgres = location.startswith("postgresql")
    id_column = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY" if postgres else "INTEGER PRIMARY KEY AUTOINCREMENT"
    statements = [
        *OLD_KEYS_SCHEMA,
        f"CREATE TABLE usage (id {id_column}, created_at DOUBLE PRECISION NOT NULL, key_name TEXT, "
        "model TEXT NOT NULL, endpoint TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, "
        "completion_tokens INTEGER NOT NULL, latency_s DOUBLE PRECISION NOT NULL, status INTEGER NOT NULL, "
        f"{cost_column} NOT NULL)",
        *(
            "INSERT INTO usage (created_at, key_name, model, endpoint, prompt_tokens, completion_tokens, latency_s, "
            f"status, {cost_column.split()[0]}) VALUES ({1_800_000_000 + row}, 'old', 'tiny', '/v1/completions', "
            f"{row}, 1, 0.5, 200, {cost})"
            for row, cost in enumerate(costs)
        ),
    ]
    execute_each(location, statements)
    if not postgres:
        Path(location).chmod(0o600)


def test_an_old_databases_float_costs_are_converted_once_every_row_kept_and_totals_exact(database_location, capsys):
    """An earlier seekstack's costs: raw floats (before they were rounded), floats of 12 significant digits, and a
    sum of them that no float holds exactly."""
    old_usage_database(database_location, ["0.00026000000000000003", "0.00026", "1000.0", "1e-07", "0.0"])
    database = open_database(database_location)
    told = capsys.readouterr().err
    assert "usage.cost of 5 rows converted to cost_units and cost_pico, whole units and 1e-12 of the currency" in told
    stored = database.query("SELECT id, prompt_tokens, cost_units, cost_pico FROM usage ORDER BY id")
    assert [tuple(row.values()) for row in stored] == [
        (1, 0, 0, 260_000_000), (2, 1, 0, 260_000_000), (3, 2, 1000, 0), (4, 3, 0, 100_000), (5, 4, 0, 0)
    ]  # fmt: skip
    ledger = Ledger(database)
    assert [row["cost"] for row in ledger.records("old")] == [0.00026, 0.00026, 1000.0, 1e-07, 0.0]
    assert ledger_module.total_cost(ledger.daily()) == ledger.spent("old") == 1000.0005201
    ledger.record(usage("old", 1000, 0))  # the default plan: 0.002 per 1k
    assert ledger.spent("old") == 1000.0025201
    open_database(database_location)  # converted once: nothing left to do
    assert capsys.readouterr().err == ""


def test_a_databases_costs_kept_whole_in_cost_pico_are_split_into_units_once_every_cost_kept_exactly(
    database_location, capsys
):
    """A database of the seekstack that kept each cost as one 64-bit count of 1e-12 of the currency (usage.cost_pico,
    at most 9.2 million): opening it splits each into whole units (usage.cost_units) and the 1e-12 below them. That
    seekstack, which has no schema version to refuse the database by, would open it again and read cost_pico alone (a
    cost of 40.0 as 0.0): the note says so."""
    costs = [40, 999_999_999_999, 10**12, 1000 * 10**12 + 123, 2**63 - 1, 0]
    old_usage_database(database_location, [str(cost) for cost in costs], cost_column="cost_pico BIGINT")
    database = open_database(database_location)
    told = capsys.readouterr().err
    assert "column usage.cost_units added" in told
    assert (
        "each cost split into its whole units (usage.cost_units) and the 1e-12 below them (usage.cost_pico): a "
        "seekstack from before 2026-12-06 still opens the database but reads each cost less its whole units (40.0 as "
        "0.0, in what a key spent, its records and the daily totals), so do not go back to one"
    ) in told
    stored = database.query("SELECT cost_units, cost_pico FROM usage ORDER BY id")
    assert [(row["cost_units"], row["cost_pico"]) for row in stored] == [
        (0, 40), (0, 999_999_999_999), (1, 0), (1000, 123), (9_223_372, 36_854_775_807), (0, 0)
    ]  # fmt: skip
    ledger = Ledger(database)
    assert [row["cost"] for row in ledger.records("old")] == [cost / 10**12 for cost in costs]
    assert [day.cost_pico for day in ledger.daily()] == [sum(costs)]
    open_database(database_location)  # split once: nothing left to do
    assert capsys.readouterr().err == ""
    assert database.query("SELECT SUM(cost_units) AS units FROM usage")[0]["units"] == 9_224_373


def test_a_stream_an_older_server_still_runs_is_split_only_once_it_ends_its_cost_counted_once(database_location):
    """Several servers may share one database (a rolling upgrade): the split rewrote a row still in progress, and the
    older server still running its stream then wrote the whole final cost into cost_pico beside the split's units, so
    40.0 finished at 44.0 read as 84.0."""
    old_usage_database(database_location, [str(40 * 10**12), str(7 * 10**12 + 5)], cost_column="cost_pico BIGINT")
    execute_each(database_location, ["UPDATE usage SET status = 0 WHERE id = 1"])  # the older server's stream
    database = open_database(database_location)
    stored = database.query("SELECT cost_units, cost_pico FROM usage ORDER BY id")
    assert [(row["cost_units"], row["cost_pico"]) for row in stored] == [(0, 40 * 10**12), (7, 5)]
    ledger = Ledger(database)
    assert ledger.spent("old") == 47.000000000005  # read right unsplit
    # the older server ends its stream as it writes rows: the whole cost in cost_pico
    execute_each(database_location, [f"UPDATE usage SET status = 200, cost_pico = {44 * 10**12} WHERE id = 1"])
    assert [row["cost"] for row in ledger.records("old")] == [44.0, 7.000000000005]
    assert [day.cost_pico for day in ledger.daily()] == [51 * 10**12 + 5]
    database = open_database(database_location)  # a later opening splits the ended row
    stored = database.query("SELECT cost_units, cost_pico FROM usage ORDER BY id")
    assert [(row["cost_units"], row["cost_pico"]) for row in stored] == [(44, 0), (7, 5)]
    assert Ledger(database).spent("old") == 51.000000000005


def test_opening_a_database_looks_up_the_costs_left_to_split_by_an_index_not_a_scan_of_every_row(database_location):
    """The split runs at every opening, in the transaction that holds the database's write lock: it read every row of
    usage (60 ms at a million rows on SQLite, the other servers' writes waiting on it). An index of the rows whose
    cost_pico holds whole units, which this seekstack never writes, gives it the few an older server left."""
    old_usage_database(database_location, [str(40 * 10**12), "5"], cost_column="cost_pico BIGINT")
    database = open_database(database_location)
    if database_location.startswith("postgresql"):
        import psycopg

        with psycopg.connect(database_location) as connection:
            connection.execute("SET enable_seqscan = off")  # the planner's choice on a table of three rows
            plan = " ".join(row[0] for row in connection.execute(f"EXPLAIN {database_module.SPLIT_COSTS}"))
    else:
        with sqlite3.connect(database_location) as connection:
            plan = " ".join(row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {database_module.SPLIT_COSTS}"))
    assert "usage_unsplit_costs" in plan
    assert [row["cost"] for row in Ledger(database).records("old")][:2] == [40.0, 5e-12]


def test_servers_opening_one_old_postgresql_database_at_once_both_start_every_row_kept(postgres_server):
    """Each opening transaction read usage (a shared lock) and then altered it (ADD COLUMN cost_pico): two servers
    opening an old database at once waited on each other, "deadlock detected", and one failed to start."""
    for _ in range(4):  # the race is lost only some of the time
        location = new_postgres_database(postgres_server)
        old_usage_database(location, [str(row / 4) for row in range(200)])
        start = threading.Barrier(2)

        def open_at_once(location=location, start=start):
            start.wait()
            return open_database(location)

        with ThreadPoolExecutor(2) as pool:
            opened = [future.result() for future in [pool.submit(open_at_once) for _ in range(2)]]
        stored = opened[0].query("SELECT id, cost_units, cost_pico FROM usage ORDER BY id")
        assert [(row["id"], row["cost_units"], row["cost_pico"]) for row in stored] == [
            (row + 1, row // 4, row % 4 * 250_000_000_000) for row in range(200)
        ]
        for database in opened:
            database.close()


def test_an_old_sqlite_usage_table_rebuilt_for_its_costs_issues_no_deleted_rows_id_again(tmp_path):
    """SQLite's AUTOINCREMENT never issues an id twice; the rebuilt table counted from its largest id kept, so the
    id of a last row deleted by hand came again, for another request."""
    location = str(tmp_path / "old.db")
    old_usage_database(location, ["0.1", "0.2", "0.3"])
    with sqlite3.connect(location) as connection:
        connection.execute("DELETE FROM usage WHERE id = 3")
    ledger = Ledger(open_database(location))
    ledger.record(usage("old", 1, 1))
    assert [row["id"] for row in ledger.records()] == [1, 2, 4]


@pytest.mark.parametrize(
    ("damage", "fault"),
    [
        ("no amount", "which is no amount >= 0"),
        ("1e20", r"more than the 9.223372036854776e\+18 a request's cost may be \(a 64-bit count of units\)"),
    ],
)
def test_an_old_database_with_a_cost_that_is_no_amount_is_refused_and_left_unchanged(database_location, damage, fault):
    """A cost that is no amount, or one past what cost_pico holds (which overflowed converting it), names its row."""
    postgres = database_location.startswith("postgresql")
    damaged = damage if damage != "no amount" else "'NaN'" if postgres else "'twelve'"  # SQLite's holds any text
    old_usage_database(database_location, ["0.5", damaged, "0.25"])
    schema = database_schema(database_location)
    if not postgres:
        old_bytes = Path(database_location).read_bytes()
    with pytest.raises(
        ValueError,
        match=f"usage row 2 has cost .*, {fault}: the database is damaged; its costs were left",
    ):
        open_database(database_location)
    if postgres:
        import psycopg

        with psycopg.connect(database_location) as connection:
            kept = [row[0] for row in connection.execute("SELECT cost FROM usage ORDER BY id")]
    else:
        with sqlite3.connect(database_location) as connection:
            kept = [row[0] for row in connection.execute("SELECT cost FROM usage ORDER BY id")]
    assert kept[0] == 0.5 and kept[2] == 0.25 and len(kept) == 3  # the float column, every row, as it was
    assert database_schema(database_location) == schema  # no column added, no table made (SQLite committed both)
    if not postgres:
        assert Path(database_location).read_bytes() == old_bytes


def database_schema(location: str) -> list[tuple]:
    """Each (table, column, type) of the database at `location`, sorted."""
    if location.startswith("postgresql"):
        import psycopg

        with psycopg.connect(location) as connection:
            return sorted(
                connection.execute(
                    "SELECT table_name, column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = current_schema()"
                ).fetchall()
            )
    with sqlite3.connect(location) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return sorted(
            (table, column[1], column[2])
            for table in tables
            for column in connection.execute(f"PRAGMA table_info({table})")
        )


def test_since_counts_a_request_written_at_the_first_instant_of_its_day(database, monkeypatch):
    day = dt.date(2026, 11, 1)
    midnight = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC).timestamp()
    monkeypatch.setattr(ledger_module, "time", types.SimpleNamespace(time=lambda: midnight))
    Ledger(database).record(usage("k", 10, 20))
    assert [(d.day, d.requests) for d in Ledger(database).daily(since=day)] == [("2026-11-01", 1)]


def test_until_ends_a_report_with_its_day_so_one_month_is_billed_alone(database, database_location, monkeypatch):
    """A bill for November once December had begun: `since` alone gave November and December together."""
    instants = [
        dt.datetime(2026, 10, 31, 23, 59, 59, tzinfo=dt.UTC),
        dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
        dt.datetime(2026, 11, 30, 23, 59, 59, 999000, tzinfo=dt.UTC),
        dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
    ]
    for instant in instants:
        monkeypatch.setattr(ledger_module, "time", types.SimpleNamespace(time=instant.timestamp))
        Ledger(database).record(usage("k", 10, 20))
    november = Ledger(database).daily(since=dt.date(2026, 11, 1), until=dt.date(2026, 11, 30))
    assert [(d.day, d.requests) for d in november] == [("2026-11-01", 1), ("2026-11-30", 1)]
    assert [d.day for d in Ledger(database).daily(until=dt.date(2026, 10, 31))] == ["2026-10-31"]
    with pytest.raises(ValueError, match="since 2026-11-02 is after until 2026-11-01: no day is in between"):
        Ledger(database).daily(since=dt.date(2026, 11, 2), until=dt.date(2026, 11, 1))
    cli = CliRunner().invoke(app, ["usage", "--since", "2026-11-01", "--until", "2026-11-30", "--json", "--db",
                                   database_location])  # fmt: skip
    assert [(day["day"], day["requests"]) for day in json.loads(cli.stdout)] == [("2026-11-01", 1), ("2026-11-30", 1)]
    none = CliRunner().invoke(app, ["usage", "--key", "k", "--until", "2026-10-30", "--db", database_location])
    assert none.stdout == "no usage recorded for key 'k' until 2026-10-30\n"


def test_records_survive_a_new_connection(tmp_path):
    path = tmp_path / "ledger.db"
    Ledger(open_database(path)).record(usage(None, 3, 4))  # no close: as if the process died
    rows = sqlite3.connect(path).execute("SELECT prompt_tokens, completion_tokens, status FROM usage").fetchall()
    assert rows == [(3, 4, 200)]


def test_a_usage_write_waits_for_a_database_another_connection_holds(tmp_path, monkeypatch):
    import threading
    import time

    from seekstack.serve import database as database_module

    database = open_database(tmp_path / "db")
    database._connection.execute("PRAGMA busy_timeout=50")  # SQLite's own wait ends long before the other's lock
    usage = UsageRecord("k", "m", "/v1/completions", 5, 7, 0.1, 200)
    other = sqlite3.connect(tmp_path / "db", isolation_level=None, check_same_thread=False)  # another server, a backup
    other.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.5, lambda: other.execute("COMMIT")).start()
    started = time.monotonic()
    Ledger(database).record(usage)  # was: "database is locked", and the request's usage was lost
    assert time.monotonic() - started >= 0.4 and [r["completion_tokens"] for r in Ledger(database).records()] == [7]
    monkeypatch.setattr(database_module, "BUSY_RETRY_S", 0.3)  # held for longer than a write waits: the error stays
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        Ledger(database).record(usage)
    other.execute("COMMIT")


def test_opening_a_database_another_connection_holds_waits_for_it_and_then_says_it_is_held(tmp_path, monkeypatch):
    import threading

    from seekstack.serve import database as database_module

    monkeypatch.setattr(database_module, "SQLITE_BUSY_TIMEOUT_MS", 50)  # SQLite's own wait ends before the other's lock
    KeyStore(open_database(tmp_path / "db")).create("k")
    other = sqlite3.connect(tmp_path / "db", isolation_level=None, check_same_thread=False)  # another server, a VACUUM
    other.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.5, lambda: other.execute("COMMIT")).start()
    # was: "db is not a usable seekstack database: database is locked", and `seekstack serve` did not start
    assert KeyStore(open_database(tmp_path / "db")).any_keys()
    monkeypatch.setattr(database_module, "BUSY_RETRY_S", 0.3)  # held for longer than opening waits
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(ValueError, match="db is held by another connection .* and stayed locked for 0 s"):
        open_database(tmp_path / "db")
    other.execute("COMMIT")


def test_opening_postgresql_beside_an_open_read_transaction_neither_waits_nor_stalls_the_running_server(
    postgres_server,
):
    import threading

    import psycopg

    url = new_postgres_database(postgres_server)
    running = open_database(url)  # a server serving
    report = psycopg.connect(url)  # a report in psql: its SELECT opens a transaction that stays open
    report.execute("SELECT count(*) FROM usage").fetchall()
    try:
        opening = threading.Thread(target=open_database, args=(url,), daemon=True)  # `seekstack usage`, a 2nd server
        opening.start()
        opening.join(timeout=5)
        assert not opening.is_alive()  # was: ALTER TABLE waited for the report, and every write queued behind it
        Ledger(running).record(usage("k", 1, 1))
    finally:
        report.rollback()
        report.close()
    assert [row["completion_tokens"] for row in Ledger(running).records()] == [1]


def test_rate_limit_writes_wait_for_a_database_another_connection_holds(tmp_path):
    import threading

    database = open_database(tmp_path / "db")
    database._connection.execute("PRAGMA busy_timeout=50")  # SQLite's own wait ends long before the other's lock
    limiter = RateLimiter(database)
    other = sqlite3.connect(tmp_path / "db", isolation_level=None, check_same_thread=False)  # a backup, say
    other.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
    charge = limiter.admit("k", rpm=None)  # was: "database is locked", a 500 for the request
    limiter.reserve(charge, "k", tpm=100, tokens=80)
    other.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
    limiter.settle(charge, 20)  # was: "database is locked", and the request's usage row was lost with it
    assert limiter.tokens_left("k", 100) == 80


def test_a_read_does_not_wait_behind_a_write_of_this_process_waiting_for_another_connections_lock(tmp_path):
    import threading
    import time

    database = open_database(tmp_path / "db")
    ledger = Ledger(database)
    ledger.record(usage("k", 1, 1))
    other = sqlite3.connect(tmp_path / "db", isolation_level=None, check_same_thread=False)  # another server, a backup
    other.execute("BEGIN IMMEDIATE")
    writer = threading.Thread(target=ledger.record, args=(usage("k", 2, 2),))  # a request's usage row, waiting
    writer.start()
    deadline = time.monotonic() + 5
    while not database._lock.locked() and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    seen = [row["completion_tokens"] for row in ledger.records()]  # what /health, /v1/models, the usage report read
    waited = time.monotonic() - started
    other.execute("COMMIT")
    writer.join()
    assert waited < 0.5 and seen == [1]  # was: the read queued behind the waiting write, 5 s (SQLite's busy timeout)
    assert [row["completion_tokens"] for row in ledger.records()] == [1, 2]


def test_a_postgresql_read_does_not_wait_behind_a_write_waiting_for_another_connections_row_lock(postgres_server):
    import threading
    import time

    import psycopg

    url = new_postgres_database(postgres_server)
    database = open_database(url)
    KeyStore(database).create("k")
    other = psycopg.connect(url)  # another server admitting a request of the same key, a report in psql
    other.execute("SELECT 1 FROM keys WHERE name = 'k' FOR UPDATE")
    writer = threading.Thread(target=RateLimiter(database).admit, args=("k", 1))  # waits for the row
    writer.start()
    deadline = time.monotonic() + 5
    while not database._lock.locked() and time.monotonic() < deadline:
        time.sleep(0.01)
    threading.Timer(2, other.commit).start()  # bounds the wait of the read, were it to queue behind the write
    started = time.monotonic()
    assert KeyStore(database).any_keys()
    waited = time.monotonic() - started
    writer.join()
    other.close()
    assert waited < 0.5  # was: until the other connection let go of the row (2 s here; no limit)
    assert RateLimiter(database).tokens_left("k", 100) == 100
    with pytest.raises(RateLimited, match="limit of 1 requests per minute"):
        RateLimiter(database).admit("k", 1)


def test_parse_day_names_the_expected_format():
    assert parse_day("2026-01-31") == dt.date(2026, 1, 31)
    with pytest.raises(ValueError, match="'31/01/2026' is not in the form YYYY-MM-DD"):
        parse_day("31/01/2026")
    with pytest.raises(ValueError, match="'2099-13-45' is no day of the calendar"):
        parse_day("2099-13-45")


def test_database_that_is_not_sqlite_is_named(tmp_path):
    path = tmp_path / "not.db"
    path.write_text("hello, I am text " * 100)
    with pytest.raises(ValueError, match="not.db is not a usable seekstack database"):
        open_database(path)


def test_a_folder_given_for_the_database_is_named_as_one_and_left_as_it_was(tmp_path, capsys):
    """`--db` naming a folder warned to `chmod 600` it (a folder of mode 600 cannot be entered) and then said SQLite's
    'unable to open database file'; `keys list` and `usage` said 'no such database'."""
    tmp_path.chmod(0o755)
    for create in (True, False):
        with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a folder; the database is a file: name one in it "
                                                    f"\\({tmp_path / 'seekstack.db'}\\)"):  # fmt: skip
            open_database(tmp_path, create=create)
    assert capsys.readouterr().err == "" and list(tmp_path.iterdir()) == []


def test_an_empty_database_path_is_refused_as_empty_not_read_as_the_current_folder(tmp_path, monkeypatch):
    """`ServeOptions(database="")` (the CLI refuses an empty --db) was read as the current folder: ' is a folder; the
    database is a file: name one in it (seekstack.db)', naming no folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="^the database is an empty path "):
        open_database("")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_seekstack_db_is_the_default_database(tmp_path, monkeypatch):
    """An empty $SEEKSTACK_DB (a compose file's `SEEKSTACK_DB=${DB}`, DB unset) named the working folder itself: every
    command was refused (' is a folder; the database is a file', before 743adfe '. is not a usable seekstack
    database' after a warning to `chmod 600 .`)."""
    monkeypatch.chdir(tmp_path)
    created = CliRunner().invoke(app, ["keys", "create", "--name", "ci"], env={"SEEKSTACK_DB": ""})
    assert created.exit_code == 0, created.output
    assert [key.name for key in KeyStore(open_database(tmp_path / "seekstack.db")).list()] == ["ci"]


def test_a_database_whose_journal_cannot_be_created_beside_it_is_not_called_unusable(tmp_path):
    """A database in a folder that takes no new file (read-only, another user's) was refused as 'not a usable seekstack
    database: unable to open database file', though nothing was wrong with it: a user so told may delete it, keys and
    bills with it. (A folder in the way of its -wal file stands for that folder here: root writes anywhere.)"""
    path = tmp_path / "keys.db"
    open_database(path).close()
    (tmp_path / "keys.db-wal").mkdir()
    with pytest.raises(PermissionError, match=f"{path} cannot be written: SQLite could not create its journal files "
                                              f"beside it \\(keys.db-wal, keys.db-shm\\) in {tmp_path}, "):  # fmt: skip
        open_database(path)
    (tmp_path / "keys.db-wal").rmdir()
    assert KeyStore(open_database(path)).list() == []  # the database as it was


def test_a_database_in_a_read_only_folder_or_one_this_user_may_not_write_is_not_called_unusable(tmp_path):
    """A database in a read-only folder (SQLITE_READONLY_DIRECTORY) and one this user may not read and write (SQLite's
    CANTOPEN or READONLY) were refused as 'not a usable seekstack database': the first is told of its folder, the
    second of the file's owner and mode; a new one in a read-only folder (a bare '[Errno 13] Permission denied') of its
    folder too. Run without root's power to write anywhere, as a service user runs."""
    in_read_only_folder, locked = tmp_path / "read-only" / "keys.db", tmp_path / "locked" / "keys.db"
    new_in_read_only_folder = in_read_only_folder.parent / "new.db"
    for path in (in_read_only_folder, locked):
        path.parent.mkdir()
        open_database(path).close()
    in_read_only_folder.parent.chmod(0o555)
    locked.chmod(0o400)
    as_a_user = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"] if os.geteuid() == 0 else []
    opening = "import sys\nfrom seekstack.serve.database import open_database\ntry: open_database(sys.argv[1])\n"
    opening += "except Exception as error: print(type(error).__name__, error)"
    try:
        said = [
            subprocess.run([*as_a_user, sys.executable, "-c", opening, path], capture_output=True, text=True).stdout
            for path in (in_read_only_folder, locked, new_in_read_only_folder)
        ]
    finally:
        in_read_only_folder.parent.chmod(0o755)
    assert said[0].startswith(
        f"PermissionError {in_read_only_folder} cannot be written: SQLite could not create its journal files beside "
        f"it (keys.db-wal, keys.db-shm) in {in_read_only_folder.parent}, "
    )
    assert said[1].startswith(
        f"PermissionError {locked} cannot be read and written by this user (uid {os.geteuid()}; the file is uid "
        f"{os.geteuid()}'s, mode 0400): "
    )
    assert said[2].startswith(
        f"PermissionError {new_in_read_only_folder} cannot be created: {in_read_only_folder.parent} takes no new files "
    )
    assert not new_in_read_only_folder.exists()


def charged(limiter: RateLimiter, key_name: str, rpm: int | None, tpm: int | None, tokens: int) -> Charge:
    """A request admitted and charged `tokens`, as the server does: counted, then its tokens reserved."""
    charge = limiter.admit(key_name, rpm)
    limiter.reserve(charge, key_name, tpm, tokens)
    return charge


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_limit_and_retry_after(tmp_path):
    clock = FakeClock()
    limiter = RateLimiter(open_database(tmp_path / "limits.db"), clock)
    charged(limiter, "k", 2, None, 1)
    clock.now += 10
    charged(limiter, "k", 2, None, 1)
    clock.now += 5
    with pytest.raises(RateLimited, match="limit of 2 requests per minute") as refused:
        charged(limiter, "k", 2, None, 1)
    assert refused.value.retry_after_s == 45  # the first request leaves the window 60 s after it came
    charged(limiter, "other", 2, None, 1)  # keys have separate windows
    clock.now += 45
    charged(limiter, "k", 2, None, 1)


def test_each_admitted_or_refused_request_says_what_its_keys_limits_leave_as_openais_headers(tmp_path):
    """OpenAI (and LiteLLM) answer with x-ratelimit-limit/-remaining/-reset-{requests,tokens}; a 429 had only
    Retry-After, a 200 none, so a client could not pace itself before it was refused."""
    clock = FakeClock()
    limiter = RateLimiter(open_database(tmp_path / "limits.db"), clock)
    first = limiter.admit("k", 2)
    assert limiter.reserve(first, "k", 100, 30).headers() == {
        "x-ratelimit-limit-tokens": "100", "x-ratelimit-remaining-tokens": "70", "x-ratelimit-reset-tokens": "1m0s",
    }  # fmt: skip
    assert first.requests.headers() == {
        "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "1m0s",
    }  # fmt: skip
    clock.now += 15.5
    second = limiter.admit("k", 2)
    assert (second.requests.remaining, second.requests.headers()["x-ratelimit-reset-requests"]) == (0, "45s")
    assert limiter.reserve(second, "k", 100, 50).headers()["x-ratelimit-remaining-tokens"] == "20"
    with pytest.raises(RateLimited) as refused:
        limiter.admit("k", 2)
    assert refused.value.window.headers() == {
        "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "45s",
    }  # fmt: skip
    assert limiter.reserve(limiter.admit("k", None), "k", None, 10) is None  # no limit, no headers
    with pytest.raises(RateLimited) as refused:
        limiter.reserve(limiter.admit("k", None), "k", 100, 30)  # 20 left; the first charge's 30 free it in 45 s
    assert (refused.value.window.remaining, refused.value.window.headers()["x-ratelimit-reset-tokens"]) == (20, "45s")


def test_a_429_says_what_was_used_and_requested_and_when_to_try_again_as_openais_do(tmp_path):
    """OpenAI's: 'Limit 3, Used 3, Requested 1. Please try again in 20s.'; ours named the limit only."""
    clock = FakeClock()
    limiter = RateLimiter(open_database(tmp_path / "limits.db"), clock)
    charged(limiter, "k", 2, 100, 70)
    clock.now += 15
    with pytest.raises(RateLimited) as refused:
        charged(limiter, "k", 2, 100, 40)
    assert str(refused.value) == (
        "key 'k' is over its limit of 100 tokens per minute (used 70, requested 40): try again in 45 s"
    )
    with pytest.raises(RateLimited) as refused:
        charged(limiter, "k", 2, 100, 10)  # the request refused above was counted
    assert (
        str(refused.value)
        == "key 'k' is over its limit of 2 requests per minute (used 2, requested 1): try again in 45 s"
    )


def test_tokens_per_minute_charge_is_settled_to_the_real_usage(tmp_path):
    clock = FakeClock()
    limiter = RateLimiter(open_database(tmp_path / "limits.db"), clock)
    charge = charged(limiter, "k", None, 100, 80)  # prompt + max_tokens
    with pytest.raises(RateLimited, match="limit of 100 tokens per minute") as refused:
        charged(limiter, "k", None, 100, 30)
    assert refused.value.retry_after_s == 60
    limiter.settle(charge, 20)  # it stopped early
    charged(limiter, "k", None, 100, 30)
    with pytest.raises(NeverFits, match="more than key 'k' may use in a minute"):
        charged(limiter, "k", None, 100, 101)


def test_a_request_that_fills_the_token_window_exactly_is_admitted(tmp_path):
    limiter = RateLimiter(open_database(tmp_path / "limits.db"), FakeClock())
    charged(limiter, "k", None, 100, 60)
    charged(limiter, "k", None, 100, 40)
    charged(limiter, "fresh", None, 100, 100)
    assert limiter.tokens_left("k", 100) == limiter.tokens_left("fresh", 100) == 0


def test_a_charge_leaves_the_window_exactly_60_seconds_after_it_was_made(tmp_path):
    clock = FakeClock()
    limiter = RateLimiter(open_database(tmp_path / "limits.db"), clock)
    charged(limiter, "k", 1, 100, 80)
    clock.now += 59.5
    assert limiter.tokens_left("k", 100) == 20
    clock.now += 0.5
    assert limiter.tokens_left("k", 100) == 100
    charged(limiter, "k", 1, 100, 100)


def test_retry_after_is_when_the_oldest_charges_free_just_enough(tmp_path):
    """Tokens: the oldest charge alone frees the 30 tokens over the limit. Requests: with a limit lowered below the
    requests in the window, the wait is until fewer than the limit are left in it."""
    clock = FakeClock()
    limiter = RateLimiter(open_database(tmp_path / "limits.db"), clock)
    charged(limiter, "k", None, 100, 30)
    clock.now += 10
    charged(limiter, "k", None, 100, 50)
    clock.now += 10
    with pytest.raises(RateLimited) as refused:
        charged(limiter, "k", None, 100, 50)  # 130: 30 over
    assert refused.value.retry_after_s == 40
    with pytest.raises(RateLimited) as refused:
        charged(limiter, "k", 1, None, 1)  # 3 requests in the window (the one refused counts), 1 allowed
    assert refused.value.retry_after_s == 60  # all must leave it


def test_keys_cli_shows_the_key_once_and_lists_it_by_prefix(tmp_path):
    runner, db = CliRunner(), str(tmp_path / "cli.db")
    created = runner.invoke(app, ["keys", "create", "--name", "frank", "--rpm", "5", "--db", db])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert KeyStore(open_database(db)).verify(key).rpm == 5
    listed = runner.invoke(app, ["keys", "list", "--db", db]).stdout
    assert "frank" in listed and key[:12] in listed and key not in listed
    priced = runner.invoke(
        app, ["keys", "plan", "pro", "--prompt-price", "0.5", "--completion-price", "1.5", "--db", db]
    )
    assert "pro: 0.5 / 1.5 per 1k" in priced.stdout
    refused = runner.invoke(app, ["keys", "create", "--name", "gina", "--plan", "gold", "--db", db])
    assert refused.exit_code == 1 and "no plan 'gold'" in refused.stderr
    Ledger(open_database(db)).record(usage("frank", 1000, 500))
    table = runner.invoke(app, ["usage", "--db", db]).stdout
    assert "frank" in table and "1,000" in table and "0.003000" in table  # 1.5k tokens at 0.002 per 1k
    Ledger(open_database(db)).record(usage("frank", 2000, 250))
    total = next(line for line in runner.invoke(app, ["usage", "--db", db]).stdout.splitlines() if "total" in line)
    assert [cell.strip() for cell in total.split("│")[3:7]] == ["2", "0", "3,000", "750"]  # the token totals too
    bad_day = runner.invoke(app, ["usage", "--since", "yesterday", "--db", db])
    assert bad_day.exit_code == 1 and "'yesterday' is not in the form YYYY-MM-DD" in bad_day.stderr


def test_revoking_a_revoked_or_unknown_key_says_when_it_was_revoked_or_names_the_close_names(database):
    keys = KeyStore(database)
    keys.create("alice")
    keys.create("alicia")
    keys.revoke("alice")
    revoked_at = utc_time(next(key.revoked_at for key in keys.list() if key.name == "alice"))
    with pytest.raises(KeyStoreError) as again:
        keys.revoke("alice")
    assert str(again.value) == (
        f"key 'alice' was revoked already, at {revoked_at} UTC: it has no active key to revoke "
        "(`seekstack keys create --name alice` gives the name a new one)"
    )
    with pytest.raises(KeyStoreError) as typo:
        keys.revoke("alic")
    assert str(typo.value) == (
        "no key named 'alic' was ever created (did you mean 'alice', 'alicia'?); `seekstack keys list` shows every key"
    )
    with pytest.raises(KeyStoreError) as unknown:
        keys.revoke("zed")
    assert str(unknown.value) == "no key named 'zed' was ever created; `seekstack keys list` shows every key"
    assert [key.name for key in keys.list() if key.revoked_at is None] == ["alicia"]


def test_keys_revoke_of_a_revoked_key_is_refused_with_exit_1_saying_so(tmp_path):
    runner, db = CliRunner(), str(tmp_path / "cli.db")
    KeyStore(open_database(db)).create("alice")
    assert runner.invoke(app, ["keys", "revoke", "alice", "--db", db]).exit_code == 0
    again = runner.invoke(app, ["keys", "revoke", "alice", "--db", db])
    assert again.exit_code == 1 and "error: key 'alice' was revoked already, at " in again.stderr


def test_keys_rotate_prints_the_new_key_once_and_revokes_the_old(tmp_path):
    runner, db = CliRunner(), str(tmp_path / "cli.db")
    old = KeyStore(open_database(db)).create("leaky", rpm=5)
    rotated = runner.invoke(app, ["keys", "rotate", "leaky", "--db", db])
    assert rotated.exit_code == 0, rotated.output
    new = rotated.stdout.strip()
    assert "rotated key 'leaky': the old one is revoked; copy it now" in rotated.stderr
    assert "plan 'default', rpm 5, tpm unlimited, models all, admin no" in rotated.stderr
    store = KeyStore(open_database(db))
    assert store.verify(old) is None and store.verify(new).rpm == 5
    unknown = runner.invoke(app, ["keys", "rotate", "nobody", "--db", db])
    assert unknown.exit_code == 1 and "no active key named 'nobody' to rotate" in unknown.stderr


def test_keys_create_and_rotate_print_the_key_alone_on_stdout_and_its_terms_on_stderr(tmp_path):
    runner, db = CliRunner(), str(tmp_path / "cli.db")
    runner.invoke(app, ["keys", "plan", "pro", "--prompt-price", "1", "--completion-price", "2", "--db", db])
    flags = ["--plan", "pro", "--tpm", "900", "--admin", "--model", "legal", "--model", "poem", "--db", db]
    created = runner.invoke(app, ["keys", "create", "--name", "legal-team", *flags])
    rotated = runner.invoke(app, ["keys", "rotate", "legal-team", "--db", db])
    store = KeyStore(open_database(db))
    for printed in (created, rotated):
        assert printed.exit_code == 0, printed.output
        assert printed.stdout.startswith(KEY_PREFIX)
        assert len(printed.stdout.splitlines()) == 1  # `KEY=$(seekstack keys create ...)` gets the key alone
        assert "plan 'pro', rpm unlimited, tpm 900, models legal, poem, admin yes" in printed.stderr
    assert store.verify(rotated.stdout.strip()).models == ("legal", "poem")


def test_keys_list_shows_the_models_each_key_may_use(tmp_path):
    runner, db = CliRunner(), str(tmp_path / "cli.db")
    store = KeyStore(open_database(db))
    store.create("legal-team", models=("legal", "poem"))
    store.create("everything")
    listed = runner.invoke(app, ["keys", "list", "--db", db], env={"COLUMNS": "200"})  # one line per key
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    header = next(cells(line, "┃") for line in lines if "name" in line)
    rows = [dict(zip(header, cells(line, "│"), strict=True)) for line in lines if line.startswith("│")]
    assert [(row["name"], row["models"]) for row in rows] == [("legal-team", "legal, poem"), ("everything", "all")]


def test_an_80_column_terminal_shows_every_number_and_day_whole(tmp_path):
    runner, db = CliRunner(), str(tmp_path / "cli.db")
    store = KeyStore(open_database(db))
    store.set_plan("enterprise", prompt_per_1k=1.25, completion_per_1k=3.75)
    store.create("analytics", plan="enterprise", rpm=600, tpm=200_000)
    Ledger(open_database(db)).record(usage("analytics", 1_234_567, 7_654_321))
    listed = runner.invoke(app, ["keys", "list", "--db", db], env={"COLUMNS": "80"})
    assert "rpm 600, tpm 200000," in listed.stdout  # was: '2000…'
    report = runner.invoke(app, ["usage", "--db", db], env={"COLUMNS": "80"}).stdout
    day = dt.datetime.now(dt.UTC).date().isoformat()  # was: '2026-12-…'
    assert f"{day}  analytics\n" in report and "prompt tokens 1,234,567, completion tokens" in report
    assert "7,654,321, cost 30246.912500" in report and max(len(line) for line in report.splitlines()) <= 80


def test_a_usage_table_folds_no_name_to_a_few_letters_a_line(tmp_path):
    """In 80 columns a usage table of three models folded each key and model to 3 letters a line ('dee', 'pse',
    'ek-', 'v3-', 'bas', 'e'): names fold to no fewer than 16, else each row is a block naming them whole."""
    db = str(tmp_path / "cli.db")
    for model in ("deepseek-v3-base", "legal-adapter", "a-long-adapter-name-for-legal-work"):
        Ledger(open_database(db)).record(usage("analytics-team", 12, 12, model=model))
    narrow = CliRunner().invoke(app, ["usage", "--db", db], env={"COLUMNS": "80"}).stdout
    day = dt.datetime.now(dt.UTC).date().isoformat()
    for model in ("deepseek-v3-base", "legal-adapter", "a-long-adapter-name-for-legal-work"):
        assert f"{day}  analytics-team  {model}\n" in narrow
    wide = CliRunner().invoke(app, ["usage", "--db", db], env={"COLUMNS": "110"}).stdout
    lines = [cells(line, "│") for line in wide.splitlines() if line.startswith("│")]
    assert [(line[1], line[2]) for line in lines] == [
        ("analytics-team", "a-long-adapter-name-for"), ("", "-legal-work"), ("analytics-team", "deepseek-v3-base"),
        ("analytics-team", "legal-adapter"), ("", ""),
    ]  # fmt: skip


def test_a_usage_table_too_narrow_for_its_names_gives_a_block_per_row_naming_its_key_and_model(tmp_path):
    """In 80 columns a day of two models with costs in the thousands left no room for the key and model columns: rich
    squeezed them to nothing, and no row said whose usage it was."""
    db = str(tmp_path / "cli.db")
    store = KeyStore(open_database(db))
    store.set_plan("enterprise", prompt_per_1k=1.25, completion_per_1k=3.75)
    store.create("analytics", plan="enterprise")
    for model in ("tiny", "legal-adapter"):
        Ledger(open_database(db)).record(usage("analytics", 1_234_567, 7_654_321, model=model))
    report = CliRunner().invoke(app, ["usage", "--db", db], env={"COLUMNS": "80"}).stdout
    day = dt.datetime.now(dt.UTC).date().isoformat()
    assert report.splitlines() == [
        "usage per key, day (UTC) and model",
        f"{day}  analytics  legal-adapter",
        "    requests 1, failed (5xx, free) 0, prompt tokens 1,234,567, completion tokens",
        "    7,654,321, cost 30246.912500",
        f"{day}  analytics  tiny",
        "    requests 1, failed (5xx, free) 0, prompt tokens 1,234,567, completion tokens",
        "    7,654,321, cost 30246.912500",
        "total",
        "    requests 2, failed (5xx, free) 0, prompt tokens 2,469,134, completion tokens",
        "    15,308,642, cost 60493.825000",
    ]
    wide = CliRunner().invoke(app, ["usage", "--db", db], env={"COLUMNS": "120"}).stdout
    header = next(cells(line, "┃") for line in wide.splitlines() if "requests" in line)
    rows = [dict(zip(header, cells(line, "│"), strict=True)) for line in wide.splitlines() if line.startswith("│")]
    assert [(row["key"], row["model"]) for row in rows] == [("analytics", "legal-adapter"), ("analytics", "tiny"),
                                                            ("", "")]  # fmt: skip


def test_a_usage_cost_below_a_millionth_shows_its_significant_digits_not_zero(tmp_path):
    """A plan priced at 1e-4 per 1k tokens billed a 1-token request 1e-07, which the table showed as 0.000000."""
    db = str(tmp_path / "cli.db")
    store = KeyStore(open_database(db))
    store.set_plan("micro", prompt_per_1k=1e-4, completion_per_1k=0.0)
    store.create("k", plan="micro")
    Ledger(open_database(db)).record(usage("k", 1, 0))
    table = CliRunner().invoke(app, ["usage", "--db", db], env={"COLUMNS": "120"}).stdout
    header = next(cells(line, "┃") for line in table.splitlines() if "requests" in line)
    rows = [dict(zip(header, cells(line, "│"), strict=True)) for line in table.splitlines() if line.startswith("│")]
    assert [row["cost"] for row in rows] == ["0.000000100"] * 2  # the day and the total


def test_keys_list_narrower_than_its_table_shows_a_block_per_key_wrapped_between_words(tmp_path):
    """In 80 columns the nine columns folded words: plan 'defa/ult', header 'crea/ted', state 'activ/e', a day
    '2026/-12-/04'."""
    runner, db = CliRunner(), str(tmp_path / "cli.db")
    store = KeyStore(open_database(db))
    store.set_plan("enterprise", prompt_per_1k=1.25, completion_per_1k=3.75)
    analytics = store.create("analytics-team", plan="enterprise", rpm=600, tpm=200_000)
    legal = store.create("legal", admin=True, models=("legal-v2", "deepseek-v3-base"))
    store.revoke("legal")
    listed = runner.invoke(app, ["keys", "list", "--db", db], env={"COLUMNS": "80"})
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert lines[0] == "API keys (times in UTC)" and max(len(line) for line in lines) <= 80
    blocks: list[list[str]] = []  # a key's line, then its terms indented, wrapped between words
    for line in lines[1:]:
        if line.startswith("    "):
            blocks[-1].append(line.strip())
        else:
            blocks.append([line])
    day = dt.datetime.now(dt.UTC).date().isoformat()
    assert blocks[0][0] == f"analytics-team  {analytics[:12]}...  active"
    assert " ".join(blocks[0][1:]).startswith(
        f"plan 'enterprise', rpm 600, tpm 200000, models all, admin no; created {day} "
    )
    assert blocks[1][0].startswith(f"legal  {legal[:12]}...  revoked {day} ")
    assert " ".join(blocks[1][1:]).startswith(
        f"plan 'default', rpm unlimited, tpm unlimited, models legal-v2, deepseek-v3-base, admin yes; created {day} "
    )
    wide = runner.invoke(app, ["keys", "list", "--db", db], env={"COLUMNS": "200"})
    rows = [cells(line, "│") for line in wide.stdout.splitlines() if line.startswith("│")]
    assert [row[:3] for row in rows] == [
        ["analytics-team", f"{analytics[:12]}...", "enterprise"],
        ["legal", f"{legal[:12]}...", "default"],
    ]


def cells(line: str, border: str) -> list[str]:
    """The cells of one line of a rich table."""
    return [cell.strip() for cell in line.split(border)[1:-1]]


def test_usage_of_an_unknown_key_fails_and_a_key_without_usage_says_it_has_none(tmp_path):
    runner, db = CliRunner(), str(tmp_path / "cli.db")
    KeyStore(open_database(db)).create("idle")
    Ledger(open_database(db)).record(usage("gone", 10, 10))  # a key the ledger knows, no longer in the store

    unknown = runner.invoke(app, ["usage", "--key", "nosuch", "--db", db])
    assert unknown.exit_code == 1 and "no key named 'nosuch'" in unknown.stderr and "total" not in unknown.stdout
    as_json = runner.invoke(app, ["usage", "--key", "nosuch", "--json", "--db", db])
    assert as_json.exit_code == 1 and "no key named 'nosuch'" in as_json.stdout
    idle = runner.invoke(app, ["usage", "--key", "idle", "--db", db])
    assert (idle.exit_code, idle.stdout.strip()) == (0, "no usage recorded for key 'idle'")
    assert runner.invoke(app, ["usage", "--key", "idle", "--json", "--db", db]).stdout.strip() == "[]"
    future = runner.invoke(app, ["usage", "--key", "gone", "--since", "2999-01-01", "--db", db])
    assert (future.exit_code, future.stdout.strip()) == (0, "no usage recorded for key 'gone' since 2999-01-01")
    assert "gone" in runner.invoke(app, ["usage", "--key", "gone", "--db", db]).stdout


@pytest.mark.parametrize("price", ["nan", "inf", "-inf", "1e400", "-0.5"])
def test_a_price_that_is_not_a_finite_number_at_least_zero_is_refused_and_says_so(tmp_path, price):
    db = str(tmp_path / "cli.db")
    priced = CliRunner().invoke(app, ["keys", "plan", "pro", "--prompt-price", price, "--completion-price", "1",
                                      "--db", db])  # fmt: skip
    assert priced.exit_code == 1
    assert "prompt price of plan 'pro' must be a finite number >= 0, got" in priced.stderr
    assert [plan.name for plan in KeyStore(open_database(db)).plans()] == ["default"]  # nothing stored
    with pytest.raises(KeyStoreError, match="cached prompt price of plan 'default' must be a finite number >= 0"):
        KeyStore(open_database(db)).set_plan("default", 1.0, 1.0, cached_prompt_per_1k=float(price))


@pytest.mark.parametrize(
    "command", [["usage"], ["keys", "list"], ["keys", "plan"], ["keys", "revoke", "ci"], ["keys", "rotate", "ci"]]
)
def test_commands_that_read_the_database_name_a_missing_one_instead_of_creating_it(tmp_path, command):
    missing = tmp_path / "typo.db"
    result = CliRunner().invoke(app, [*command, "--db", str(missing)])
    assert result.exit_code == 1 and f"{missing}: no such database" in result.stderr
    assert not missing.exists()


def test_keys_plan_and_a_new_keys_budget_show_every_digit_they_were_given(tmp_path):
    """`:g` kept 6 significant digits: a price of 0.0012345678 was listed as 0.00123457, as if stored rounded."""
    runner, db = CliRunner(), str(tmp_path / "cli.db")
    listed = runner.invoke(app, ["keys", "plan", "fine", "--prompt-price", "0.0012345678", "--completion-price",
                                 "1.23456789", "--cached-prompt-price", "1e-7", "--db", db])  # fmt: skip
    assert "fine: 0.0012345678 / 1.23456789 per 1k prompt / output tokens (1e-07 for cached prompt tokens)" in (
        listed.stdout.splitlines()
    )
    assert "default: 0.002 / 0.002 per 1k prompt / output tokens" in listed.stdout.splitlines()  # no digits added
    created = runner.invoke(app, ["keys", "create", "--name", "team", "--max-budget", "12.3456789", "--db", db])
    assert created.stderr.splitlines()[-1].endswith(", budget 12.3456789")


def test_keys_list_json_gives_every_key_with_its_terms_for_scripts(tmp_path):
    """LiteLLM's /key/list answers JSON; `keys list` had only a table (or wrapped blocks) for a script to parse."""
    runner, db = CliRunner(), str(tmp_path / "cli.db")
    store = KeyStore(open_database(db))
    store.create("team", rpm=60, models=("legal",), budget=Budget(25.0, 30 * 86400), expires_at=time.time() + 3600)
    store.create("ops", admin=True)
    store.revoke("ops")
    listed = runner.invoke(app, ["keys", "list", "--json", "--db", db])
    team, ops = json.loads(listed.stdout)
    assert {field: team[field] for field in ("name", "plan", "rpm", "tpm", "models", "admin", "revoked_at")} == {
        "name": "team", "plan": "default", "rpm": 60, "tpm": None, "models": ["legal"], "admin": False,
        "revoked_at": None,
    }  # fmt: skip
    assert (team["max_budget"], team["budget_period_s"], team["prefix"]) == (25.0, 30 * 86400, store.list()[0].prefix)
    assert team["expires_at"] > team["created_at"] and "key_hash" not in team and "prices" not in team
    assert (ops["name"], ops["admin"], ops["max_budget"]) == ("ops", True, None) and ops["revoked_at"] is not None
    missing = runner.invoke(app, ["keys", "list", "--json", "--db", str(tmp_path / "typo.db")])
    assert missing.exit_code == 1 and "no such database" in json.loads(missing.stdout)["error"]["message"]


def test_prices_without_a_plan_name_are_refused_not_ignored(tmp_path):
    db = str(tmp_path / "cli.db")
    result = CliRunner().invoke(app, ["keys", "plan", "--prompt-price", "1", "--db", db])
    assert result.exit_code == 1 and "name it" in result.stderr
