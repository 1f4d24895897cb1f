"""Per-key rate limits: requests per minute and tokens per minute over a sliding 60-second window.

A request is charged its prompt tokens plus the completion tokens it may generate when admitted
(as OpenAI counts `max_tokens`), and the charge is corrected to the tokens it really used when it
ends. Limits live in this process's memory: one server, one window per key.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 60.0


class RateLimited(Exception):
    """Over a limit: `retry_after_s` says when the request would fit."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Charge:
    """Tokens charged to a key's window at `time` (monotonic seconds)."""

    time: float
    tokens: int


@dataclass
class _Window:
    charges: deque[Charge] = field(default_factory=deque)

    def expire(self, now: float) -> None:
        while self.charges and self.charges[0].time <= now - WINDOW_S:
            self.charges.popleft()

    def tokens(self) -> int:
        return sum(charge.tokens for charge in self.charges)


class RateLimiter:
    """Admits or refuses requests per key; thread-safe."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def admit(self, key_name: str, rpm: int | None, tpm: int | None, tokens: int) -> Charge:
        """Charge one request of up to `tokens` tokens to `key_name`, or raise `RateLimited`."""
        with self._lock:
            now = self._clock()
            window = self._windows.setdefault(key_name, _Window())
            window.expire(now)
            if rpm is not None and len(window.charges) >= rpm:
                wait = window.charges[-rpm].time + WINDOW_S - now
                raise RateLimited(f"key {key_name!r} is over its limit of {rpm} requests per minute", _seconds(wait))
            if tpm is not None and tokens > tpm:
                raise RateLimited(
                    f"the request may use {tokens} tokens (prompt + max_tokens), more than key {key_name!r} "
                    f"may use in a minute ({tpm}); lower max_tokens",
                    math.ceil(WINDOW_S),
                )
            if tpm is not None and window.tokens() + tokens > tpm:
                raise RateLimited(
                    f"key {key_name!r} is over its limit of {tpm} tokens per minute",
                    _seconds(self._time_until_free(window, window.tokens() + tokens - tpm, now)),
                )
            charge = Charge(now, tokens)
            window.charges.append(charge)
            return charge

    def settle(self, charge: Charge, tokens: int) -> None:
        """Correct an admitted request's charge to the `tokens` it really used."""
        with self._lock:
            charge.tokens = tokens

    @staticmethod
    def _time_until_free(window: _Window, excess: int, now: float) -> float:
        """Seconds until the oldest charges, expiring, free `excess` tokens."""
        freed = 0
        for charge in window.charges:
            freed += charge.tokens
            if freed >= excess:
                return charge.time + WINDOW_S - now
        return WINDOW_S


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))
