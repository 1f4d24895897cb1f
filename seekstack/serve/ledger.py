"""The usage ledger: one row per API request, priced at its key's plan as the request came (the server reads it then:
a price change bills new requests, never tokens already under way), or else when the row is written.

The server writes a request's row before the last byte of its response leaves, so a client that
has its answer is also on the bill, whatever happens to the server afterwards. A stream's row is
opened (status 0) when it starts and brought up to date as its tokens go out (see `app.Bill`), so a
server that dies mid-stream has billed all but the last few tokens it sent. A request the server failed
(a 5xx status) is recorded with its tokens but costs nothing: the user is not charged for the server's error.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import time
from dataclasses import asdict, dataclass

from seekstack.schema import shown_value
from seekstack.serve.database import (
    COST_SCALE,
    DEFAULT_PLAN,
    IN_PROGRESS,
    Database,
    cost_amount,
    cost_columns,
    retrying_while_busy,
    stored_cost_pico,
)
from seekstack.serve.keys import Plan

PLAN_OF_KEY = (  # parameters: the key's name, the default plan (a name without keys: the open server)
    "SELECT * FROM plans WHERE name = COALESCE((SELECT plan FROM keys WHERE name = ? "
    "ORDER BY created_at DESC LIMIT 1), ?)"  # a name's newest key: its active one, if it has one
)
# The rows' costs summed in four parts, billions of units, the whole units below them, the millionths and the 1e-12
# below those: SQLite's SUM of 64-bit integers fails ("integer overflow") past 2**63 - 1, which a sum of whole units
# passes at 9.2e18 of the currency (two of the largest requests at the highest price: every later request of a key
# with a budget failed, 500). Each part passes it only after 10**9 rows of the largest cost (billions, at most 9.2e9
# a row), or 9.2e9 rows (each other part below 10**9 a row)
COST_SUMS = (  # (no % operator: psycopg reads it as a placeholder's start)
    "SUM(cost_units / 1000000000) AS cost_giga_units, SUM(cost_units - cost_units / 1000000000 * 1000000000) AS "
    "cost_units, SUM(cost_pico / 1000000) AS cost_micro, SUM(cost_pico - cost_pico / 1000000 * 1000000) AS "
    "cost_below_micro"
)


@dataclass(frozen=True)
class UsageRecord:
    """One request as billed: who, which model and endpoint, tokens, latency and HTTP status."""

    key_name: str | None  # None: the server ran open, without keys
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    status: int  # HTTP status; IN_PROGRESS while a stream runs
    cached_tokens: int = 0  # of the prompt tokens, those read from the prefix cache
    moderation: str | None = None  # the content-safety category that blocked, redacted or flagged it
    free: bool = False  # waived by the content policy or a 400 its fields caused while generating (tokens kept)
    plan: Plan | None = None  # the prices it is billed at; None: its key's plan when the row is written

    @property
    def charged(self) -> bool:
        """Whether its tokens cost the key anything: not when the content policy waives them, nor when the server
        failed the request (a 5xx status)."""
        return not self.free and not 500 <= self.status < 600


@dataclass(frozen=True)
class DailyUsage:
    """Totals of one key on one UTC day for one model (the base's name or a LoRA adapter's)."""

    key_name: str | None
    day: str  # YYYY-MM-DD
    model: str
    requests: int
    failed: int  # of the requests, those the server failed (a 5xx status): their tokens are counted, not charged
    prompt_tokens: int
    cached_tokens: int  # of the prompt tokens, those read from the prefix cache (priced at the plan's cached price)
    completion_tokens: int
    cost_pico: int  # the cost, in whole 1e-12 of the currency (usage.cost_units and usage.cost_pico)

    @property
    def cost(self) -> float:
        return cost_amount(self.cost_pico)

    def to_dict(self) -> dict:
        """The day as /v1/admin/usage and `seekstack usage --json` give it: its cost as an amount."""
        return {field: value for field, value in asdict(self).items() if field != "cost_pico"} | {"cost": self.cost}


def summed_pico(row: dict) -> int:
    """The cost, in 1e-12 of the currency, of rows summed by COST_SUMS (PostgreSQL sums a BIGINT as a NUMERIC, a
    Decimal; no row: NULL)."""
    return (
        int(row["cost_giga_units"] or 0) * 1_000_000_000 * COST_SCALE
        + int(row["cost_units"] or 0) * COST_SCALE
        + int(row["cost_micro"] or 0) * 1_000_000
        + int(row["cost_below_micro"] or 0)
    )


def total_cost(days: list[DailyUsage]) -> float:
    """The cost of `days` together, as /v1/admin/usage's total_cost and `seekstack usage`'s total show it: the exact
    sum of their costs in 1e-12 (no float noise: 0.0000001 + 0.0000023 + 0.0000001 is 2.5e-06)."""
    return cost_amount(sum(day.cost_pico for day in days))


class Ledger:
    """Append-only usage records and their totals per key name and day (a name's keys, old and new, together),
    each row priced at its record's plan, else at the plan of the name's newest key when written."""

    def __init__(self, database: Database):
        self.database = database

    def record(self, usage: UsageRecord, row_id: int | None = None) -> float:
        """Write one request's usage (durably, before returning): a new row, or the row `open` returned brought up to
        date; returns its cost."""
        return cost_amount(self.write(usage, row_id)[1])

    def open(self, usage: UsageRecord) -> tuple[int, int]:
        """Write the row of a request still running (status IN_PROGRESS, billed so far); its id for `record`, and its
        cost in 1e-12 of the currency."""
        return self.write(dataclasses.replace(usage, status=IN_PROGRESS), None)

    def default_plan(self) -> Plan:
        """The prices a request of the open server (no keys yet) is billed at now; a key's come with it
        (`KeyStore.verify`)."""
        return Plan(**self.database.query("SELECT * FROM plans WHERE name = ?", (DEFAULT_PLAN,))[0])

    def write(self, usage: UsageRecord, row_id: int | None = None) -> tuple[int, int]:
        """`record`, returning the row's id and its cost in 1e-12 of the currency; tried again while another
        connection holds the database (`retrying_while_busy`)."""
        return retrying_while_busy(self.database, lambda: self._write_once(usage, row_id))

    def _write_once(self, usage: UsageRecord, row_id: int | None) -> tuple[int, int]:
        """The row's id and its cost in 1e-12 of the currency."""
        with self.database.transaction() as connection:
            plan = usage.plan or Plan(**connection.execute(PLAN_OF_KEY, (usage.key_name, DEFAULT_PLAN)).fetchone())
            cost = 0
            if usage.charged:
                cost = plan.cost_pico(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
            values = (
                usage.key_name, usage.model, usage.endpoint, usage.prompt_tokens, usage.completion_tokens,
                usage.latency_s, usage.status, *cost_columns(cost), usage.cached_tokens, usage.moderation,
            )  # fmt: skip
            if row_id is None:
                row_id = connection.execute(
                    "INSERT INTO usage (created_at, key_name, model, endpoint, prompt_tokens, completion_tokens, "
                    "latency_s, status, cost_units, cost_pico, cached_tokens, moderation) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
                    (time.time(), *values),
                ).fetchone()["id"]
            else:
                connection.execute(
                    "UPDATE usage SET key_name = ?, model = ?, endpoint = ?, prompt_tokens = ?, completion_tokens = ?, "
                    "latency_s = ?, status = ?, cost_units = ?, cost_pico = ?, cached_tokens = ?, moderation = ? "
                    "WHERE id = ?",
                    (*values, row_id),
                )
        return row_id, cost

    def records(self, key_name: str | None = None) -> list[dict]:
        """The rows, oldest first, optionally of one key; each cost as an amount (`cost`), not in 1e-12."""
        where, parameters = ("WHERE key_name = ?", (key_name,)) if key_name is not None else ("", ())
        rows = self.database.query(f"SELECT * FROM usage {where} ORDER BY id", parameters)
        return [
            {name: value for name, value in row.items() if name not in ("cost_units", "cost_pico")}
            | {"cost": cost_amount(stored_cost_pico(row))}
            for row in rows
        ]

    def spent(self, key_name: str, since: float | None = None) -> float:
        """What the usage of the key named `key_name` has cost, that recorded after `since` (Unix seconds) or all."""
        return cost_amount(self.spent_pico(key_name, since))

    def spent_pico(self, key_name: str, since: float | None = None) -> int:
        """`spent`, in 1e-12 of the currency."""
        after, parameters = ("AND created_at > ?", (key_name, since)) if since is not None else ("", (key_name,))
        rows = self.database.query(f"SELECT {COST_SUMS} FROM usage WHERE key_name = ? {after}", parameters)
        return summed_pico(rows[0])

    def knows(self, key_name: str) -> bool:
        """Whether any usage is recorded for key `key_name`."""
        return bool(self.database.query("SELECT 1 FROM usage WHERE key_name = ? LIMIT 1", (key_name,)))

    def daily(
        self,
        key_name: str | None = None,
        since: dt.date | None = None,
        model: str | None = None,
        until: dt.date | None = None,
    ) -> list[DailyUsage]:
        """Requests, tokens (prompt, cached prompt, completion) and cost per key, UTC day and model, from `since` to
        `until` (both days included: `since` 2026-11-01 `until` 2026-11-30 is November); for one key and/or one model
        when named. ValueError for a `since` after `until`."""
        if since is not None and until is not None and since > until:
            raise ValueError(f"since {since} is after until {until}: no day is in between")
        conditions, parameters = [], []
        for column, value in (("key_name", key_name), ("model", model)):
            if value is not None:
                conditions.append(f"{column} = ?")
                parameters.append(value)
        # the calendar's last day (9999-12-31) has no day after it: it leaves the days unbounded
        after_until = None if until in (None, dt.date.max) else until + dt.timedelta(days=1)
        for comparison, day in ((">=", since), ("<", after_until)):
            if day is not None:  # from the first instant of `since` to that of the day after `until`
                conditions.append(f"created_at {comparison} ?")
                parameters.append(dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC).timestamp())
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = self.database.query(
            f"SELECT key_name, {self.database.day('created_at')} AS day, model, COUNT(*) AS requests, "
            "SUM(CASE WHEN status BETWEEN 500 AND 599 THEN 1 ELSE 0 END) AS failed, "
            "SUM(prompt_tokens) AS prompt_tokens, SUM(cached_tokens) AS cached_tokens, "
            f"SUM(completion_tokens) AS completion_tokens, {COST_SUMS} "
            f"FROM usage {where} GROUP BY key_name, day, model ORDER BY day, key_name, model",
            tuple(parameters),
        )
        return [
            DailyUsage(
                **{name: value for name, value in row.items() if not name.startswith("cost_")},
                cost_pico=summed_pico(row),
            )
            for row in rows
        ]


def parse_day(text: str) -> dt.date:
    """A YYYY-MM-DD date, or a ValueError saying which format is expected."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError as error:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):  # the form is right, the day is not
            raise ValueError(f"date {text!r} is no day of the calendar ({error})") from None
        raise ValueError(f"date {shown_value(text)} is not in the form YYYY-MM-DD") from None
