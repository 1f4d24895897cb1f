"""A key's budget holds: each request holds the most it may cost while it runs, so concurrent requests, or one long
completion, never carry a key's spend past its budget; a chat that leaves max_tokens to the server is given what the
budget leaves."""

from __future__ import annotations

import asyncio
import threading
import time
from decimal import Decimal

import pytest

from seekstack.infer.engine import Engine
from seekstack.serve.app import create_app
from seekstack.serve.billing import Bill
from seekstack.serve.budget import BudgetHolds, OverBudget, affordable_tokens
from seekstack.serve.database import cost_pico, open_database
from seekstack.serve.keys import Budget, KeyStore, Plan
from seekstack.serve.ledger import Ledger
from tests.serve.server import error_of, make_model_dir, run

# two prompt ids and four tokens, at 0.5 a token: each request may cost 3.0, and does (ignore_eos)
REQUEST = {"model": "model", "prompt": [5, 6], "max_tokens": 4, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    return Engine.from_pretrained(make_model_dir(tmp_path_factory.mktemp("budget")))


def pricey_key(database, budget: float, prompt_per_1k: float = 500.0) -> str:
    keys = KeyStore(database)
    keys.set_plan("pricey", prompt_per_1k=prompt_per_1k, completion_per_1k=500.0)  # a completion token costs 0.5
    return keys.create("capped", plan="pricey", budget=Budget(budget))


def test_concurrent_requests_never_carry_a_key_past_its_budget(engine, tmp_path):
    """Four requests at once on a budget of two: each passed the budget check before any was billed, all four were
    served and billed 12.0 of a budget of 6. Two are served now, two refused with 429 insufficient_quota naming what
    the requests under way hold (a retry may fit: no x-should-retry) or, sent after, what was spent."""
    database = open_database(tmp_path / "db")
    headers = {"Authorization": f"Bearer {pricey_key(database, budget=6.0)}"}

    async def scenario(client):
        return await asyncio.gather(*(client.post("/v1/completions", json=REQUEST, headers=headers) for _ in range(4)))

    answers = run(create_app(engine, database), scenario)
    assert sorted(answer.status_code for answer in answers) == [200, 200, 429, 429]
    assert Ledger(database).spent("capped") == 6.0
    for refused in (answer for answer in answers if answer.status_code == 429):
        error = error_of(refused, 429)
        assert (error["type"], error["code"], error["param"]) == (
            "insufficient_quota",
            "insufficient_quota",
            "max_tokens",
        )
        assert "this request may cost up to 3.000000" in error["message"], error["message"]


def test_a_request_that_may_cost_more_than_the_budget_leaves_is_refused_before_it_runs(engine, tmp_path):
    """A budget of 4 and a request that may cost 3.0: the first was served, and so was the second, spent 3.0 < 4, then
    billed to 6.0. The second is refused now, at no cost, told to lower max_tokens and not to send it again as it is."""
    database = open_database(tmp_path / "db")
    headers = {"Authorization": f"Bearer {pricey_key(database, budget=4.0)}"}

    async def scenario(client):
        return [await client.post("/v1/completions", json=REQUEST, headers=headers) for _ in range(2)]

    served, refused = run(create_app(engine, database), scenario)
    assert served.status_code == 200
    error = error_of(refused, 429)
    assert error["message"] == (
        "key 'capped' has spent 3.000000 of its budget of 4, and its requests under way may cost up to 0.000000 more; "
        "this request may cost up to 3.000000 (its prompt and max_tokens at plan 'pricey''s prices), more than is "
        "left: lower max_tokens"
    )
    assert refused.headers["x-should-retry"] == "false"
    assert [(row["status"], row["cost"]) for row in Ledger(database).records("capped")] == [(200, 3.0), (429, 0.0)]


def test_a_chat_without_max_tokens_is_given_what_the_budget_leaves(engine, tmp_path):
    """A chat that leaves max_tokens to the server may fill the context: on a key with 2.0 of its budget left it was
    refused (or, before budgets held, served and billed past it). It is served the 4 tokens the budget pays for."""
    database = open_database(tmp_path / "db")
    headers = {"Authorization": f"Bearer {pricey_key(database, budget=2.0, prompt_per_1k=0.0)}"}
    chat = {"model": "model", "messages": [{"role": "user", "content": "hello"}], "ignore_eos": True}

    async def scenario(client):
        return await client.post("/v1/chat/completions", json=chat, headers=headers)

    answer = run(create_app(engine, database), scenario)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 4
    assert answer.json()["choices"][0]["finish_reason"] == "length"
    assert Ledger(database).spent("capped") == 2.0


def test_a_chat_without_max_tokens_whose_prompt_does_not_fit_is_told_to_shorten_it_not_to_lower_max_tokens(
    engine, tmp_path
):
    """A chat that gave no max_tokens, on a key whose budget does not pay even for its prompt, was asked for one token
    and refused "lower max_tokens" (param max_tokens), a field the client never sent. It is told its prompt does not
    fit (param messages)."""
    database = open_database(tmp_path / "db")
    headers = {"Authorization": f"Bearer {pricey_key(database, budget=0.5, prompt_per_1k=5000.0)}"}
    chat = {"model": "model", "messages": [{"role": "user", "content": "hello"}]}

    async def scenario(client):
        return await client.post("/v1/chat/completions", json=chat, headers=headers)

    error = error_of(run(create_app(engine, database), scenario), 429)
    assert (error["param"], error["code"]) == ("messages", "insufficient_quota")
    assert "(its prompt and one token at plan 'pricey''s prices)" in error["message"], error["message"]
    assert error["message"].endswith("more than is left: shorten the prompt"), error["message"]


def test_a_chat_that_gave_max_completion_tokens_is_told_to_lower_that_field_not_max_tokens(engine, tmp_path):
    """A chat that named its length in max_completion_tokens, refused for its cost, was told "lower max_tokens"
    (param max_tokens), a field the client never sent: it is told to lower the one it sent."""
    database = open_database(tmp_path / "db")
    headers = {"Authorization": f"Bearer {pricey_key(database, budget=1.0)}"}
    chat = {"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4}

    async def scenario(client):
        return await client.post("/v1/chat/completions", json=chat, headers=headers)

    error = error_of(run(create_app(engine, database), scenario), 429)
    assert (error["param"], error["code"]) == ("max_completion_tokens", "insufficient_quota")
    assert "(its prompt and max_completion_tokens at plan 'pricey''s prices)" in error["message"], error["message"]
    assert error["message"].endswith("more than is left: lower max_completion_tokens"), error["message"]


def test_affordable_tokens_fit_the_cost_as_the_ledger_rounds_it():
    """The completion tokens each request may take so that the call costs at most what is left, its prompt first."""
    plan = Plan("p", prompt_per_1k=1.0, completion_per_1k=3.0)  # a prompt token 0.001, a completion token 0.003
    left = plan.cost_pico(10, 0) + plan.cost_pico(0, 7)  # the prompt and 7 tokens, exactly
    assert affordable_tokens(plan, left, prompt_tokens=10, requests=1) == 7
    assert affordable_tokens(plan, left - 1, prompt_tokens=10, requests=1) == 6
    assert affordable_tokens(plan, left, prompt_tokens=10, requests=2) == 3
    assert affordable_tokens(plan, plan.cost_pico(9, 0), prompt_tokens=10, requests=1) == 0
    assert affordable_tokens(Plan("free", 1.0, 0.0), 0, prompt_tokens=10, requests=1) is None


def test_a_stream_billed_while_a_request_is_admitted_is_counted_not_missed(tmp_path):
    """A stream's row brought up to date between the admission's read of the spend and its read of the holds was
    missed: the spend read before the update, the stream's hold after it (less what the update billed), and a request
    that passed the budget was admitted."""
    database = open_database(tmp_path / "db")
    keys = KeyStore(database)
    keys.set_plan("unit", prompt_per_1k=1000.0, completion_per_1k=1000.0)  # a token costs 1
    key = keys.verify(keys.create("capped", plan="unit", budget=Budget(10.0)))
    ledger = Ledger(database)
    holds = BudgetHolds(ledger)
    stream = Bill(ledger, key, "model", "/v1/completions", time.perf_counter(), prompt_tokens=2, plan=key.prices)
    holds.hold(key, stream, most_pico=key.prices.cost_pico(2, 4))  # may cost 6
    stream.open()  # billed 2
    read_spent = ledger.spent_pico

    def spent_read_as_the_stream_is_billed(key_name: str, since: float | None = None) -> int:
        spent = read_spent(key_name, since)
        stream.completion_tokens = 3
        stream.update()  # billed 5 once the spend was read: 1 more is held for it
        return spent

    ledger.spent_pico = spent_read_as_the_stream_is_billed
    request = Bill(ledger, key, "model", "/v1/completions", time.perf_counter(), plan=key.prices)
    with pytest.raises(OverBudget, match="has spent 2.000000 of its budget of 10, and its requests under way may cost "
                                         "up to 4.000000 more"):  # fmt: skip
        holds.hold(key, request, most_pico=key.prices.cost_pico(1, 4))  # 5 + 1 held + 5 > 10


def test_a_prompt_read_from_the_prefix_cache_at_a_dearer_cached_price_is_held_at_that_price(engine, tmp_path):
    """A plan whose cached prompt price is above its prompt price: requests were held at the prompt price alone (0
    here), their prompt then read from the prefix cache and billed 16.0 each, 32.0 of a budget of 20. Each is held at
    the dearer price (20.0), and the third refused."""
    database = open_database(tmp_path / "db")
    keys = KeyStore(database)
    keys.set_plan("cache-priced", prompt_per_1k=0.0, completion_per_1k=0.0, cached_prompt_per_1k=500.0)
    headers = {"Authorization": f"Bearer {keys.create('capped', plan='cache-priced', budget=Budget(20.0))}"}
    body = {"model": "model", "prompt": list(range(5, 45)), "max_tokens": 2}  # 40 tokens: 32 cached after the first

    async def scenario(client):
        return [await client.post("/v1/completions", json=body, headers=headers) for _ in range(3)]

    *served, refused = run(create_app(engine, database), scenario)
    assert [answer.status_code for answer in served] == [200, 200]
    assert "this request may cost up to 20.000000" in error_of(refused, 429)["message"]
    assert Ledger(database).spent("capped") == 16.0


def test_one_keys_admission_does_not_wait_for_anothers_read_of_its_spend(tmp_path):
    """Admissions took one lock for all keys, so every budgeted request of the server waited for each other key's read
    of its spend (0.1 s for 130k usage rows): one key's admission, held while it read, held up another key's."""
    database = open_database(tmp_path / "db")
    keys = KeyStore(database)
    slow, quick = (keys.verify(keys.create(name, budget=Budget(10.0))) for name in ("slow", "quick"))
    ledger = Ledger(database)
    holds = BudgetHolds(ledger)
    read_spent, quick_admitted = ledger.spent_pico, threading.Event()

    def spent_read_slowly(key_name: str, since: float | None = None) -> int:
        if key_name == "slow":
            quick_admitted.wait(timeout=5)
        return read_spent(key_name, since)

    ledger.spent_pico = spent_read_slowly
    slow_admission = threading.Thread(
        target=holds.hold, args=(slow, Bill(ledger, slow, "model", "/v1/completions", 0.0), 1)
    )
    slow_admission.start()
    time.sleep(0.1)  # the slow key's admission is reading its spend
    started = time.monotonic()
    holds.hold(quick, Bill(ledger, quick, "model", "/v1/completions", 0.0), 1)
    quick_admitted.set()
    slow_admission.join()
    assert time.monotonic() - started < 2  # was: 5 s, the slow read's whole wait


def test_a_release_does_not_wait_for_an_admission_of_the_same_key_reading_its_spend(tmp_path):
    """A request's release (on the event loop, as its row is written) took the admission lock of its key, so it waited
    for an admission of the same key reading its spend (0.1 s for 130k usage rows), and the whole server with it."""
    database = open_database(tmp_path / "db")
    keys = KeyStore(database)
    key = keys.verify(keys.create("capped", budget=Budget(10.0)))
    ledger = Ledger(database)
    holds = BudgetHolds(ledger)
    ending = Bill(ledger, key, "model", "/v1/completions", 0.0)
    holds.hold(key, ending, 1)
    read_spent, released = ledger.spent_pico, threading.Event()

    def spent_read_slowly(key_name: str, since: float | None = None) -> int:
        released.wait(timeout=5)
        return read_spent(key_name, since)

    ledger.spent_pico = spent_read_slowly
    admission = threading.Thread(target=holds.hold, args=(key, Bill(ledger, key, "model", "/v1/completions", 0.0), 1))
    admission.start()
    time.sleep(0.1)  # the admission is reading the spend
    started = time.monotonic()
    holds.release(ending)
    released.set()
    admission.join()
    assert time.monotonic() - started < 2  # was: 5 s, the slow read's whole wait
    ledger.spent_pico = read_spent
    assert holds.left_pico(key) == cost_pico(Decimal(10)) - 1  # the admitted request's hold alone
