"""Live sources built from their settings: the one place that knows which class
serves which setting, so callers (the daemon) see only the ``base.Source``
protocol and never ask a source what it is.

    sources = make_sources(config.source, modalities=model_modalities,
                           clock_check=ClockCheck(...))

``[source.mqtt]`` gives one MQTT source, its ``receiver`` setting choosing the
child process (``MqttProcessSource``) or paho's thread in this process
(``MqttThreadSource``); every ``[[source.serial]]`` table gives one
``SerialSource``. ``modalities`` are the model's: what MQTT subscribes to and
what a serial line may carry, unless a source's ``allowed_modalities`` says
otherwise.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from edgefuse.sensors.live.base import ClockCheck, Source
from edgefuse.sensors.live.mqtt_process import MqttProcessSource
from edgefuse.sensors.live.mqtt_source import MqttSourceBase, MqttSourceSettings, MqttThreadSource
from edgefuse.sensors.live.serial_source import SerialSettings, SerialSource


class SourcesSettings(Protocol):
    """What make_sources reads (runtime.service.config.SourceSettings is one)."""

    @property
    def mqtt(self) -> MqttSourceSettings | None: ...

    @property
    def serial(self) -> Sequence[SerialSettings]: ...


def make_mqtt_source(settings: MqttSourceSettings, *, modalities: Iterable[str] | None = None,
                     clock_check: ClockCheck | None = None) -> MqttSourceBase:
    """The MQTT source the settings' ``receiver`` names (same protocol, same counters)."""
    cls = MqttThreadSource if settings.receiver == "thread" else MqttProcessSource
    return cls(settings, modalities=modalities, clock_check=clock_check)


def make_sources(settings: SourcesSettings, *, modalities: Iterable[str] | None = None,
                 clock_check: ClockCheck | None = None) -> list[Source]:
    """Every source the settings enable, MQTT first, not opened; [] when none is."""
    modalities = None if modalities is None else tuple(modalities)
    sources: list[Source] = []
    if settings.mqtt is not None:
        sources.append(make_mqtt_source(settings.mqtt, modalities=modalities,
                                        clock_check=clock_check))
    for serial_settings in settings.serial:
        sources.append(SerialSource(serial_settings, modalities=modalities,
                                    clock_check=clock_check))
    return sources
