"""Chunks from an MQTT broker: one message = one chunk of one (node, modality).

The topic says who and what: the pattern ``edgefuse/{node}/{modality}``
(configurable; ``{node}`` and ``{modality}`` are whole topic levels, ``+``
matches any level) is subscribed once per modality the source is given
(``allowed_modalities``, else the model's channel table): ``edgefuse/+/acoustic``
and so on, never ``edgefuse/+/+``, which would deliver the daemon's own
decisions (``edgefuse/{node}/decisions``) back to it. A sender publishing a
modality outside that set is therefore not seen at all. The payload is a
runtime.core.wire chunk, binary when it starts with the magic ``EFCK``, JSON
otherwise.

``partition = "K/N"``: this daemon is K of N that share the nodes; it
subscribes to its partition of ``edgefuse/p{partition}/{node}/{modality}``
only (the default pattern becomes that) and refuses a node that hashes to
another partition (sensors.live.topics: the hash, the reason counted).

``persistent_session = true`` (with ``qos = 1`` and a fixed ``[mqtt]
client_id``) asks the broker to keep the subscription and to queue the QoS 1
chunks that arrive while the daemon is disconnected or restarting, for
``session_expiry_s``; the nodes must publish with QoS 1 too (the broker
delivers min(publish QoS, subscription QoS)) and the broker bounds the queue
(Mosquitto: ``max_queued_messages``, 1000 per client by default).

Two receivers behind one protocol (``receiver`` setting, chosen by
``sensors.live.factory.make_mqtt_source``): ``"process"`` (default,
``MqttProcessSource`` in sensors.live.mqtt_process) runs paho in a child
process; ``"thread"`` (``MqttThreadSource`` here) runs it in this process.
Both use the same ``Subscriber`` for the paho side, which owns the checks:
topic, reserved modality (``decisions``: counted in ``ignored``, reachable
only by a catch-all subscription), size before any parsing, allowed
modality; then ``base.decode_payload`` decodes, and the chunk goes to a
bounded queue. The channel count is the aligner's check.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from edgefuse.sensors.live import mqtt_client
from edgefuse.runtime.core import wire
from edgefuse.runtime.core.errors import ConfigError
from edgefuse.sensors.live.base import DEFAULT_QUEUE_MAX, ClockCheck, Source, decode_payload
from edgefuse.sensors.live.mqtt_subscriber import Subscriber
from edgefuse.sensors.live.topics import (DEFAULT_PATTERN, PARTITIONED_PATTERN, Partition,
                                          TopicPattern)

log = logging.getLogger(__name__)

RECEIVERS = ("process", "thread")


@dataclass(frozen=True)
class MqttSourceSettings:
    mqtt: mqtt_client.MqttSettings = field(default_factory=mqtt_client.MqttSettings)
    topic_pattern: str = DEFAULT_PATTERN
    qos: int = 0          # sensor data: a late retransmission is worth little; 1 is allowed
    max_payload_bytes: int = wire.DEFAULT_MAX_PAYLOAD
    allowed_modalities: tuple[str, ...] | None = None
    queue_max: int = DEFAULT_QUEUE_MAX
    # "process": paho's network loop in a child process (sensors.live.mqtt_receiver), off
    # the daemon's GIL; "thread": in this process, as paho's own thread.
    receiver: str = "process"
    # process receiver only: bytes of frames the child holds while the daemon is
    # behind (the pipe holds up to as much again, at most 1 MiB); beyond that the
    # oldest frames are dropped and counted. 8 MiB is about a second of 300 nodes.
    receiver_queue_bytes: int = 8 << 20
    # Broker-held session (see the module docstring): needs qos = 1 and [mqtt] client_id.
    persistent_session: bool = False
    session_expiry_s: int = 300   # MQTT 5: how long the broker keeps it after we leave
    # "K/N": this daemon is K of N sharing the nodes (sensors.live.topics); the default
    # topic pattern then becomes PARTITIONED_PATTERN. "" = every node.
    partition: str = ""

    def __post_init__(self) -> None:
        if self.receiver not in RECEIVERS:
            raise ConfigError(f"mqtt source receiver must be one of {list(RECEIVERS)}, "
                              f"found {self.receiver!r}")
        if not 1 << 16 <= self.receiver_queue_bytes <= 1 << 30:
            raise ConfigError("receiver_queue_bytes must be 64 KiB..1 GiB, found "
                              f"{self.receiver_queue_bytes!r}")
        if self.qos not in (0, 1):
            raise ConfigError(f"mqtt source qos must be 0 or 1, found {self.qos!r}")
        if not 64 <= self.max_payload_bytes <= 64 << 20:
            raise ConfigError("max_payload_bytes must be 64 B..64 MiB, found "
                              f"{self.max_payload_bytes!r}")
        self.topic_pattern_for()  # validate early (pattern and partition together)
        if not 1 <= self.session_expiry_s <= mqtt_client.MAX_SESSION_EXPIRY_S:
            raise ConfigError(f"session_expiry_s must be 1..{mqtt_client.MAX_SESSION_EXPIRY_S}, "
                              f"found {self.session_expiry_s!r}")
        if self.persistent_session and not self.mqtt.client_id:
            raise ConfigError(
                "persistent_session = true needs a fixed [mqtt] client_id: the broker keeps "
                "the session (subscription and queued chunks) under the client id, and the "
                "default id holds the process id, which changes at every start; set "
                "client_id = \"<unique name of this gateway>\"")
        if self.persistent_session and self.qos != 1:
            raise ConfigError(
                "persistent_session = true needs qos = 1: a broker queues only QoS 1 and 2 "
                f"messages for a disconnected client; found qos = {self.qos!r}")

    @property
    def partition_of_daemon(self) -> Partition | None:
        return Partition.parse(self.partition) if self.partition else None

    @property
    def resolved_pattern(self) -> str:
        """The topic pattern in force: with a partition, the default one is partitioned."""
        if self.partition and self.topic_pattern == DEFAULT_PATTERN:
            return PARTITIONED_PATTERN
        return self.topic_pattern

    def topic_pattern_for(self) -> TopicPattern:
        """The parser / filter builder of these settings (ConfigError when they clash)."""
        return TopicPattern(self.resolved_pattern, self.partition_of_daemon)

    @property
    def session_expiry(self) -> int:
        """Seconds the broker keeps our session; 0 for a clean one."""
        return self.session_expiry_s if self.persistent_session else 0


class MqttSourceBase(Source):
    """What both receivers share: settings, name, topic pattern, subscription
    filters, the allowed modalities, the subscribed flag."""

    COUNTERS = Source.COUNTERS + ("subscribed", "connect_failures")

    def __init__(self, settings: MqttSourceSettings | None = None, *,
                 modalities: Iterable[str] | None = None,
                 clock_check: ClockCheck | None = None):
        """modalities: the model's modalities, subscribed to unless the settings'
        allowed_modalities name others (None with neither: the catch-all filter)."""
        self.settings = settings or MqttSourceSettings()
        s = self.settings
        super().__init__(f"mqtt:{s.mqtt.host}:{s.mqtt.port}", s.queue_max, clock_check)
        self.topics = s.topic_pattern_for()
        self.allowed = None if s.allowed_modalities is None else frozenset(s.allowed_modalities)
        if self.allowed is not None:
            subscribe = self.allowed
        else:  # no modality known: the catch-all (the subscriber skips our decisions)
            subscribe = frozenset(modalities) if modalities else None
        self.filters = self.topics.filters(subscribe)
        self._subscribed = threading.Event()

    def origin(self, node: str, modality: str) -> dict[str, str]:
        """The topic a chunk came from, where the pattern determines it (no ``+`` level,
        and a partition known for a partitioned pattern)."""
        topics = self.topics
        if "+" in topics.pattern.split("/") or (topics.partitioned and not topics.partition):
            return {}
        return {"topic": self.topics.topic(node, modality)}


class MqttThreadSource(MqttSourceBase):
    """Subscribes to the chunk topics in this process, on paho's network thread
    (``receiver = "thread"``); sensors.live.mqtt_process is the other receiver."""

    def __init__(self, settings: MqttSourceSettings | None = None, *,
                 modalities: Iterable[str] | None = None,
                 clock_check: ClockCheck | None = None):
        super().__init__(settings, modalities=modalities, clock_check=clock_check)
        self._subscriber: Subscriber | None = None

    def _transport_up(self) -> bool:
        subscriber = self._subscriber
        return subscriber is not None and subscriber.connected

    @property
    def alive(self) -> bool:
        subscriber = self._subscriber
        return subscriber is None or subscriber.alive

    @property
    def last_error(self) -> str | None:
        subscriber = self._subscriber   # while open, the live connection's cause
        return self._last_error if subscriber is None else subscriber.last_error

    def open(self) -> None:
        if self._subscriber is not None:
            return
        s = self.settings
        subscriber = Subscriber(
            s.mqtt, self.topics, qos=s.qos, max_payload=s.max_payload_bytes,
            allowed=self.allowed, counters=self._counters, deliver=self._deliver,
            on_state=self._on_state, filters=self.filters, session_expiry_s=s.session_expiry)
        self._subscriber = subscriber  # before start(): its callbacks look it up
        try:
            subscriber.start()  # a bad CA/key file raises ConfigError here, before any thread
        except BaseException:
            self._subscriber = None
            raise
        self._opened = True
        log.info("MQTT source connecting to %s:%d, topic filters %s", s.mqtt.host, s.mqtt.port,
                 self.filters)

    def wait_connected(self, timeout_s: float) -> bool:
        """True once the broker acknowledged the current session's subscription."""
        return self._subscribed.wait(max(0.0, timeout_s))

    def close(self) -> None:
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            subscriber.stop()
            self._last_error = subscriber.last_error
        self._subscribed.clear()

    # --- from the subscriber (paho's network thread) ------------------------
    def _on_state(self) -> None:
        subscriber = self._subscriber
        if subscriber is not None and subscriber.subscribed:
            self._subscribed.set()
        else:
            self._subscribed.clear()

    def _deliver(self, node: str, modality: str, payload: bytes, received_ns: int) -> None:
        # Size and modality were checked by the subscriber; RejectedMessage propagates
        # to it, which counts it.
        self._offer(decode_payload(payload, node, modality), received_ns)
