"""Chunks from an MQTT broker: one message = one chunk of one (node, modality).

The topic says who and what: the pattern ``edgefuse/{node}/{modality}``
(configurable; ``{node}`` and ``{modality}`` are whole topic levels, ``+``
matches any level) is subscribed as ``edgefuse/+/+``. The payload is a
runtime.wire chunk, binary when it starts with the magic ``EFCK``, JSON
otherwise.

paho runs on_message on its network thread, so the callback does only the
cheap things, in this order: size check (before any parsing), modality
check, decode, channel check, bounded enqueue. Messages on the decisions
topic (modality ``decisions``, published by our own decision sink) are
ignored and counted in ``ignored``.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

import paho.mqtt.client as mqtt

from edgefuse.runtime import mqtt_client, wire
from edgefuse.runtime.errors import ConfigError
from edgefuse.sensors.base import (
    BAD_TOPIC, DEFAULT_QUEUE_MAX, ChunkValidator, RejectedPayload, Source,
)
from edgefuse.sensors.topics import (  # noqa: F401 - TopicPattern is part of this API
    DEFAULT_PATTERN, RESERVED_MODALITIES, TopicPattern,
)

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

    @classmethod
    def from_dict(cls, values: dict) -> MqttSourceSettings:
        """From a config table; an ``mqtt`` sub-table holds the connection settings."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown mqtt source setting(s) {unknown}; allowed: {sorted(known)}")
        values = dict(values)
        values["mqtt"] = mqtt_client.MqttSettings.from_dict(values.get("mqtt", {}))
        if values.get("allowed_modalities") is not None:
            values["allowed_modalities"] = tuple(values["allowed_modalities"])
        return cls(**values)


class MqttSource(Source):
    """Subscribes to the chunk topics; see the module docstring."""

    COUNTERS = Source.COUNTERS + ("subscribed", "connect_failures")

    def __init__(self, settings: MqttSourceSettings | None = None, *,
                 allowed_modalities: Iterable[str] | None = None,
                 channels: Mapping[str, int] | None = None):
        self.settings = settings or MqttSourceSettings()
        super().__init__(self.settings.queue_max)
        self.topics = TopicPattern(self.settings.topic_pattern)
        self.validator = ChunkValidator(
            allowed_modalities if allowed_modalities is not None else self.settings.allowed_modalities,
            channels if channels is not None else self.settings.channels)
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def open(self) -> None:
        if self._client is not None:
            return
        client = mqtt_client.make_client(self.settings.mqtt, "source")
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        self._opened = True
        mqtt_client.start(client, self.settings.mqtt)
        log.info("MQTT source connecting to %s:%d, topic filter %r", self.settings.mqtt.host,
                 self.settings.mqtt.port, self.topics.filter)

    @property
    def alive(self) -> bool:
        thread = None if self._client is None else getattr(self._client, "_thread", None)
        return thread is None or thread.is_alive()  # paho's network thread

    def wait_subscribed(self, timeout_s: float) -> bool:
        """True once the broker acknowledged the current session's subscription."""
        return self._subscribed.wait(timeout_s)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            self._closing = True  # our own disconnect is not a lost connection
            mqtt_client.stop(client)
            self._closing = False
        self._connected.clear()
        self._subscribed.clear()

    # --- paho callbacks (network thread: keep them short) ----------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._counters.add("connect_failures")
            log.warning("MQTT broker refused the connection: %s", reason_code)
            return
        if self._counters.add("connects") > 0:
            self._counters.add("reconnects")
        self._connected.set()
        # Clean start: the broker forgot our subscription, so subscribe on every connect.
        client.subscribe(self.topics.filter, qos=self.settings.qos)

    def _on_connect_fail(self, client, userdata) -> None:
        self._counters.add("connect_failures")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(rc.is_failure for rc in reason_codes):
            log.error("MQTT broker refused the subscription to %r: %s; check the broker ACL",
                      self.topics.filter, reason_codes)
            return
        self._counters.add("subscribed")
        self._subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected.is_set() and not self._closing:
            self._counters.add("disconnects")
            log.warning("MQTT connection lost (%s); reconnecting", reason_code)
        self._connected.clear()
        self._subscribed.clear()

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        self._counters.add("received")
        payload = message.payload
        try:
            node, modality = self.topics.parse(message.topic)
            if modality in RESERVED_MODALITIES:
                self._counters.add("ignored")
                return
            chunk = self.validator.decode(payload, node, modality,
                                          self.settings.max_payload_bytes)
        except RejectedPayload as exc:
            self._reject(exc)
            return
        except UnicodeDecodeError:  # topic that is not UTF-8
            self._reject(RejectedPayload(BAD_TOPIC, "topic is not valid UTF-8"))
            return
        except Exception:  # noqa: BLE001 - an escaping exception would stop paho's thread
            self._counters.malformed("internal_error")
            log.exception("unexpected error decoding a message on %r; skipped", message.topic)
            return
        self._counters.add("decoded")
        self._offer(chunk)


def make_mqtt_source(settings: MqttSourceSettings, *,
                     allowed_modalities: Iterable[str] | None = None,
                     channels: Mapping[str, int] | None = None) -> Source:
    """The MQTT source the settings' ``receiver`` names (same interface, same counters)."""
    if settings.receiver == "thread":
        return MqttSource(settings, allowed_modalities=allowed_modalities, channels=channels)
    from edgefuse.sensors.mqtt_process import MqttProcessSource  # imports this module
    return MqttProcessSource(settings, allowed_modalities=allowed_modalities, channels=channels)
