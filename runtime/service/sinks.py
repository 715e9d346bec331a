"""Where decisions go: ``write(decision)``, ``flush()``, ``close()``.

- JsonlSink: one canonical JSON line per decision, to a file or stdout.
- MqttDecisionSink: QoS 1 to ``edgefuse/{node}/decisions`` through a durable
  Outbox. write() only appends to the outbox (an fsync, no network); a
  publisher thread drains it while the broker is there and deletes a row
  only after the broker's PUBACK for it. While the broker is away paho
  reconnects with capped exponential backoff and the rows wait on disk.
  On a full disk the outbox drops and counts what it cannot queue instead
  of raising (see runtime.outbox), so the other sinks go on.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import paho.mqtt.client as mqtt

from edgefuse.sensors.live import mqtt_client
from edgefuse.runtime.core.decision import Decision
from edgefuse.runtime.core.errors import ConfigError
from edgefuse.runtime.service.outbox import Outbox
from edgefuse.runtime.core.ratelimit import WarnLimiter

log = logging.getLogger(__name__)

DEFAULT_DECISION_TOPIC = "edgefuse/{node}/decisions"
ACK_BATCH_S = 0.005
QUOTA_EXCEEDED = 0x97  # MQTT 5 PUBACK reason: try again later


class Sink(ABC):
    @abstractmethod
    def write(self, decision: Decision) -> None: ...

    def write_many(self, decisions: Iterable[Decision]) -> None:
        """Several decisions at once (MqttDecisionSink: one outbox transaction)."""
        for decision in decisions:
            self.write(decision)

    def flush(self) -> None:  # noqa: B027 - optional for sinks that do not buffer
        """Push buffered decisions out."""

    def stats(self) -> dict:
        """Numeric counters of this sink (exported as metrics)."""
        return {}

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonlSink(Sink):
    """JSON Lines to ``target``: a path, "-" for stdout, or an open text stream.

    A path is truncated unless append=True; fsync=True fsyncs on every flush().
    """

    def __init__(self, target: str | Path | TextIO = "-", *, append: bool = False,
                 fsync: bool = False):
        self._fsync = fsync
        if target == "-":
            self._file, self._owned = sys.stdout, False
        elif isinstance(target, (str, Path)):
            self._file = open(target, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
            self._owned = True
        else:
            self._file, self._owned = target, False
        self.written = 0

    def write(self, decision: Decision) -> None:
        self._file.write(decision.to_json() + "\n")
        self.written += 1

    def stats(self) -> dict:
        return {"written": self.written}

    def flush(self) -> None:
        self._file.flush()
        if self._fsync and self._owned:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._file.close()


class MqttDecisionSink(Sink):
    """Decisions to MQTT with QoS 1 through a durable outbox (see module docstring).

    outbox: an Outbox, or a path to open one (then the sink closes it).
    max_inflight: rows published but not yet acknowledged (bounds paho's memory).
    Rows the broker refuses (PUBACK reason >= 0x80) are retried after a capped
    exponential delay (retry_min_s .. retry_max_s) and counted in ``rejected``.
    """

    def __init__(self, outbox: Outbox | str | Path, settings: mqtt_client.MqttSettings, *,
                 topic: str = DEFAULT_DECISION_TOPIC, max_inflight: int = 20,
                 retry_min_s: float = 0.5, retry_max_s: float = 30.0):
        if "{node}" not in topic or any(c in topic for c in "+#"):
            raise ConfigError(f"decision topic must contain {{node}} and no wildcards, "
                              f"found {topic!r}")
        if not 1 <= max_inflight <= 1000:
            raise ConfigError(f"max_inflight must be 1..1000, found {max_inflight!r}")
        self._owns_outbox = not isinstance(outbox, Outbox)
        self.outbox = Outbox(outbox) if self._owns_outbox else outbox
        self.topic = topic
        self.max_inflight = max_inflight
        self._retry = (retry_min_s, retry_max_s)
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}      # paho mid -> outbox row id
        self._early: dict[int, object] = {}      # PUBACKs that beat publish() returning
        self._acked: list[int] = []              # row ids to delete (by the publisher thread)
        self._cooldown: dict[int, float] = {}    # refused row id -> monotonic time to retry
        self._refusals: dict[int, int] = {}      # refused row id -> times refused
        self._counts = {"published": 0, "acked": 0, "rejected": 0, "connects": 0,
                        "disconnects": 0}
        self._warner = WarnLimiter(log)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._closing = False
        self._client = mqtt_client.make_client(settings, "decisions")
        self._client.max_inflight_messages_set(max_inflight)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        mqtt_client.start(self._client, settings)
        self._thread = threading.Thread(target=self._run, name="decision-publisher", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def write(self, decision: Decision) -> None:
        self.write_many([decision])

    def write_many(self, decisions: Iterable[Decision]) -> None:
        """Durable once this returns; one fsync for the whole batch.

        On a full disk the outbox drops the batch and counts it (stats
        ``outbox_dropped_disk_full``, one warning per episode) instead of raising,
        so the daemon's other sinks keep taking decisions.
        """
        items = [(self.topic.format(node=d.node), d.to_json().encode()) for d in decisions]
        if items and self.outbox.put_many(items):
            self._wake.set()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until the outbox is empty; False when rows remain after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while self.outbox.depth() and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.02)
        return self.outbox.depth() == 0

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop publishing; undelivered rows stay in the outbox for the next start."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        self._closing = True  # our own disconnect is not a lost broker
        mqtt_client.stop(self._client)
        self._apply_acks()
        if self._owns_outbox:
            self.outbox.close()

    def stats(self) -> dict:
        with self._lock:
            out = {**self._counts, "inflight": len(self._inflight)}
        out.update({f"outbox_{k}": v for k, v in self.outbox.stats().items()})
        out["connected"] = self.connected
        return out

    @property
    def last_error(self) -> str | None:
        """Why the publisher's last connection attempt failed; None while connected."""
        return self._client.status.last_error

    # --- paho callbacks (network thread: record and wake, nothing slow) ---
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return  # mqtt_client logs the refusal with its cause, rate-limited
        with self._lock:
            self._counts["connects"] += 1
        self._connected.set()
        self._wake.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected.is_set() and not self._closing:
            with self._lock:
                self._counts["disconnects"] += 1
            self._warner.warn("lost", "decision publisher lost the broker (%s); decisions "
                              "wait in the outbox", reason_code)
        self._connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            row_id = self._inflight.pop(mid, None)
            if row_id is None:
                self._early[mid] = reason_code
            else:
                self._settle(row_id, reason_code)
        self._wake.set()

    def _settle(self, row_id: int, reason_code) -> None:
        """Under self._lock: a PUBACK arrived for row_id."""
        if getattr(reason_code, "is_failure", False):
            refused = self._refusals.get(row_id, 0) + 1
            self._refusals[row_id] = refused
            self._counts["rejected"] += 1
            delay = min(self._retry[0] * 2 ** (refused - 1), self._retry[1])
            self._cooldown[row_id] = time.monotonic() + delay
            log.log(logging.WARNING if refused == 1 else logging.DEBUG,
                    "broker refused decision row %d (%s); retrying in %.1f s (check the "
                    "broker ACL for the decision topic)", row_id, reason_code, delay)
        else:
            self._refusals.pop(row_id, None)
            self._acked.append(row_id)

    # --- publisher thread ----------------------------------------------------
    def _apply_acks(self) -> None:
        with self._lock:
            acked, self._acked = self._acked, []
        # Called even with nothing new: the outbox then retries the deletes a full
        # disk refused (it keeps those ids and peek() skips them, so an
        # acknowledged row is not published again meanwhile).
        n = self.outbox.ack(acked)
        if n:
            with self._lock:
                self._counts["acked"] += n

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            # Gather the PUBACKs and decisions of a few ms into one outbox
            # transaction instead of one per wake-up (less GIL and disk churn).
            self._stop.wait(ACK_BATCH_S)
            self._wake.clear()
            try:
                self._apply_acks()
                if self._connected.is_set():
                    self._publish_some()
            except Exception:  # noqa: BLE001 - keep publishing; the rows are safe on disk
                log.exception("decision publisher failed; retrying")
                self._stop.wait(self._retry[0])

    def _publish_some(self) -> None:
        now = time.monotonic()
        with self._lock:
            busy = set(self._inflight.values()) | set(self._acked)
            self._cooldown = {r: t for r, t in self._cooldown.items() if t > now}
            busy |= set(self._cooldown)
            room = self.max_inflight - len(self._inflight)
        if room <= 0:
            return
        rows = self.outbox.peek(room + len(busy))
        if rows and self._refusals:  # forget refusals of rows the outbox bound dropped
            with self._lock:
                self._refusals = {r: n for r, n in self._refusals.items() if r >= rows[0].id}
        for row in rows:
            if room <= 0 or not self._connected.is_set():
                break
            if row.id in busy:
                continue
            # publish() takes paho's message lock, which paho holds while calling
            # on_publish: never call it while holding self._lock.
            info = self._client.publish(row.topic, row.payload, qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                log.warning("publish of decision row %d failed: %s", row.id,
                            mqtt.error_string(info.rc))
                break
            # NO_CONN: paho keeps the QoS 1 message and sends it after reconnecting.
            with self._lock:
                self._counts["published"] += 1
                if info.mid in self._early:
                    self._settle(row.id, self._early.pop(info.mid))
                else:
                    self._inflight[info.mid] = row.id
            room -= 1
