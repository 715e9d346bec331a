"""The one interface every live source implements, and what they share.

A source owns a transport thread (paho's network loop, a serial reader)
that decodes incoming bytes into chunks and puts them on a bounded queue;
``read(timeout_s)`` hands the caller whatever has arrived.

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
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone

from edgefuse.runtime.core import wire
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import ConfigError, TransportError, WireFormatError
from edgefuse.sensors.live.accounting import (  # noqa: F401 - re-exported for the sources
    BAD_BINARY, BAD_CRC, BAD_CSV, BAD_DTYPE, BAD_FIELDS, BAD_FRAME, BAD_HEADER, BAD_JSON,
    BAD_RATE, BAD_TIME, BAD_TOPIC, CLOCK_OFFSET, TRUNCATED, UNKNOWN_MODALITY, WRONG_CHANNELS,
    Counters, RejectedPayload, count_anomaly, count_rejection, unknown_modality,
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
    """Name the reason a payload failed runtime.wire decoding (called on errors only)."""
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


class ChunkValidator:
    """Checks a stream against the allowed modalities and their channel counts.

    allowed: modalities accepted (None = any).
    channels: modality -> channel count, where known (from the model contract).
    """

    def __init__(self, allowed: Iterable[str] | None = None,
                 channels: Mapping[str, int] | None = None):
        self.allowed = None if allowed is None else frozenset(allowed)
        self.channels = dict(channels or {})

    def check_modality(self, modality: str) -> None:
        if self.allowed is not None and modality not in self.allowed:
            raise unknown_modality(modality, self.allowed)

    def check_chunk(self, chunk: Chunk) -> Chunk:
        self.check_modality(chunk.modality)
        expected = self.channels.get(chunk.modality)
        if expected is not None and chunk.channels != expected:
            raise RejectedPayload(
                WRONG_CHANNELS,
                f"{chunk.node}/{chunk.modality} seq {chunk.seq}: expected {expected} "
                f"channel(s), found {chunk.channels}")
        return chunk

    def decode(self, payload: bytes, node: str, modality: str, max_payload: int) -> Chunk:
        """Size check first, then modality, then runtime.wire decoding, then channels."""
        if len(payload) > max_payload:
            raise RejectedPayload(
                "oversized", f"{node}/{modality}: payload of {len(payload)} bytes exceeds "
                f"the limit of {max_payload}; send smaller chunks or raise max_payload_bytes")
        self.check_modality(modality)
        try:
            chunk = wire.decode_payload(payload, node, modality, max_payload)
        except WireFormatError as exc:
            # The decoder names rate/time refusals itself; else judge by the payload.
            raise RejectedPayload(exc.reason or classify_wire_error(payload), str(exc)) from exc
        except (ValueError, OverflowError, RecursionError) as exc:
            # json.loads: > 4300-digit ints (ValueError), deep nesting (RecursionError);
            # numpy: ints beyond float range (OverflowError). Still just a bad message.
            raise RejectedPayload(classify_wire_error(payload),
                                  f"{node}/{modality}: {type(exc).__name__}: {exc}") from None
        return self.check_chunk(chunk)


class Source(ABC):
    """open() / read(timeout_s) / close(), a context manager, stats() and connected.

    Subclasses run a transport thread that calls ``_offer(chunk)``, and count
    with ``self._counters``. read() never raises on bad data; it raises
    TransportError only when called on a source that was never opened.
    """

    COUNTERS = ("received", "decoded", "delivered", "oversized", "ignored",
                "dropped_queue_full", "connects", "reconnects", "disconnects", CLOCK_OFFSET)

    def __init__(self, queue_max: int = DEFAULT_QUEUE_MAX, clock_check: ClockCheck | None = None):
        """clock_check: compare t0 with the receipt time (None: no check)."""
        if queue_max < 1:
            raise ValueError(f"queue_max must be >= 1, found {queue_max!r}")
        self._queue: queue.Queue[Chunk] = queue.Queue(maxsize=queue_max)
        self._offer_lock = threading.Lock()
        self._counters = Counters(self.COUNTERS)
        self._opened = False
        self._clock_check = clock_check if clock_check is not None and clock_check.enabled \
            else None

    # --- interface -------------------------------------------------------
    @abstractmethod
    def open(self) -> None:
        """Start the transport thread; does not wait for the peer to be there."""

    @abstractmethod
    def close(self) -> None:
        """Stop the transport thread; chunks already queued can still be read."""

    @property
    @abstractmethod
    def connected(self) -> bool:
        """True while the transport is up (broker session, open serial port)."""

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until the transport is up (MQTT: subscribed; serial: port open)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while not self.connected:
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
        return True

    #: Why the last connection attempt failed (short, human); None while connected
    #: or before the first attempt. The daemon names it when a source stays down.
    last_error: str | None = None

    @property
    def alive(self) -> bool:
        """False when the transport died and will not recover by itself: the
        daemon's health check then stops the watchdog pings and systemd restarts
        the service. A lost connection that is being retried is alive."""
        return True

    def read(self, timeout_s: float) -> list[Chunk]:
        """Chunks that arrived, oldest first; waits up to timeout_s for the first one."""
        if not self._opened:
            raise TransportError(f"{type(self).__name__}.read() called before open()")
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
        snap = self._counters.snapshot()
        snap["queued"] = self._queue.qsize()
        snap["connected"] = self.connected
        return snap

    def __enter__(self) -> Source:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def origin(self, node: str, modality: str) -> dict[str, str]:
        """Where a chunk of (node, modality) came from, for warnings: {"topic": ...}
        or {"port": ...}; empty where the source cannot tell."""
        return {}

    # --- for transport threads ------------------------------------------
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
                    count_rejection(self._counters, RejectedPayload(
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

    def _reject(self, exc: RejectedPayload) -> None:
        count_rejection(self._counters, exc)
