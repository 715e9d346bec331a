"""Decisions keep their identity across daemon restarts; one daemon owns an outbox.

`edgefuse run` as a real process, a real Mosquitto and a persistent-session
subscriber. Consumers deduplicate on (node, seq), so a seq that restarts at 0
after a restart would make them drop new decisions as repeats of old ones:
(node, seq) must always name the same window (seq is the window index).
"""
from __future__ import annotations

import json
import threading
from collections import defaultdict

import pytest

from edgefuse.runtime.core.inference import OnnxModel
from edgefuse.runtime.service.simulate import simulate
from tests.conftest import Collector, wait_until
from tests.daemon_helpers import (MODEL, DaemonProcess, mqtt_args, mqtt_publisher,
                                  synthetic_chunks)

pytestmark = pytest.mark.timeout(300)




def _two_nodes(seconds: float) -> list:
    chunks = synthetic_chunks("n1", seconds, seed=1) + synthetic_chunks("n2", seconds, seed=2)
    chunks.sort(key=lambda c: (c.t0_ns, c.node, c.modality, c.seq))
    return chunks


def _stream_then_sigterm(tmp_path, broker, out, outbox, name, chunks) -> None:
    """A daemon decides ``chunks`` streamed to it, then SIGTERM drains it (exit 0)."""
    daemon = DaemonProcess(tmp_path, mqtt_args(broker, out, outbox), name=name)
    try:
        daemon.wait_ready()
        simulate(chunks, mqtt_publisher(broker), speed=50.0)
        daemon.wait_metric("edgefuse_source_decoded_total", len(chunks))
        assert daemon.terminate() == 0, daemon.log()
    finally:
        daemon.close()


@pytest.mark.slow
def test_seq_never_names_two_windows_across_sigterm_and_sigkill_restarts(tmp_path,
                                                                         persistent_broker):
    broker = persistent_broker
    hop_ns = OnnxModel.load(MODEL).contract.hop_ns
    chunks = _two_nodes(30.0)
    third = len(chunks) // 3
    parts = [chunks[:third], chunks[third:2 * third], chunks[2 * third:]]
    outbox = tmp_path / "outbox.sqlite"
    collector = Collector(broker, "edgefuse/+/decisions", session=True,
                          client_id="restart-collector")
    outs = [tmp_path / f"d{i}.jsonl" for i in range(3)]
    try:
        # 1: the first third, then SIGTERM (drains: its decisions reach the broker)
        _stream_then_sigterm(tmp_path, broker, outs[0], outbox, "first", parts[0])

        # 2: the second third, SIGKILL while it is still streaming in
        second = DaemonProcess(tmp_path, mqtt_args(broker, outs[1], outbox), name="second")
        try:
            second.wait_ready()
            sender = threading.Thread(target=simulate, args=(parts[1], mqtt_publisher(broker)),
                                      kwargs={"speed": 4.0}, name="second-sender")
            sender.start()
            second.wait_metric("edgefuse_source_decoded_total", len(parts[1]) // 2)
            wait_until(lambda: outs[1].exists() and outs[1].read_text().count("\n") >= 3, 30,
                       "decisions of the second daemon before it is killed")
            second.kill()
            assert sender.is_alive(), "the stream ended before SIGKILL: slow the sender down"
            sender.join(60)
        finally:
            second.close()

        # 3: the last third to a restarted daemon (it also sends what the killed one left)
        _stream_then_sigterm(tmp_path, broker, outs[2], outbox, "third", parts[2])
        drained = outs[0].read_text().splitlines() + outs[2].read_text().splitlines()
        wait_until(lambda: set(drained) <= {p.decode() for p in collector.payloads()}, 30,
                   "every decision of the drained daemons at the subscriber")
    finally:
        collector.close()

    received = [json.loads(p) for p in collector.payloads()]
    windows: dict[tuple[str, int], set[tuple[int, int]]] = defaultdict(set)
    for d in received:
        windows[(d["node"], d["seq"])].add((d["window_start_ns"], d["window_end_ns"]))
    reused = {key: sorted(spans) for key, spans in windows.items() if len(spans) > 1}
    assert not reused, f"{len(reused)} (node, seq) pairs name two windows: {reused}"
    for d in received:  # seq is the window's index: window k spans [k*hop, k*hop + window)
        assert d["window_start_ns"] == d["seq"] * hop_ns, d
    # not vacuous: each node has decisions from all three daemons' data
    killed = [json.loads(x) for x in outs[1].read_text().splitlines()]
    assert killed, "the killed daemon decided nothing"
    for node in ("n1", "n2"):
        starts = {d["window_start_ns"] for d in received if d["node"] == node}
        for part in parts:
            lo = min(c.t0_ns for c in part if c.node == node)
            hi = max(c.t0_ns for c in part if c.node == node)
            assert any(lo <= s <= hi for s in starts), (node, lo, hi)


def test_second_daemon_on_the_same_outbox_is_refused_in_one_line(tmp_path, broker):
    """Two publishers of one outbox sent every decision several times; now the second
    daemon exits 1 at start naming the outbox, and the first goes on alone."""
    outbox = tmp_path / "outbox.sqlite"
    collector = Collector(broker, "edgefuse/+/decisions")
    owner = DaemonProcess(tmp_path, mqtt_args(broker, tmp_path / "a.jsonl", outbox), name="owner")
    try:
        owner.wait_ready()
        intruder = DaemonProcess(tmp_path, mqtt_args(broker, tmp_path / "b.jsonl", outbox),
                                 name="intruder")
        try:
            rc = intruder.proc.wait(120)
        finally:
            intruder.close()
        text = intruder.log()
        errors = [line for line in text.splitlines() if "error:" in line]
        assert rc == 1, text
        assert len(errors) == 1 and f"outbox {outbox} is in use" in errors[0], text
        assert f"process {owner.proc.pid}" in errors[0], text
        assert "Traceback" not in text, text

        chunks = synthetic_chunks("n1", 6.0)
        simulate(chunks, mqtt_publisher(broker), speed=50.0)
        owner.wait_metric("edgefuse_source_decoded_total", len(chunks))
        assert owner.terminate() == 0, owner.log()
    finally:
        owner.close()
    written = (tmp_path / "a.jsonl").read_text().splitlines()
    try:
        wait_until(lambda: len(collector.payloads()) >= len(written) > 0, 30,
                   "the owner's decisions at the subscriber")
    finally:
        collector.close()
    payloads = [p.decode() for p in collector.payloads()]
    assert sorted(payloads) == sorted(written)  # each exactly once: one publisher
