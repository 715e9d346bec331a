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
than the oldest ones.

One owner: the outbox holds an exclusive ``flock`` on ``<path>.lock`` for
its whole life (the kernel releases it when the process dies, even by
SIGKILL). A second owner, in another process or this one, is refused at
once with OutboxInUseError: two publishers of one outbox would send every
row twice and delete each other's rows.

A full disk is an episode, not an error per decision: a put that SQLite
refuses with SQLITE_FULL (or ENOSPC) drops its decisions, counts them in
``dropped_disk_full`` and returns no ids; one warning marks the start of the
episode and one info line with the counts its end (the first write that
works again). Deletes of acknowledged rows that fail the same way are kept
in memory (only ids of rows still in the table, so bounded by the outbox)
and retried on the next ``ack``; until then ``peek`` skips those rows, so an
acknowledged decision is never published again while its delete waits. Only
a restart in that state sends them once more (at-least-once).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from edgefuse.runtime.core.errors import ConfigError, InputError
from edgefuse.runtime.core.ratelimit import WarnLimiter

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SYNC_MODES = ("full", "normal")
DEFAULT_MAX_ROWS = 100_000
MAX_ROWS_LIMIT = 100_000_000
MAX_PAYLOAD_BYTES = 256 * 1024
SQLITE_FULL = 13                 # primary result code of "database or disk is full"
SQLITE_IOERR_SHMSIZE = 4874      # growing the WAL index (-shm) failed: also no space
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
EPISODE_LOG_PERIOD_S = 60.0      # a disk that flaps between full and not logs this rarely


@dataclass(frozen=True)
class OutboxSettings:
    """How an outbox keeps its rows; the one place these values are checked (the
    ``[sink.mqtt]`` settings build one, so a bad value fails when the config loads)."""

    max_rows: int = DEFAULT_MAX_ROWS
    synchronous: str = "full"

    def __post_init__(self) -> None:
        if self.synchronous not in SYNC_MODES:
            raise ConfigError(f"synchronous = {self.synchronous!r} is not allowed; allowed: "
                              f"{list(SYNC_MODES)}")
        if not 1 <= self.max_rows <= MAX_ROWS_LIMIT:
            raise ConfigError(f"max_rows = {self.max_rows!r} is out of range; allowed: "
                              f"1..{MAX_ROWS_LIMIT}")


class OutboxInUseError(ConfigError):
    """Another process (or another Outbox of this one) owns the outbox file."""

    def __init__(self, message: str, *, path: str):
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class OutboxRow:
    id: int
    topic: str
    payload: bytes
    created_ns: int


def is_disk_full(exc: BaseException) -> bool:
    """True for the errors a full filesystem (or quota) gives: SQLITE_FULL, ENOSPC."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
        if code is not None:
            return code & 0xFF == SQLITE_FULL or code == SQLITE_IOERR_SHMSIZE
        return "database or disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


class Outbox:
    """Thread-safe (one connection behind a lock); see the module docstring."""

    def __init__(self, path: str | Path, *, max_rows: int = DEFAULT_MAX_ROWS,
                 synchronous: str = "full"):
        settings = OutboxSettings(max_rows=max_rows, synchronous=synchronous)  # checks them
        self.path = Path(path)
        self.max_rows = settings.max_rows
        self._lock = threading.Lock()
        self._counts = {"put": 0, "acked": 0, "dropped_full": 0, "dropped_disk_full": 0,
                        "delete_failures": 0}
        # Acknowledged rows whose DELETE failed (disk full). Always a subset of the
        # table's ids, so it is bounded by the rows on disk and depth stays exact.
        self._unacked: set[int] = set()
        self._episode: dict[str, int] | None = None  # counts of the disk-full episode going on
        # Episode lines are logged after self._lock is released (never log under
        # it); the limiters have their own lock as two threads may report.
        self._log_lock = threading.Lock()
        self._episode_log = WarnLimiter(log, period_s=EPISODE_LOG_PERIOD_S)
        self._recovered_log = WarnLimiter(log, period_s=EPISODE_LOG_PERIOD_S, level=logging.INFO)
        self._closed = False
        self._lock_fd = self._take_ownership()
        try:
            self._open_db(settings.synchronous)
        except BaseException:
            os.close(self._lock_fd)
            raise
        if self._depth:
            log.info("outbox %s holds %d undelivered row(s) from before", self.path, self._depth)

    def _take_ownership(self) -> int:
        """Open and flock ``<path>.lock``; OutboxInUseError when someone else holds it.

        flock (not fcntl/POSIX locks): it belongs to the open file, so a second
        Outbox in this same process conflicts too; the descriptor is not inherited
        by exec'd children (PEP 446), so a child process cannot keep it after us.
        The lock file stays on disk: unlinking it would let a third process lock a
        fresh file while the second still holds the old one.
        """
        lock_path = Path(f"{self.path}.lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise InputError(f"cannot open the outbox lock {lock_path}: {exc.strerror}; the "
                             "outbox folder must be writable by this user",
                             path=str(self.path)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                pass
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise InputError(f"cannot lock the outbox {self.path} ({lock_path}): "
                                 f"{exc.strerror}; put the outbox on a local filesystem",
                                 path=str(self.path)) from exc
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise OutboxInUseError(
                f"outbox {self.path} is in use: {who} holds {lock_path}; one edgefuse process "
                "owns an outbox at a time, so stop the other daemon or give this one its own "
                "outbox (--outbox PATH or [sink.mqtt] outbox)", path=str(self.path)) from None
        try:  # the pid only makes the refusal above more helpful: best effort
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        return fd

    def _open_db(self, synchronous: str) -> None:
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
            if version == 0:  # a new file; an existing one is not written to (full disk)
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                    "topic TEXT NOT NULL, payload BLOB NOT NULL, created_ns INTEGER NOT NULL)")
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._depth = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            hint = ("free space on its filesystem" if is_disk_full(exc) else
                    "if it is not an edgefuse outbox, move it away")
            raise InputError(f"cannot open outbox {self.path}: {exc}; {hint}",
                             path=str(self.path)) from exc

    def put(self, topic: str, payload: bytes | str) -> int | None:
        """Append one message; returns its id (None when the disk is full).
        Drops the oldest rows when the outbox is full."""
        ids = self.put_many([(topic, payload)])
        return ids[0] if ids else None

    def put_many(self, items: Iterable[tuple[str, bytes | str]]) -> list[int]:
        """Append several messages in ONE transaction (one fsync); returns their ids.

        On a full disk nothing is appended and [] is returned: the messages are
        counted in ``dropped_disk_full`` (see the module docstring), not raised.
        """
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
            note, dropped = None, 0
            excess = self._depth + len(rows) - self.max_rows
            try:
                self._db.execute("BEGIN IMMEDIATE")
                if excess > 0:
                    dropped = self._db.execute(
                        "DELETE FROM outbox WHERE id IN "
                        "(SELECT id FROM outbox ORDER BY id LIMIT ?)", (excess,)).rowcount
                now = time.time_ns()
                ids = [self._db.execute(
                    "INSERT INTO outbox (topic, payload, created_ns) VALUES (?, ?, ?)",
                    (topic, payload, now)).lastrowid for topic, payload in rows]
                self._db.execute("COMMIT")
            except BaseException as exc:
                self._rollback()
                if not is_disk_full(exc):
                    raise
                self._counts["dropped_disk_full"] += len(rows) + too_many
                note = self._disk_full(exc, dropped=len(rows) + too_many)
                ids = []
            else:
                if dropped and self._unacked:  # the bound may have deleted acknowledged rows
                    self._unacked = self._existing(self._unacked)
                self._depth += len(rows) - dropped
                dropped += too_many
                self._counts["put"] += len(rows) + too_many
                self._counts["dropped_full"] += dropped
                note = self._disk_ok()
        self._note(note)
        if ids and dropped:
            log.warning("outbox %s full (%d rows): dropped the %d oldest undelivered "
                        "decision(s)", self.path, self.max_rows, dropped)
        return ids

    def peek(self, n: int) -> list[OutboxRow]:
        """The oldest n rows (not removed), skipping acknowledged rows whose delete waits."""
        n = max(0, n)
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, created_ns FROM outbox ORDER BY id LIMIT ?",
                (n + len(self._unacked),)).fetchall()
            rows = [r for r in rows if r[0] not in self._unacked][:n]
        return [OutboxRow(i, t, bytes(p), c) for i, t, p, c in rows]

    def ack(self, ids: Iterable[int]) -> int:
        """Delete delivered rows; returns how many were deleted now.

        Unknown ids (already dropped/acked) are ignored. On a full disk the ids
        are kept and deleted by a later call (an empty one will do): they are
        counted in ``acks_pending`` meanwhile and ``peek`` skips them.
        """
        ids = list(ids)
        with self._lock:
            if not ids and not self._unacked:
                return 0
            note = None
            todo = sorted(self._unacked.union(ids))
            removed = 0
            # A delete lost in a power cut only makes a delivered decision go out
            # again (at-least-once), so acks skip the fsync that puts need.
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for start in range(0, len(todo), 500):  # SQLite's variable limit
                    part = todo[start:start + 500]
                    removed += self._db.execute(
                        f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(part))})",
                        part).rowcount
                self._db.execute("COMMIT")
            except BaseException as exc:
                self._rollback()
                if not is_disk_full(exc):
                    raise
                self._counts["delete_failures"] += 1
                # Keep the new ids that are rows (reads work on a full disk); the
                # ones kept before still are: only our own deletes remove rows.
                self._unacked |= self._existing(set(ids) - self._unacked)
                note = self._disk_full(exc, dropped=0)
                removed = 0
            else:
                self._unacked.clear()
                self._depth -= removed
                self._counts["acked"] += removed
                note = self._disk_ok()
            finally:
                self._db.execute(f"PRAGMA synchronous={self._sync_pragma}")
        self._note(note)
        return removed

    def depth(self) -> int:
        """Rows still waiting for the broker (acknowledged ones whose delete waits excluded)."""
        with self._lock:
            return self._depth - len(self._unacked)

    @property
    def disk_full(self) -> bool:
        """True from a write refused for lack of space until the next one that works."""
        return self._episode is not None

    def stats(self) -> dict:
        with self._lock:
            return {**self._counts, "acks_pending": len(self._unacked),
                    "disk_full": int(self._episode is not None),
                    "depth": self._depth - len(self._unacked)}

    def close(self) -> None:
        """Close the database and give up ownership; a second call does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            unacked = len(self._unacked)
            try:
                self._db.close()
            finally:
                os.close(self._lock_fd)  # releases the flock
        if unacked:
            log.warning("outbox %s closed with %d acknowledged row(s) not deleted (disk full); "
                        "they are published once more after the next start", self.path, unacked)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals (called with self._lock held, but _note) ------------------
    def _rollback(self) -> None:
        # SQLite rolls back by itself on SQLITE_FULL; a ROLLBACK then would raise
        # "no transaction is active" and hide the real error.
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _existing(self, ids: Iterable[int]) -> set[int]:
        """Those of ids that are rows of the table."""
        ids = sorted(ids)
        found: set[int] = set()
        for start in range(0, len(ids), 500):  # SQLite's variable limit
            part = ids[start:start + 500]
            found.update(i for (i,) in self._db.execute(
                f"SELECT id FROM outbox WHERE id IN ({','.join('?' * len(part))})", part))
        return found

    def _disk_full(self, exc: BaseException, dropped: int) -> tuple | None:
        """Count a write refused for lack of space; the line to log when an episode starts."""
        note = None
        if self._episode is None:
            self._episode = {"dropped": 0, "delete_failures": 0}
            note = (self._episode_log, ("disk_full", str(self.path)),
                    "outbox %s: the disk is full (%s): decisions that cannot be queued are "
                    "dropped and counted (dropped_disk_full), acknowledged rows are deleted "
                    "later; other sinks go on; free space on the outbox's filesystem",
                    (self.path, exc))
        self._episode["dropped"] += dropped
        self._episode["delete_failures"] += 0 if dropped else 1
        return note

    def _disk_ok(self) -> tuple | None:
        """A write worked: the line to log when that ends an episode."""
        if self._episode is None:
            return None
        episode, self._episode = self._episode, None
        return (self._recovered_log, ("disk_ok", str(self.path)),
                "outbox %s: writes work again; while the disk was full %d decision(s) could "
                "not be queued and %d delete(s) of acknowledged rows failed",
                (self.path, episode["dropped"], episode["delete_failures"]))

    def _note(self, note: tuple | None) -> None:
        """Log an episode line (called without self._lock)."""
        if note is not None:
            limiter, key, msg, args = note
            with self._log_lock:
                limiter.warn(key, msg, *args)
