"""Per-key rate limits: requests per minute and tokens per minute over a sliding 60-second window.

A request is charged its prompt tokens plus the completion tokens it may generate when admitted
(as OpenAI counts `max_tokens`), and the charge is corrected to the tokens it really used when it
ends. The windows live in the server's database (table `rate_charges`), so every server process
sharing it sees the same window: admitting reads the key's charges and adds one in a single write
transaction (SQLite's BEGIN IMMEDIATE; on PostgreSQL the key's row is locked), so two processes
cannot both take the last request of a minute. Times are Unix seconds, shared by the processes. A write that
meets the database held by another connection is tried again, as the ledger's are (`retrying_while_busy`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from seekstack.serve.database import Database, retrying_while_busy

WINDOW_S = 60.0


class RateLimited(Exception):
    """Over a limit: `retry_after_s` says when the request would fit."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NeverFits(ValueError):
    """A request that needs more tokens than its key may use in a whole minute: retrying cannot help."""


@dataclass(frozen=True)
class Charge:
    """A request's row in `rate_charges`."""

    charge_id: int


class RateLimiter:
    """Admits or refuses requests per key, against the charges every process wrote to `database`."""

    def __init__(self, database: Database, clock=time.time):
        self.database = database
        self._clock = clock

    def admit(self, key_name: str, rpm: int | None, tpm: int | None, tokens: int) -> Charge:
        """Charge one request of up to `tokens` tokens to `key_name`, or raise `RateLimited` (or `NeverFits`)."""
        if tpm is not None and tokens > tpm:
            raise NeverFits(
                f"the request may use {tokens} tokens (its prompt tokens, and max_tokens for each choice it asks for: "
                f"n, or best_of), more than key {key_name!r} may use in a minute ({tpm}); lower max_tokens or n, or "
                "shorten the prompt"
            )
        return retrying_while_busy(self.database, lambda: self._admit_once(key_name, rpm, tpm, tokens))

    def _admit_once(self, key_name: str, rpm: int | None, tpm: int | None, tokens: int) -> Charge:
        with self.database.transaction() as connection:
            connection.execute(f"SELECT 1 FROM keys WHERE name = ?{self.database.lock_rows}", (key_name,))
            now = self._clock()
            connection.execute("DELETE FROM rate_charges WHERE key_name = ? AND at <= ?", (key_name, now - WINDOW_S))
            charges = connection.execute(
                "SELECT at, tokens FROM rate_charges WHERE key_name = ? ORDER BY at, id", (key_name,)
            ).fetchall()
            if rpm is not None and len(charges) >= rpm:
                wait = charges[-rpm]["at"] + WINDOW_S - now
                raise RateLimited(f"key {key_name!r} is over its limit of {rpm} requests per minute", _seconds(wait))
            used = sum(charge["tokens"] for charge in charges)
            if tpm is not None and used + tokens > tpm:
                raise RateLimited(
                    f"key {key_name!r} is over its limit of {tpm} tokens per minute",
                    _seconds(_time_until_free(charges, used + tokens - tpm, now)),
                )
            row = connection.execute(
                "INSERT INTO rate_charges (key_name, at, tokens) VALUES (?, ?, ?) RETURNING id", (key_name, now, tokens)
            ).fetchone()
        return Charge(row["id"])

    def tokens_left(self, key_name: str, tpm: int) -> int:
        """The tokens `key_name` may still use of its `tpm` tokens per minute: those its window has not charged."""
        charges = self.database.query(
            "SELECT tokens FROM rate_charges WHERE key_name = ? AND at > ?", (key_name, self._clock() - WINDOW_S)
        )
        return max(tpm - sum(charge["tokens"] for charge in charges), 0)

    def settle(self, charge: Charge, tokens: int) -> None:
        """Correct an admitted request's charge to the `tokens` it really used (tried again while the database is
        held)."""
        retrying_while_busy(self.database, lambda: self.settle_once(charge, tokens))

    def settle_once(self, charge: Charge, tokens: int) -> None:
        """`settle` in one try: the database's error when another connection holds it."""
        with self.database.transaction() as connection:
            connection.execute("UPDATE rate_charges SET tokens = ? WHERE id = ?", (tokens, charge.charge_id))


def _time_until_free(charges: list[dict], excess: int, now: float) -> float:
    """Seconds until the oldest charges, expiring, free `excess` tokens."""
    freed = 0
    for charge in charges:
        freed += charge["tokens"]
        if freed >= excess:
            return charge["at"] + WINDOW_S - now
    return WINDOW_S


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))
