"""The sandbox and container tables.

Each record is one row with its unique name in its own column and the whole record as JSON.
Every change is a transaction, so a daemon killed at any point finds either the old record or
the new one.
"""

from __future__ import annotations

import sqlite3

from servin_shim.errors import AlreadyExists, NotFound
from servin_shim.state.db import Database
from servin_shim.state.records import ContainerRecord, SandboxRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    full_name TEXT NOT NULL UNIQUE,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS containers (
    id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    full_name TEXT NOT NULL UNIQUE,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS containers_by_sandbox ON containers (sandbox_id)
"""


class MetadataStore:
    """Reads and writes sandbox and container records."""

    def __init__(self, db: Database) -> None:
        self._db = db
        db.ensure_schema(SCHEMA)

    # Sandboxes

    def add_sandbox(self, record: SandboxRecord) -> None:
        try:
            with self._db.transaction() as conn:
                conn.execute(
                    "INSERT INTO sandboxes (id, full_name, data) VALUES (?, ?, ?)",
                    (record.id, record.full_name, record.model_dump_json()),
                )
        except sqlite3.IntegrityError:
            existing = self._db.query_one(
                "SELECT id FROM sandboxes WHERE full_name = ?", (record.full_name,)
            )
            owner = existing["id"] if existing else record.id
            raise AlreadyExists(
                f"pod sandbox name {record.full_name!r} is already used by sandbox {owner}; "
                "remove that sandbox first"
            ) from None

    def save_sandbox(self, record: SandboxRecord) -> None:
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE sandboxes SET data = ? WHERE id = ?", (record.model_dump_json(), record.id)
            )

    def get_sandbox(self, sandbox_id: str) -> SandboxRecord:
        row = self._db.query_one("SELECT data FROM sandboxes WHERE id = ?", (sandbox_id,))
        if row is None:
            raise NotFound(f"pod sandbox {sandbox_id!r} not found")
        return SandboxRecord.model_validate_json(row["data"])

    def sandboxes(self) -> list[SandboxRecord]:
        rows = self._db.query("SELECT data FROM sandboxes")
        return [SandboxRecord.model_validate_json(r["data"]) for r in rows]

    def delete_sandbox(self, sandbox_id: str) -> None:
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))

    # Containers

    def add_container(self, record: ContainerRecord) -> None:
        try:
            with self._db.transaction() as conn:
                conn.execute(
                    "INSERT INTO containers (id, sandbox_id, full_name, data) VALUES (?, ?, ?, ?)",
                    (record.id, record.sandbox_id, record.full_name, record.model_dump_json()),
                )
        except sqlite3.IntegrityError:
            existing = self._db.query_one(
                "SELECT id FROM containers WHERE full_name = ?", (record.full_name,)
            )
            owner = existing["id"] if existing else record.id
            raise AlreadyExists(
                f"container name {record.name!r} attempt {record.attempt} in sandbox "
                f"{record.sandbox_id} is already used by container {owner}; remove it first"
            ) from None

    def save_container(self, record: ContainerRecord) -> None:
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE containers SET data = ? WHERE id = ?", (record.model_dump_json(), record.id)
            )

    def get_container(self, container_id: str) -> ContainerRecord:
        row = self._db.query_one("SELECT data FROM containers WHERE id = ?", (container_id,))
        if row is None:
            raise NotFound(f"container {container_id!r} not found")
        return ContainerRecord.model_validate_json(row["data"])

    def containers(self, sandbox_id: str | None = None) -> list[ContainerRecord]:
        if sandbox_id is None:
            rows = self._db.query("SELECT data FROM containers")
        else:
            rows = self._db.query(
                "SELECT data FROM containers WHERE sandbox_id = ?", (sandbox_id,)
            )
        return [ContainerRecord.model_validate_json(r["data"]) for r in rows]

    def delete_container(self, container_id: str) -> None:
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM containers WHERE id = ?", (container_id,))
