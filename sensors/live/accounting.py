"""What every source counts, and why it refuses a message.

Every refused message is counted by reason and warned about with its topic
(or port), node and modality where known: the first of each (where, reason)
at once, then at most one line a minute with the count since
(runtime.ratelimit). A flood of distinct topics cannot flood the log either:
past REJECTION_BURST lines of one reason in a minute, the rest are summed up
in one line per reason and minute.

Each check has one owner: the transport checks a message's size and
modality (MQTT: the subscriber; serial: the line/frame parser) before
decoding it; the channel count is the aligner's (runtime.core.aligner), the
same for live and replay, so no source counts it.

Standard library only: the MQTT receiver process (sensors.live.mqtt_receiver)
imports this without numpy, so it stays small.
"""
from __future__ import annotations

import difflib
import logging
import threading
import time
from collections.abc import Callable, Iterable

from edgefuse.runtime.core.errors import InputError
from edgefuse.runtime.core.ratelimit import DEFAULT_PERIOD_S, WarnLimiter

log = logging.getLogger(__name__)

REJECTION_BURST = 20   # lines per reason and period before they are summed up

# Why an incoming message was skipped (keys of stats()["malformed"]).
BAD_TOPIC = "bad_topic"                # MQTT topic does not match the pattern
UNKNOWN_MODALITY = "unknown_modality"  # modality not in the allowed set
BAD_JSON = "bad_json"                  # JSON does not parse
BAD_FIELDS = "bad_fields"              # JSON parses but a chunk field is missing/invalid
BAD_HEADER = "bad_header"              # binary header: wrong version/channels
BAD_DTYPE = "bad_dtype"                # binary header: unknown dtype code
TRUNCATED = "truncated"                # binary body shorter than its header says; partial frame
BAD_BINARY = "bad_binary"              # binary header values out of range (rate ...)
BAD_CSV = "bad_csv"                    # CSV line without modality,t_ns,values or non-numeric
BAD_FRAME = "bad_frame"                # serial frame header CRC/length/name invalid
BAD_CRC = "bad_crc"                    # serial frame body CRC mismatch
BAD_RATE = "bad_rate"                  # rate_hz outside [0.001, 1e7) Hz (or not a number)
BAD_TIME = "bad_time"                  # t0_ns outside [0, 2**62), or far from the receipt time
# A kept chunk whose t0 is far from its receipt time (counted in stats()[CLOCK_OFFSET]).
CLOCK_OFFSET = "clock_offset"


OVERSIZED = "oversized"                # counted on its own: stats()["oversized"]


class RejectedMessage(InputError):
    """A source refused one incoming message (topic, size, modality or encoding);
    ``reason`` is one of the constants above: the counter it is counted in."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """" (did you mean 'acoustic'?)" for a near miss (case, a typo), else ""."""
    known = sorted(known)
    for k in known:
        if k.lower() == name.lower():
            return f" (did you mean {k!r}?)"
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_modality(modality: str, allowed: frozenset[str] | None) -> None:
    """Raise RejectedMessage(UNKNOWN_MODALITY) when allowed is a set without modality."""
    if allowed is not None and modality not in allowed:
        raise unknown_modality(modality, allowed)


def unknown_modality(modality: str, allowed: Iterable[str]) -> RejectedMessage:
    allowed = sorted(allowed)
    return RejectedMessage(
        UNKNOWN_MODALITY,
        f"modality {modality!r} is not one of {allowed}{did_you_mean(modality, allowed)}; "
        "fix the sender or add it to allowed_modalities")


class RejectionLog:
    """Rate-limited rejection warnings of one source (see the module docstring)."""

    def __init__(self, logger: logging.Logger = log, *, period_s: float = DEFAULT_PERIOD_S,
                 burst: int = REJECTION_BURST, clock: Callable[[], float] = time.monotonic):
        self.period_s = period_s
        self.burst = burst
        self._clock = clock
        self._per_key = WarnLimiter(logger, period_s=period_s, clock=clock)
        self._flood = WarnLimiter(logger, period_s=period_s, clock=clock)
        self._windows: dict[str, list] = {}   # reason -> [window start, lines logged]
        # WarnLimiter is not thread-safe and several transport threads may share
        # one source; the lock only orders the bookkeeping and its log call.
        self._lock = threading.Lock()

    def warn(self, where: str, reason: str, msg: str, *args: object) -> None:
        with self._lock:
            now = self._clock()
            window = self._windows.get(reason)
            if window is None or now - window[0] >= self.period_s:
                window = self._windows[reason] = [now, 0]
            if window[1] < self.burst:
                if self._per_key.warn((where, reason), msg, *args):
                    window[1] += 1
                return
            self._flood.warn(reason, "more than %d sources sent %s messages within %.0f s; "
                             "latest: " + msg, self.burst, reason, self.period_s, *args)


class Counters:
    """Thread-safe counters: plain names plus ``malformed`` by reason.

    ``rejections``: the rate-limited warnings of count_rejection for this owner.
    """

    def __init__(self, names: Iterable[str]):
        self._lock = threading.Lock()
        self._plain = {name: 0 for name in names}
        self._malformed: dict[str, int] = {}
        self.rejections = RejectionLog()

    def add(self, name: str, n: int = 1) -> int:
        """Count; returns the value before adding."""
        with self._lock:
            before = self._plain.get(name, 0)
            self._plain[name] = before + n
        return before

    def malformed(self, reason: str, n: int = 1) -> None:
        """Count n messages refused for reason (stats()["malformed"][reason])."""
        with self._lock:
            self._malformed[reason] = self._malformed.get(reason, 0) + n

    def stats(self) -> dict:
        with self._lock:
            out: dict = dict(self._plain)
            out["malformed"] = dict(self._malformed)
        out["malformed_total"] = sum(out["malformed"].values())
        return out


def _origin(topic: str | None, port: str | None, node: str | None,
            modality: str | None) -> tuple[str, str]:
    """(words naming where a message came from, rate-limit key of that origin)."""
    parts = [f"topic {topic!r}" if topic else f"port {port}" if port else "",
             f"node {node!r}" if node else "", f"modality {modality!r}" if modality else ""]
    words = ", ".join(p for p in parts if p) or "an unknown origin"
    return words, f"{topic or port or ''} {node}/{modality}"


def count_rejection(counters: Counters, exc: RejectedMessage, *, topic: str | None = None,
                    node: str | None = None, modality: str | None = None,
                    port: str | None = None) -> None:
    """Count a refused message and warn, naming where it came from.

    topic (MQTT) or port (serial), and node/modality where they were parsed;
    the warning is rate-limited per (topic or port, node/modality, reason).
    """
    if exc.reason == OVERSIZED:
        counters.add(OVERSIZED)
    else:
        counters.malformed(exc.reason)
    origin, where = _origin(topic, port, node, modality)
    counters.rejections.warn(where, exc.reason, "skipped a message from %s: %s: %s; "
                             "counted in stats()[%r]", origin, exc.reason, exc,
                             OVERSIZED if exc.reason == OVERSIZED else "malformed")


def count_anomaly(counters: Counters, name: str, detail: str, *, topic: str | None = None,
                  node: str | None = None, modality: str | None = None,
                  port: str | None = None) -> None:
    """Count a message that was KEPT but is suspect (stats()[name]) and warn like
    count_rejection: origin named, rate-limited per (origin, node/modality, name)."""
    counters.add(name)
    origin, where = _origin(topic, port, node, modality)
    counters.rejections.warn(where, name, "message from %s: %s: %s; counted in stats()[%r]",
                             origin, name, detail, name)
