"""Chunks from an MQTT broker: one message = one chunk of one (node, modality).

The topic says who and what: the pattern ``edgefuse/{node}/{modality}``
(configurable; ``{node}`` and ``{modality}`` are whole topic levels, ``+``
matches any level) is subscribed as ``edgefuse/+/+``. The payload is a
runtime.wire chunk, binary when it starts with the magic ``EFCK``, JSON
otherwise.

Two receivers behind one interface (``receiver`` setting, ``make_mqtt_source``):
``"process"`` (default, sensors.mqtt_process) runs paho in a child process;
``"thread"`` (``MqttSource`` here) runs it in this process. Both use the
same ``Subscriber`` for the paho side: topic, reserved modality
(``decisions``, our own output: counted in ``ignored``), size before any
parsing, allowed modality; then the same ChunkValidator decodes and checks
the channel count, and the chunk goes to a bounded queue.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from edgefuse.runtime import mqtt_client, wire
from edgefuse.runtime.errors import ConfigError
from edgefuse.sensors.base import DEFAULT_QUEUE_MAX, ChunkValidator, Source
from edgefuse.sensors.mqtt_subscriber import Subscriber
from edgefuse.sensors.topics import DEFAULT_PATTERN, TopicPattern

log = logging.getLogger(__name__)

RECEIVERS = ("process", "thread")


@dataclass(frozen=True)
class MqttSourceSettings:
    mqtt: mqtt_client.MqttSettings = field(default_factory=mqtt_client.MqttSettings)
    topic_pattern: str = DEFAULT_PATTERN
    qos: int = 0          # sensor data: a late retransmission is worth little; 1 is allowed
    max_payload_bytes: int = wire.DEFAULT_MAX_PAYLOAD
    allowed_modalities: tuple[str, ...] | None = None
    channels: Mapping[str, int] | None = None
    queue_max: int = DEFAULT_QUEUE_MAX
    # "process": paho's network loop in a child process (sensors.mqtt_receiver), off
    # the daemon's GIL; "thread": in this process, as paho's own thread.
    receiver: str = "process"
    # process receiver only: bytes of frames the child holds while the daemon is
    # behind (the pipe holds up to as much again, at most 1 MiB); beyond that the
    # oldest frames are dropped and counted. 8 MiB is about a second of 300 nodes.
    receiver_queue_bytes: int = 8 << 20

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
        TopicPattern(self.topic_pattern)  # validate early


class MqttSourceBase(Source):
    """What both receivers share: settings, topic pattern, validator, subscribed flag."""

    COUNTERS = Source.COUNTERS + ("subscribed", "connect_failures")

    def __init__(self, settings: MqttSourceSettings | None = None, *,
                 allowed_modalities: Iterable[str] | None = None,
                 channels: Mapping[str, int] | None = None):
        self.settings = settings or MqttSourceSettings()
        super().__init__(self.settings.queue_max)
        self.topics = TopicPattern(self.settings.topic_pattern)
        # Arguments (from the model contract) win over the settings.
        self.validator = ChunkValidator(
            self.settings.allowed_modalities if allowed_modalities is None else allowed_modalities,
            self.settings.channels if channels is None else channels)
        self._subscribed = threading.Event()


class MqttSource(MqttSourceBase):
    """Subscribes to the chunk topics in this process (``receiver = "thread"``)."""

    def __init__(self, settings: MqttSourceSettings | None = None, *,
                 allowed_modalities: Iterable[str] | None = None,
                 channels: Mapping[str, int] | None = None):
        super().__init__(settings, allowed_modalities=allowed_modalities, channels=channels)
        self._subscriber: Subscriber | None = None

    @property
    def connected(self) -> bool:
        return self._subscriber is not None and self._subscriber.connected

    @property
    def alive(self) -> bool:
        return self._subscriber is None or self._subscriber.alive

    def open(self) -> None:
        if self._subscriber is not None:
            return
        s = self.settings
        self._subscriber = Subscriber(
            s.mqtt, self.topics, qos=s.qos, max_payload=s.max_payload_bytes,
            allowed=self.validator.allowed, counters=self._counters, deliver=self._deliver,
            on_state=self._on_state)
        self._opened = True
        self._subscriber.start()
        log.info("MQTT source connecting to %s:%d, topic filter %r", s.mqtt.host, s.mqtt.port,
                 self.topics.filter)

    def wait_subscribed(self, timeout_s: float) -> bool:
        """True once the broker acknowledged the current session's subscription."""
        return self._subscribed.wait(timeout_s)

    def close(self) -> None:
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            subscriber.stop()
        self._subscribed.clear()

    # --- from the subscriber (paho's network thread) ------------------------
    def _on_state(self) -> None:
        subscriber = self._subscriber
        if subscriber is not None and subscriber.subscribed:
            self._subscribed.set()
        else:
            self._subscribed.clear()

    def _deliver(self, node: str, modality: str, payload: bytes, received_ns: int) -> None:
        # RejectedPayload propagates to the subscriber, which counts it.
        chunk = self.validator.decode(payload, node, modality, self.settings.max_payload_bytes)
        self._counters.add("decoded")
        self._offer(chunk, received_ns)


def make_mqtt_source(settings: MqttSourceSettings, *,
                     allowed_modalities: Iterable[str] | None = None,
                     channels: Mapping[str, int] | None = None) -> Source:
    """The MQTT source the settings' ``receiver`` names (same interface, same counters)."""
    if settings.receiver == "thread":
        return MqttSource(settings, allowed_modalities=allowed_modalities, channels=channels)
    from edgefuse.sensors.mqtt_process import MqttProcessSource  # imports this module
    return MqttProcessSource(settings, allowed_modalities=allowed_modalities, channels=channels)
