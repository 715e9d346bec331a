"""The daemon's configuration: frozen dataclasses loaded from TOML.

Every table maps onto one dataclass; a key that is not a field is refused
(a typo must not silently fall back to a default), and every value is
checked at start, the error naming the full key and what is allowed:

    edgefuse.toml: [sink.mqtt] max_inflight = 0 is out of range; allowed: 1..1000

``edgefuse run`` works without a file: ``load_config(None, overrides)``
returns the defaults with the command-line values applied. The settings of
the transports and sinks reuse their own classes (MqttSettings,
MqttSourceSettings, SerialSettings, AlignerConfig, SinkSettings), which
check their own ranges.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from edgefuse.runtime.core.errors import ConfigError
from edgefuse.sensors.live.mqtt_client import MqttSettings
from edgefuse.runtime.core.pipeline import PipelineConfig
from edgefuse.runtime.service.sinks import SinkSettings
from edgefuse.sensors.live.base import CLOCK_OFFSET_ACTIONS
from edgefuse.sensors.live.mqtt_source import MqttSourceSettings
from edgefuse.sensors.live.topics import Partition
from edgefuse.sensors.live.serial_source import SerialSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROVIDERS = ("cpu", "cuda", "tensorrt")
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class ModelSettings:
    path: str = ""                       # "" -> the bundled default model (gv_detect)
    providers: tuple[str, ...] = ("cpu",)
    require_provider: bool = False
    threads: int = 1

    def __post_init__(self) -> None:
        bad = [p for p in self.providers if p not in PROVIDERS]
        if bad or not self.providers:
            raise ConfigError(f"providers = {list(self.providers)!r} is not allowed; allowed: "
                              f"a non-empty list of {list(PROVIDERS)}")
        _check_range("threads", self.threads, 1, 256)


@dataclass(frozen=True)
class SourceSettings:
    mqtt: MqttSourceSettings | None = field(default_factory=MqttSourceSettings)
    serial: tuple[SerialSettings, ...] = ()


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9108

    def __post_init__(self) -> None:
        _check_range("port", self.port, 0, 65535)  # 0: any free port (tests)


WAIT_FOR_SOURCES = ("any", "all")


@dataclass(frozen=True)
class DaemonSettings:
    read_timeout_s: float = 0.005        # how long one read waits for data
    connect_timeout_s: float = 30.0      # READY=1 waits this long for the sources
    # "any": READY=1 once one source is connected (after waiting up to start_grace_s for
    # the others, which keep connecting in the background); "all": every source must be
    # connected within connect_timeout_s, else the start fails.
    wait_for_sources: str = "any"
    start_grace_s: float = 5.0
    drain_timeout_s: float = 10.0        # SIGTERM: how long the outbox may take to empty
    # No loop iteration for this long (or for systemd's WatchdogSec, if shorter): the
    # daemon reports itself unhealthy and not ready, and logs where the loop is stuck.
    stall_timeout_s: float = 10.0
    record: str = ""                     # "" -> no recording; else an MCAP path
    latency_trace: str = ""              # "" -> off; else a JSONL file (benchmarks)
    # A live chunk whose t0 is further than this from its receipt time (wall clock) is
    # counted and warned with its topic/port, node and modality; 0 turns the check off.
    # Past it a t0 that is no clock time (before 2000: seconds or ms sent as ns) is
    # refused (bad_time); a plausible one is kept ("warn", counted clock_offset) or
    # refused ("refuse"). See sensors.base.ClockCheck.
    max_clock_offset_s: float = 86_400.0
    clock_offset_action: str = "warn"

    def __post_init__(self) -> None:
        _check_range("read_timeout_s", self.read_timeout_s, 0.0005, 1.0)
        _check_range("connect_timeout_s", self.connect_timeout_s, 0.0, 3600.0)
        _check_range("start_grace_s", self.start_grace_s, 0.0, 3600.0)
        _check_range("drain_timeout_s", self.drain_timeout_s, 0.0, 3600.0)
        _check_range("stall_timeout_s", self.stall_timeout_s, 0.1, 3600.0)
        _check_range("max_clock_offset_s", self.max_clock_offset_s, 0.0, 3.2e9)
        if self.clock_offset_action not in CLOCK_OFFSET_ACTIONS:
            raise ConfigError(f"clock_offset_action = {self.clock_offset_action!r} is not "
                              f"allowed; allowed: {list(CLOCK_OFFSET_ACTIONS)}")
        if self.wait_for_sources not in WAIT_FOR_SOURCES:
            raise ConfigError(f"wait_for_sources = {self.wait_for_sources!r} is not allowed; "
                              f"allowed: {list(WAIT_FOR_SOURCES)}")


@dataclass(frozen=True)
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    source: SourceSettings = field(default_factory=SourceSettings)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sink: SinkSettings = field(default_factory=SinkSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)

    def outbox_path(self) -> Path:
        """Where the decision outbox lives (systemd StateDirectory when there is one)."""
        if self.sink.mqtt.outbox:
            return Path(self.sink.mqtt.outbox).expanduser()
        state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        if state:
            return Path(state) / "outbox.sqlite"
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        return base / "edgefuse" / "outbox.sqlite"

    def decision_mqtt(self) -> MqttSettings:
        return self.sink.mqtt.mqtt or self.mqtt

    @property
    def partition(self) -> Partition | None:
        """This daemon's share of the nodes (``[source.mqtt] partition``), or None."""
        return None if self.source.mqtt is None else self.source.mqtt.partition_of_daemon


def _apply_partition(config: Config) -> Config:
    """Daemon K of N connects with ``<client_id>-p<K>`` wherever a client_id is fixed:
    N daemons started from one config must not share an MQTT client id (the broker
    would knock one off for the other, in a loop) nor a persistent session."""
    part = config.partition
    if part is None:
        return config

    def own(m: MqttSettings | None) -> MqttSettings | None:
        if m is None or not m.client_id:
            return m
        return dataclasses.replace(m, client_id=f"{m.client_id}-p{part.index}")

    replace = dataclasses.replace
    src, sink = config.source.mqtt, config.sink.mqtt
    return replace(config, mqtt=own(config.mqtt),
                   source=replace(config.source, mqtt=replace(src, mqtt=own(src.mqtt))),
                   sink=replace(config.sink, mqtt=replace(sink, mqtt=own(sink.mqtt))))


def _check_range(name: str, value: Any, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{name} = {value!r} is out of range; allowed: {lo}..{hi}")


def _type_ok(value: Any, hint: Any) -> bool:
    """A small runtime check of TOML values against the dataclass annotations."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(
            _type_ok(v, typing.get_args(hint)[0]) for v in value)
    if origin in (typing.Mapping, dict) or str(origin).endswith("Mapping'>"):
        return isinstance(value, dict)
    return True  # nested dataclasses are checked by _build


def _describe(hint: Any) -> str:
    text = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("edgefuse.runtime.", "").replace("edgefuse.sensors.", "")


def _build(cls: type, table: Any, path: str):
    """cls(**table) with unknown keys refused and each value's type checked.

    path: the dotted table name ("" at the top level), used in every message.
    """
    where = f"[{path}]" if path else "top level"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, found {table!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {known}")
    values = {}
    for name, value in table.items():
        sub = f"{path}.{name}" if path else name
        hint = hints[name]
        item_cls = _dataclass_in(typing.get_args(hint)[0]) \
            if typing.get_origin(hint) is tuple else None
        target = None if item_cls is not None else _dataclass_in(hint)
        if target is not None:
            if isinstance(value, dict):
                values[name] = _build(target, value, sub)
            elif value is None and _type_ok(None, hint):
                values[name] = None
            else:
                raise ConfigError(f"{where} {name} = {value!r} has the wrong type; expected "
                                  f"a table [{sub}]")
            continue
        if item_cls is not None:
            if not isinstance(value, list):
                raise ConfigError(f"{sub} must be an array of tables ([[{sub}]]), "
                                  f"found {value!r}")
            values[name] = tuple(_build(item_cls, v, f"{sub}#{i + 1}")
                                 for i, v in enumerate(value))
            continue
        if not _type_ok(value, hint):
            raise ConfigError(f"{where} {name} = {value!r} has the wrong type; expected "
                              f"{_describe(hint)}")
        values[name] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**values)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where} {exc}") from exc


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    for h in typing.get_args(hint):
        if dataclasses.is_dataclass(h):
            return h
    return None


def from_dict(doc: dict, source: str = "config") -> Config:
    """A Config from a parsed TOML document (errors prefixed with ``source``).

    ``[source.mqtt]`` takes ``enabled = false`` to turn the MQTT source off, and
    connects with the top-level ``[mqtt]`` settings unless it has its own
    ``[source.mqtt.mqtt]`` table (the decision sink likewise). With
    ``[source.mqtt] partition = "K/N"`` every fixed client_id gets ``-p<K>``.
    """
    try:
        doc = dict(doc)
        src = doc.get("source", {})
        if isinstance(src, dict) and isinstance(src.get("mqtt", {}), dict):
            src = dict(src)
            table = dict(src.get("mqtt", {}))
            enabled = table.pop("enabled", True)
            if not isinstance(enabled, bool):
                raise ConfigError(f"[source.mqtt] enabled = {enabled!r} has the wrong type; "
                                  "expected true or false")
            if enabled:
                table.setdefault("mqtt", doc.get("mqtt", {}))
                src["mqtt"] = table
            elif table.get("partition"):
                raise ConfigError(f"[source.mqtt] partition = {table['partition']!r} needs the "
                                  "MQTT source, which is disabled (enabled = false, or "
                                  "--no-mqtt-source); enable it or drop the partition")
            else:
                src["mqtt"] = None
            doc["source"] = src
        config = _apply_partition(_build(Config, doc, ""))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def read_toml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; is this a "
                              "config file?")
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}; give the path "
                          "of a TOML file (see deploy/edgefuse.toml)") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def merge(base: dict, overrides: dict) -> dict:
    """Deep-merge ``overrides`` (e.g. from the command line) into ``base``."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike | None = None,
                overrides: dict | None = None) -> Config:
    """The defaults, then the TOML file, then the overrides (command line)."""
    doc = read_toml(path) if path is not None else {}
    return from_dict(merge(doc, overrides or {}),
                     source=str(path) if path is not None else "command line")
