"""A key's budget held at admission: each request holds the most it may cost until its final row is written, so that
requests under way together, or one long completion, never carry a key's spend past its budget.

A request is admitted only if what its key's name has spent (its usage rows over the budget's period, a stream's
running row included), what the name's requests under way may still add, and the request's own most cost (its
prompt and every choice's max_tokens at its plan's prices, `most_cost_pico`) fit within the budget. A chat request
that leaves max_tokens to the server is given at most what the budget leaves it (`affordable_tokens`). The holds are
this process's: servers sharing one database each hold their own requests.
"""

from __future__ import annotations

import threading
import time

from seekstack.serve.billing import Bill
from seekstack.serve.database import cost_amount, cost_pico
from seekstack.serve.keys import ApiKey, Plan, format_amount, format_cost, price_decimal
from seekstack.serve.ledger import Ledger


class OverBudget(Exception):
    """A request whose most cost does not fit in what its key's budget leaves."""

    def __init__(
        self, key: ApiKey, most_pico: int, spent_pico: int, held_pico: int, length_name: str | None = "max_tokens"
    ):
        self.retry_may_fit = held_pico > 0  # the requests under way may end costing less than they hold
        period = "" if key.budget.period_s is None else " over its period"
        # a request without a length was given what the budget leaves, at least one token: its prompt does not fit
        length, advice = (length_name, f"lower {length_name}") if length_name else ("one token", "shorten the prompt")
        super().__init__(
            f"key {key.name!r} has spent {format_cost(cost_amount(spent_pico))}{period} of its budget of "
            f"{format_amount(key.budget.amount)}, and its requests under way may cost up to "
            f"{format_cost(cost_amount(held_pico))} more; this request may cost up to "
            f"{format_cost(cost_amount(most_pico))} (its prompt and {length} at plan {key.plan!r}'s prices), more "
            f"than is left: {advice}"
            + (", or send it again once the requests under way have ended" if self.retry_may_fit else "")
        )


class BudgetHolds:
    """The most the requests under way of each key name may still cost, held against the name's budget."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        # one admission of a key name at a time reads its spend and holds its own; other names' go on meanwhile (a
        # spend's read takes 0.1 s for 130k usage rows)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        # the holds' dicts, each read or change of them one step: a release (on the event loop) never waits for a read
        # of the spend
        self._holds_lock = threading.Lock()
        self._under_way: dict[str, dict[int, Bill]] = {}  # key name -> the bills of its requests under way, by id

    def hold(self, key: ApiKey, bill: Bill, most_pico: int, length_name: str | None = "max_tokens") -> None:
        """Hold `most_pico` (in 1e-12 of the currency) for `bill`'s request until `release`; OverBudget where it does
        not fit in what `key`'s budget leaves (its advice for a request that gave its length in
        `length_name`, or, where None, one given what the budget leaves). A key without a budget holds nothing."""
        if key.budget is None:
            return
        with self._lock_of(key.name):
            spent, held = self._spent_and_held(key)
            if spent + held + most_pico > cost_pico(price_decimal(key.budget.amount)):
                raise OverBudget(key, most_pico, spent, held, length_name)
            bill.most_pico = most_pico
            with self._holds_lock:
                self._under_way.setdefault(key.name, {})[id(bill)] = bill

    def release(self, bill: Bill) -> None:
        """Stop holding for `bill`'s request, once its final row is written (or it was refused before any)."""
        if bill.key is None:
            return
        with self._holds_lock:
            self._under_way.get(bill.key.name, {}).pop(id(bill), None)

    def left_pico(self, key: ApiKey) -> int:
        """What `key`'s budget leaves now for a new request, in 1e-12 of the currency (0 when spent)."""
        with self._lock_of(key.name):
            spent, held = self._spent_and_held(key)
        return max(cost_pico(price_decimal(key.budget.amount)) - spent - held, 0)

    def _lock_of(self, key_name: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(key_name, threading.Lock())

    def _spent_and_held(self, key: ApiKey) -> tuple[int, int]:
        """What `key`'s name has spent over its budget's period, and what its requests under way may still add to it:
        each the most it may cost less what its row has billed so far. The holds are read first: a row written
        meanwhile (its bill's `billed_pico` set once it is committed) is then counted twice, never missed."""
        with self._holds_lock:
            bills = list(self._under_way.get(key.name, {}).values())
        held = sum(max(bill.most_pico - bill.billed_pico, 0) for bill in bills)
        since = None if key.budget.period_s is None else time.time() - key.budget.period_s
        return self.ledger.spent_pico(key.name, since), held


def most_cost_pico(plan: Plan, prompt_tokens: int, completion_tokens: int) -> int:
    """The most a request of `prompt_tokens` and at most `completion_tokens` may cost at `plan`'s prices, in 1e-12 of
    the currency: its prompt at the dearer of the prompt and the cached prompt price (the cost is linear in the prompt
    tokens read from the prefix cache, which the admission cannot know)."""
    return max(plan.cost_pico(prompt_tokens, completion_tokens, cached) for cached in (0, prompt_tokens))


def affordable_tokens(plan: Plan, left_pico: int, prompt_tokens: int, requests: int) -> int | None:
    """The most completion tokens each of a call's `requests` engine requests may generate so that its prompt and their
    tokens cost at most `left_pico` at `plan`'s prices (0 when not even the prompt fits); None when completion tokens
    are free."""
    if plan.completion_per_1k == 0:
        return None
    per_token_pico = plan.cost_pico(0, 1000) / 1000  # the completion price per token, unrounded
    tokens = max(int((left_pico - most_cost_pico(plan, prompt_tokens, 0)) / per_token_pico) // requests, 0)
    while tokens > 0 and most_cost_pico(plan, prompt_tokens, tokens * requests) > left_pico:  # the cost's rounding
        tokens -= 1
    return tokens
