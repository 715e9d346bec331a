"""The real daemon under hostile MQTT input (issue 8): absurd rates and times from a
fake node, and a flood of node names, against `edgefuse run` with a real Mosquitto.

The daemon must stay alive, answer SIGTERM, and decide the good node exactly as
`edgefuse replay` of that node's chunks does (whole decision lines compared: what
a replay writes is what the daemon writes, whatever seq scheme both use).
"""
from __future__ import annotations

import struct

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgefuse.runtime.core import wire
from edgefuse.runtime.service.simulate import simulate
from tests.conftest import wait_until
from tests.daemon_helpers import (T0, DaemonProcess, by_node, mqtt_args, mqtt_publisher,
                                  replay_text, synthetic_chunks, write_log)

pytestmark = pytest.mark.timeout(300)



def _aligner_count(daemon: DaemonProcess, kind: str) -> float:
    """An aligner counter, under its generic name or as an aligner event kind."""
    return max(daemon.value(f"edgefuse_aligner_{kind}_total"),
               daemon.value("edgefuse_aligner_events_total", kind=kind))


def _json(t0: int, rate: str, seq: int, n: int = 3) -> bytes:
    values = ",".join(str(v) for v in range(1, n + 1))
    return b'{"t0_ns":%d,"rate_hz":%s,"seq":%d,"values":[%s]}' % (t0, rate.encode(), seq,
                                                                   values.encode())


def _binary(t0: int, rate: float, seq: int, n: int = 3) -> bytes:
    header = wire.HEADER.pack(wire.MAGIC, wire.VERSION, 2, 1, rate, t0, seq, 0.0, 0)
    return header + np.arange(1, n + 1, dtype="<f4").tobytes()


class FastPublisher:
    """One paho client publishing as fast as it can (the flood)."""

    def __init__(self, broker, qos: int = 0):
        self.qos = qos
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.max_queued_messages_set(0)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send_all(self, items) -> None:
        infos = [self.client.publish(topic, payload, qos=self.qos) for topic, payload in items]
        for info in infos:
            info.wait_for_publish(30)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_absurd_rates_and_times_from_a_fake_node_do_not_crash_hang_or_disturb(tmp_path,
                                                                              broker):
    """The issue's messages: after a normal chunk, rate_hz 5e-324 / 1e-300 / 1e-5 (JSON
    and binary), three null-rate chunks 1e18 ns apart, a rate the wire takes but the
    modality does not (1 Hz seismic), t0 outside [0, 2**62), and a consecutive chunk
    1e18 ns ahead. Meanwhile node n1 streams normally."""
    good = synthetic_chunks("n1", 10.0)
    half = len(good) // 2
    topic = "edgefuse/evil5/seismic"
    t1 = T0 + 1_000_000_000
    refused_by_wire = [_json(t1, "5e-324", 1), _json(t1, "1e-300", 2), _json(t1, "1e-5", 3),
                       _binary(t1, 5e-324, 4), _binary(t1, 1e-300, 5), _binary(t1, 1e-5, 6),
                       _json(-1, "800.0", 7), _json(1 << 62, "800.0", 8),
                       _binary((1 << 63) - 1, 800.0, 9)]
    accepted = [_json(T0, "800.0", 0, n=400),                             # the normal chunk
                _json(t1 + 10**9, "1.0", 10),                             # bad for seismic
                *[_json(t1 + 2 * 10**9 + i * 10**18, "null", 11 + i) for i in range(3)],
                _json(T0 + 400 * 1_250_000, "800.0", 1, n=400),           # seq 1 again...
                _binary(T0 + 10**18, 800.0, 2, n=400)]                    # ...then a jump
    out = tmp_path / "d.jsonl"
    daemon = DaemonProcess(tmp_path, mqtt_args(broker, out, tmp_path / "ob"))
    try:
        daemon.wait_ready()
        pub = mqtt_publisher(broker)
        for chunk in good[:half]:
            pub.send(chunk)
        for payload in accepted[:1] + refused_by_wire + accepted[1:]:
            pub.client.publish(topic, payload, qos=1)
        for chunk in good[half:]:
            pub.send(chunk)
        pub.close()
        daemon.wait_metric("edgefuse_source_decoded_total", len(good) + len(accepted))
        daemon.wait_metric("edgefuse_source_malformed_total", len(refused_by_wire))
        # the decoder names why: 6 absurd rates, 3 times out of range
        daemon.wait_metric("edgefuse_source_malformed_total", 6, reason="bad_rate")
        daemon.wait_metric("edgefuse_source_malformed_total", 3, reason="bad_time")
        assert daemon.proc.poll() is None, daemon.log()
        # the main loop still runs: its metrics show what the aligner refused (1 Hz seismic)
        wait_until(lambda: _aligner_count(daemon, "bad_rate_chunks") >= 1, 30,
                   f"bad_rate_chunks counted (log:\n{daemon.log()[-3000:]})", 0.2)
        assert daemon.terminate(timeout_s=30) == 0, daemon.log()[-3000:]
    finally:
        daemon.close()
    log = daemon.log()
    assert "Traceback" not in log, log[-3000:]
    assert "evil5/seismic seq 10 refused (bad_rate_chunks)" in log
    assert "evil5/seismic seq 11: the rate estimated from chunk times" in log
    nodes = by_node(out.read_text().splitlines())
    assert nodes["n1"], "no decision for the good node"
    assert "\n".join(nodes["n1"]) + "\n" == replay_text(write_log(tmp_path / "n1.mcap", good))


# The flood is 10,000 names, 50 times max_nodes (200 here, not the default 1000, so
# that the per-node metrics scraped while waiting stay small): far past the limit.
MAX_NODES = 200
FLOOD = 10_000


def test_a_10000_name_flood_then_a_real_node_is_decided(tmp_path, broker):
    config = tmp_path / "edgefuse.toml"
    config.write_text(f"[pipeline.aligner]\nmax_nodes = {MAX_NODES}\n")
    out = tmp_path / "d.jsonl"
    real = synthetic_chunks("real1", 10.0, seed=4)
    one = struct.pack("<h", 7) * 3
    flood = [(f"edgefuse/fake{i:05d}/seismic",
              wire.HEADER.pack(wire.MAGIC, wire.VERSION, 1, 1, 1605.23, T0 + i * 1000, 0,
                               32767.0, 0) + one)
             for i in range(FLOOD)]
    daemon = DaemonProcess(tmp_path, mqtt_args(broker, out, tmp_path / "ob", "--config", config))
    try:
        daemon.wait_ready()
        pub = FastPublisher(broker)
        pub.send_all(flood)
        pub.close()
        daemon.wait_metric("edgefuse_source_received_total", FLOOD, timeout_s=120)

        def flood_consumed() -> bool:  # every fake past the first MAX_NODES displaced one
            return (_aligner_count(daemon, "displaced_nodes")
                    + daemon.value("edgefuse_source_dropped_queue_full_total")
                    >= FLOOD - MAX_NODES)
        wait_until(flood_consumed, 120, "the flood to reach the aligner", 0.2)
        assert _aligner_count(daemon, "too_many_nodes_chunks") == 0

        pub = mqtt_publisher(broker)
        simulate(real, pub, speed=20.0)
        pub.close()
        daemon.wait_metric("edgefuse_stream_chunks_total", len(real), node="real1")
        assert daemon.proc.poll() is None
        assert daemon.terminate(timeout_s=60) == 0, daemon.log()[-3000:]
    finally:
        daemon.close()
    log = daemon.log()
    assert "displaced to admit node" in log and "Traceback" not in log
    nodes = by_node(out.read_text().splitlines())
    assert nodes.get("real1"), "the real node was never decided"
    assert "\n".join(nodes["real1"]) + "\n" == replay_text(write_log(tmp_path / "r.mcap", real))
