"""The server's one SQLite file: API keys, price plans and the usage ledger.

Tables (created on first open):
  plans(name, prompt_per_1k, completion_per_1k)             prices in the user's currency per 1k tokens
  keys(name, key_hash, prefix, plan, rpm, tpm, admin, created_at, revoked_at)   only the sha256 of a key
  usage(created_at, key_name, model, endpoint, prompt_tokens, completion_tokens, latency_s, status, cost)
Times are Unix seconds (UTC). Every write is committed with `synchronous=FULL`, so a record that a
call returned from survives the process being killed.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_DATABASE = "seekstack.db"
DATABASE_ENV = "SEEKSTACK_DB"
DEFAULT_PLAN = "default"
DEFAULT_PRICE_PER_1K = 0.002

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS plans (
    name TEXT PRIMARY KEY,
    prompt_per_1k REAL NOT NULL,
    completion_per_1k REAL NOT NULL
);
INSERT OR IGNORE INTO plans VALUES ('{DEFAULT_PLAN}', {DEFAULT_PRICE_PER_1K}, {DEFAULT_PRICE_PER_1K});
CREATE TABLE IF NOT EXISTS keys (
    name TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    plan TEXT NOT NULL REFERENCES plans(name),
    rpm INTEGER,
    tpm INTEGER,
    admin INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    key_name TEXT,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    status INTEGER NOT NULL,
    cost REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_by_key_time ON usage (key_name, created_at);
"""


def default_database_path() -> Path:
    """$SEEKSTACK_DB if set, else `seekstack.db` in the current directory."""
    return Path(os.environ.get(DATABASE_ENV, DEFAULT_DATABASE))


class Database:
    """One SQLite connection shared by threads, one statement group at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"database folder {self.path.parent} does not exist")
        try:
            self._connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=FULL")
            self._connection.execute("PRAGMA busy_timeout=5000")
            self._connection.executescript(SCHEMA)
        except sqlite3.DatabaseError as error:
            raise ValueError(f"{self.path} is not a usable seekstack database: {error}") from error
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside BEGIN ... COMMIT (ROLLBACK on error), holding the lock."""
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def query(self, sql: str, parameters: tuple = ()) -> list[sqlite3.Row]:
        """Rows of a read-only statement, as `sqlite3.Row` (columns by name)."""
        with self._lock:
            cursor = self._connection.execute(sql, parameters)
            cursor.row_factory = sqlite3.Row
            return cursor.fetchall()

    def close(self) -> None:
        with self._lock:
            self._connection.close()
