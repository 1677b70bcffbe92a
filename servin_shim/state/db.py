"""A small SQLite wrapper: one connection per daemon, WAL journal, every write inside a transaction.

SQLite calls on a local file take microseconds, so they run on the event loop thread; the
connection is therefore used by one thread only. Each part of the daemon registers its own
tables with ``ensure_schema`` at start, which keeps the schema next to the code that uses it.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Database:
    """The metadata database at ``<root>/servin.db``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction covers
        # exactly the statements inside ``transaction()``.
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        # With WAL, NORMAL keeps every committed transaction through a crash of the daemon and
        # the database consistent through a power loss, which may undo the last commits. FULL
        # would fsync on every commit, and those fsyncs stalled the event loop for every pod
        # start. A power loss ends every container anyway, and kubelet recreates the pods.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._depth = 0

    def ensure_schema(self, script: str) -> None:
        """Run idempotent DDL (``CREATE TABLE IF NOT EXISTS ...``) in one transaction."""
        with self.transaction():
            for statement in script.split(";"):
                if statement.strip():
                    self._conn.execute(statement)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Yield the connection inside BEGIN IMMEDIATE ... COMMIT, rolling back on any error.

        Nested use joins the outer transaction, so helpers can be composed.
        """
        if self._depth:
            self._depth += 1
            try:
                yield self._conn
            finally:
                self._depth -= 1
            return
        self._conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")
        finally:
            self._depth = 0

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """Run a read-only statement and return all rows."""
        return self._conn.execute(sql, params).fetchall()

    def query_one(
        self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()
    ) -> sqlite3.Row | None:
        """Run a read-only statement and return the first row, or None."""
        row: sqlite3.Row | None = self._conn.execute(sql, params).fetchone()
        return row

    def close(self) -> None:
        self._conn.close()
