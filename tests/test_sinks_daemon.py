"""The daemon hands every batch to every sink and measures latency from the decisions:
the latency trace names, per decision, the chunk that closed its window (bench/live.py
matches it with the publish time of that chunk)."""
from __future__ import annotations

import json

import pytest

from edgefuse.runtime.service.simulate import MqttPublisher, simulate
from edgefuse.sensors.live.mqtt_client import MqttSettings
from tests.daemon_helpers import MODEL, DaemonProcess, synthetic_chunks

pytestmark = pytest.mark.timeout(240)


def test_latency_trace_names_the_closing_chunk_of_every_decision(tmp_path, broker):
    out, trace = tmp_path / "d.jsonl", tmp_path / "trace.jsonl"
    chunks = synthetic_chunks("n1", 6.0)
    daemon = DaemonProcess(tmp_path, ["--model", MODEL, "--mqtt", f"{broker.host}:{broker.port}",
                                      "--no-mqtt-sink", "--out", out, "--latency-trace", trace])
    try:
        daemon.wait_ready()
        simulate(chunks, MqttPublisher(MqttSettings(host=broker.host, port=broker.port)),
                 speed=20.0)
        daemon.wait_metric("edgefuse_source_decoded_total", len(chunks))
        daemon.wait_metric("edgefuse_decision_latency_seconds_count", 1)
        assert daemon.value("edgefuse_sink_written_total", sink="jsonl") >= 1
        assert daemon.terminate() == 0, daemon.log()
    finally:
        daemon.close()
    decisions = [json.loads(x) for x in out.read_text().splitlines()]
    traced = [json.loads(x) for x in trace.read_text().splitlines()]
    assert len(decisions) > 5
    assert [(t["node"], t["seq"], t["window_end_ns"]) for t in traced] == \
        [(d["node"], d["seq"], d["window_end_ns"]) for d in decisions]
    sent = {(c.node, c.modality, c.seq) for c in chunks}
    closed = [t for t in traced if t["closing"] != ["", "", -1]]
    assert len(closed) >= len(traced) - 4, traced  # only the drain's flush closes none
    for t in closed:
        assert tuple(t["closing"]) in sent, t
        assert 0 <= t["out_ns"] - t["arrival_ns"] < 30e9, t
    for t in traced:
        if t not in closed:
            assert t["arrival_ns"] == t["out_ns"], t  # end of input: counted from its output
