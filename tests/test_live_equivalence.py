"""Live == replay: the daemon fed by `edgefuse simulate` over a real Mosquitto broker
or a real pty pair writes, byte for byte, what `edgefuse replay` writes for the log.

The daemon is started the way the issue says works without a config file
(`edgefuse run --model M --mqtt HOST:PORT --out FILE`); it is asked to stop
with SIGTERM once it has decoded every chunk, and flushes like replay does at
the end of its input, so whole files are compared.
"""
from __future__ import annotations

import json

import pytest

from edgefuse.sensors.live.mqtt_client import MqttSettings
from edgefuse.runtime.service.simulate import MqttPublisher, SerialPublisher, simulate
from edgefuse.sensors.readers.inputs import open_inputs
from tests.conftest import Collector
from tests.daemon_helpers import MODEL, SAMPLE, DaemonProcess, replay_text

pytestmark = pytest.mark.timeout(180)


def _chunk_count(log) -> int:
    return sum(1 for _ in open_inputs([log]).chunks())


def test_live_mqtt_equals_replay(tmp_path, broker):
    out = tmp_path / "live.jsonl"
    daemon = DaemonProcess(tmp_path, ["--model", MODEL, "--mqtt", f"{broker.host}:{broker.port}",
                                      "--out", out],
                           env={"XDG_STATE_HOME": str(tmp_path / "state")})  # default outbox
    collector = Collector(broker, "edgefuse/+/decisions")
    try:
        daemon.wait_ready()
        summary = simulate(open_inputs([SAMPLE]).chunks(),
                           MqttPublisher(MqttSettings(host=broker.host, port=broker.port)),
                           speed=50.0, max_idle_s=0.5)
        assert summary.chunks == _chunk_count(SAMPLE)
        daemon.wait_metric("edgefuse_source_decoded_total", summary.chunks)
        assert daemon.terminate() == 0, daemon.log()
    finally:
        daemon.close()
    expected = replay_text(SAMPLE)
    assert expected and out.read_text() == expected
    # the same decisions went out over MQTT (QoS 1, via the default outbox path)
    assert (tmp_path / "state" / "edgefuse" / "outbox.sqlite").exists()
    lines = expected.splitlines()
    got = [p.decode() for p in collector.payloads()]
    collector.close()
    assert sorted(set(got)) == sorted(lines)
    assert {json.loads(x)["node"] for x in lines} == {"123", "129", "81", "121"}


@pytest.mark.parametrize("protocol", ["binary", "json"])
def test_live_serial_equals_replay(tmp_path, socat_link, protocol):
    out = tmp_path / "live.jsonl"
    daemon = DaemonProcess(tmp_path, ["--model", MODEL, "--serial", socat_link.device,
                                      "--serial-protocol", protocol, "--no-mqtt-source",
                                      "--no-mqtt-sink", "--out", out])
    try:
        daemon.wait_ready()
        summary = simulate(open_inputs([SAMPLE]).chunks(),
                           SerialPublisher(socat_link.peer, protocol=protocol),
                           speed=50.0, max_idle_s=0.5)
        daemon.wait_metric("edgefuse_source_decoded_total", summary.chunks)
        assert daemon.value("edgefuse_source_malformed_total") == 0
        assert daemon.terminate() == 0, daemon.log()
    finally:
        daemon.close()
    assert out.read_text() == replay_text(SAMPLE)
