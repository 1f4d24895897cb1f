"""API keys and price plans: create (the key is shown once), list, revoke, rotate, verify.

A key is `sk-ss-` + 43 random URL-safe characters (256 bits); the database keeps its sha256 and
its first characters (to recognise it in a list), never the key. High-entropy keys need no slow
password hash: sha256 cannot be inverted and there is nothing to guess. A name has at most one active key; once
its keys are revoked it may be given a new one, and usage (recorded by name) shows old and new together.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
import re
import secrets
import sys
import time
from dataclasses import asdict, dataclass, replace
from decimal import Decimal, localcontext

from seekstack.schema import refuse_a_non_bool, shown_value
from seekstack.serve.database import (
    COST_SCALE,
    DEFAULT_PLAN,
    MAX_COST_PICO,
    Database,
    Statements,
    cost_amount,
    cost_pico,
)

KEY_PREFIX = "sk-ss-"
SHOWN_PREFIX_CHARS = 12
NAME_PATTERN = re.compile(r"(?!-)[A-Za-z0-9_.@-]{1,64}")  # of a key and of a plan; a leading - reads as an option
DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}  # of a key's term and budget period, as LiteLLM's
# the longest, 100 years: a term far past it overflows a datetime writing its date (past the year 9999), a budget's
# period SQLite's INTEGER storing it
MAX_DURATION_S = 36500 * 86400
MAX_LIMIT = 2**31 - 1  # the largest rpm or tpm: PostgreSQL's INTEGER (SQLite's holds up to 2**63 - 1)
# The most tokens one request is billed for: 64 generations (serve.schemas.MAX_ENGINE_REQUESTS) of a 262144-token
# context; at any plan's price (at most MAX_PRICE_PER_1K per 1k tokens) it costs what the usage ledger holds
MAX_BILLED_TOKENS = 2**24
MAX_PRICE_PER_1K = Decimal(MAX_COST_PICO * 1000 * 10**6 // (COST_SCALE * MAX_BILLED_TOKENS)).scaleb(
    -6
)  # 549755813887999.999999, to 6 decimals: a price in any currency
# The digits a request's cost is computed to before it is rounded to 1e-12: Decimal's default 28 rounded a cost past
# 1e16 of the currency (31 digits of 1e-12); the largest (MAX_COST_PICO) and a float price's 17 below it fit in 64
COST_DIGITS = 64
ACTIVE_KEY_WITH_PRICES = (  # parameter: the key's hash
    "SELECT keys.*, plans.prompt_per_1k, plans.completion_per_1k, plans.cached_prompt_per_1k "
    "FROM keys JOIN plans ON plans.name = keys.plan WHERE keys.key_hash = ? AND keys.revoked_at IS NULL"
)


class KeyStoreError(ValueError):
    """A key or plan operation that cannot be done; the message names the key or plan."""


@dataclass(frozen=True)
class ApiKey:
    """What the server knows about a key (never the key itself)."""

    name: str
    prefix: str
    plan: str
    rpm: int | None  # requests per minute; None: unlimited
    tpm: int | None  # tokens (prompt + completion) per minute; None: unlimited
    admin: bool  # may read everyone's usage (/v1/admin/usage); other keys have the user scope
    created_at: float
    revoked_at: float | None
    models: tuple[str, ...] | None = None  # the models (base or adapters) it may use; None: all
    prices: Plan | None = None  # its plan's prices when it was verified (None: not read with it)
    expires_at: float | None = None  # when it stops working (Unix seconds); None: never
    budget: Budget | None = None  # the most its name's usage may cost; None: no budget

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def to_dict(self) -> dict:
        """The key as `keys list --json` gives it (its plan by name, its budget as max_budget and its period)."""
        record = {field: value for field, value in asdict(self).items() if field not in ("prices", "budget")}
        amount, period_s = (None, None) if self.budget is None else (self.budget.amount, self.budget.period_s)
        return {**record, "max_budget": amount, "budget_period_s": period_s}


@dataclass(frozen=True)
class Budget:
    """The most a key's name may spend (the cost of its usage rows, LiteLLM's max_budget), over the trailing
    `period_s` seconds (LiteLLM's budget_duration) or, None, over all its usage."""

    amount: float
    period_s: float | None = None


def price_decimal(price: float) -> Decimal:
    """A price as the decimal the user gave (the float's shortest repr: 0.01, not 0.01000000000000000020816...)."""
    return Decimal(repr(price))


@dataclass(frozen=True)
class Plan:
    """Prices per 1k prompt and completion tokens, and per 1k prompt tokens read from the prefix cache."""

    name: str
    prompt_per_1k: float
    completion_per_1k: float
    cached_prompt_per_1k: float | None = None  # None: cached prompt tokens cost what other prompt tokens cost

    def cost_pico(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
        """The price of a request, in 1e-12 of the currency, from the prices as the decimals they were given;
        `cached_tokens` of its `prompt_tokens` at the cached price."""
        cached_price = self.prompt_per_1k if self.cached_prompt_per_1k is None else self.cached_prompt_per_1k
        with localcontext(prec=COST_DIGITS):
            per_1k = (
                (prompt_tokens - cached_tokens) * price_decimal(self.prompt_per_1k)
                + cached_tokens * price_decimal(cached_price)
                + completion_tokens * price_decimal(self.completion_per_1k)
            )
            return cost_pico(per_1k / 1000)


def hash_key(key: str) -> str:
    """The hex sha256 the database keeps instead of the key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    """Keys and plans in the server database."""

    def __init__(self, database: Database):
        self.database = database

    def create(
        self,
        name: str,
        *,
        plan: str = DEFAULT_PLAN,
        rpm: int | None = None,
        tpm: int | None = None,
        admin: bool = False,
        models: tuple[str, ...] | None = None,
        expires_at: float | None = None,
        budget: Budget | None = None,
    ) -> str:
        """Store a new key under `name` (free, or with only revoked or expired keys: an expired one is revoked) and
        return it; this is the only time it is available. From `expires_at` (Unix seconds) on the server refuses it,
        and once its name's usage has cost `budget`."""
        _require_name("key", name)
        now = time.time()
        # compared, never subtracted: an int past a float's range (10**400) is refused, not overflowed; nan too (stored
        # as NULL, it would read as never)
        if expires_at is not None and not (
            isinstance(expires_at, numbers.Real) and now - MAX_DURATION_S <= expires_at <= now + MAX_DURATION_S
        ):
            raise KeyStoreError(
                f"key {name!r}: expires_at={expires_at!r} is not a Unix time within 100 years from now; give one, or "
                "None for a key that never expires"
            )
        if expires_at is not None and expires_at <= now:
            raise KeyStoreError(f"key {name!r} would expire at {utc_time(expires_at)} UTC, which has passed")
        amount, period_s = (None, None) if budget is None else (budget.amount, budget.period_s)
        # numbers, compared as expires_at is (nan refused too)
        if budget is not None and not (isinstance(amount, numbers.Real) and 0 < amount <= sys.float_info.max):
            raise KeyStoreError(f"the budget of key {name!r} must be a finite amount above 0, got {amount!r}")
        if period_s is not None and not (isinstance(period_s, numbers.Real) and 0 < period_s <= MAX_DURATION_S):
            raise KeyStoreError(  # a period of 0 or less counts no spend: a budget never reached
                f"the budget period of key {name!r} must be above 0 seconds and within 100 years (None: all its "
                f"usage), got {period_s!r}"
            )
        if not plan:
            raise KeyStoreError("a key's plan name must not be empty; `seekstack keys plan` lists the plans")
        for field, limit in (("rpm", rpm), ("tpm", tpm)):  # a whole number: "5" or 1.5 is no count of requests
            if limit is not None and not (type(limit) is int and 1 <= limit <= MAX_LIMIT):
                raise KeyStoreError(
                    f"{field} must be a whole number between 1 and {MAX_LIMIT} (or unset for no limit), got {limit!r}"
                )
        refuse_a_non_bool("admin", admin, KeyStoreError)  # stored as int(admin): "1" would make an admin key, "no" fail
        if isinstance(models, str):  # iterated, its letters would be the models the key may use
            raise KeyStoreError(f"models={models!r} is one name: give a tuple of names, models=({models!r},)")
        for model in models or ():
            _require_model_name(model)
        with self.database.transaction() as connection:
            active = connection.execute(
                "SELECT expires_at FROM keys WHERE name = ? AND revoked_at IS NULL", (name,)
            ).fetchone()
            if active is not None and active["expires_at"] is not None and active["expires_at"] <= time.time():
                _revoke_active(connection, name)  # expired, refused already: the name's new key replaces it
            elif active is not None:
                raise KeyStoreError(f"an active key named {name!r} already exists; rotate it (`seekstack keys rotate "
                                    f"{name}`), revoke it or choose another name")  # fmt: skip
            return _insert(connection, name, plan, rpm, tpm, admin, models, expires_at, budget)

    def revoke(self, name: str) -> None:
        """Mark the key `name` revoked: it stops working on the next request."""
        with self.database.transaction() as connection:
            if _revoke_active(connection, name) is None:
                raise KeyStoreError(_nothing_to_revoke(connection, name))

    def rotate(self, name: str) -> str:
        """Revoke the active key `name` and store a new one under the name with its plan, limits, models, admin flag,
        expiry and budget, in one transaction; return the new key (shown this once)."""
        with self.database.transaction() as connection:
            old = _revoke_active(connection, name)
            if old is None:
                raise KeyStoreError(f"no active key named {shown_value(name)} to rotate; `seekstack keys create "
                                    f"--name {shown_value(name, str)}` makes one")  # fmt: skip
            if old.expired(time.time()):  # its new key would be expired too
                raise KeyStoreError(f"key {name!r} expired at {utc_time(old.expires_at)} UTC: create a new one (`keys "
                                    "create --expires-in` gives it a new term)")  # fmt: skip
            return _insert(
                connection, name, old.plan, old.rpm, old.tpm, old.admin, old.models, old.expires_at, old.budget
            )

    def list(self) -> list[ApiKey]:
        """All keys, revoked ones included, oldest first."""
        return [_api_key(row) for row in self.database.query("SELECT * FROM keys ORDER BY created_at")]

    def verify(self, key: str) -> ApiKey | None:
        """The active key whose hash matches `key`, with its plan's prices now (one read), or None."""
        rows = self.database.query(ACTIVE_KEY_WITH_PRICES, (hash_key(key),))
        if not rows:
            return None
        row = rows[0]
        prices = Plan(row["plan"], row["prompt_per_1k"], row["completion_per_1k"], row["cached_prompt_per_1k"])
        return replace(_api_key(row), prices=prices)

    def knows(self, name: str) -> bool:
        """Whether a key named `name` was ever created (revoked ones included)."""
        return bool(self.database.query("SELECT 1 FROM keys WHERE name = ? LIMIT 1", (name,)))

    def any_keys(self) -> bool:
        """Whether any key was ever created: without one the server is open (localhost only)."""
        return bool(self.database.query("SELECT 1 FROM keys LIMIT 1"))

    def set_plan(
        self, name: str, prompt_per_1k: float, completion_per_1k: float, cached_prompt_per_1k: float | None = None
    ) -> Plan:
        """Create or change the prices of plan `name` for requests that come after; usage already recorded, and
        requests under way, keep the prices they came with. A new plan's name follows the key-name rule; plans an
        earlier seekstack created under other names keep them."""
        prices = (("prompt price", prompt_per_1k), ("completion price", completion_per_1k),
                  ("cached prompt price", cached_prompt_per_1k or 0))  # fmt: skip
        for field, price in prices:
            if not math.isfinite(price) or price < 0:  # nan would slip past `< 0`, inf would bill inf
                raise KeyStoreError(f"{field} of plan {shown_value(name)} must be a finite number >= 0, got {price}")
            if price_decimal(price) > MAX_PRICE_PER_1K:  # a request's cost would pass what the ledger holds
                raise KeyStoreError(
                    f"{field} of plan {shown_value(name)} is {price} per 1k tokens; at most {MAX_PRICE_PER_1K} is "
                    f"taken: a request of up to {MAX_BILLED_TOKENS} tokens must cost at most "
                    f"{cost_amount(MAX_COST_PICO)}, the most the usage ledger holds (a 64-bit count of whole units of "
                    "the currency)"
                )
        with self.database.transaction() as connection:
            if not _plan_exists(connection, name):
                _require_name("plan", name)
            connection.execute(
                "INSERT INTO plans (name, prompt_per_1k, completion_per_1k, cached_prompt_per_1k) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET prompt_per_1k = excluded.prompt_per_1k, "
                "completion_per_1k = excluded.completion_per_1k, cached_prompt_per_1k = excluded.cached_prompt_per_1k",
                (name, prompt_per_1k, completion_per_1k, cached_prompt_per_1k),
            )
        return Plan(name, prompt_per_1k, completion_per_1k, cached_prompt_per_1k)

    def plans(self) -> list[Plan]:
        """All plans, by name."""
        return [Plan(**row) for row in self.database.query("SELECT * FROM plans ORDER BY name")]


def _require_name(kind: str, name: str) -> None:
    """KeyStoreError unless `name` may name a key or a plan (`kind`)."""
    if not (isinstance(name, str) and NAME_PATTERN.fullmatch(name)):
        raise KeyStoreError(
            f"{kind} name {shown_value(name)} must be 1-64 ASCII letters, digits or _.@- (no spaces), not beginning "
            "with -"
        )


def _require_model_name(model: str) -> None:
    """KeyStoreError when `model` is empty, blank or has whitespace around it (a slip: a key would match no request's
    model). Any other name may be served: a checkpoint folder's, --served-model-name's ("DeepSeek V3"), an adapter's."""
    if not (isinstance(model, str) and model and model == model.strip()):
        raise KeyStoreError(
            f"model {shown_value(model)}: a model name must be a str, not empty and not beginning or ending with "
            "whitespace"
        )


def _plan_exists(connection: Statements, name: str) -> bool:
    """Whether plan `name` is in the database (in `connection`'s transaction)."""
    return connection.execute("SELECT 1 FROM plans WHERE name = ?", (name,)).fetchone() is not None


def _insert(
    connection: Statements,
    name: str,
    plan: str,
    rpm: int | None,
    tpm: int | None,
    admin: bool,
    models: tuple[str, ...] | None,
    expires_at: float | None,
    budget: Budget | None,
) -> str:
    """Store a new active key (in `connection`'s transaction) and return it."""
    if not _plan_exists(connection, plan):
        raise KeyStoreError(
            f"no plan {shown_value(plan)}; create it with `seekstack keys plan {shown_value(plan, str)} --prompt-price "
            "...`"
        )
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    allowed = None if models is None else json.dumps(list(models))
    amount, period_s = (None, None) if budget is None else (budget.amount, budget.period_s)
    connection.execute(
        "INSERT INTO keys (name, key_hash, prefix, plan, rpm, tpm, admin, created_at, models, expires_at, max_budget, "
        "budget_period_s) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        (name, hash_key(key), key[:SHOWN_PREFIX_CHARS], plan, rpm, tpm, int(admin), time.time(), allowed, expires_at,
         amount, period_s),
    )  # fmt: skip
    return key


def _revoke_active(connection: Statements, name: str) -> ApiKey | None:
    """Revoke the active key `name` (in `connection`'s transaction); the key, or None when `name` has no active one."""
    rows = connection.execute(
        "UPDATE keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL RETURNING *", (time.time(), name)
    ).fetchall()
    return _api_key(rows[0]) if rows else None


def _nothing_to_revoke(connection: Statements, name: str) -> str:
    """Why `name` has no active key to revoke: when its last key was revoked, or that no key of the name was ever
    created, naming the names close to it (a typo)."""
    revoked = connection.execute("SELECT MAX(revoked_at) AS at FROM keys WHERE name = ?", (name,)).fetchone()["at"]
    if revoked is not None:
        return (f"key {name!r} was revoked already, at {utc_time(revoked)} UTC: it has no active key to revoke "
                f"(`seekstack keys create --name {name}` gives the name a new one)")  # fmt: skip
    names = [row["name"] for row in connection.execute("SELECT DISTINCT name FROM keys").fetchall()]
    close = difflib.get_close_matches(name, names, n=3)
    did_you_mean = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    return f"no key named {shown_value(name)} was ever created{did_you_mean}; `seekstack keys list` shows every key"


def _api_key(row) -> ApiKey:
    return ApiKey(
        name=row["name"],
        prefix=row["prefix"],
        plan=row["plan"],
        rpm=row["rpm"],
        tpm=row["tpm"],
        admin=bool(row["admin"]),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
        models=None if row["models"] is None else tuple(json.loads(row["models"])),
        expires_at=row["expires_at"],
        budget=None if row["max_budget"] is None else Budget(row["max_budget"], row["budget_period_s"]),
    )


def parse_duration(text: str, option: str) -> float:
    """The seconds of a duration written as LiteLLM's key durations are (`30s`, `15m`, `12h`, `90d`); ValueError
    naming `option` and that form for any other, or for one longer than 100 years (`MAX_DURATION_S`)."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if match is None:
        raise ValueError(f"{option} {text!r}: give a whole number of seconds, minutes, hours or days: 30s, 15m, 12h, "
                         "90d")  # fmt: skip
    too_long = ValueError(f"{option} {shown_value(text)}: give at most 36500d (100 years), or leave {option} out")
    if len(match[1].lstrip("0")) > len(str(MAX_DURATION_S)):  # too long in any unit; int() refuses 4300+ digits
        raise too_long
    seconds = int(match[1]) * DURATION_UNITS_S[match[2]]
    if seconds == 0:  # it said "give a whole number", which 0 is
        raise ValueError(f"{option} {text!r}: give a duration longer than 0: 30s, 15m, 12h, 90d")
    if seconds > MAX_DURATION_S:
        raise too_long
    return seconds


def format_duration(seconds: float) -> str:
    """`seconds` in the largest of `parse_duration`'s units that holds it whole: 2592000 -> `30d`."""
    unit = next(unit for unit, size in reversed(DURATION_UNITS_S.items()) if seconds % size == 0 or size == 1)
    return f"{seconds / DURATION_UNITS_S[unit]:g}{unit}"


def format_amount(amount: float) -> str:
    """A price or budget with every digit it was given (`:g` kept 6: 0.0012345678 showed as 0.00123457), none added:
    25, 0.1, 1e-07."""
    return f"{amount:.15g}"


def format_cost(cost: float) -> str:
    """A cost spent, to 6 decimals, or to its first 3 significant digits below 1e-6 (which showed as 0.000000, as if
    the requests were free; LiteLLM's spend shows them): 0.012346, 0.000000123."""
    if 0 < abs(cost) < 1e-6:
        return f"{cost:.{2 - math.floor(math.log10(abs(cost)))}f}"
    return f"{cost:.6f}"


def utc_time(timestamp: float) -> str:
    """Unix seconds as the UTC time `YYYY-MM-DD HH:MM:SS`."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))
