"""The server's database: API keys, price plans and the usage ledger, in SQLite (one file) or PostgreSQL.

`open_database(location)` takes a file path (SQLite) or a `postgresql://` URL. Tables, created on first open:
  plans(name, prompt_per_1k, completion_per_1k, cached_prompt_per_1k)   prices in the user's currency per 1k
        tokens; cached_prompt_per_1k: prompt tokens read from the prefix cache (NULL: the prompt price)
  keys(name, key_hash, prefix, plan, rpm, tpm, admin, created_at, revoked_at, models, expires_at, max_budget,
        budget_period_s)   only a key's sha256; a name has at most one active key, and may be given a new one once
        its keys are revoked
  usage(id, created_at, key_name, model, endpoint, prompt_tokens, completion_tokens, latency_s, status, cost_pico,
        cached_tokens, moderation, cost_units)   status 0: a stream still running, or cut off by a crash (see
        ledger.py); the cost exactly, so that every sum of costs is exact: cost_units whole units of the currency
        (up to 2**63 - 1) and cost_pico the whole 1e-12 of it below them (0 to 10**12 - 1)
  rate_charges(id, key_name, at, tokens)   the last minute's requests per key, for the rate limits of every process
Times are Unix seconds (UTC). A committed write is durable: SQLite runs with `synchronous=FULL`, PostgreSQL
with its default synchronous commit. Statements are written once, with `?` placeholders and SQL both
dialects accept; rows come back as dicts. A SQLite file is created readable by its owner only (0600): it
holds the key hashes and everyone's bill; an existing one that others may read or write is warned of on stderr.
Columns added since a database was created are added when it opens, and a keys table from before names could be
reused (its name a primary key) is rebuilt without that constraint, a usage table of float costs (usage.cost) has them
converted to cost_units and cost_pico in one transaction (refused, unchanged, where a cost is no amount), a usage
table whose cost_pico held a whole cost has it split into cost_units and cost_pico, and a note on stderr names what
changed, since an earlier seekstack may no longer open the database, or (one from before cost_units) opens it and
reads each cost less its whole units.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from seekstack.extras import import_extra

DEFAULT_DATABASE = "seekstack.db"
DATABASE_ENV = "SEEKSTACK_DB"
DEFAULT_PLAN = "default"
DEFAULT_PRICE_PER_1K = 0.002
POSTGRES_SCHEMES = ("postgresql", "postgres")
SECRET_URL_PARAMETERS = ("password", "sslpassword")  # libpq parameters a URL may carry a secret in
BUSY_RETRY_S = 120.0  # how long a write waits for a database another connection holds (beyond its own timeout)
SQLITE_BUSY_TIMEOUT_MS = 5000  # SQLite's own wait for another connection's lock, each try
WRITE_THREADS = 4  # a database's writes run one at a time (its lock): more threads only wait on it
Result = TypeVar("Result")
_WRITES = ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="seekstack-database-write")

KEYS_COLUMNS = """
        name TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        plan TEXT NOT NULL REFERENCES plans(name),
        rpm INTEGER,
        tpm INTEGER,
        admin INTEGER NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION,
        models TEXT,
        expires_at DOUBLE PRECISION,
        max_budget DOUBLE PRECISION,
        budget_period_s DOUBLE PRECISION
"""
KEYS_COLUMN_NAMES = (
    "name, key_hash, prefix, plan, rpm, tpm, admin, created_at, revoked_at, models, expires_at, max_budget, "
    "budget_period_s"
)
USAGE_COLUMNS = """
        id {id_column},
        created_at DOUBLE PRECISION NOT NULL,
        key_name TEXT,
        model TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        latency_s DOUBLE PRECISION NOT NULL,
        status INTEGER NOT NULL,
        cost_pico BIGINT NOT NULL
"""  # {id_column}: the dialect's (SCHEMA)
USAGE_INDEX = "CREATE INDEX IF NOT EXISTS usage_by_key_time ON usage (key_name, created_at)"
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS plans (
        name TEXT PRIMARY KEY,
        prompt_per_1k DOUBLE PRECISION NOT NULL,
        completion_per_1k DOUBLE PRECISION NOT NULL
    )""",
    f"""INSERT INTO plans (name, prompt_per_1k, completion_per_1k)
        VALUES ('{DEFAULT_PLAN}', {DEFAULT_PRICE_PER_1K}, {DEFAULT_PRICE_PER_1K}) ON CONFLICT (name) DO NOTHING""",
    f"CREATE TABLE IF NOT EXISTS keys ({KEYS_COLUMNS})",
    f"CREATE TABLE IF NOT EXISTS usage ({USAGE_COLUMNS})",
    USAGE_INDEX,
    """CREATE TABLE IF NOT EXISTS rate_charges (
        id {id_column},
        key_name TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        tokens INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS rate_charges_by_key_time ON rate_charges (key_name, at)",
)
ADDED_COLUMNS = (  # (table, column, definition): columns newer than the tables above
    ("plans", "cached_prompt_per_1k", "DOUBLE PRECISION"),
    ("usage", "cached_tokens", "INTEGER NOT NULL DEFAULT 0"),
    ("usage", "moderation", "TEXT"),  # the content-safety category that blocked, redacted or flagged it
    ("keys", "models", "TEXT"),  # JSON list of the models the key may use; NULL: all (before a rebuild copies it)
    ("keys", "expires_at", "DOUBLE PRECISION"),  # when the key stops working; NULL: never (as models, before a rebuild)
    ("keys", "max_budget", "DOUBLE PRECISION"),  # the most its name's usage may cost; NULL: no budget
    ("keys", "budget_period_s", "DOUBLE PRECISION"),  # the budget's trailing window; NULL: the name's whole usage
    ("usage", "cost_units", "BIGINT NOT NULL DEFAULT 0"),  # a cost's whole units; before it, cost_pico held all of it
)
SQLITE_ID = "INTEGER PRIMARY KEY AUTOINCREMENT"
SCHEMA_LOCK = 0x5EE5_57AC  # PostgreSQL's advisory lock (a bigint of our choosing) held by a server upgrading the schema
COST_SCALE = 10**12  # usage.cost_pico: the whole 1e-12 of the currency below a cost's whole units (usage.cost_units)
# The most one request may cost, in 1e-12 of the currency: 2**63 - 1 whole units (a 64-bit usage.cost_units, 9.2e18)
# and the 1e-12 below them. A cost kept in one 64-bit count of 1e-12 held at most 9.2 million of the currency
MAX_COST_PICO = (2**63 - 1) * COST_SCALE + COST_SCALE - 1
IN_PROGRESS = 0  # the status of a stream's row until it ends; a row left so was cut off by a crash
# A cost_pico written by a seekstack from before cost_units, which held the whole cost, split into the two (each row
# once), at each opening: a server of that seekstack still running on the database (a rolling upgrade) writes its
# stream's final cost whole into cost_pico, so a row still in progress is split only once it has ended (until then it
# is read right unsplit, cost_units 0), never twice (40.0 split, then finished at 44.0, read as 84.0)
SPLIT_COSTS = (
    f"UPDATE usage SET cost_units = cost_pico / {COST_SCALE}, cost_pico = cost_pico - cost_pico / {COST_SCALE} * "
    f"{COST_SCALE} WHERE cost_pico >= {COST_SCALE} AND status <> {IN_PROGRESS}"
)
# The rows SPLIT_COSTS looks for, so that each opening reads those alone rather than the whole usage table: none but
# an older server's, and a row this seekstack writes never enters it. Made once cost_pico is there (after the upgrades)
UNSPLIT_COSTS_INDEX = f"CREATE INDEX IF NOT EXISTS usage_unsplit_costs ON usage (id) WHERE cost_pico >= {COST_SCALE}"
# The note of `note_upgrade` once cost_units is added to a database that had costs: an older seekstack has no schema
# version to refuse it by, and reads cost_pico alone
COSTS_SPLIT = (
    "each cost split into its whole units (usage.cost_units) and the 1e-12 below them (usage.cost_pico): a seekstack "
    "from before 2026-12-06 still opens the database but reads each cost less its whole units (40.0 as 0.0, in what "
    "a key spent, its records and the daily totals), so do not go back to one"
)
OLD_COST_DIGITS = 12  # the significant digits an earlier seekstack rounded its float costs to (usage.cost)
KEYS_REBUILT = "keys rebuilt so that a name whose keys are revoked may be given a new one"
KEYS_INDEXES = (  # made once the keys table is rebuilt, if it had to be (SQLiteDatabase._free_revoked_key_names)
    "CREATE UNIQUE INDEX IF NOT EXISTS keys_active_name ON keys (name) WHERE revoked_at IS NULL",
    "CREATE INDEX IF NOT EXISTS keys_by_name ON keys (name)",
)


class Statements(Protocol):
    """What a transaction offers: `execute(sql, parameters)` returning a cursor (fetchone, fetchall, rowcount)."""

    def execute(self, sql: str, parameters: tuple = ()) -> Any: ...


def default_database_location() -> str:
    """$SEEKSTACK_DB if set (empty, as a compose file's `SEEKSTACK_DB=${DB}` with DB unset sets it, is not), else
    `seekstack.db` in the current directory."""
    return os.environ.get(DATABASE_ENV) or DEFAULT_DATABASE


def open_database(location: str | os.PathLike, create: bool = True) -> Database:
    """The database at `location`: a `postgresql://` URL, or else the path of a SQLite file (created if new, or
    FileNotFoundError naming it without `create`; IsADirectoryError for a folder; ValueError for `""`, which Path reads
    as the current folder)."""
    if not str(location):
        raise ValueError(
            "the database is an empty path (a variable left unset?): give a SQLite file or a postgresql:// URL"
        )
    if urlsplit(str(location)).scheme in POSTGRES_SCHEMES:
        return PostgresDatabase(str(location))
    if Path(location).is_dir():  # SQLite's words: "unable to open database file", or "no such database" to a read
        raise IsADirectoryError(
            f"{location} is a folder; the database is a file: name one in it ({Path(location) / DEFAULT_DATABASE})"
        )
    if not create and not Path(location).is_file():
        raise FileNotFoundError(
            f"{location}: no such database; `seekstack serve` and `seekstack keys create` write it (--db or "
            f"${DATABASE_ENV} name another)"
        )
    return SQLiteDatabase(Path(location))


async def in_write_thread(write: Callable[..., Result], *args: Any) -> Result:
    """`write(*args)` (a write to a database) on one of the WRITE_THREADS kept for writes, from the event loop: writes
    waiting for a database another connection holds (each up to BUSY_RETRY_S) never take the threads of asyncio's
    default pool (6 on 2 cores), where reads, request parsing and the engine's new requests run."""
    return await asyncio.get_running_loop().run_in_executor(_WRITES, functools.partial(write, *args))


def retrying_while_busy(database: Database, write: Callable[[], Result]) -> Result:
    """`write()`, tried again while another connection holds `database` (another server on it, a backup) for up to
    BUSY_RETRY_S: a request's usage row or rate-limit charge is not lost because the database was busy a while."""
    deadline, pause = time.monotonic() + BUSY_RETRY_S, 0.05
    while True:
        try:
            return write()
        except Exception as error:
            if not database.busy(error) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, 1.0)


class SQLiteDatabase:
    """Two SQLite connections shared by threads: one for transactions, one at a time, and one for reads (`query`),
    one at a time, that need not wait for a write (WAL mode)."""

    lock_rows = ""  # BEGIN IMMEDIATE already holds the database's write lock across processes

    def __init__(self, path: Path):
        self.location = str(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"database folder {path.parent} does not exist")
        if not path.exists():  # SQLite gives its -wal and -shm files the database file's permissions
            try:
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            except PermissionError:
                raise PermissionError(
                    f"{path} cannot be created: {path.parent} takes no new files (a read-only folder, or one this user "
                    "may not write to); name a database in a folder this user may write to (--db, $SEEKSTACK_DB)"
                ) from None
        else:
            warn_if_others_may_read(path)
        try:
            self._connection = _connect(path)
            retrying_while_busy(self, self._create_tables)  # writes, as a request's: another server may hold it
            self._reader = _connect(path)  # in WAL mode a read sees the last commit while a writer holds the lock
        except sqlite3.DatabaseError as error:
            if self.busy(error):
                raise ValueError(
                    f"{path} is held by another connection (another server writing, a VACUUM, an open sqlite3 "
                    f"session) and stayed locked for {BUSY_RETRY_S:.0f} s: {error}; try again once it is free"
                ) from error
            refused = error.sqlite_errorname in ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_READONLY_DIRECTORY")
            if refused and not os.access(path, os.R_OK | os.W_OK):
                owner = path.stat()
                raise PermissionError(
                    f"{path} cannot be read and written by this user (uid {os.geteuid()}; the file is uid "
                    f"{owner.st_uid}'s, mode {stat.S_IMODE(owner.st_mode):04o}): run as its owner, or give this user "
                    "the file (chown, chmod u+rw); the database itself is not at fault"
                ) from error
            if refused and error.sqlite_errorname != "SQLITE_READONLY":  # the file opens: its journal cannot be made
                raise PermissionError(
                    f"{path} cannot be written: SQLite could not create its journal files beside it ({path.name}-wal, "
                    f"{path.name}-shm) in {path.parent}, which must take new files (a read-only folder, or one this "
                    "user may not write to, does not; nor may a folder stand in the way of one); the database itself "
                    "is not at fault"
                ) from error
            raise ValueError(f"{path} is not a usable seekstack database: {error}") from error
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()

    def _create_tables(self) -> None:
        """The tables and the columns added since, each step a no-op where done before, in one transaction: a database
        refused on the way (a damaged cost) is left as it was; then WAL mode. A database of an earlier seekstack that
        it changes is told of (`note_upgrade`)."""
        connection = self._connection
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("BEGIN IMMEDIATE")  # another process opening the database waits, then finds it done
        try:
            existed = bool(connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'plans'").fetchone())
            for statement in SCHEMA:
                connection.execute(statement.format(id_column=SQLITE_ID))
            changes, added = [], set()
            for table, column, definition in ADDED_COLUMNS:
                try:
                    connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                    changes.append(added_column(table, column))
                    added.add((table, column))
                except sqlite3.OperationalError as error:
                    if "duplicate column" not in str(error):  # there already
                        raise
            converted = self._keep_costs_in_pico()
            if converted is not None:
                changes.append(costs_converted(converted))
            connection.execute(UNSPLIT_COSTS_INDEX)
            connection.execute(SPLIT_COSTS)
            if ("usage", "cost_units") in added:  # cost_pico held the whole cost
                changes.append(COSTS_SPLIT)
            if self._free_revoked_key_names():
                changes.append(KEYS_REBUILT)
            for statement in KEYS_INDEXES:
                connection.execute(statement)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        connection.execute("PRAGMA journal_mode=WAL")  # outside a transaction, as SQLite requires
        if existed:
            note_upgrade(self.location, changes)

    def _keep_costs_in_pico(self) -> int | None:
        """Rebuild a usage table of an earlier seekstack, whose cost column held floats, with each cost as the whole
        units and 1e-12 of the currency it stands for (cost_units, cost_pico), inside `_create_tables`' transaction:
        SQLite cannot change a column's type in place. How many rows were converted; None where there was nothing to
        do."""
        connection = self._connection
        columns = [column["name"] for column in connection.execute("PRAGMA table_info(usage)")]
        if "cost" not in columns:
            return None
        costs = old_costs_in_pico(self.location, connection.execute("SELECT id, cost FROM usage").fetchall())
        issued = connection.execute("SELECT seq FROM sqlite_sequence WHERE name = 'usage'").fetchone()
        kept = ", ".join(column for column in columns if column != "cost")
        connection.execute(f"CREATE TABLE usage_rebuilt ({USAGE_COLUMNS.format(id_column=SQLITE_ID)})")
        for table, column, definition in ADDED_COLUMNS:
            if table == "usage":
                connection.execute(f"ALTER TABLE usage_rebuilt ADD COLUMN {column} {definition}")
        connection.execute(f"INSERT INTO usage_rebuilt ({kept}, cost_pico) SELECT {kept}, 0 FROM usage")
        connection.executemany("UPDATE usage_rebuilt SET cost_units = ?, cost_pico = ? WHERE id = ?", costs)
        connection.execute("DROP TABLE usage")
        connection.execute("ALTER TABLE usage_rebuilt RENAME TO usage")
        if issued is not None:  # the copy counts from its largest id: no id of a deleted row is issued again
            connection.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'usage'", (issued["seq"],))
        connection.execute(USAGE_INDEX)
        return len(costs)

    def _free_revoked_key_names(self) -> bool:
        """Rebuild a keys table whose name is its primary key (one key per name, ever) without that constraint, inside
        `_create_tables`' transaction: SQLite cannot drop a primary key in place. Whether it was rebuilt."""
        connection = self._connection
        if not any(
            column["name"] == "name" and column["pk"] for column in connection.execute("PRAGMA table_info(keys)")
        ):
            return False
        connection.execute(f"CREATE TABLE keys_rebuilt ({KEYS_COLUMNS})")
        connection.execute(f"INSERT INTO keys_rebuilt ({KEYS_COLUMN_NAMES}) SELECT {KEYS_COLUMN_NAMES} FROM keys")
        connection.execute("DROP TABLE keys")
        connection.execute("ALTER TABLE keys_rebuilt RENAME TO keys")
        return True

    @contextmanager
    def transaction(self) -> Iterator[Statements]:
        """Statements inside BEGIN ... COMMIT (ROLLBACK on error), holding the lock."""
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def query(self, sql: str, parameters: tuple = ()) -> list[dict]:
        """Rows of one read, on a connection of its own: it does not wait behind a write of this process waiting for
        another's lock, and it sees what was committed (not a transaction still open)."""
        with self._read_lock:
            return self._reader.execute(sql, parameters).fetchall()

    @staticmethod
    def busy(error: Exception) -> bool:
        """Whether `error` says another connection held the database past the busy timeout (worth trying again)."""
        return isinstance(error, sqlite3.OperationalError) and ("locked" in str(error) or "busy" in str(error))

    @staticmethod
    def day(column: str) -> str:
        """SQL for the UTC day (YYYY-MM-DD) of a Unix-seconds column."""
        return f"date({column}, 'unixepoch')"

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._connection.close()
            self._reader.close()


class PostgresDatabase:
    """Two PostgreSQL connections (psycopg 3) shared by threads: one for transactions, one at a time, and one for reads
    (`query`), one at a time, that need not wait for a write waiting on another connection's row lock."""

    lock_rows = " FOR UPDATE"  # a SELECT's suffix that holds its rows until the transaction ends

    def __init__(self, url: str):
        self.location = _without_password(url)
        psycopg = import_extra("psycopg", "postgres", "a postgresql:// database")
        from psycopg.rows import dict_row

        try:
            self._connection = psycopg.connect(url, autocommit=True, row_factory=dict_row)
            with self._connection.transaction():
                # One server at a time upgrades: two that each read usage (a shared lock) and then altered it, or
                # created the same table, waited on each other ("deadlock detected") and one failed to start.
                self._connection.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                existed = bool(self._connection.execute("SELECT to_regclass('plans') AS plans").fetchone()["plans"])
                for statement in SCHEMA:
                    self._connection.execute(
                        statement.format(id_column="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
                    )
                # ALTER TABLE locks its table against every reader, and queues every later statement behind it while
                # any transaction reads the table (a report in psql): altered only where a change is due.
                present = {
                    (column["table_name"], column["column_name"])
                    for column in self._connection.execute(
                        "SELECT table_name, column_name FROM information_schema.columns "
                        "WHERE table_schema = current_schema()"
                    )
                }
                changes = []
                for table, column, definition in ADDED_COLUMNS:
                    if (table, column) not in present:
                        self._connection.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {definition}")
                        changes.append(added_column(table, column))
                if ("usage", "cost") in present:  # an earlier seekstack's float costs
                    costs = old_costs_in_pico(self.location, self._connection.execute("SELECT id, cost FROM usage"))
                    self._connection.execute("ALTER TABLE usage ADD COLUMN cost_pico BIGINT NOT NULL DEFAULT 0")
                    with self._connection.cursor() as cursor:
                        cursor.executemany("UPDATE usage SET cost_units = %s, cost_pico = %s WHERE id = %s", costs)
                    self._connection.execute("ALTER TABLE usage ALTER COLUMN cost_pico DROP DEFAULT")
                    self._connection.execute("ALTER TABLE usage DROP COLUMN cost")
                    changes.append(costs_converted(len(costs)))
                self._connection.execute(UNSPLIT_COSTS_INDEX)
                self._connection.execute(SPLIT_COSTS)
                if ("usage", "cost_units") not in present:  # cost_pico held the whole cost
                    changes.append(COSTS_SPLIT)
                if self._connection.execute(
                    "SELECT 1 FROM pg_constraint WHERE conname = 'keys_pkey' AND conrelid = 'keys'::regclass"
                ).fetchone():
                    self._connection.execute("ALTER TABLE keys DROP CONSTRAINT IF EXISTS keys_pkey")  # a name, reusable
                    changes.append(KEYS_REBUILT)
                for statement in KEYS_INDEXES:
                    self._connection.execute(statement)
                if existed:
                    note_upgrade(self.location, changes)
            self._reader = psycopg.connect(url, autocommit=True, row_factory=dict_row)
        except psycopg.Error as error:
            raise ValueError(f"cannot use the database {self.location}: {error}") from error
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[Statements]:
        with self._lock, self._connection.transaction():
            yield _QmarkStatements(self._connection)

    def query(self, sql: str, parameters: tuple = ()) -> list[dict]:
        with self._read_lock:
            return self._reader.execute(_qmark_to_format(sql), parameters).fetchall()

    @staticmethod
    def busy(error: Exception) -> bool:
        """Whether `error` is a lock wait or conflict that a new transaction may not meet."""
        from psycopg import errors

        return isinstance(error, (errors.LockNotAvailable, errors.SerializationFailure, errors.DeadlockDetected))

    @staticmethod
    def day(column: str) -> str:
        return f"to_char(to_timestamp({column}) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._connection.close()
            self._reader.close()


class _QmarkStatements:
    """A psycopg connection that takes the `?` placeholders the statements are written with."""

    def __init__(self, connection):
        self._connection = connection

    def execute(self, sql: str, parameters: tuple = ()):
        return self._connection.execute(_qmark_to_format(sql), parameters)


def _qmark_to_format(sql: str) -> str:
    return sql.replace("?", "%s")  # our statements hold no literal ? or %


def note_upgrade(location: str, changes: list[str]) -> None:
    """Say on stderr that this seekstack changed the database at `location` (`changes`, none: nothing said), which an
    earlier seekstack may then refuse: one from before 2026-11-30 inserts a plan of 3 values into a table of 4."""
    if changes:
        print(
            f"note: {location} was upgraded for this seekstack ({'; '.join(changes)}); an earlier seekstack may no "
            "longer open it (one from before 2026-11-30 refuses it: 'table plans has 4 columns but 3 values were "
            "supplied')",
            file=sys.stderr,
        )


def added_column(table: str, column: str) -> str:
    """The note of `note_upgrade` for a column added to a table."""
    return f"column {table}.{column} added"


def cost_pico(amount: Decimal) -> int:
    """A cost in the currency as the whole number of 1e-12 of it the ledger keeps (half to even)."""
    return int((amount * COST_SCALE).to_integral_value(ROUND_HALF_EVEN))


def cost_columns(pico: int) -> tuple[int, int]:
    """A cost in 1e-12 of the currency as the ledger stores it: (usage.cost_units, usage.cost_pico)."""
    return divmod(pico, COST_SCALE)


def stored_cost_pico(row: dict) -> int:
    """The cost, in 1e-12 of the currency, of a usage row read with its cost_units and cost_pico."""
    return row["cost_units"] * COST_SCALE + row["cost_pico"]


def cost_amount(pico: int) -> float:
    """A cost kept as 1e-12 of the currency as the amount the usage JSON and tables show: the float nearest to that
    decimal (0.00026, never 0.00026000000000000003)."""
    return pico / COST_SCALE


def old_costs_in_pico(location: str, rows: Iterable[dict]) -> list[tuple[int, int, int]]:
    """(cost_units, cost_pico, id) of each row (id, cost) of an earlier seekstack's usage table, whose float costs
    stood for decimals of OLD_COST_DIGITS significant digits; ValueError naming the database and the row for a cost
    that is no amount (a damaged database), which rolls back the opening transaction it is called in: the database is
    left as it was, every column and table the opening would have added included."""
    converted = []
    for row in rows:
        cost = row["cost"]
        if not isinstance(cost, int | float) or not math.isfinite(cost) or cost < 0:
            fault = "which is no amount >= 0"
        elif (pico := cost_pico(Decimal(f"{cost:.{OLD_COST_DIGITS}g}"))) > MAX_COST_PICO:
            fault = f"more than the {cost_amount(MAX_COST_PICO)} a request's cost may be (a 64-bit count of units)"
        else:
            converted.append((*cost_columns(pico), row["id"]))
            continue
        raise ValueError(
            f"{location}: usage row {row['id']} has cost {cost!r}, {fault}: the database is damaged; its costs were "
            "left as they were (floats): correct that row or restore a backup, then open it again"
        )
    return converted


def costs_converted(rows: int) -> str:
    """The note of `note_upgrade` for a usage table whose float costs were converted."""
    return f"usage.cost of {rows} rows converted to cost_units and cost_pico, whole units and 1e-12 of the currency"


def warn_if_others_may_read(path: Path) -> None:
    """Say on stderr that the SQLite file at `path` (key hashes, everyone's bill) may be read by users other than its
    owner, and how to close it; a database this seekstack creates is 0600, one copied or made otherwise may not be."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        print(
            f"warning: {path} is readable or writable by users other than its owner (mode {mode:04o}); it holds the "
            f"API keys' hashes and every key's usage: `chmod 600 {path}` closes it to them",
            file=sys.stderr,
        )


def _connect(path: Path) -> sqlite3.Connection:
    """A SQLite connection any thread may use (under a lock), in autocommit mode, giving rows as dicts and waiting
    SQLITE_BUSY_TIMEOUT_MS for another connection's lock."""
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    connection.row_factory = _dict_row
    connection.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    return connection


def _dict_row(cursor: sqlite3.Cursor, row: tuple) -> dict:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


def _without_password(url: str) -> str:
    """The URL as it may be shown in messages and logs: its password, in `user:password@` or in a libpq parameter
    (`?password=`, `?sslpassword=`), shown as ***."""
    parts = urlsplit(url)
    netloc = parts.netloc if parts.password is None else parts.netloc.replace(f":{parts.password}@", ":***@")
    parameters = [parameter.partition("=") for parameter in parts.query.split("&")]
    query = "&".join(
        f"{name}{equals}{'***' if name.lower() in SECRET_URL_PARAMETERS else value}"
        for name, equals, value in parameters
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


Database = SQLiteDatabase | PostgresDatabase
