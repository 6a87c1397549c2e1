"""The local cloud's resource records: every resource it makes, with the tags Azure would carry on it.

Azure keeps tags on the resources themselves, and the janitor finds a dead build's leftovers by them. The local
cloud's resources (staging groups, VMs, addresses, disks, blobs, images, gallery versions) are spread over
Azurite, the file system and the kernel, so their tags live here instead: one sqlite file in the state folder
that survives restarts and is shared by every worker and CLI on the machine.

A record's build is its ``build_id`` column, which every lookup reads; its tags (``activities.clouds.aib.tags``)
are what the resource would carry on Azure. So records written when the build-id tag was still ``buildId`` are
found and cleaned up like any other.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from activities.clouds.aib.tags import ROLE_TEMPORARY, TAG_ROLE
from activities.clouds.state import state_dir


def record_key(resource_id: str) -> str:
    """ARM ids are case-insensitive: records of ARM resources are kept under the lower-case id."""
    return resource_id.lower()


@dataclass(frozen=True)
class ResourceRecord:
    id: str
    kind: str
    build_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def role(self) -> str:
        """What happens to the resource when its build ends (a record without a role is temporary)."""
        return self.tags.get(TAG_ROLE, ROLE_TEMPORARY)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    build_id TEXT,
    tags TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS resources_build ON resources (build_id);
CREATE INDEX IF NOT EXISTS resources_kind ON resources (kind);
"""


class ResourceStore:
    """Resource records in sqlite. Every call opens its own connection, so one store is safe to share between
    threads (asyncio.to_thread), and WAL lets several worker processes read while one writes."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or state_dir() / "resources.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def record(
        self,
        id: str,
        *,
        kind: str,
        build_id: str | None,
        tags: dict[str, str] | None = None,
        data: dict[str, Any] | None = None,
    ) -> ResourceRecord:
        """Create or replace the record of ``id``; a replaced record keeps its ``created_at``."""
        now = datetime.now(UTC).isoformat()
        with self._connect() as db:
            db.execute(
                "INSERT INTO resources (id, kind, build_id, tags, data, created_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, build_id = excluded.build_id, "
                "tags = excluded.tags, data = excluded.data",
                (id, kind, build_id, json.dumps(tags or {}), json.dumps(data or {}), now),
            )
            return self._get(db, id)  # type: ignore[return-value]

    def claim(
        self,
        id: str,
        *,
        kind: str,
        build_id: str | None,
        tags: dict[str, str] | None = None,
        data: dict[str, Any] | None = None,
    ) -> ResourceRecord:
        """Record ``id`` only if nobody has: returns the record that is stored, which is someone else's when the
        caller lost the race (two builds numbering the same gallery version)."""
        with self._connect() as db:
            db.execute(
                "INSERT OR IGNORE INTO resources (id, kind, build_id, tags, data, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (id, kind, build_id, json.dumps(tags or {}), json.dumps(data or {}), datetime.now(UTC).isoformat()),
            )
            return self._get(db, id)  # type: ignore[return-value]

    def update(self, id: str, data: dict[str, Any]) -> ResourceRecord | None:
        """Merge ``data`` into the record's data (top-level keys); None if there is no such record."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # read-modify-write without losing another process's update
            found = self._get(db, id)
            if found is None:
                db.execute("ROLLBACK")
                return None
            merged = {**found.data, **data}
            db.execute("UPDATE resources SET data = ? WHERE id = ?", (json.dumps(merged), id))
            db.execute("COMMIT")
            return ResourceRecord(found.id, found.kind, found.build_id, found.tags, merged, found.created_at)

    def forget(self, id: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM resources WHERE id = ?", (id,))

    def get(self, id: str) -> ResourceRecord | None:
        with self._connect() as db:
            return self._get(db, id)

    def list(self, *, build_id: str | None = None, kind: str | None = None) -> list[ResourceRecord]:
        """Records, oldest first, of one build and/or one kind (all of them when neither is given)."""
        query, args = "SELECT * FROM resources WHERE 1 = 1", []
        if build_id is not None:
            query += " AND build_id = ?"
            args.append(build_id)
        if kind is not None:
            query += " AND kind = ?"
            args.append(kind)
        with self._connect() as db:
            return [_row(r) for r in db.execute(query + " ORDER BY created_at, rowid", args)]

    @staticmethod
    def _get(db: sqlite3.Connection, id: str) -> ResourceRecord | None:
        row = db.execute("SELECT * FROM resources WHERE id = ?", (id,)).fetchone()
        return _row(row) if row else None


def _row(row: tuple) -> ResourceRecord:
    id, kind, build_id, tags, data, created_at = row
    return ResourceRecord(id, kind, build_id, json.loads(tags), json.loads(data), datetime.fromisoformat(created_at))
