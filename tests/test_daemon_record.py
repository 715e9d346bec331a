"""`edgefuse run --record`: a live daemon (real Mosquitto, `edgefuse simulate` as the
nodes) records the chunks it read and the decisions it made; standard decoders read
the file (tests/mcap_standard.py), its decisions are the daemon's JSONL, and replaying
it gives that JSONL byte for byte."""
from __future__ import annotations

import json

import pytest

from edgefuse.runtime.service.simulate import simulate
from edgefuse.sensors.readers.inputs import open_inputs
from tests import mcap_standard
from tests.daemon_helpers import (
    SAMPLE, DaemonProcess, mqtt_args, mqtt_publisher, replay_text,
)

pytestmark = pytest.mark.timeout(120)


def test_live_daemon_records_chunks_and_decisions(tmp_path, broker):
    out, rec = tmp_path / "live.jsonl", tmp_path / "live.mcap"
    daemon = DaemonProcess(tmp_path, mqtt_args(broker, out, tmp_path / "outbox.sqlite",
                                               "--record", rec))
    try:
        daemon.wait_ready()
        summary = simulate(open_inputs([SAMPLE]).chunks(), mqtt_publisher(broker),
                           speed=50.0, max_idle_s=0.5)
        daemon.wait_metric("edgefuse_source_decoded_total", summary.chunks)
        assert daemon.terminate() == 0, daemon.log()
    finally:
        daemon.close()
    live = out.read_text()
    channels, messages = mcap_standard.read(rec)
    schemas = {c["topic"]: c["schema"] for c in channels}
    nodes = {json.loads(line)["node"] for line in live.splitlines()}
    assert {t for t, s in schemas.items() if s == "edgefuse.Decision"} == \
        {f"/{n}/decisions" for n in nodes}
    chunks = [m for t, _, m in messages if schemas[t] == "edgefuse.SensorChunk"]
    assert len(chunks) == summary.chunks
    decisions = [json.dumps(d, separators=(",", ":"))
                 for t, _, d in messages if schemas[t] == "edgefuse.Decision"]
    assert live and sorted(decisions) == sorted(live.splitlines())
    # what the daemon recorded replays to what it decided
    assert replay_text(rec) == live
