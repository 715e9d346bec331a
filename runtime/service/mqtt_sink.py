"""Decisions to MQTT: QoS 1 to ``edgefuse/{node}/decisions`` through a durable outbox.

The sink owns its Outbox (runtime.service.outbox): open() takes the outbox
(its lock refuses a second owner at once), then connects. write_many() only
appends to the outbox (one fsync per batch, no network); a publisher thread
drains it while the broker is there and deletes a row only after the
broker's PUBACK for it. While the broker is away paho reconnects with capped
exponential backoff and the rows wait on disk. On a full disk the outbox
drops and counts what it cannot queue instead of raising (see its module
docstring), so the other sinks go on. close() stops publishing and closes
the outbox; undelivered rows are sent after the next start.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from edgefuse.runtime.core.backoff import Backoff
from edgefuse.runtime.core.decision import Decision
from edgefuse.runtime.core.errors import ConfigError, EdgefuseError
from edgefuse.runtime.core.ratelimit import WarnLimiter
from edgefuse.runtime.service.outbox import DEFAULT_MAX_ROWS, Outbox, OutboxSettings
from edgefuse.runtime.service.sink_base import Sink
from edgefuse.sensors.live import mqtt_client
from edgefuse.sensors.live.mqtt_client import MqttSettings

log = logging.getLogger(__name__)

DEFAULT_DECISION_TOPIC = "edgefuse/{node}/decisions"
ACK_BATCH_S = 0.005
JOIN_TIMEOUT_S = 2.0  # close(): how long the publisher thread may take to stop
MAX_INFLIGHT_LIMIT = 1000
MAX_RETRY_S = 3600.0


@dataclass(frozen=True)
class MqttSinkSettings:
    """``[sink.mqtt]``: checked here, once (the outbox's values by OutboxSettings).

    max_inflight: rows published but not yet acknowledged (bounds paho's memory).
    Rows the broker refuses (PUBACK reason >= 0x80) are retried after a capped
    exponential delay (retry_min_s .. retry_max_s) and counted in ``rejected``.
    """

    enabled: bool = True
    topic: str = DEFAULT_DECISION_TOPIC
    outbox: str = ""                     # "" -> $STATE_DIRECTORY/outbox.sqlite or XDG state
    max_rows: int = DEFAULT_MAX_ROWS
    synchronous: str = "full"
    max_inflight: int = 20
    retry_min_s: float = 0.5
    retry_max_s: float = 30.0
    mqtt: MqttSettings | None = None     # None -> the daemon's [mqtt] connection

    def __post_init__(self) -> None:
        if "{node}" not in self.topic or any(c in self.topic for c in "+#"):
            raise ConfigError(f"topic = {self.topic!r} is not allowed; it must contain "
                              "{node} and no wildcards")
        OutboxSettings(max_rows=self.max_rows, synchronous=self.synchronous)
        if not 1 <= self.max_inflight <= MAX_INFLIGHT_LIMIT:
            raise ConfigError(f"max_inflight = {self.max_inflight!r} is out of range; "
                              f"allowed: 1..{MAX_INFLIGHT_LIMIT}")
        if not 0 < self.retry_min_s <= self.retry_max_s <= MAX_RETRY_S:
            raise ConfigError(f"retry_min_s = {self.retry_min_s!r}, retry_max_s = "
                              f"{self.retry_max_s!r}: allowed 0 < retry_min_s <= retry_max_s "
                              f"<= {MAX_RETRY_S:g}")


class MqttDecisionSink(Sink):
    """Decisions to MQTT with QoS 1 through a durable outbox (see module docstring).

    outbox: the outbox file; mqtt: the broker connection. Both are resolved by
    ``make_sinks`` from ``settings.outbox`` / ``settings.mqtt`` and the daemon's
    defaults, so they are given here rather than read from ``settings``.
    """

    name = "mqtt"

    def __init__(self, outbox: str | Path, mqtt_settings: MqttSettings,
                 settings: MqttSinkSettings | None = None):
        self.settings = settings or MqttSinkSettings()
        self.outbox_path = Path(outbox)
        self.mqtt_settings = mqtt_settings
        self.outbox: Outbox | None = None   # open() opens it
        self._client: mqtt_client.Client | None = None
        self._thread: threading.Thread | None = None
        self._retry = Backoff(self.settings.retry_min_s, self.settings.retry_max_s)
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

    def open(self) -> None:
        """Take the outbox (OutboxInUseError when another process owns it), then connect."""
        if self.outbox is not None:
            return
        folder = self.outbox_path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the outbox folder {folder}: {exc.strerror}; "
                              "set [sink.mqtt] outbox or STATE_DIRECTORY") from exc
        s = self.settings
        outbox = Outbox(self.outbox_path, max_rows=s.max_rows, synchronous=s.synchronous)
        try:
            client = mqtt_client.make_client(self.mqtt_settings, "decisions")
            client.max_inflight_messages_set(s.max_inflight)
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_publish = self._on_publish
            mqtt_client.start(client, self.mqtt_settings)
        except BaseException:
            outbox.close()
            raise
        self.outbox, self._client = outbox, client
        self._thread = threading.Thread(target=self._run, name="decision-publisher", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def write_many(self, decisions: Sequence[Decision]) -> None:
        """Durable once this returns; one fsync for the whole batch.

        On a full disk the outbox drops the batch and counts it (stats
        ``outbox_dropped_disk_full``, one warning per episode) instead of raising,
        so the daemon's other sinks keep taking decisions.
        """
        if self.outbox is None or self._stop.is_set():
            raise EdgefuseError("sink mqtt is not open: call open() before writing (or use "
                                "the sink as a context manager)")
        topic = self.settings.topic
        items = [(topic.format(node=d.node), d.to_json().encode()) for d in decisions]
        if items and self.outbox.put_many(items):
            self._wake.set()

    def flush(self) -> None:
        """Wake the publisher; delivery goes on in its thread (see drain)."""
        self._wake.set()

    def drain(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty; False (and a warning) when rows remain after
        timeout_s: they stay in the outbox and are sent after the next start."""
        if self.outbox is None:
            return True
        deadline = time.monotonic() + timeout_s
        while self.outbox.depth() and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.02)
        left = self.outbox.depth()
        if left:
            log.warning("%d decision(s) still wait in the outbox %s after %.1f s; they are "
                        "sent after the next start", left, self.outbox_path, timeout_s)
        return left == 0

    def close(self) -> None:
        """Stop publishing; undelivered rows stay in the outbox for the next start."""
        if self.outbox is None or self._stop.is_set():
            return  # never opened, or closed already
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
        self._closing = True  # our own disconnect is not a lost broker
        mqtt_client.stop(self._client)
        try:
            self._apply_acks()
        finally:
            self.outbox.close()

    def stats(self) -> dict:
        with self._lock:
            out = {**self._counts, "inflight": len(self._inflight)}
        if self.outbox is not None:
            out.update({f"outbox_{k}": v for k, v in self.outbox.stats().items()})
        out["connected"] = self.connected
        return out

    @property
    def last_error(self) -> str | None:
        """Why the publisher's last connection attempt failed; None while connected."""
        return self._client.status.last_error if self._client is not None else None

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
            delay = self._retry.delay(refused)
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
                self._stop.wait(self._retry.min_s)

    def _publish_some(self) -> None:
        now = time.monotonic()
        with self._lock:
            busy = set(self._inflight.values()) | set(self._acked)
            self._cooldown = {r: t for r, t in self._cooldown.items() if t > now}
            busy |= set(self._cooldown)
            room = self.settings.max_inflight - len(self._inflight)
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
