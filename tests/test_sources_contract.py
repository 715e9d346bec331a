"""The live-source protocol (sensors.live.base.Source), one suite for every implementation.

Each case builds a source through the factory, as the daemon does, over a real peer: a
Mosquitto on an ephemeral port for both MQTT receivers (child process and paho thread),
a pty pair for serial. The same checks run against each: name, read before open, open,
wait_connected, last_error, alive, one chunk through, stats() of numbers, close
(idempotent, what was queued stays readable).
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from edgefuse.runtime.core import wire
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import TransportError
from edgefuse.sensors.live.base import Source
from edgefuse.sensors.live.factory import make_sources
from edgefuse.sensors.live.mqtt_client import MqttSettings
from edgefuse.sensors.live.mqtt_process import MqttProcessSource
from edgefuse.sensors.live.mqtt_source import MqttSourceSettings, MqttThreadSource
from edgefuse.sensors.live.serial_framing import encode_chunk_frame
from edgefuse.sensors.live.serial_source import SerialSettings, SerialSource

from tests.conftest import publish, wait_until


@dataclass(frozen=True)
class SourcesSettings:  # the shape of runtime.service.config.SourceSettings
    mqtt: MqttSourceSettings | None = None
    serial: tuple[SerialSettings, ...] = ()


@dataclass
class Case:
    source: Source
    name: str
    cls: type
    send: Callable[[Chunk], None]   # one chunk from the peer's side


def chunk(seq: int = 0) -> Chunk:
    rng = np.random.default_rng(seq)
    return Chunk("n1", "acoustic", 1_700_000_000_000_000_000 + seq * 10**9, 800.0,
                 rng.normal(0, 1, (16, 1)).astype(np.float32), seq)


def _mqtt_case(request, receiver: str, cls: type) -> Case:
    broker = request.getfixturevalue("broker")
    mqtt = MqttSettings(host=broker.host, port=broker.port, reconnect_min_s=0.1,
                        reconnect_max_s=1.0)
    (source,) = make_sources(SourcesSettings(mqtt=MqttSourceSettings(mqtt=mqtt,
                                                                     receiver=receiver)),
                             modalities=("acoustic",))
    return Case(source, f"mqtt:{broker.host}:{broker.port}", cls,
                lambda c: publish(broker, [(f"edgefuse/{c.node}/{c.modality}",
                                            wire.encode_binary(c))]))


def _serial_case(request) -> Case:
    pty = request.getfixturevalue("pty_pair")
    (source,) = make_sources(SourcesSettings(mqtt=None, serial=(
        SerialSettings(device=pty.path, protocol="binary"),)), modalities=("acoustic",))
    return Case(source, f"serial:{pty.path}", SerialSource,
                lambda c: pty.write(encode_chunk_frame(c)))


CASES = {
    "mqtt-process": lambda r: _mqtt_case(r, "process", MqttProcessSource),
    "mqtt-thread": lambda r: _mqtt_case(r, "thread", MqttThreadSource),
    "serial": _serial_case,
}


@pytest.fixture(params=sorted(CASES))
def case(request) -> Case:
    made = CASES[request.param](request)
    yield made
    made.source.close()


def _numbers(stats: dict) -> None:
    for key, value in stats.items():
        if key == "malformed":
            assert all(isinstance(n, int) for n in value.values()), value
        else:
            assert isinstance(value, (int, float)), (key, value)  # bool counts as 0/1


def test_the_factory_builds_the_configured_class_with_its_name(case):
    assert type(case.source) is case.cls and isinstance(case.source, Source)
    assert case.source.name == case.name and case.name in repr(case.source)


def test_before_open(case):
    source = case.source
    with pytest.raises(TransportError, match="before open"):
        source.read(0)
    assert source.wait_connected(0) is False
    assert source.alive
    _numbers(source.stats())
    assert source.stats()["connected"] is False


def test_open_connect_read_close(case):
    source = case.source
    with source as opened:
        assert opened is source
        assert source.wait_connected(5), (source.last_error, source.stats())
        assert source.last_error is None and source.alive
        assert source.read(0) == [] and source.read(0.05) == []
        want = chunk(seq=3)
        case.send(want)
        got = wait_until(lambda: source.read(0.1), 5, "one chunk")
        assert [(c.node, c.modality, c.t0_ns, c.seq) for c in got] == \
            [(want.node, want.modality, want.t0_ns, want.seq)]
        np.testing.assert_array_equal(got[0].samples, want.samples)
        assert got[0].received_ns is not None  # stamped by the source at receipt
        stats = source.stats()
        for key in (*Source.COUNTERS, "malformed", "malformed_total", "queued", "connected"):
            assert key in stats, key
        _numbers(stats)
        assert stats["connected"] is True and stats["malformed"] == {}
        assert stats["decoded"] == 1 and stats["delivered"] == 1 and stats["queued"] == 0
        case.send(chunk(seq=4))
        wait_until(lambda: source.stats()["decoded"] == 2, 5, "the second chunk decoded")
    assert source.wait_connected(0) is False and source.stats()["connected"] is False
    source.close()  # closing twice is harmless
    assert [c.seq for c in source.read(0)] == [4]  # what was queued stays readable
    assert source.read(0) == []


def test_properties_only_report(request, broker):
    """The receiver process has no thread of its own: its properties never pump the
    pipe nor restart the child; read() does (the daemon calls it every iteration)."""
    case = _mqtt_case(request, "process", MqttProcessSource)
    with case.source as source:
        assert source.wait_connected(5)
        child = source._proc
        os.kill(child.pid, signal.SIGKILL)
        child.wait(5)
        for _ in range(50):
            assert source.alive and source.last_error is None
        assert source._proc is child  # nothing noticed: no property moved anything
        wait_until(lambda: not source.read(0.05) and source.stats()["receiver_starts"] == 2,
                   10, "read() to restart the receiver")
        assert source.wait_connected(5)
        case.send(chunk(seq=5))
        assert [c.seq for c in wait_until(lambda: source.read(0.1), 5, "a chunk")] == [5]
