"""Image records in SQLite: one row per image (keyed by config digest) plus its names.

A name is either a tag (``docker.io/library/busybox:1``) or a digest reference
(``docker.io/library/busybox@sha256:...``). A name points at exactly one image, so pulling a
tag that moved takes the tag away from the old image.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from typing import Any

from pydantic import BaseModel, Field

from servin_shim.state.db import Database

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS image_records (
    id TEXT PRIMARY KEY,
    manifest_digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    config_json TEXT NOT NULL,
    chain_ids_json TEXT NOT NULL,
    blobs_json TEXT NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS image_names (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('tag', 'digest')),
    image_id TEXT NOT NULL REFERENCES image_records(id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS image_names_by_image ON image_names(image_id)
"""

TAG = "tag"
DIGEST = "digest"


class ImageRecord(BaseModel):
    """An image as the CRI layer reports it. The ``id`` is the digest of the image config."""

    id: str
    repo_tags: list[str] = Field(default_factory=list)
    repo_digests: list[str] = Field(default_factory=list)
    size: int
    manifest_digest: str
    config: dict[str, Any]
    chain_ids: list[str]  # bottom layer first
    blobs: list[str]  # every blob this image needs: index, manifest, config, layers
    pinned: bool = False
    created_at: float = 0.0

    @property
    def uid(self) -> int | None:
        """Numeric user of the image config ``User`` field, or None when it is a name or empty."""
        user = self._user_part()
        return int(user) if user.isdigit() else None

    @property
    def username(self) -> str:
        """User name of the image config ``User`` field, or "" when it is numeric or empty."""
        user = self._user_part()
        return "" if user.isdigit() else user

    def _user_part(self) -> str:
        runtime = self.config.get("config") or {}
        user = str(runtime.get("User") or "")
        return user.split(":", 1)[0]


class ImageStore:
    """Reads and writes image records through the shared ``Database``."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.ensure_schema(SCHEMA)

    def get(self, image_id: str) -> ImageRecord | None:
        row = self.db.query_one("SELECT * FROM image_records WHERE id = ?", (image_id,))
        return self._record(row) if row else None

    def find_name(self, name: str) -> tuple[str, str] | None:
        """Return (image id, kind) for a tag or digest name."""
        row = self.db.query_one("SELECT image_id, kind FROM image_names WHERE name = ?", (name,))
        return (row["image_id"], row["kind"]) if row else None

    def ids_with_prefix(self, prefix: str) -> list[str]:
        rows = self.db.query(
            "SELECT id FROM image_records WHERE substr(id, 1, ?) = ?", (len(prefix), prefix)
        )
        return [row["id"] for row in rows]

    def all(self) -> list[ImageRecord]:
        rows = self.db.query("SELECT * FROM image_records ORDER BY created_at, id")
        return [self._record(row) for row in rows]

    def save(self, record: ImageRecord, names: list[tuple[str, str]]) -> list[str]:
        """Insert or merge ``record``, point ``names`` at it, and return ids left without names."""
        now = time.time()
        with self.db.transaction() as conn:
            existing = self.get(record.id)
            blobs = list(record.blobs)
            pinned = record.pinned
            created = now
            if existing is not None:
                blobs += [blob for blob in existing.blobs if blob not in blobs]
                pinned = pinned or existing.pinned
                created = existing.created_at
            conn.execute(
                "INSERT INTO image_records (id, manifest_digest, size, config_json, "
                "chain_ids_json, blobs_json, pinned, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET manifest_digest = excluded.manifest_digest, "
                "size = excluded.size, blobs_json = excluded.blobs_json, pinned = excluded.pinned",
                (
                    record.id,
                    record.manifest_digest,
                    record.size,
                    json.dumps(record.config, sort_keys=True),
                    json.dumps(record.chain_ids),
                    json.dumps(blobs),
                    int(pinned),
                    created,
                ),
            )
            previous_owners: set[str] = set()
            for name, kind in names:
                owner = self.find_name(name)
                if owner is not None and owner[0] != record.id:
                    previous_owners.add(owner[0])
                    log.info(
                        "name moved name=%s from_image=%s to_image=%s", name, owner[0], record.id
                    )
                conn.execute(
                    "INSERT INTO image_names (name, kind, image_id) VALUES (?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET kind = excluded.kind, "
                    "image_id = excluded.image_id",
                    (name, kind, record.id),
                )
            return [image_id for image_id in previous_owners if not self.names(image_id)]

    def names(self, image_id: str) -> list[tuple[str, str]]:
        rows = self.db.query(
            "SELECT name, kind FROM image_names WHERE image_id = ? ORDER BY name", (image_id,)
        )
        return [(row["name"], row["kind"]) for row in rows]

    def remove_name(self, name: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM image_names WHERE name = ?", (name,))

    def delete(self, image_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM image_names WHERE image_id = ?", (image_id,))
            conn.execute("DELETE FROM image_records WHERE id = ?", (image_id,))

    def set_pinned(self, image_id: str, pinned: bool) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE image_records SET pinned = ? WHERE id = ?", (int(pinned), image_id)
            )

    def referenced(self) -> tuple[set[str], set[str]]:
        """Return the blobs and chain IDs that at least one image needs."""
        blobs: set[str] = set()
        chains: set[str] = set()
        for row in self.db.query("SELECT blobs_json, chain_ids_json FROM image_records"):
            blobs.update(json.loads(row["blobs_json"]))
            chains.update(json.loads(row["chain_ids_json"]))
        return blobs, chains

    def _record(self, row: sqlite3.Row) -> ImageRecord:
        names = self.names(row["id"])
        return ImageRecord(
            id=row["id"],
            repo_tags=[name for name, kind in names if kind == TAG],
            repo_digests=[name for name, kind in names if kind == DIGEST],
            size=row["size"],
            manifest_digest=row["manifest_digest"],
            config=json.loads(row["config_json"]),
            chain_ids=json.loads(row["chain_ids_json"]),
            blobs=json.loads(row["blobs_json"]),
            pinned=bool(row["pinned"]),
            created_at=row["created_at"],
        )
