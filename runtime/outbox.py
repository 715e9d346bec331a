"""A disk-backed outbox: decisions wait here until the broker acknowledged them.

SQLite in WAL mode, one table, rows in insertion order. ``put`` appends,
``peek(n)`` reads the oldest n, ``ack(ids)`` deletes them once the broker sent
PUBACK. A row is therefore delivered at least once: after a crash between
PUBACK and ack it is published again (consumers dedupe on node + seq).

synchronous=FULL by default: every put is fsynced before it returns, so a
decision survives power loss as well as a killed process. Power cuts are
the usual failure of edge devices, and decisions are few (one per window
hop per node, a handful per second), so one fsync each is affordable.
``synchronous="normal"`` (WAL) still survives a killed process but may lose
the last puts on power loss; use it only for high decision rates on flash
that must not be worn by fsyncs.

Bounded: at most ``max_rows`` rows. When a put finds the outbox full, the
OLDEST rows are deleted to make room and counted in ``dropped_full`` (with a
warning): while the broker is away for long, recent decisions matter more
than the oldest ones. One process owns an outbox file at a time.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from edgefuse.runtime.errors import ConfigError, InputError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SYNC_MODES = ("full", "normal")
DEFAULT_MAX_ROWS = 100_000
MAX_PAYLOAD_BYTES = 256 * 1024


@dataclass(frozen=True)
class OutboxRow:
    id: int
    topic: str
    payload: bytes
    created_ns: int


class Outbox:
    """Thread-safe (one connection behind a lock); see the module docstring."""

    def __init__(self, path: str | Path, *, max_rows: int = DEFAULT_MAX_ROWS,
                 synchronous: str = "full"):
        if synchronous not in SYNC_MODES:
            raise ConfigError(f"outbox synchronous must be one of {SYNC_MODES}, "
                              f"found {synchronous!r}")
        if not 1 <= max_rows <= 100_000_000:
            raise ConfigError(f"outbox max_rows must be 1..1e8, found {max_rows!r}")
        self.path = Path(path)
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._counts = {"put": 0, "acked": 0, "dropped_full": 0}
        try:
            self._db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._sync_pragma = synchronous.upper()
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise InputError(f"outbox {self.path} has schema version {version}, expected "
                                 f"{SCHEMA_VERSION}; it was written by another edgefuse "
                                 "version: publish or move it away", path=str(self.path))
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "topic TEXT NOT NULL, payload BLOB NOT NULL, created_ns INTEGER NOT NULL)")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._depth = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise InputError(f"cannot open outbox {self.path}: {exc}; if it is not an edgefuse "
                             "outbox, move it away", path=str(self.path)) from exc
        if self._depth:
            log.info("outbox %s holds %d undelivered row(s) from before", self.path, self._depth)

    def put(self, topic: str, payload: bytes | str) -> int:
        """Append one message; returns its id. Drops the oldest rows when full."""
        return self.put_many([(topic, payload)])[0]

    def put_many(self, items: Iterable[tuple[str, bytes | str]]) -> list[int]:
        """Append several messages in ONE transaction (one fsync); returns their ids."""
        rows = []
        for topic, payload in items:
            if isinstance(payload, str):
                payload = payload.encode()
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise InputError(f"outbox payload of {len(payload)} bytes exceeds "
                                 f"{MAX_PAYLOAD_BYTES}; decisions are small: is this the "
                                 "right data?")
            rows.append((topic, payload))
        if not rows:
            return []
        too_many = max(0, len(rows) - self.max_rows)  # only the newest max_rows can stay
        rows = rows[too_many:]
        with self._lock:
            excess = self._depth + len(rows) - self.max_rows
            self._db.execute("BEGIN IMMEDIATE")
            try:
                dropped = 0
                if excess > 0:
                    dropped = self._db.execute(
                        "DELETE FROM outbox WHERE id IN "
                        "(SELECT id FROM outbox ORDER BY id LIMIT ?)", (excess,)).rowcount
                now = time.time_ns()
                ids = [self._db.execute(
                    "INSERT INTO outbox (topic, payload, created_ns) VALUES (?, ?, ?)",
                    (topic, payload, now)).lastrowid for topic, payload in rows]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._depth += len(rows) - dropped
            dropped += too_many
            self._counts["put"] += len(rows) + too_many
            self._counts["dropped_full"] += dropped
        if dropped:
            log.warning("outbox %s full (%d rows): dropped the %d oldest undelivered "
                        "decision(s)", self.path, self.max_rows, dropped)
        return ids

    def peek(self, n: int) -> list[OutboxRow]:
        """The oldest n rows (not removed)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, created_ns FROM outbox ORDER BY id LIMIT ?",
                (max(0, n),)).fetchall()
        return [OutboxRow(i, t, bytes(p), c) for i, t, p, c in rows]

    def ack(self, ids: Iterable[int]) -> int:
        """Delete delivered rows; unknown ids (already dropped/acked) are ignored."""
        ids = list(ids)
        if not ids:
            return 0
        removed = 0
        with self._lock:
            # A delete lost in a power cut only makes a delivered decision go out
            # again (at-least-once), so acks skip the fsync that puts need.
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for start in range(0, len(ids), 500):  # SQLite's variable limit
                        part = ids[start:start + 500]
                        removed += self._db.execute(
                            f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(part))})",
                            part).rowcount
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            finally:
                self._db.execute(f"PRAGMA synchronous={self._sync_pragma}")
            self._depth -= removed
            self._counts["acked"] += removed
        return removed

    def depth(self) -> int:
        with self._lock:
            return self._depth

    def stats(self) -> dict:
        with self._lock:
            return {**self._counts, "depth": self._depth}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
