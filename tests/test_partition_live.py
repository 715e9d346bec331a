"""Partitioned daemons on a real Mosquitto: `edgefuse run --partition K/N` processes,
nodes sent as devices of a partitioned fleet (`simulate` with partitions = N).

- every node is decided by exactly one daemon, its partition's, and the union of
  their decisions is, byte for byte and per node in order, a replay of the input;
- a node sent to the wrong partition is refused, counted and warned;
- a daemon killed with SIGKILL loses no decision (its outbox is sent by the
  restarted daemon), and its nodes resume, the chunks sent while it was down
  included (a persistent session, QoS 1, client id <client_id>-p<K>).
"""
from __future__ import annotations

import itertools
import json
import threading

import pytest

from edgefuse.runtime.core import wire
from edgefuse.runtime.service.simulate import MqttPublisher, simulate
from edgefuse.sensors.live.mqtt_client import MqttSettings
from edgefuse.sensors.live.topics import WRONG_PARTITION, partition_of
from tests.conftest import Collector, publish, wait_until
from tests.daemon_helpers import (DaemonProcess, by_node, mqtt_args, replay_text,
                                  synthetic_chunks, write_log)

pytestmark = pytest.mark.timeout(240)


def _fleet(nodes: list[str], seconds: float) -> list:
    chunks = [c for i, node in enumerate(nodes) for c in synthetic_chunks(node, seconds, seed=i)]
    chunks.sort(key=lambda c: (c.t0_ns, c.node, c.modality, c.seq))
    return chunks


def _publisher(broker, partitions: int) -> MqttPublisher:
    return MqttPublisher(MqttSettings(host=broker.host, port=broker.port), partitions=partitions)


def _start(tmp_path, broker, k: int, n: int, *extra, name: str | None = None) -> DaemonProcess:
    name = name or f"p{k}"
    return DaemonProcess(tmp_path, mqtt_args(broker, tmp_path / f"{name}.jsonl",
                                             tmp_path / f"p{k}.outbox.sqlite",
                                             "--partition", f"{k}/{n}", *extra), name=name)


def test_three_daemons_decide_each_node_once_and_equal_a_replay(tmp_path, broker):
    n = 3
    nodes = [f"n{i}" for i in range(6)]
    assert {partition_of(node, n) for node in nodes} == {0, 1, 2}  # each daemon has work
    chunks = _fleet(nodes, 10.0)
    expected = replay_text(write_log(tmp_path / "fleet.mcap", chunks))
    daemons = [_start(tmp_path, broker, k, n) for k in range(n)]
    try:
        for d in daemons:
            d.wait_ready()
        # a device that hashes otherwise: n1 belongs to partition 1, sends on p0
        stranger = next(c for c in chunks if c.node == "n1")
        assert partition_of("n1", n) == 1
        publish(broker, [("edgefuse/p0/n1/acoustic", wire.encode_binary(stranger))])
        daemons[0].wait_metric("edgefuse_source_malformed_total", 1, reason=WRONG_PARTITION)
        simulate(chunks, _publisher(broker, n), speed=50.0, max_idle_s=0.5)
        for k, d in enumerate(daemons):
            mine = sum(partition_of(c.node, n) == k for c in chunks)
            d.wait_metric("edgefuse_source_decoded_total", mine)
            assert d.value("edgefuse_partition_info", partition=str(k), partitions=str(n)) == 1
        wrong = [d.value("edgefuse_source_malformed_total", reason=WRONG_PARTITION)
                 for d in daemons]
        for d in daemons:
            assert d.terminate() == 0, d.log()
    finally:
        for d in daemons:
            d.close()
    assert wrong == [1, 0, 0]
    warned = [line for line in daemons[0].log().splitlines() if WRONG_PARTITION in line]
    assert len(warned) == 1 and "node 'n1'" in warned[0] and "edgefuse/p1/n1" in warned[0]

    decided = {k: by_node((tmp_path / f"p{k}.jsonl").read_text().splitlines())
               for k in range(n)}
    deciders = {node: [k for k in range(n) if node in decided[k]] for node in nodes}
    assert deciders == {node: [partition_of(node, n)] for node in nodes}
    union = {node: lines for per in decided.values() for node, lines in per.items()}
    assert union == by_node(expected.splitlines())
    assert sorted(itertools.chain(*union.values())) == sorted(expected.splitlines())


@pytest.mark.slow
def test_a_killed_daemon_loses_nothing_and_its_nodes_resume(tmp_path, persistent_broker):
    broker, n = persistent_broker, 2
    config = tmp_path / "edgefuse.toml"
    config.write_text('[mqtt]\nclient_id = "gw"\n\n'
                      "[source.mqtt]\nqos = 1\npersistent_session = true\n")
    nodes = ["n0", "n1", "n4", "n5"]
    assert {partition_of(node, n) for node in nodes} == {0, 1}
    victim = partition_of("n0", n)
    survivor = 1 - victim
    chunks = _fleet(nodes, 30.0)
    collector = Collector(broker, "edgefuse/+/decisions", session=True,
                          client_id="partition-collector")
    killed = threading.Event()
    after_kill: list = []   # the victim's chunks sent once it was dead

    def feed():
        for chunk in chunks:
            if killed.is_set() and partition_of(chunk.node, n) == victim:
                after_kill.append(chunk)
            yield chunk

    extra = ("--config", config)
    keep = _start(tmp_path, broker, survivor, n, *extra)
    first = _start(tmp_path, broker, victim, n, *extra, name="victim")
    second = None
    try:
        keep.wait_ready()
        first.wait_ready()
        sender = threading.Thread(target=simulate, args=(feed(), _publisher(broker, n)),
                                  kwargs={"speed": 4.0}, name="fleet-sender")
        sender.start()
        victim_out = tmp_path / "victim.jsonl"
        wait_until(lambda: victim_out.exists() and victim_out.read_text().count("\n") >= 4, 60,
                   "decisions of the victim before it is killed")
        first.kill()
        killed.set()
        assert sender.is_alive(), "the stream ended before SIGKILL: slow the sender down"
        before = victim_out.read_text().splitlines()
        second = _start(tmp_path, broker, victim, n, *extra, name="restarted")
        second.wait_ready()
        sent_while_down = len(after_kill)   # before the restarted daemon subscribed
        sender.join(120)
        assert sent_while_down, "nothing was sent while the victim was down: slow the sender"
        # everything sent since the kill reaches the restarted daemon (the broker kept
        # its session); chunks read but not decided by the killed one are gone
        second.wait_metric("edgefuse_source_decoded_total", len(after_kill))
        keep.wait_metric("edgefuse_source_decoded_total",
                         sum(partition_of(c.node, n) == survivor for c in chunks))
        assert second.terminate() == 0, second.log()
        assert keep.terminate() == 0, keep.log()
        outs = {name: (tmp_path / f"{name}.jsonl").read_text().splitlines()
                for name in ("victim", "restarted", f"p{survivor}")}
        everything = set(itertools.chain(*outs.values()))
        wait_until(lambda: everything <= {p.decode() for p in collector.payloads()}, 30,
                   "every decision, the killed daemon's included, at the subscriber")
    finally:
        collector.close()
        for d in (keep, first, second):
            if d is not None:
                d.close()

    assert before and set(before) <= {p.decode() for p in collector.payloads()}
    victim_nodes = {node for node in nodes if partition_of(node, n) == victim}
    resumed = by_node(outs["restarted"])
    assert set(resumed) == victim_nodes   # its nodes resumed, on it alone
    last_before = {node: max(json.loads(x)["seq"] for x in lines)
                   for node, lines in by_node(before).items()}
    for node in victim_nodes & last_before.keys():
        assert max(json.loads(x)["seq"] for x in resumed[node]) > last_before[node]
    # the survivor never noticed: its nodes equal a replay of their chunks
    theirs = [c for c in chunks if partition_of(c.node, n) == survivor]
    assert by_node(outs[f"p{survivor}"]) == by_node(
        replay_text(write_log(tmp_path / "survivor.mcap", theirs)).splitlines())
    # (node, seq) names one window across the kill (consumers deduplicate on it)
    windows: dict = {}
    for d in (json.loads(p) for p in collector.payloads()):
        windows.setdefault((d["node"], d["seq"]), set()).add(d["window_start_ns"])
    assert all(len(v) == 1 for v in windows.values())
