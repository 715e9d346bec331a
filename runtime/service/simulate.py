"""``edgefuse simulate``: play recorded inputs as live sensor nodes would send them.

Every chunk of the input (an MCAP log, or anything ``open_inputs`` reads,
cut into ``chunk_s``) is sent in the documented wire formats (README, "Wire formats"):
over MQTT as a binary chunk on ``edgefuse/<node>/<modality>`` (with
``partitions`` N, as devices of a partitioned fleet do:
``edgefuse/p<k>/<node>/<modality>``, k = sensors.live.topics.partition_of), or over a
serial line as binary frames (or JSON / CSV lines). Chunks go out in the
order replay feeds them, each once the wall clock reaches the end of its
data (a sensor sends a chunk once it is complete), at ``speed`` times real
time. Pauses in the recording longer than ``max_idle_s`` (wall seconds
after speed) are shortened to that: logs of several days play in minutes,
and event times, hence decisions, are unchanged.

The daemon fed by a simulation decides exactly what ``edgefuse replay`` of
the same input decides: same chunks, same order, same event times.
One exception: the wire format has no field for ``rate_is_nominal`` (a rate
that is only nominal and should be re-estimated); streams recorded with it
are sent with the rate as exact, and a warning says so.
"""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from edgefuse.runtime.core import wire
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import ConfigError, TransportError
from edgefuse.sensors.live.mqtt_client import MqttSettings

log = logging.getLogger(__name__)


def payload_of(chunk: Chunk) -> bytes:
    """The binary wire payload, int16 when the samples are PCM counts (as MCAP logs hold)."""
    from edgefuse.sensors.readers.mcaplog import payload_dtype
    return wire.encode_binary(chunk, payload_dtype(chunk.samples))


class Publisher(ABC):
    @abstractmethod
    def send(self, chunk: Chunk) -> None: ...

    def close(self) -> None:  # noqa: B027
        """Wait until everything sent has left, then release the transport."""


class MqttPublisher(Publisher):
    """One MQTT connection; QoS 1 by default so a simulation loses nothing."""

    def __init__(self, settings: MqttSettings, *, topic_pattern: str = "edgefuse/{node}/{modality}",
                 qos: int = 1, connect_timeout_s: float = 10.0, max_pending: int = 1000,
                 partitions: int | None = None):
        import paho.mqtt.client as mqtt

        from edgefuse.sensors.live import mqtt_client
        from edgefuse.sensors.live.topics import (DEFAULT_PATTERN, MAX_PARTITIONS,
                                                  PARTITIONED_PATTERN, TopicPattern)
        if qos not in (0, 1):
            raise ConfigError(f"simulate qos must be 0 or 1, found {qos!r}")
        if partitions is not None:
            if not 1 <= partitions <= MAX_PARTITIONS:
                raise ConfigError(f"partitions must be 1..{MAX_PARTITIONS}, found {partitions!r}")
            if topic_pattern == DEFAULT_PATTERN:
                topic_pattern = PARTITIONED_PATTERN
        self._mqtt = mqtt
        self.topics = TopicPattern(topic_pattern)
        if self.topics.partitioned != (partitions is not None):
            raise ConfigError(f"topic pattern {topic_pattern!r} and partitions = {partitions!r} "
                              "disagree: a {partition} level needs the number of partitions "
                              "(--partitions N), and partitions need that level")
        self.partitions = partitions
        self.qos = qos
        self._pending: list = []
        self._max_pending = max_pending
        self.client = mqtt_client.make_client(settings, "simulate")
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(max_pending)
        try:
            self.client.connect(settings.host, settings.port, settings.keepalive_s)
        except OSError as exc:
            raise TransportError(f"cannot connect to the MQTT broker {settings.host}:"
                                 f"{settings.port}: {exc}; is it running?") from exc
        self.client.loop_start()
        deadline = time.monotonic() + connect_timeout_s
        while not self.client.is_connected():
            if time.monotonic() > deadline:
                raise TransportError(f"MQTT broker {settings.host}:{settings.port} did not "
                                     f"accept the connection within {connect_timeout_s} s")
            time.sleep(0.01)

    def send(self, chunk: Chunk) -> None:
        topic = self.topics.topic(chunk.node, chunk.modality, self.partitions)
        info = self.client.publish(topic, payload_of(chunk), qos=self.qos)
        if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
            raise TransportError(f"publish failed: {self._mqtt.error_string(info.rc)}")
        self._pending.append(info)
        if len(self._pending) >= self._max_pending:  # bound paho's memory
            self._pending.pop(0).wait_for_publish(30)
        self._pending = [i for i in self._pending if not i.is_published()]

    def close(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        for info in self._pending:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        self.client.disconnect()
        self.client.loop_stop()


class SerialPublisher(Publisher):
    """Writes frames to a serial device (a real port, a pty, socat's peer end)."""

    def __init__(self, device: str, *, protocol: str = "binary", baud: int = 115200):
        import serial

        from edgefuse.sensors.live.serial_source import PROTOCOLS
        from edgefuse.sensors.readers.mcaplog import payload_dtype
        if protocol not in PROTOCOLS:
            raise ConfigError(f"serial protocol must be one of {sorted(PROTOCOLS)}, "
                              f"found {protocol!r}")
        encode = PROTOCOLS[protocol].encode
        # binary payloads as payload_of() sends them over MQTT: int16 for PCM counts
        self._encode = lambda chunk: encode(chunk, payload_dtype(chunk.samples))
        try:
            self.port = serial.Serial(device, baud, write_timeout=10)
        except (serial.SerialException, OSError) as exc:
            raise TransportError(f"cannot open serial device {device}: {exc}") from exc

    def send(self, chunk: Chunk) -> None:
        self.port.write(self._encode(chunk))

    def close(self) -> None:
        self.port.flush()
        self.port.close()


@dataclass
class SimulateSummary:
    chunks: int = 0
    wall_s: float = 0.0
    skipped_idle_s: float = 0.0
    streams: dict = field(default_factory=dict)


def simulate(chunks, publisher: Publisher, *, speed: float = 1.0, max_idle_s: float = 1.0,
             stop=None) -> SimulateSummary:
    """Send ``chunks`` (time-ordered, e.g. ``InputSet.chunks()``) in real time / speed.

    stop: an optional threading.Event that ends the simulation early.
    """
    if not speed > 0:
        raise ConfigError(f"speed must be > 0, found {speed!r}")
    if not max_idle_s > 0:
        raise ConfigError(f"max_idle_s must be > 0, found {max_idle_s!r}")
    summary = SimulateSummary()
    wall0 = time.monotonic()
    origin_ns = None   # event time that maps to wall0
    skipped = 0.0      # wall seconds removed from long pauses
    last_due = 0.0
    warned_nominal = set()
    for chunk in chunks:
        if stop is not None and stop.is_set():
            break
        end_ns = chunk.t0_ns + (int(round(chunk.n * 1e9 / chunk.rate_hz))
                                if chunk.rate_hz else 0)
        if origin_ns is None:
            origin_ns = end_ns
        due = (end_ns - origin_ns) / 1e9 / speed - skipped
        if due - last_due > max_idle_s:  # a long pause in the recording: shorten it
            skipped += due - last_due - max_idle_s
            due = last_due + max_idle_s
        last_due = max(last_due, due)
        ahead = wall0 + due - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        if chunk.rate_is_nominal and chunk.stream not in warned_nominal:
            warned_nominal.add(chunk.stream)
            log.warning("%s/%s: its rate is nominal in the log, but the wire format cannot say "
                        "so; the live aligner treats it as exact", *chunk.stream)
        publisher.send(chunk)
        summary.chunks += 1
        key = f"{chunk.node}/{chunk.modality}"
        summary.streams[key] = summary.streams.get(key, 0) + 1
    publisher.close()
    summary.wall_s = time.monotonic() - wall0
    summary.skipped_idle_s = skipped
    return summary
