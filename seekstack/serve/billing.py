"""One request's bill as its usage becomes known, written to the ledger once at its end, and for streams also
while they run.

A stream's row is opened before its first event goes out and brought up to date (in a worker thread, while
the stream goes on) whenever `BILL_EVERY_TOKENS` more tokens or `BILL_EVERY_S` seconds have passed since the
last update began. A server killed mid-stream has billed all but the tokens generated since its last finished
update: fewer than `BILL_EVERY_TOKENS` (at most `BILL_EVERY_S` seconds' worth) plus those generated while that
update was being written, a few milliseconds unless the database is busy. The row keeps status 0
(`ledger.IN_PROGRESS`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from seekstack.serve.database import in_write_thread
from seekstack.serve.keys import ApiKey, Plan
from seekstack.serve.ledger import IN_PROGRESS, Ledger, UsageRecord
from seekstack.serve.schemas import CompletionTokensDetails, PromptTokensDetails, Usage

BILL_EVERY_TOKENS = 32
BILL_EVERY_S = 1.0


@dataclass
class Bill:
    """The usage of one API request: `record` writes it exactly once; `open` and `update` keep a stream's row."""

    ledger: Ledger
    key: ApiKey | None
    model: str
    endpoint: str
    started: float  # time.perf_counter()
    prompt_tokens: int = 0  # set once the engine has taken the request: refused requests cost nothing
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those read from the prefix cache
    reasoning_tokens: int | None = None  # of the completion tokens, the reasoning's (None: no reasoning parser)
    moderation: str | None = None  # the content-safety category that acted on it
    free: bool = False  # that category's policy, or a 400 its own fields caused while generating, waives the cost
    plan: Plan | None = None  # the prices of its key's plan as it came (None: those when its row is written)
    recorded: bool = False
    status: int | None = None  # the final row's HTTP status, once written
    row_id: int | None = None  # the stream's open row
    most_pico: int = 0  # the most it may cost, held against its key's budget while under way (budget.BudgetHolds)
    billed_pico: int = 0  # the cost its row holds so far, in 1e-12 of the currency
    _billed_tokens: int = 0
    _billed_at: float = 0.0
    _updating: asyncio.Future | None = field(default=None, repr=False)  # the update being written
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def usage_record(self, status: int) -> UsageRecord:
        return UsageRecord(
            key_name=self.key.name if self.key else None,
            model=self.model,
            endpoint=self.endpoint,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            latency_s=time.perf_counter() - self.started,
            status=status,
            cached_tokens=self.cached_tokens,
            moderation=self.moderation,
            free=self.free,
            plan=self.plan,
        )

    def record(self, status: int) -> None:
        """Write the final row (into the open one if there is one); later calls do nothing."""
        with self._lock:  # the event loop and a worker thread may both try; an update may be writing
            if self.recorded:
                return
            _, self.billed_pico = self.ledger.write(self.usage_record(status), self.row_id)
            self.recorded, self.status = True, status  # after the write: if it failed, the error path records it

    def open(self) -> None:
        """Write the row of a stream about to start, billed for its prompt."""
        with self._lock:
            if not self.recorded and self.row_id is None:
                self.row_id, self.billed_pico = self.ledger.open(self.usage_record(IN_PROGRESS))
                self._billed_at = time.perf_counter()

    def update_soon(self) -> None:
        """If the open row is `BILL_EVERY_TOKENS` tokens or `BILL_EVERY_S` seconds behind, start bringing it up to
        date in a worker thread; the stream does not wait for the database (another request may hold it)."""
        due = self.row_id is not None and (
            self.completion_tokens - self._billed_tokens >= BILL_EVERY_TOKENS
            or time.perf_counter() - self._billed_at >= BILL_EVERY_S
        )
        if due and (self._updating is None or self._updating.done()):
            self._billed_tokens, self._billed_at = self.completion_tokens, time.perf_counter()
            self._updating = asyncio.ensure_future(in_write_thread(self.update))

    def update(self) -> None:
        """Bring the open row up to the tokens generated so far (nothing once the final row is written)."""
        with self._lock:
            if self.recorded or self.row_id is None:
                return
            _, self.billed_pico = self.ledger.write(self.usage_record(IN_PROGRESS), self.row_id)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.total_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens),
            completion_tokens_details=self.completion_tokens_details(),
        )

    def completion_tokens_details(self) -> CompletionTokensDetails | None:
        """The reasoning tokens of the completion, when a reasoning parser counted them."""
        if self.reasoning_tokens is None:
            return None
        return CompletionTokensDetails(reasoning_tokens=self.reasoning_tokens)

    async def record_async(self, status: int) -> None:
        await in_write_thread(self.record, status)
