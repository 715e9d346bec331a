"""Every decision sink keeps one contract (runtime.service.sink_base.Sink).

The same tests run against each implementation: the JSONL sink on a file and
on a stream, and the MQTT sink against a real Mosquitto. Then the factory
(``make_sinks``): the order it opens in, what it refuses.
"""
from __future__ import annotations

import io
import json
import threading

import pytest

from edgefuse.runtime.core.errors import ConfigError, EdgefuseError
from edgefuse.runtime.service.config import from_dict
from edgefuse.runtime.service.outbox import Outbox, OutboxInUseError, OutboxSettings
from edgefuse.runtime.service.sinks import (JsonlSink, MqttDecisionSink, MqttSinkSettings, Sink,
                                            make_sinks)
from edgefuse.sensors.live.mqtt_client import MqttSettings
from tests.conftest import Collector, free_port, wait_until
from tests.test_outbox import decision




def mqtt(port: int) -> MqttSettings:
    return MqttSettings(host="127.0.0.1", port=port, reconnect_min_s=0.1, reconnect_max_s=0.5)


class Case:
    """One sink under test: how to build it and how to read back what it delivered."""

    def __init__(self, kind: str, tmp_path, broker=None):
        self.kind = kind
        self.tmp_path = tmp_path
        self.broker = broker
        self.stream = io.StringIO()
        self.collector = None

    def build(self) -> Sink:
        if self.kind == "jsonl-file":
            return JsonlSink(self.tmp_path / "d.jsonl")
        if self.kind == "jsonl-stream":
            return JsonlSink(self.stream, name="stream")
        if self.collector is None:
            self.collector = Collector(self.broker, "edgefuse/+/decisions")
        return MqttDecisionSink(self.tmp_path / "o.db", mqtt(self.broker.port))

    def delivered(self) -> list[str]:
        if self.kind == "jsonl-file":
            return (self.tmp_path / "d.jsonl").read_text().splitlines()
        if self.kind == "jsonl-stream":
            return self.stream.getvalue().splitlines()
        return [p.decode() for p in self.collector.payloads()]

    def close(self) -> None:
        if self.collector is not None:
            self.collector.close()


@pytest.fixture(params=["jsonl-file", "jsonl-stream", "mqtt"])
def case(request, tmp_path):
    broker = request.getfixturevalue("broker") if request.param == "mqtt" else None
    c = Case(request.param, tmp_path, broker)
    yield c
    c.close()


def test_open_write_flush_drain_close_delivers_every_decision_once(case):
    sink = case.build()
    assert isinstance(sink.name, str) and sink.name
    with sink:
        sink.write_many([decision(i) for i in range(5)])
        sink.flush()
        sink.write(decision(5))
        sink.write_many([])
        assert sink.drain(10) is True, sink.stats()
        stats = sink.stats()
    expect = [decision(i).to_json() for i in range(6)]
    wait_until(lambda: len(case.delivered()) >= 6, 10, "six decisions delivered")
    assert sorted(case.delivered()) == sorted(expect)
    assert all(isinstance(v, (int, float, bool)) for v in stats.values()), stats
    if case.kind == "mqtt":
        assert stats["acked"] == 6 and stats["outbox_depth"] == 0
    else:
        assert stats == {"written": 6}
        assert case.delivered() == expect  # in the order written


def test_close_is_safe_before_open_and_twice(case):
    sink = case.build()
    sink.close()
    sink.close()
    with case.build() as sink:
        sink.write(decision(0))
    sink.close()


def test_writing_to_a_sink_not_open_is_refused_by_name(case):
    sink = case.build()
    if case.kind != "jsonl-stream":  # a stream given is open from the start: the caller's
        with pytest.raises(EdgefuseError, match=f"sink {sink.name} is not open"):
            sink.write(decision(0))
    sink.open()
    sink.close()
    with pytest.raises(EdgefuseError, match="is not open"):
        sink.write(decision(1))


def test_constructors_do_no_io(tmp_path):
    """Sinks, like sources, touch nothing until open(): no file, no lock, no thread."""
    out = tmp_path / "folder" / "d.jsonl"
    outbox = tmp_path / "state" / "o.db"
    threads = set(threading.enumerate())
    JsonlSink(out)
    mqtt_sink = MqttDecisionSink(outbox, mqtt(free_port()))
    assert not out.parent.exists() and not outbox.parent.exists()
    assert set(threading.enumerate()) == threads
    assert not mqtt_sink.connected and mqtt_sink.last_error is None
    assert mqtt_sink.stats()["published"] == 0 and mqtt_sink.drain(0.0)


def test_mqtt_drain_without_a_broker_gives_up_and_the_rows_wait_for_the_next_open(tmp_path,
                                                                                 caplog):
    sink = MqttDecisionSink(tmp_path / "o.db", mqtt(free_port()))
    with sink:
        sink.write_many([decision(i) for i in range(3)])
        sink.flush()
        assert sink.drain(0.3) is False
    assert "3 decision(s) still wait in the outbox" in caplog.text
    with Outbox(tmp_path / "o.db") as box:  # closed by the sink: free for the next owner
        assert [json.loads(r.payload)["seq"] for r in box.peek(10)] == [0, 1, 2]


def test_mqtt_sink_opens_its_outbox_from_its_settings(tmp_path):
    settings = MqttSinkSettings(max_rows=2, synchronous="normal")
    with MqttDecisionSink(tmp_path / "deep" / "o.db", mqtt(free_port()), settings) as sink:
        sink.write_many([decision(i) for i in range(5)])
        stats = sink.stats()
        assert sink.outbox.max_rows == 2
    assert stats["outbox_depth"] == 2 and stats["outbox_dropped_full"] == 3


def test_a_refused_outbox_leaves_nothing_open(tmp_path):
    path = tmp_path / "o.db"
    with Outbox(path):
        sink = MqttDecisionSink(path, mqtt(free_port()))
        with pytest.raises(OutboxInUseError):
            sink.open()
        assert sink.outbox is None
        sink.close()


@pytest.mark.parametrize("kwargs,expect", [
    ({"topic": "edgefuse/+/decisions"}, "must contain {node} and no wildcards"),
    ({"topic": "edgefuse/decisions"}, "must contain {node}"),
    ({"max_inflight": 0}, "max_inflight = 0 is out of range; allowed: 1..1000"),
    ({"retry_min_s": 2.0, "retry_max_s": 1.0}, "allowed 0 < retry_min_s <= retry_max_s"),
    ({"synchronous": "off"}, "synchronous = 'off' is not allowed; allowed: ['full', 'normal']"),
    ({"max_rows": 0}, "max_rows = 0 is out of range; allowed: 1..100000000"),
])
def test_sink_settings_are_checked_once_in_their_dataclass(kwargs, expect):
    with pytest.raises(ConfigError) as err:
        MqttSinkSettings(**kwargs)
    assert expect in str(err.value)


def test_the_outbox_values_have_one_owner():
    with pytest.raises(ConfigError, match="synchronous = 'off' is not allowed"):
        OutboxSettings(synchronous="off")
    with pytest.raises(ConfigError, match="max_rows = 0 is out of range"):
        OutboxSettings(max_rows=0)


def _config(tmp_path, **sink):
    return from_dict({"mqtt": {"port": free_port()}, "sink": sink})


def test_make_sinks_builds_in_opening_order_and_opens_nothing(tmp_path):
    out = tmp_path / "d.jsonl"
    config = _config(tmp_path, mqtt={"outbox": str(tmp_path / "o.db")},
                     jsonl={"path": str(out)}, stdout={"enabled": True})
    sinks = make_sinks(config)
    assert [s.name for s in sinks] == ["mqtt", "jsonl", "stdout"]
    assert isinstance(sinks[0], MqttDecisionSink) and sinks[0].outbox_path == tmp_path / "o.db"
    assert not out.exists() and not (tmp_path / "o.db").exists()
    assert [s.name for s in make_sinks(_config(tmp_path, mqtt={"enabled": False},
                                               jsonl={"path": str(out)}))] == ["jsonl"]


def test_make_sinks_refuses_a_config_without_sinks(tmp_path):
    with pytest.raises(ConfigError, match="no sink is enabled"):
        make_sinks(_config(tmp_path, mqtt={"enabled": False}))


def test_a_second_owner_is_refused_before_it_truncates_the_jsonl_file(tmp_path):
    """Opened in make_sinks' order, the outbox lock refuses a second daemon's sinks
    before its JSONL sink (append = false) truncates the file the first one writes."""
    out = tmp_path / "d.jsonl"
    config = _config(tmp_path, mqtt={"outbox": str(tmp_path / "o.db")},
                     jsonl={"path": str(out), "append": False})
    first = make_sinks(config)
    try:
        for sink in first:
            sink.open()
        for sink in first:
            sink.write_many([decision(0)])
            sink.flush()
        second = make_sinks(config)
        with pytest.raises(OutboxInUseError):
            for sink in second:
                sink.open()
        for sink in second:
            sink.close()
        assert out.read_text() == decision(0).to_json() + "\n"
    finally:
        for sink in first:
            sink.close()
