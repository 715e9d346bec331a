"""The paho side of both MQTT receivers: subscribe, check cheaply, hand over.

``Subscriber`` owns one paho client subscribed to the chunk topics: one
filter per modality it is given (sensors.live.topics), so our own decisions are
never delivered. Its callbacks run on paho's network thread, so they only
count and check, in this order: topic (its partition included, counted as
``wrong_partition``), reserved modality (``decisions``:
counted in ``ignored``; reached only with the catch-all filter), size
(before any parsing), allowed modality. A payload that passes goes to
``deliver(node, modality, payload, received_ns)``: the in-process source
decodes and queues it, the receiver process frames it for the daemon. These
are the MQTT path's only size and modality checks: what is delivered is only
decoded after this (sensors.live.accounting: one owner per check).
Connection changes call ``on_state()``; ``last_error`` says why the last
connection attempt failed (sensors.live.mqtt_client.ConnectionStatus).

With ``session_expiry_s`` > 0 the session is persistent: the broker keeps
the subscription and queues QoS 1 messages while we are away.

Standard library and paho only (the receiver process imports it without numpy).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

from edgefuse.sensors.live import mqtt_client
from edgefuse.runtime.core.ratelimit import WarnLimiter
from edgefuse.sensors.live.accounting import (
    BAD_TOPIC, OVERSIZED, Counters, RejectedMessage, check_modality, count_rejection,
)
from edgefuse.sensors.live.topics import RESERVED_MODALITIES, TopicPattern

log = logging.getLogger(__name__)

COUNTERS = ("received", "oversized", "ignored", "connects", "reconnects", "disconnects",
            "subscribed", "connect_failures")

Deliver = Callable[[str, str, bytes, int], None]


class Subscriber:
    """See the module docstring. ``connected`` / ``subscribed`` are plain flags."""

    def __init__(self, settings: mqtt_client.MqttSettings, topics: TopicPattern, *,
                 qos: int, max_payload: int, allowed: Iterable[str] | None,
                 counters: Counters, deliver: Deliver,
                 on_state: Callable[[], None] = lambda: None,
                 filters: Sequence[str] | None = None, session_expiry_s: int = 0):
        self.settings = settings
        self.topics = topics
        self.filters = list(filters) if filters else [topics.filter]
        self.session_expiry_s = session_expiry_s
        self.qos = qos
        self.max_payload = max_payload
        self.allowed = None if allowed is None else frozenset(allowed)
        self.counters = counters
        self.connected = False
        self.subscribed = False
        self._deliver = deliver
        self._on_state = on_state
        self._client: mqtt_client.Client | None = None
        self._status: mqtt_client.ConnectionStatus | None = None
        self._closing = False
        self._lost = WarnLimiter(log)

    @property
    def alive(self) -> bool:
        """False once paho's network thread has died."""
        thread = None if self._client is None else getattr(self._client, "_thread", None)
        return thread is None or thread.is_alive()

    @property
    def last_error(self) -> str | None:
        """Why the last connection attempt failed; None while connected."""
        return None if self._status is None else self._status.last_error

    def start(self) -> None:
        client = mqtt_client.make_client(self.settings, "source",
                                         session_expiry_s=self.session_expiry_s,
                                         on_failure=self._on_connect_failed)
        self._status = client.status
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        mqtt_client.start(client, self.settings)

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            self._closing = True  # our own disconnect is not a lost connection
            mqtt_client.stop(client)
            self._closing = False
        self._set_state(connected=False, subscribed=False)

    def _set_state(self, *, connected: bool | None = None, subscribed: bool | None = None):
        if connected is not None:
            self.connected = connected
        if subscribed is not None:
            self.subscribed = subscribed
        self._on_state()

    # --- paho callbacks (network thread: keep them short) ----------------
    def _on_connect_failed(self) -> None:
        # ConnectionStatus has logged why (rate-limited); here it is only counted.
        self.counters.add("connect_failures")
        self._set_state()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return  # counted and explained by _on_connect_failed
        if self.counters.add("connects") > 0:
            self.counters.add("reconnects")
        self._set_state(connected=True)
        # A clean session forgot our subscription, and a kept one may predate a
        # configuration change: subscribe on every connect (the same filters again
        # are harmless).
        client.subscribe([(f, self.qos) for f in self.filters])
        if self.session_expiry_s and self.topics.filter not in self.filters:
            # A persistent session of an older version may hold the catch-all, which
            # would deliver our own decisions: drop it (no-op when absent).
            client.unsubscribe(self.topics.filter)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(rc.is_failure for rc in reason_codes):
            log.error("MQTT broker refused the subscription to %s: %s; check the broker ACL",
                      self.filters, [str(rc) for rc in reason_codes])
            return
        self.counters.add("subscribed")
        self._set_state(subscribed=True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected and not self._closing:
            self.counters.add("disconnects")
            self._lost.warn(str(reason_code), "MQTT source lost the connection to %s:%d "
                            "(%s); reconnecting", self.settings.host, self.settings.port,
                            reason_code)
        self._set_state(connected=False, subscribed=False)

    def _on_message(self, client, userdata, message) -> None:
        received_ns = time.monotonic_ns()
        self.counters.add("received")
        payload = message.payload
        topic = node = modality = None
        try:
            topic = message.topic
            node, modality = self.topics.parse(topic)
            if modality in RESERVED_MODALITIES:
                self.counters.add("ignored")
                return
            # The one size check of the MQTT path: before any parsing or copy.
            if len(payload) > self.max_payload:
                raise RejectedMessage(
                    OVERSIZED, f"{node}/{modality}: payload of {len(payload)} bytes exceeds "
                    f"the limit of {self.max_payload}; send smaller chunks or raise "
                    "max_payload_bytes")
            check_modality(modality, self.allowed)
            self._deliver(node, modality, payload, received_ns)
        except RejectedMessage as exc:
            # a node of another partition is named, though parse() refused it
            node, modality = getattr(exc, "node", node), getattr(exc, "modality", modality)
            count_rejection(self.counters, exc, topic=topic, node=node, modality=modality)
        except UnicodeDecodeError:  # topic that is not UTF-8
            count_rejection(self.counters, RejectedMessage(BAD_TOPIC, "topic is not valid "
                                                           "UTF-8"), topic="(not UTF-8)")
        except Exception:  # noqa: BLE001 - an escaping exception would stop paho's thread
            self.counters.malformed("internal_error")
            log.exception("unexpected error on a message on %r; skipped", topic)
