"""`edgefuse simulate`: recorded chunks go out unchanged, in order, in the wire formats."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import serial

from edgefuse.runtime.core import wire
from edgefuse.runtime.cli import main
from edgefuse.runtime.core.errors import ConfigError, TransportError
from edgefuse.sensors.live.mqtt_client import MqttSettings
from edgefuse.runtime.service.simulate import MqttPublisher, Publisher, SerialPublisher, simulate
from edgefuse.sensors.live import serial_framing
from edgefuse.sensors.readers.inputs import open_inputs
from tests.conftest import Collector, free_port, wait_until
from tests.daemon_helpers import T0, synthetic_chunks, write_log

pytestmark = pytest.mark.timeout(120)


def _same(a, b) -> bool:
    return (a.node, a.modality, a.t0_ns, a.rate_hz, a.seq, a.full_scale) == \
        (b.node, b.modality, b.t0_ns, b.rate_hz, b.seq, b.full_scale) and \
        np.array_equal(a.samples, b.samples)


def test_mqtt_sends_every_chunk_in_order_in_the_binary_format(broker):
    chunks = synthetic_chunks("n1", 3.0) + synthetic_chunks("n2", 3.0, seed=5)
    chunks.sort(key=lambda c: (c.t0_ns, c.node, c.modality))
    collector = Collector(broker, "edgefuse/+/+")
    summary = simulate(chunks, MqttPublisher(MqttSettings(host=broker.host, port=broker.port)),
                       speed=100.0)
    wait_until(lambda: len(collector.messages) >= len(chunks), 10, "every chunk")
    collector.close()
    assert summary.chunks == len(chunks) and summary.streams["n2/seismic"] > 0
    got = []
    for topic, payload in collector.messages:
        _, node, modality = topic.split("/")
        assert payload[:4] == wire.MAGIC
        got.append(wire.decode_payload(payload, node, modality))
    assert len(got) == len(chunks) and all(_same(a, b) for a, b in zip(got, chunks))


@pytest.mark.parametrize("protocol", ["binary", "json"])
def test_serial_frames_parse_back_to_the_same_chunks(socat_link, protocol):
    chunks = synthetic_chunks("s1", 2.0)
    parser = (serial_framing.BinaryFrameParser(serial_framing.DEFAULT_MAX_FRAME, None)
              if protocol == "binary" else serial_framing.JsonLineParser(1 << 20, None))
    got: list = []
    port = serial.Serial(socat_link.device, timeout=0.1)
    done = threading.Event()

    def reader():
        while not done.is_set() or port.in_waiting:
            got.extend(parser.feed(port.read(65536)))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    simulate(chunks, SerialPublisher(socat_link.peer, protocol=protocol), speed=100.0)
    wait_until(lambda: len(got) >= len(chunks), 10, "every frame")
    done.set()
    thread.join(5)
    port.close()
    assert parser.errors == {} and len(got) == len(chunks)
    assert all(_same(a, b) for a, b in zip(got, chunks))


class _Recorder(Publisher):
    def __init__(self):
        self.sent = []

    def send(self, chunk):
        self.sent.append(chunk)


def test_long_pauses_are_shortened_without_touching_event_times():
    hour = 3600 * 10**9
    chunks = synthetic_chunks("a", 1.0) + synthetic_chunks("b", 1.0, start_ns=T0 + hour)
    rec = _Recorder()
    summary = simulate(chunks, rec, speed=1000.0, max_idle_s=0.01)
    assert rec.sent == chunks  # same objects, same order
    # the skipped wall time follows from the event times alone: about 1 h / speed - idle
    assert 3.5 < summary.skipped_idle_s < 3.6


def test_cli_simulate_plays_a_log(tmp_path, broker):
    chunks = synthetic_chunks("n1", 2.0)
    log = write_log(tmp_path / "in.mcap", chunks)
    collector = Collector(broker, "edgefuse/+/+")
    assert main(["simulate", str(log), "--mqtt", f"{broker.host}:{broker.port}",
                 "--speed", "100"]) == 0
    wait_until(lambda: len(collector.messages) >= len(chunks), 10, "every chunk")
    collector.close()
    assert len(collector.messages) == len(list(open_inputs([log]).chunks()))


def test_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="speed must be > 0"):
        simulate([], _Recorder(), speed=0)
    with pytest.raises(TransportError, match="cannot connect to the MQTT broker"):
        MqttPublisher(MqttSettings(port=free_port()))
    log = write_log(tmp_path / "in.mcap", synthetic_chunks("n1", 1.0))
    assert main(["simulate", str(log)]) == 1
    assert "exactly one of --mqtt HOST:PORT or --serial PATH" in capsys.readouterr().err
    assert main(["simulate", str(log), "--serial", str(tmp_path / "no-such-tty")]) == 1
    assert "cannot open serial device" in capsys.readouterr().err
