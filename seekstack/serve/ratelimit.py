"""Per-key rate limits: requests per minute and tokens per minute over a sliding 60-second window.

A request counts against its key's requests per minute as soon as its key is known (`admit`), whatever
comes of it: one refused as malformed, a moderation, as OpenAI counts unsuccessful requests, so a key cannot
flood the server with them. Once read, it is charged its prompt tokens plus the completion tokens it may
generate (`reserve`, as OpenAI counts `max_tokens`), and the charge is corrected to the tokens it really
used when it ends (`settle`). The windows live in the server's database (table `rate_charges`), so every server process
sharing it sees the same window: admitting reads the key's charges and adds one in a single write
transaction (SQLite's BEGIN IMMEDIATE; on PostgreSQL the key's row is locked), so two processes
cannot both take the last request of a minute. Times are Unix seconds, shared by the processes. A write that
meets the database held by another connection is tried again, as the ledger's are (`retrying_while_busy`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from seekstack.serve.database import Database, Statements, retrying_while_busy

WINDOW_S = 60.0


@dataclass(frozen=True)
class Window:
    """What one of a key's limits leaves it in the window, as OpenAI's `x-ratelimit-*` headers tell a client."""

    unit: str  # "requests" or "tokens", as the headers name the limit
    limit: int  # per minute
    remaining: int  # of `limit`, the request counted (or refused)
    reset_s: float  # until the window's oldest charge leaves it (or, refused, until the request would fit)

    def headers(self) -> dict[str, str]:
        """`x-ratelimit-limit-{unit}`, `x-ratelimit-remaining-{unit}` and `x-ratelimit-reset-{unit}` (Go's duration
        form, as OpenAI writes it: `12s`, `1m0s`)."""
        seconds = math.ceil(self.reset_s)
        reset = f"{seconds // 60}m{seconds % 60}s" if seconds >= 60 else f"{seconds}s"
        return {
            f"x-ratelimit-limit-{self.unit}": str(self.limit),
            f"x-ratelimit-remaining-{self.unit}": str(self.remaining),
            f"x-ratelimit-reset-{self.unit}": reset,
        }


# every header `Window.headers` may write, for CORS to let a web page read them
LIMIT_HEADERS = tuple(name for unit in ("requests", "tokens") for name in Window(unit, 0, 0, 0).headers())


def limit_headers(*windows: Window | None) -> dict[str, str]:
    """The `x-ratelimit-*` headers of each of `windows` (None: a limit the key does not have)."""
    return {name: value for window in windows if window is not None for name, value in window.headers().items()}


class RateLimited(Exception):
    """Over a limit: `retry_after_s` says when the request would fit, `window` what the limit leaves, `other` what
    the key's other limit leaves (None: it has none)."""

    def __init__(self, message: str, retry_after_s: int, window: Window, other: Window | None = None):
        super().__init__(message)
        self.retry_after_s, self.window, self.other = retry_after_s, window, other

    def headers(self) -> dict[str, str]:
        """`Retry-After` and the `x-ratelimit-*` headers of both of the key's limits."""
        return {"Retry-After": str(self.retry_after_s), **limit_headers(self.window, self.other)}


class NeverFits(ValueError):
    """A request that needs more tokens than its key may use in a whole minute: retrying cannot help."""


@dataclass(frozen=True)
class Charge:
    """A request's row in `rate_charges`, what its key's requests per minute leave once it is counted, and what its
    tokens per minute leave before it is charged any (None: no such limit)."""

    charge_id: int
    requests: Window | None = None
    tokens: Window | None = None


class RateLimiter:
    """Admits or refuses requests per key, against the charges every process wrote to `database`."""

    def __init__(self, database: Database, clock=time.time):
        self.database = database
        self._clock = clock

    def admit(self, key_name: str, rpm: int | None, tpm: int | None = None) -> Charge:
        """Count one request of `key_name`, at no tokens yet, or raise `RateLimited` over its `rpm`; what its `tpm`
        leaves comes with either."""
        return retrying_while_busy(self.database, lambda: self._admit_once(key_name, rpm, tpm))

    def _admit_once(self, key_name: str, rpm: int | None, tpm: int | None) -> Charge:
        with self.database.transaction() as connection:
            now, charges = self._window(connection, key_name)
            tokens = None if tpm is None else _tokens_window(charges, tpm, 0, now)
            if rpm is not None and len(charges) >= rpm:
                wait = charges[-rpm]["at"] + WINDOW_S - now
                raise RateLimited(f"key {key_name!r} is over its limit of {rpm} requests per minute (used "
                                  f"{len(charges)}, requested 1): try again in {_seconds(wait)} s", _seconds(wait),
                                  Window("requests", rpm, 0, wait), tokens)  # fmt: skip
            row = connection.execute(
                "INSERT INTO rate_charges (key_name, at, tokens) VALUES (?, ?, 0) RETURNING id", (key_name, now)
            ).fetchone()
        oldest = charges[0]["at"] if charges else now
        requests = None if rpm is None else Window("requests", rpm, rpm - len(charges) - 1, oldest + WINDOW_S - now)
        return Charge(row["id"], requests, tokens)

    def reserve(self, charge: Charge, key_name: str, tpm: int | None, tokens: int) -> Window | None:
        """Charge an admitted request the `tokens` it may use, or raise `RateLimited` (or `NeverFits`) over `tpm`: the
        request then keeps its charge of no tokens (it still counts against the requests per minute). What `tpm`
        leaves (None: no such limit)."""
        if tpm is None:  # the tokens count for nothing
            return None
        if tokens > tpm:
            raise NeverFits(
                f"the request may use {tokens} tokens (its prompt tokens, and max_tokens for each choice it asks for: "
                f"n, or best_of), more than key {key_name!r} may use in a minute ({tpm}); lower max_tokens or n, or "
                "shorten the prompt"
            )
        return retrying_while_busy(self.database, lambda: self._reserve_once(charge, key_name, tpm, tokens))

    def _reserve_once(self, charge: Charge, key_name: str, tpm: int, tokens: int) -> Window:
        with self.database.transaction() as connection:
            now, charges = self._window(connection, key_name)
            charges = [row for row in charges if row["id"] != charge.charge_id]  # its own: no tokens yet
            used = sum(row["tokens"] for row in charges)
            if used + tokens > tpm:
                wait = _time_until_free(charges, used + tokens - tpm, now)
                raise RateLimited(f"key {key_name!r} is over its limit of {tpm} tokens per minute (used {used}, "
                                  f"requested {tokens}): try again in {_seconds(wait)} s", _seconds(wait),
                                  Window("tokens", tpm, tpm - used, wait), charge.requests)  # fmt: skip
            connection.execute("UPDATE rate_charges SET tokens = ? WHERE id = ?", (tokens, charge.charge_id))
        return _tokens_window(charges, tpm, tokens, now)

    def _window(self, connection: Statements, key_name: str) -> tuple[float, list[dict]]:
        """The time now and `key_name`'s charges of the last minute, oldest first, the key's row held (in the open
        transaction of `connection`) so that no other process admits a request of the key meanwhile."""
        connection.execute(f"SELECT 1 FROM keys WHERE name = ?{self.database.lock_rows}", (key_name,))
        now = self._clock()
        connection.execute("DELETE FROM rate_charges WHERE key_name = ? AND at <= ?", (key_name, now - WINDOW_S))
        charges = connection.execute(
            "SELECT id, at, tokens FROM rate_charges WHERE key_name = ? ORDER BY at, id", (key_name,)
        ).fetchall()
        return now, charges

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


def _tokens_window(charges: list[dict], tpm: int, charged: int, now: float) -> Window:
    """What `tpm` leaves a key whose window holds `charges` and a request charged `charged` tokens: its reset when
    the oldest charge of tokens leaves the window (the request's own, a minute from now; none: 0 s, the limit whole)."""
    used = sum(charge["tokens"] for charge in charges)
    reset = _time_until_free(charges, 1, now) if used else WINDOW_S if charged else 0.0
    return Window("tokens", tpm, tpm - used - charged, reset)


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
