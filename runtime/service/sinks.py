"""Where decisions go: the sinks ``[sink.*]`` enables, built by ``make_sinks``.

Every sink implements one interface (``Sink``, runtime.service.sink_base):
``open()``, ``write_many(decisions)``, ``flush()``, ``drain(timeout_s)``,
``close()``, ``stats()``, ``name``. Constructors do no I/O; open() does.

- ``mqtt``: QoS 1 to ``edgefuse/{node}/decisions`` through a durable outbox
  the sink owns (runtime.service.mqtt_sink);
- ``jsonl``, ``stdout``: one canonical JSON line per decision (JsonlSink, in
  runtime.service.jsonl_sink), the writer ``edgefuse replay`` uses too, so both
  write the same bytes.

A new sink: a module with a Sink subclass and its settings dataclass (which
checks its own values, once), a field in SinkSettings, a branch in make_sinks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgefuse.runtime.core.errors import ConfigError
from edgefuse.runtime.service.jsonl_sink import JsonlSink
from edgefuse.runtime.service.mqtt_sink import (DEFAULT_DECISION_TOPIC, MqttDecisionSink,
                                                MqttSinkSettings)
from edgefuse.runtime.service.sink_base import Sink

if TYPE_CHECKING:
    from edgefuse.runtime.service.config import Config

__all__ = ["DEFAULT_DECISION_TOPIC", "JsonlSink", "JsonlSinkSettings", "MqttDecisionSink",
           "MqttSinkSettings", "Sink", "SinkSettings", "StdoutSinkSettings", "make_sinks"]


@dataclass(frozen=True)
class JsonlSinkSettings:
    path: str = ""                       # "" -> no JSONL file
    fsync: bool = False
    append: bool = True


@dataclass(frozen=True)
class StdoutSinkSettings:
    enabled: bool = False


@dataclass(frozen=True)
class SinkSettings:
    """``[sink]``: one table per sink."""

    mqtt: MqttSinkSettings = field(default_factory=MqttSinkSettings)
    jsonl: JsonlSinkSettings = field(default_factory=JsonlSinkSettings)
    stdout: StdoutSinkSettings = field(default_factory=StdoutSinkSettings)


def make_sinks(config: Config) -> list[Sink]:
    """The sinks the config enables, built but not opened, in the order to open them.

    MQTT comes first: opening it takes the outbox lock, which refuses a second
    daemon before that daemon truncates a JSONL file the first one is writing.
    """
    s = config.sink
    sinks: list[Sink] = []
    if s.mqtt.enabled:
        sinks.append(MqttDecisionSink(config.outbox_path(), config.decision_mqtt(), s.mqtt))
    if s.jsonl.path:
        sinks.append(JsonlSink(s.jsonl.path, append=s.jsonl.append, fsync=s.jsonl.fsync))
    if s.stdout.enabled:
        sinks.append(JsonlSink("-", name="stdout"))
    if not sinks:
        raise ConfigError("no sink is enabled: decisions would go nowhere; enable "
                          "[sink.mqtt], [sink.jsonl] path or [sink.stdout]")
    return sinks
