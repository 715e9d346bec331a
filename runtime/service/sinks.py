"""Where decisions go: the sinks ``[sink.*]`` enables, built by ``make_sinks``.

Every sink implements one interface (``Sink``, runtime.service.sink_base):
``open()``, ``write_many(decisions)``, ``flush()``, ``drain(timeout_s)``,
``close()``, ``stats()``, ``name``. Constructors do no I/O; open() does.

- ``mqtt``: QoS 1 to ``edgefuse/{node}/decisions`` through a durable outbox
  the sink owns (runtime.service.mqtt_sink);
- ``jsonl``, ``stdout``: one canonical JSON line per decision (JsonlSink,
  here), the writer ``edgefuse replay`` uses too, so both write the same bytes.

A new sink: a module with a Sink subclass and its settings dataclass (which
checks its own values, once), a field in SinkSettings, a branch in make_sinks.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from edgefuse.runtime.core.decision import Decision
from edgefuse.runtime.core.errors import ConfigError, EdgefuseError
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


class JsonlSink(Sink):
    """JSON Lines to ``target``: a path, "-" for stdout, or an open text stream.

    A path is opened by open() (truncated unless append=True) and closed by
    close(); a stream (stdout too) stays the caller's: close() only flushes it.
    fsync=True fsyncs a path on every flush().
    """

    def __init__(self, target: str | Path | TextIO = "-", *, append: bool = False,
                 fsync: bool = False, name: str = "jsonl"):
        self.name = name
        self._target = target  # as given, for messages
        self._path = Path(target) if isinstance(target, (str, Path)) and target != "-" else None
        self._append = append
        self._fsync = fsync
        # A stream is already open (taking it is no I/O); a path waits for open().
        self._file: TextIO | None = None if self._path is not None else \
            (sys.stdout if target == "-" else target)
        self._written = 0

    def open(self) -> None:
        if self._file is not None or self._path is None:
            return  # open already, or a stream given (after close() it stays closed)
        try:
            self._file = open(self._path, "a" if self._append else "w",  # noqa: SIM115
                              encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot write decisions to {self._target}: "
                              f"{exc.strerror or exc}; choose a writable [sink.jsonl] path "
                              "(--out FILE, or --out - for stdout)") from exc

    def write_many(self, decisions: Sequence[Decision]) -> None:
        if self._file is None:
            raise EdgefuseError(f"sink {self.name} is not open: call open() before writing "
                                "(or use the sink as a context manager)")
        self._file.write("".join([d.to_json() + "\n" for d in decisions]))
        self._written += len(decisions)

    def flush(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        if self._fsync and self._path is not None:
            os.fsync(self._file.fileno())

    def stats(self) -> dict:
        return {"written": self._written}

    def close(self) -> None:
        if self._file is None:
            return
        try:
            self.flush()
        finally:
            if self._path is not None:
                self._file.close()
            self._file = None


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
