"""The one protocol every live source implements (``Source``), and what they share.

A source's transport (paho's network loop in a thread or in a child process,
a serial reader thread) decodes incoming bytes into chunks and puts them on
a bounded queue; ``read(timeout_s)`` hands the caller whatever has arrived.
Sources are built from the configuration by ``sensors.live.factory``.

Queue policy when full: the OLDEST queued chunk is dropped (and counted in
``dropped_queue_full``) so that the newest one fits. A full queue means the
consumer is behind by ``queue_max`` chunks; the oldest of them are the ones
most likely to miss their window anyway (the aligner would flag them late),
while fresh data keeps the decisions current. Either way the aligner sees a
gap for the dropped chunk, never silently shifted data.

Clock check (``ClockCheck``, ``[daemon] max_clock_offset_s``): every chunk's
t0 is compared with the wall-clock time it is handed over at. Past the
allowed offset, a t0 that is no plausible time (before 2000 or after 2100,
e.g. seconds or milliseconds sent as ns) is refused and counted
``malformed["bad_time"]``, the warning naming the likely unit; a plausible
t0 (a device clock that is off, or a recording played live by ``edgefuse
simulate``) is kept by default (``clock_offset_action = "warn"``) and counted
``clock_offset``: refusing it would stop every decision of a node whose
clock was never set, while its streams still align with each other.
Warnings name the topic or port, the node and the modality, rate-limited per
(origin, node/modality, reason).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime, timezone

from edgefuse.runtime.core import wire
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import ConfigError, TransportError, WireFormatError
from edgefuse.sensors.live.accounting import (
    BAD_BINARY, BAD_DTYPE, BAD_FIELDS, BAD_HEADER, BAD_JSON, BAD_TIME, CLOCK_OFFSET, TRUNCATED,
    Counters, RejectedMessage, count_anomaly, count_rejection,
)

log = logging.getLogger(__name__)

DEFAULT_QUEUE_MAX = 1024
MAX_READ_BATCH = 4096  # read() never returns more than this many chunks at once
DEFAULT_MAX_CLOCK_OFFSET_S = 86_400.0
CLOCK_OFFSET_ACTIONS = ("warn", "refuse")


def _utc(ns: float) -> str:
    """ISO time of ns since the epoch, or the number where it is no date."""
    try:
        return datetime.fromtimestamp(ns / 1e9, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{ns:.3g} ns"


def _span(seconds: float) -> str:
    s = abs(seconds)
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.0f} s"


class ClockCheck:
    """A live chunk's t0 against the wall-clock time of its receipt (module docstring).

    max_offset_s: the |t0 - receipt time| allowed; 0 turns the check off.
    action: past it, for a plausible t0: "warn" (keep, count clock_offset) or
    "refuse" (count bad_time). An implausible t0 past it is always refused.
    wall_ns: the wall clock (tests inject one).
    """

    def __init__(self, max_offset_s: float = DEFAULT_MAX_CLOCK_OFFSET_S, action: str = "warn",
                 wall_ns: Callable[[], int] = time.time_ns):
        if not 0 <= max_offset_s <= 100 * 365.25 * 86400:
            raise ConfigError(f"max_clock_offset_s = {max_offset_s!r} is out of range; allowed: "
                              "0 (off) .. 100 years in seconds")
        if action not in CLOCK_OFFSET_ACTIONS:
            raise ConfigError(f"clock_offset_action = {action!r} is not allowed; allowed: "
                              f"{list(CLOCK_OFFSET_ACTIONS)}")
        self.max_offset_ns = int(max_offset_s * 1e9)
        self.action = action
        self._wall_ns = wall_ns

    @property
    def enabled(self) -> bool:
        return self.max_offset_ns > 0

    def judge(self, chunk: Chunk) -> tuple[str, str] | None:
        """None when t0 is near the receipt time; else (BAD_TIME, why): refuse, or
        (CLOCK_OFFSET, why): keep, count and warn."""
        if not self.max_offset_ns:
            return None
        now = self._wall_ns()
        t0 = chunk.t0_ns
        offset = t0 - now
        if abs(offset) <= self.max_offset_ns:
            return None
        hint = wire.t0_unit_hint(t0)
        if hint is not None:
            factor = {"seconds": 1e9, "milliseconds": 1e6, "microseconds": 1e3}[hint]
            return BAD_TIME, (f"t0_ns = {t0:.3g} looks like {hint} ({_utc(t0 * factor)} "
                              f"read as {hint}; received {_utc(now)}): the sender must send "
                              "ns since the epoch")
        where = "ahead of" if offset > 0 else "behind"
        what = (f"t0 {_utc(t0)} is {_span(offset / 1e9)} {where} the receipt time "
                f"{_utc(now)} (more than [daemon] max_clock_offset_s = "
                f"{self.max_offset_ns / 1e9:g})")
        if not wire.T0_PLAUSIBLE_MIN_NS <= t0 < wire.T0_PLAUSIBLE_MAX_NS:
            return BAD_TIME, (f"{what}; a t0 outside 2000..2100 is no clock time: set the "
                              "device clock (NTP) and send ns since the epoch")
        if self.action == "refuse":
            return BAD_TIME, f"{what}: refused (clock_offset_action = \"refuse\"); fix the " \
                             "device clock (NTP)"
        return CLOCK_OFFSET, (f"{what}: kept; the device clock is off (or a recording is "
                              "played live); fix it (NTP), or set max_clock_offset_s = 0 "
                              "to not check")

def classify_wire_error(payload: bytes) -> str:
    """Name the reason a payload failed runtime.core.wire decoding (called on errors only)."""
    if payload[:4] == wire.MAGIC:
        if len(payload) < wire.HEADER_SIZE:
            return TRUNCATED
        _, version, code, channels, *_ = wire.HEADER.unpack_from(payload)
        if code not in wire.DTYPES:
            return BAD_DTYPE
        if version != wire.VERSION or not 1 <= channels <= wire.MAX_CHANNELS:
            return BAD_HEADER
        if (len(payload) - wire.HEADER_SIZE) % (channels * wire.DTYPES[code].itemsize):
            return TRUNCATED
        return BAD_BINARY
    try:
        json.loads(payload)
    except (ValueError, RecursionError):  # ValueError covers decode errors and int digit limits
        return BAD_JSON
    return BAD_FIELDS


def decode_payload(payload: bytes, node: str, modality: str) -> Chunk:
    """A runtime.core.wire payload of (node, modality) -> Chunk; RejectedMessage naming the reason.

    Decoding only: the transport has checked the payload's size and modality
    already (MQTT: the subscriber; serial: the frame parser), and the channel
    count is the aligner's check (accounting's module docstring).
    """
    try:
        # The transport's bound was applied before this call; wire's own bound
        # must not be a second, different limit (max_payload_bytes may exceed it).
        return wire.decode_payload(payload, node, modality, max_payload=len(payload))
    except WireFormatError as exc:
        # The decoder names rate/time refusals itself; else judge by the payload.
        raise RejectedMessage(exc.reason or classify_wire_error(payload), str(exc)) from exc
    except (ValueError, OverflowError, RecursionError) as exc:
        # json.loads: > 4300-digit ints (ValueError), deep nesting (RecursionError);
        # numpy: ints beyond float range (OverflowError). Still just a bad message.
        raise RejectedMessage(classify_wire_error(payload),
                              f"{node}/{modality}: {type(exc).__name__}: {exc}") from None


class Source(ABC):
    """The one protocol of a live source; every implementation behaves the same way.

    name            "mqtt:HOST:PORT" or "serial:DEVICE": the daemon's logs and the
                    ``source`` label of the metrics
    open()          start the transport; returns without waiting for the peer
    read(timeout_s) the chunks that arrived, oldest first, waiting up to timeout_s
                    for the first; never raises on bad data (TransportError only
                    when called before open())
    close()         stop the transport; idempotent; what was queued stays readable
    stats()         a dict of numbers: counters (COUNTERS, ``queued``,
                    ``connected`` 0/1) and ``malformed``: reason -> count
    alive           False when the transport died and will not recover by itself
    wait_connected(timeout_s)  True once chunks can arrive (MQTT: subscribed;
                    serial: the port is open)
    last_error      why the transport is not up (a sentence), None while it is

    Properties only report: they never wait, read a pipe or start anything. A
    source whose transport has no thread of its own (the MQTT receiver process)
    moves its data in read(), wait_connected() and stats().

    The base owns the bounded queue (see the module docstring), the clock check
    and the counters; a transport hands each decoded chunk to ``_offer``.
    """

    COUNTERS = ("received", "decoded", "delivered", "oversized", "ignored",
                "dropped_queue_full", "connects", "reconnects", "disconnects", CLOCK_OFFSET)

    def __init__(self, name: str, queue_max: int = DEFAULT_QUEUE_MAX,
                 clock_check: ClockCheck | None = None):
        """clock_check: compare t0 with the receipt time (None: no check)."""
        if queue_max < 1:
            raise ValueError(f"queue_max must be >= 1, found {queue_max!r}")
        self.name = name
        self._queue: queue.Queue[Chunk] = queue.Queue(maxsize=queue_max)
        self._offer_lock = threading.Lock()
        self._counters = Counters(self.COUNTERS)
        self._opened = False
        self._last_error: str | None = None
        self._clock_check = clock_check if clock_check is not None and clock_check.enabled \
            else None

    # --- the protocol ----------------------------------------------------
    @abstractmethod
    def open(self) -> None:
        """Start the transport; does not wait for the peer to be there."""

    @abstractmethod
    def close(self) -> None:
        """Stop the transport (idempotent); chunks already queued can still be read."""

    @abstractmethod
    def wait_connected(self, timeout_s: float) -> bool:
        """True once chunks can arrive (MQTT: subscription acknowledged; serial: port
        open), waiting up to timeout_s (0: just look)."""

    @abstractmethod
    def _transport_up(self) -> bool:
        """stats()["connected"]: the transport is up (broker session, open port)."""

    @property
    def last_error(self) -> str | None:
        """Why the transport is not up (short, human: unknown CA, connection refused,
        cannot open /dev/x ...); None while it is up or before the first attempt.
        The daemon names it when a source stays down."""
        return self._last_error

    @property
    def alive(self) -> bool:
        """False when the transport died and will not recover by itself: the
        daemon's health check then stops the watchdog pings and systemd restarts
        the service. A lost connection that is being retried is alive."""
        return True

    def read(self, timeout_s: float) -> list[Chunk]:
        """Chunks that arrived, oldest first; waits up to timeout_s for the first one."""
        if not self._opened:
            raise TransportError(f"{self.name}: read() called before open()")
        out: list[Chunk] = []
        try:
            out.append(self._queue.get(timeout=max(0.0, timeout_s)) if timeout_s > 0
                       else self._queue.get_nowait())
            while len(out) < MAX_READ_BATCH:
                out.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        if out:
            self._counters.add("delivered", len(out))
        return out

    def stats(self) -> dict:
        snap = self._counters.stats()
        snap["queued"] = self._queue.qsize()
        snap["connected"] = self._transport_up()
        return snap

    def __enter__(self) -> Source:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def origin(self, node: str, modality: str) -> dict[str, str]:
        """Where a chunk of (node, modality) came from, for warnings: {"topic": ...}
        or {"port": ...}; empty where the source cannot tell."""
        return {}

    # --- for the transports ------------------------------------------------
    def _offer(self, chunk: Chunk, received_ns: int | None = None) -> None:
        """Check the clock, count the chunk decoded, stamp the arrival time, enqueue
        without blocking; when full, drop the oldest chunk (counted)."""
        if self._clock_check is not None:
            verdict = self._clock_check.judge(chunk)
            if verdict is not None:
                reason, why = verdict
                where = dict(self.origin(chunk.node, chunk.modality), node=chunk.node,
                             modality=chunk.modality)
                if reason == BAD_TIME:
                    count_rejection(self._counters, RejectedMessage(
                        BAD_TIME, f"seq {chunk.seq}: {why}"), **where)
                    return
                count_anomaly(self._counters, reason, f"seq {chunk.seq}: {why}", **where)
        self._counters.add("decoded")
        # The chunk is ours until it is queued: stamping the frozen dataclass here
        # is the one write after construction (received_ns is not compared).
        object.__setattr__(chunk, "received_ns",
                           time.monotonic_ns() if received_ns is None else received_ns)
        with self._offer_lock:  # several producers must not interleave drop+put
            while True:
                try:
                    self._queue.put_nowait(chunk)
                    return
                except queue.Full:
                    try:
                        self._queue.get_nowait()
                        self._counters.add("dropped_queue_full")
                    except queue.Empty:
                        pass
