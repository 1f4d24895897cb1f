"""The usage ledger: one row per API request, priced by the key's plan when it is written.

The server writes a request's row before the last byte of its response leaves, so a client that
has its answer is also on the bill, whatever happens to the server afterwards.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass

from seekstack.serve.database import DEFAULT_PLAN, Database
from seekstack.serve.keys import Plan


@dataclass(frozen=True)
class UsageRecord:
    """One request as billed: who, which model and endpoint, tokens, latency and HTTP status."""

    key_name: str | None  # None: the server ran open, without keys
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    status: int


@dataclass(frozen=True)
class DailyUsage:
    """Totals of one key on one UTC day."""

    key_name: str | None
    day: str  # YYYY-MM-DD
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float

    def to_dict(self) -> dict:
        return asdict(self)


class Ledger:
    """Append-only usage records and their totals per key and day."""

    def __init__(self, database: Database):
        self.database = database

    def record(self, usage: UsageRecord) -> float:
        """Write one request's usage (durably, before returning); returns its cost."""
        with self.database.transaction() as connection:
            plan = Plan(
                **connection.execute(
                    "SELECT * FROM plans WHERE name = COALESCE((SELECT plan FROM keys WHERE name = ?), ?)",
                    (usage.key_name, DEFAULT_PLAN),
                ).fetchone()
            )
            cost = plan.cost(usage.prompt_tokens, usage.completion_tokens)
            connection.execute(
                "INSERT INTO usage (created_at, key_name, model, endpoint, prompt_tokens, completion_tokens, "
                "latency_s, status, cost) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    time.time(),
                    usage.key_name,
                    usage.model,
                    usage.endpoint,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.latency_s,
                    usage.status,
                    cost,
                ),
            )
        return cost

    def records(self, key_name: str | None = None) -> list[dict]:
        """Raw rows, oldest first, optionally of one key."""
        where, parameters = ("WHERE key_name = ?", (key_name,)) if key_name is not None else ("", ())
        return [dict(row) for row in self.database.query(f"SELECT * FROM usage {where} ORDER BY id", parameters)]

    def daily(self, key_name: str | None = None, since: dt.date | None = None) -> list[DailyUsage]:
        """Requests, tokens and cost per key and UTC day, from `since` (inclusive) on."""
        conditions, parameters = [], []
        if key_name is not None:
            conditions.append("key_name = ?")
            parameters.append(key_name)
        if since is not None:
            conditions.append("created_at >= ?")
            parameters.append(dt.datetime.combine(since, dt.time(), tzinfo=dt.timezone.utc).timestamp())
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = self.database.query(
            f"SELECT key_name, {self.database.day('created_at')} AS day, COUNT(*) AS requests, "
            "SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens, SUM(cost) AS cost "
            f"FROM usage {where} GROUP BY key_name, day ORDER BY day, key_name",
            tuple(parameters),
        )
        return [DailyUsage(**dict(row)) for row in rows]


def parse_day(text: str) -> dt.date:
    """A YYYY-MM-DD date, or a ValueError saying which format is expected."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"date {text!r} is not in the form YYYY-MM-DD") from None
