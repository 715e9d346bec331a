"""What every source counts, and why it refuses a message.

Standard library only: the MQTT receiver process (sensors.mqtt_receiver)
imports this without numpy, so it stays small.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from edgefuse.runtime.errors import WireFormatError

log = logging.getLogger(__name__)

# Why an incoming message was skipped (keys of stats()["malformed"]).
BAD_TOPIC = "bad_topic"                # MQTT topic does not match the pattern
UNKNOWN_MODALITY = "unknown_modality"  # modality not in the allowed set
WRONG_CHANNELS = "wrong_channels"      # channel count differs from the configured one
BAD_JSON = "bad_json"                  # JSON does not parse
BAD_FIELDS = "bad_fields"              # JSON parses but a chunk field is missing/invalid
BAD_HEADER = "bad_header"              # binary header: wrong version/channels
BAD_DTYPE = "bad_dtype"                # binary header: unknown dtype code
TRUNCATED = "truncated"                # binary body shorter than its header says; partial frame
BAD_BINARY = "bad_binary"              # binary header values out of range (rate ...)
BAD_CSV = "bad_csv"                    # CSV line without modality,t_ns,values or non-numeric
BAD_FRAME = "bad_frame"                # serial frame header CRC/length/name invalid
BAD_CRC = "bad_crc"                    # serial frame body CRC mismatch


class RejectedPayload(WireFormatError):
    """A message was refused; ``reason`` is one of the constants above."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def unknown_modality(modality: str, allowed: Iterable[str]) -> RejectedPayload:
    return RejectedPayload(
        UNKNOWN_MODALITY,
        f"modality {modality!r} is not one of {sorted(allowed)}; "
        "fix the sender or add it to allowed_modalities")


class Counters:
    """Thread-safe counters: plain names plus ``malformed`` by reason."""

    def __init__(self, names: Iterable[str]):
        self._lock = threading.Lock()
        self._plain = {name: 0 for name in names}
        self._malformed: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> int:
        """Count; returns the value before adding."""
        with self._lock:
            before = self._plain.get(name, 0)
            self._plain[name] = before + n
        return before

    def malformed(self, reason: str, n: int = 1) -> bool:
        """Count; True the first time this reason is seen (log that one loudly)."""
        with self._lock:
            seen = self._malformed.get(reason, 0)
            self._malformed[reason] = seen + n
        return seen == 0

    def snapshot(self) -> dict:
        with self._lock:
            out: dict = dict(self._plain)
            out["malformed"] = dict(self._malformed)
        out["malformed_total"] = sum(out["malformed"].values())
        return out


def count_rejection(counters: Counters, exc: RejectedPayload) -> None:
    """Count a refused message; warn on the first of each reason, then debug only."""
    if exc.reason == "oversized":
        first = counters.add("oversized") == 0
    else:
        first = counters.malformed(exc.reason)
    log.log(logging.WARNING if first else logging.DEBUG,
            "skipped message (%s): %s; further ones are counted in stats()", exc.reason, exc)
