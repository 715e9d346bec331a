"""Outbox durability and bounds; JSONL and MQTT decision sinks against a real broker."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from edgefuse.runtime.core.decision import Decision
from edgefuse.runtime.core.errors import ConfigError, InputError
from edgefuse.sensors.live.mqtt_client import MqttSettings
from edgefuse.runtime.service.outbox import Outbox, OutboxInUseError
from edgefuse.runtime.service.sinks import JsonlSink, MqttDecisionSink, MqttSinkSettings

from tests.conftest import Collector, Mosquitto, free_port, wait_until


def decision(seq: int, node: str = "n1") -> Decision:
    return Decision(node=node, seq=seq, window_start_ns=seq * 500_000_000,
                    window_end_ns=seq * 500_000_000 + 10**9, label="vehicle",
                    scores={"background": 0.25, "vehicle": 0.75}, used=("acoustic",),
                    missing=("seismic",), fallback="masked", missing_reason={"seismic": "gap"},
                    model="gv-fusion@1.0.0", coverage={"acoustic": 1.0, "seismic": 0.0})


def test_put_peek_ack_depth(tmp_path):
    with Outbox(tmp_path / "o.db") as box:
        ids = [box.put(f"t/{i}", f"p{i}") for i in range(5)]
        assert box.depth() == 5
        rows = box.peek(3)
        assert [r.id for r in rows] == ids[:3]
        assert [(r.topic, r.payload) for r in rows] == [("t/0", b"p0"), ("t/1", b"p1"),
                                                       ("t/2", b"p2")]
        assert box.ack([ids[1], ids[0], 999_999]) == 2   # unknown ids are ignored
        assert [r.id for r in box.peek(10)] == [ids[2], ids[3], ids[4]]
        assert box.depth() == 3 and box.stats()["acked"] == 2
    with Outbox(tmp_path / "o.db") as again:
        assert [r.payload for r in again.peek(10)] == [b"p2", b"p3", b"p4"]
        assert again.depth() == 3


def test_full_outbox_drops_the_oldest_and_counts(tmp_path):
    with Outbox(tmp_path / "o.db", max_rows=4) as box:
        for i in range(10):
            box.put("t", str(i))
        assert box.depth() == 4
        assert [r.payload for r in box.peek(10)] == [b"6", b"7", b"8", b"9"]
        assert box.stats() == {"put": 10, "acked": 0, "dropped_full": 6, "depth": 4,
                               "dropped_disk_full": 0, "delete_failures": 0,
                               "acks_pending": 0, "disk_full": 0}


def test_put_many_is_one_batch_and_respects_the_bound(tmp_path):
    with Outbox(tmp_path / "o.db", max_rows=5) as box:
        box.put("t", "old")
        ids = box.put_many([("t", str(i)) for i in range(3)])
        assert len(ids) == 3 and box.depth() == 4
        box.put_many([("t", str(i)) for i in range(10, 17)])   # 7 > max_rows
        assert [r.payload for r in box.peek(10)] == [f"{i}".encode() for i in range(12, 17)]
        assert box.stats() == {"put": 11, "acked": 0, "dropped_full": 6, "depth": 5,
                               "dropped_disk_full": 0, "delete_failures": 0,
                               "acks_pending": 0, "disk_full": 0}
        assert box.put_many([]) == []


def test_bad_files_and_settings_are_refused(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(InputError, match="cannot open outbox"):
        Outbox(junk)
    with pytest.raises(ConfigError):
        Outbox(tmp_path / "x.db", synchronous="off")
    with Outbox(tmp_path / "y.db") as box, pytest.raises(InputError, match="exceeds"):
        box.put("t", b"x" * (300 * 1024))


_WRITER = textwrap.dedent("""
    import sys, time
    from edgefuse.runtime.service.outbox import Outbox, OutboxInUseError
    box = Outbox(sys.argv[1], synchronous=sys.argv[2])
    for i in range(int(sys.argv[3])):
        box.put("edgefuse/n1/decisions", ("row %d" % i).encode())
    print("written", flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("sync", ["full", "normal"])
def test_rows_survive_sigkill_of_the_writer(tmp_path, sync):
    path = tmp_path / "o.db"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), sync, "50"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    assert proc.returncode == -signal.SIGKILL
    with Outbox(path) as box:
        assert box.depth() == 50
        assert [r.payload for r in box.peek(100)] == [f"row {i}".encode() for i in range(50)]


def test_jsonl_sink_writes_canonical_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    with JsonlSink(path) as sink:
        for i in range(3):
            sink.write(decision(i))
    lines = path.read_text().splitlines()
    assert lines == [decision(i).to_json() for i in range(3)]
    assert json.loads(lines[1])["seq"] == 1
    stream = io.StringIO()
    sink = JsonlSink(stream)
    sink.write(decision(7))
    sink.close()
    assert stream.getvalue() == decision(7).to_json() + "\n"


def mqtt_settings(broker_or_port, **kw) -> MqttSettings:
    port = broker_or_port if isinstance(broker_or_port, int) else broker_or_port.port
    return MqttSettings(host="127.0.0.1", port=port, reconnect_min_s=0.1, reconnect_max_s=0.5,
                        **kw)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_mqtt_sink_delivers_and_empties_the_outbox(tmp_path, broker, protocol):
    collector = Collector(broker, "edgefuse/+/decisions")
    try:
        sink = MqttDecisionSink(tmp_path / "o.db", mqtt_settings(broker, protocol=protocol))
        with sink:
            for i in range(20):
                sink.write(decision(i, node=f"n{i % 2}"))
            sink.write_many([decision(i, node=f"n{i % 2}") for i in range(20, 30)])
            assert sink.drain(10), sink.stats()
            stats = sink.stats()
        wait_until(lambda: len(collector.messages) >= 30, 5, "30 decisions at the subscriber")
    finally:
        collector.close()
    assert sorted(json.loads(p)["seq"] for p in collector.payloads()) == list(range(30))
    assert {t for t, _ in collector.messages} == {"edgefuse/n0/decisions", "edgefuse/n1/decisions"}
    assert stats["acked"] == 30 and stats["outbox_depth"] == 0 and stats["inflight"] == 0


@pytest.mark.slow
def test_mqtt_sink_delivers_after_broker_restart(tmp_path, persistent_broker):
    broker = persistent_broker
    collector = Collector(broker, "edgefuse/+/decisions", session=True, client_id="keeper")
    sink = MqttDecisionSink(tmp_path / "o.db", mqtt_settings(broker))
    sink.open()
    try:
        sink.write(decision(0))
        assert sink.drain(5)
        broker.stop()                                   # SIGTERM: saves the session
        wait_until(lambda: not sink.connected, 5, "the sink to notice")
        for i in range(1, 6):
            sink.write(decision(i))
        time.sleep(2.0)                                 # nothing can be acknowledged now
        assert sink.outbox.depth() == 5
        broker.start()
        assert sink.drain(15), sink.stats()
        wait_until(lambda: len(collector.messages) >= 6, 10, "all decisions at the subscriber")
        stats = sink.stats()
    finally:
        sink.close()
        collector.close()
    assert sorted({json.loads(p)["seq"] for p in collector.payloads()}) == list(range(6))
    assert stats["disconnects"] >= 1 and stats["connects"] >= 2 and stats["acked"] >= 6


_PUBLISHER = textwrap.dedent("""
    import sys, time
    from edgefuse.runtime.core.decision import Decision
    from edgefuse.sensors.live.mqtt_client import MqttSettings
    from edgefuse.runtime.service.sinks import MqttDecisionSink
    sink = MqttDecisionSink(sys.argv[1], MqttSettings(port=int(sys.argv[2]), reconnect_min_s=0.1,
                                                      reconnect_max_s=0.5))
    sink.open()
    for i in range(8):
        sink.write(Decision("n1", i, i, i + 1, "vehicle", {"vehicle": 1.0}, ("acoustic",), (),
                            "none", {}, "m@1"))
    print("written", flush=True)
    time.sleep(60)
""")


@pytest.mark.slow
def test_outbox_delivers_after_sigkill_of_the_publisher(tmp_path):
    port = free_port()  # no broker yet: the publisher cannot deliver before it dies
    proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(tmp_path / "o.db"),
                             str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    broker = Mosquitto(tmp_path / "broker", port=port)
    broker.start()
    collector = Collector(broker, "edgefuse/+/decisions")
    try:
        with MqttDecisionSink(tmp_path / "o.db", mqtt_settings(port)) as sink:
            assert sink.outbox.depth() == 8
            assert sink.drain(10), sink.stats()
        wait_until(lambda: len(collector.messages) >= 8, 5, "8 decisions at the subscriber")
    finally:
        collector.close()
        broker.stop(kill=True)
    assert [json.loads(p)["seq"] for p in collector.payloads()] == list(range(8))


def test_refused_publishes_stay_in_the_outbox_and_are_retried(tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("topic read edgefuse/#\n")  # anonymous clients may read, not write
    broker = Mosquitto(tmp_path / "broker", listener_conf=("allow_anonymous true",
                                                           f"acl_file {acl}"))
    broker.start()
    try:
        sink = MqttDecisionSink(tmp_path / "o.db", mqtt_settings(broker),
                                MqttSinkSettings(retry_min_s=0.1, retry_max_s=0.2))
        with sink:
            for i in range(3):
                sink.write(decision(i))
            wait_until(lambda: sink.stats()["rejected"] >= 6, 10, "refusals and retries")
            assert not sink.drain(0.5)
            stats = sink.stats()
    finally:
        broker.stop(kill=True)
    assert stats["outbox_depth"] == 3 and stats["acked"] == 0 and stats["published"] >= 6


def test_decision_topic_is_checked(tmp_path):
    with pytest.raises(ConfigError):
        MqttDecisionSink(tmp_path / "o.db", MqttSettings(),
                         MqttSinkSettings(topic="edgefuse/+/decisions"))


def test_a_second_outbox_on_the_same_file_is_refused_until_the_first_closes(tmp_path):
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        box.put("t", "x")
        with pytest.raises(OutboxInUseError, match=re.escape(
                f"outbox {path} is in use: process {os.getpid()} holds {path}.lock")):
            Outbox(path)
        assert box.depth() == 1  # the refused one touched nothing
    box.close()  # a second close does nothing
    with Outbox(path) as again:
        assert again.depth() == 1


_OWNER = textwrap.dedent("""
    import sys, time
    from edgefuse.runtime.core.errors import EdgefuseError
    from edgefuse.runtime.service.outbox import Outbox
    try:
        box = Outbox(sys.argv[1])
    except EdgefuseError as exc:
        print("refused:", exc, flush=True)
        sys.exit(1)
    print("owner", flush=True)
    time.sleep(60)
""")


def test_a_second_process_is_refused_and_sigkill_releases_the_outbox(tmp_path):
    """Two daemons on one outbox delivered every decision several times: the second
    process must be refused at once, and the owner's death (even SIGKILL) frees it."""
    path = tmp_path / "o.db"
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(path)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert owner.stdout.readline().strip() == "owner"
        second = subprocess.run([sys.executable, "-c", _OWNER, str(path)], capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 1, second.stdout + second.stderr
        assert second.stdout.count("\n") == 1 and second.stdout.startswith(
            f"refused: outbox {path} is in use: process {owner.pid} holds {path}.lock"), \
            second.stdout
        assert "--outbox" in second.stdout  # says what to do
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(5)
    third = subprocess.Popen([sys.executable, "-c", _OWNER, str(path)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert third.stdout.readline().strip() == "owner"
    finally:
        third.send_signal(signal.SIGKILL)
        third.wait(5)
