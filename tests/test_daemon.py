"""The daemon against real peers: systemd notifications, metrics, SIGHUP, faults.

Every test runs `edgefuse run` as a process, a real Mosquitto on a free port
and/or real pty pairs (socat), and checks the decisions against a replay of
the very chunks that were sent.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from edgefuse.runtime.cli import main
from edgefuse.runtime.service.simulate import SerialPublisher, payload_of, simulate
from tests.conftest import Collector, Mosquitto, free_port, wait_until
from tests.daemon_helpers import (MODEL, DaemonProcess, by_node, mqtt_args, mqtt_publisher,
                                  replay_text, synthetic_chunks, write_log)

pytestmark = pytest.mark.timeout(240)




def test_notify_watchdog_metrics_and_sigterm(tmp_path, broker):
    daemon = DaemonProcess(tmp_path, mqtt_args(broker, tmp_path / "d.jsonl", tmp_path / "ob"),
                           watchdog_usec=1_000_000)
    try:
        daemon.wait_ready()
        assert daemon.value("edgefuse_ready") == 1
        # the main loop pings at half the interval while healthy
        wait_until(lambda: daemon.notify.count("WATCHDOG=1") >= 3, 10, "three WATCHDOG=1")
        chunks = synthetic_chunks("n1", 4.0)
        simulate(chunks, mqtt_publisher(broker), speed=20.0)
        daemon.wait_metric("edgefuse_source_decoded_total", len(chunks))
        daemon.wait_metric("edgefuse_decision_latency_seconds_count", 1)
        m = daemon.metrics()
        assert m[("edgefuse_stream_chunks_total", (("modality", "acoustic"), ("node", "n1")))] \
            == sum(c.modality == "acoustic" for c in chunks)
        assert daemon.value("edgefuse_outbox_depth") >= 0
        assert daemon.value("edgefuse_modality_missing_rate", modality="seismic") == 0
        assert daemon.terminate() == 0, daemon.log()
    finally:
        daemon.close()
    lines = daemon.notify.lines()
    assert lines.index("READY=1") < lines.index("STOPPING=1")


def test_sighup_reloads_the_model_and_refuses_a_broken_one(tmp_path, broker):
    model = tmp_path / "model.onnx"
    shutil.copy(MODEL, model)
    shutil.copy(MODEL.with_name("standin_av.seismic.onnx"), tmp_path)
    out = tmp_path / "d.jsonl"
    daemon = DaemonProcess(tmp_path, ["--model", model, "--mqtt", f"{broker.host}:{broker.port}",
                                      "--out", out, "--outbox", tmp_path / "ob"])
    try:
        daemon.wait_ready()
        chunks = synthetic_chunks("n1", 6.0)
        simulate(chunks[: len(chunks) // 2], mqtt_publisher(broker), speed=50.0)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_metric("edgefuse_model_reloads_total", 1, result="ok")
        assert "RELOADING=1" in daemon.notify.lines()
        model.write_bytes(b"not an onnx model")
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_metric("edgefuse_model_reloads_total", 1, result="failed")
        simulate(chunks[len(chunks) // 2:], mqtt_publisher(broker), speed=50.0)
        daemon.wait_metric("edgefuse_source_decoded_total", len(chunks))
        assert daemon.terminate() == 0
    finally:
        daemon.close()
    # same weights after the reload: the decisions (and their seq) are those of a replay
    assert out.read_text() == replay_text(write_log(tmp_path / "in.mcap", chunks))


def test_malformed_payloads_are_counted_and_a_silent_modality_turns_missing(tmp_path, broker):
    """acoustic of n1 pauses for 6 s (> max_wait 2 s), garbage is mixed in; the stream goes on."""
    chunks = synthetic_chunks("n1", 16.0, pause=("acoustic", 5.0, 11.0))
    out = tmp_path / "d.jsonl"
    daemon = DaemonProcess(tmp_path, mqtt_args(broker, out, tmp_path / "ob"))
    garbage = [("edgefuse/n1/acoustic", b"{not json"),                 # bad_json
               ("edgefuse/n1/seismic", payload_of(chunks[0])[:51]),    # truncated binary
               # 2 channels: decoded by the source, refused by the aligner (its check)
               ("edgefuse/n1/acoustic", b'{"t0_ns": %d, "rate_hz": 100.0, "seq": 0, '
                                        b'"values": [[1, 2]]}' % chunks[0].t0_ns),
               ("edgefuse/n1/seismic", b'{"t0_ns": "soon"}')]           # bad_fields
    try:
        daemon.wait_ready()
        pub = mqtt_publisher(broker)
        for i, chunk in enumerate(chunks):
            pub.send(chunk)
            if i % 10 == 5:
                topic, payload = garbage[(i // 10) % len(garbage)]
                pub.client.publish(topic, payload, qos=1)
        pub.close()
        bad = [(i // 10) % len(garbage) for i in range(len(chunks)) if i % 10 == 5]
        n_wrong = bad.count(2)  # the wrong channel count, garbage[2]
        daemon.wait_metric("edgefuse_source_decoded_total", len(chunks) + n_wrong)
        daemon.wait_metric("edgefuse_source_malformed_total", len(bad) - n_wrong)
        for reason in ("bad_json", "truncated", "bad_fields"):
            assert daemon.value("edgefuse_source_malformed_total", reason=reason) >= 1, reason
        daemon.wait_metric("edgefuse_aligner_wrong_channel_chunks_total", n_wrong)
        assert n_wrong >= 1
        assert daemon.terminate() == 0
    finally:
        daemon.close()
    text = out.read_text()
    assert text == replay_text(write_log(tmp_path / "good.mcap", chunks))
    decisions = [json.loads(x) for x in text.splitlines()]
    missing = [d for d in decisions if d["missing"] == ["acoustic"]]
    assert missing, "the paused modality never turned missing"
    first, last = decisions.index(missing[0]), decisions.index(missing[-1])
    assert all(d["missing"] == [] for d in decisions[:first])
    back = decisions[last + 1:]  # the acoustic sensor is back (the data's very end aside)
    assert back and back[0]["missing"] == [] and sum(not d["missing"] for d in back) >= 5
    for d in missing:
        assert 5.0e9 <= d["window_end_ns"] - chunks[0].t0_ns and d["used"] == ["seismic"]
        assert d["missing_reason"]["acoustic"]


def test_sigkill_with_decisions_in_the_outbox_delivers_them_after_restart(tmp_path, broker):
    """Chunks come from one broker, decisions go to another that is down: they wait in
    the outbox; the daemon is killed (SIGKILL), the decision broker comes up, the
    restarted daemon delivers every row that was waiting."""
    sink_broker = Mosquitto(tmp_path / "sink-broker", port=free_port())  # not started yet
    outbox = tmp_path / "outbox.sqlite"
    config = tmp_path / "edgefuse.toml"
    config.write_text(f"[sink.mqtt.mqtt]\nhost = '127.0.0.1'\nport = {sink_broker.port}\n"
                      "reconnect_min_s = 0.1\nreconnect_max_s = 0.5\n")
    args = ["--config", config, *mqtt_args(broker, tmp_path / "d.jsonl", outbox)]
    chunks = synthetic_chunks("n1", 8.0)
    daemon = DaemonProcess(tmp_path, args, name="first")
    try:
        daemon.wait_ready()
        simulate(chunks, mqtt_publisher(broker), speed=50.0)
        daemon.wait_metric("edgefuse_source_decoded_total", len(chunks))
        daemon.wait_metric("edgefuse_outbox_depth", 5)
        daemon.kill()
    finally:
        daemon.close()
    with sqlite3.connect(outbox) as db:
        waiting = [bytes(p).decode() for (p,) in db.execute("SELECT payload FROM outbox")]
    written = (tmp_path / "d.jsonl").read_text().splitlines()
    assert len(waiting) >= 5 and set(waiting) <= set(written)

    sink_broker.start()
    collector = Collector(sink_broker, "edgefuse/+/decisions")
    again = DaemonProcess(tmp_path, args, name="second")
    try:
        again.wait_ready()
        wait_until(lambda: set(waiting) <= {p.decode() for p in collector.payloads()}, 30,
                   "the rows waiting in the outbox to reach the decision broker")
        again.wait_metric("edgefuse_outbox_events_total", len(waiting), kind="outbox_acked")
        assert again.value("edgefuse_outbox_depth") == 0
        assert again.terminate() == 0
    finally:
        again.close()
        collector.close()
        sink_broker.stop(kill=True)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            kids.append(int(stat.parent.name))
    return kids


def test_mqtt_receiver_process_killed_is_restarted_and_the_stream_goes_on(tmp_path, broker):
    """The daemon's MQTT receiver child dies between two halves of a stream: the
    daemon stays up, starts a new one, which subscribes again; every chunk sent
    after that is decided, and the decisions equal a replay of all the chunks."""
    chunks = synthetic_chunks("n1", 10.0)
    half = len(chunks) // 2
    out = tmp_path / "d.jsonl"
    daemon = DaemonProcess(tmp_path, mqtt_args(broker, out, tmp_path / "ob"))
    try:
        daemon.wait_ready()
        simulate(chunks[:half], mqtt_publisher(broker), speed=50.0)
        daemon.wait_metric("edgefuse_source_decoded_total", half)
        (child,) = _children(daemon.proc.pid)
        os.kill(child, signal.SIGKILL)
        daemon.wait_metric("edgefuse_source_receiver_starts_total", 2)
        daemon.wait_metric("edgefuse_source_subscribed_total", 2)
        assert child not in _children(daemon.proc.pid)
        simulate(chunks[half:], mqtt_publisher(broker), speed=50.0)
        daemon.wait_metric("edgefuse_source_decoded_total", len(chunks))
        assert daemon.value("edgefuse_source_disconnects_total") == 1
        assert daemon.proc.poll() is None
        assert daemon.terminate() == 0
    finally:
        daemon.close()
    assert out.read_text() == replay_text(write_log(tmp_path / "in.mcap", chunks))


def test_serial_pty_closed_and_reopened_recovers(tmp_path, socat_link):
    chunks = synthetic_chunks("s1", 10.0)
    half = len(chunks) // 2
    out = tmp_path / "d.jsonl"
    daemon = DaemonProcess(tmp_path, ["--model", MODEL, "--serial", socat_link.device,
                                      "--no-mqtt-source", "--no-mqtt-sink", "--out", out])
    try:
        daemon.wait_ready()
        simulate(chunks[:half], SerialPublisher(socat_link.peer), speed=50.0)
        daemon.wait_metric("edgefuse_source_decoded_total", half)
        socat_link.stop()   # unplugged: both ptys vanish
        wait_until(lambda: daemon.value("edgefuse_source_connected") == 0, 10,
                   "the daemon to notice the unplug")
        socat_link.start()  # plugged in again at the same path
        daemon.wait_metric("edgefuse_source_reconnects_total", 1)
        simulate(chunks[half:], SerialPublisher(socat_link.peer), speed=50.0)
        daemon.wait_metric("edgefuse_source_decoded_total", len(chunks))
        assert daemon.proc.poll() is None
        assert daemon.terminate() == 0
    finally:
        daemon.close()
    assert out.read_text() == replay_text(write_log(tmp_path / "in.mcap", chunks))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_broker_down_30s_loses_no_decision_and_resubscribes(tmp_path, socat_link):
    """Node m1 sends over MQTT before and after a 30 s broker outage; node s1 sends over
    serial during the outage, so its decisions are made while the broker is away and
    must wait in the outbox. Every decision reaches a persistent-session subscriber."""
    broker = Mosquitto(tmp_path / "broker", persistence=True)
    broker.start()
    collector = Collector(broker, "edgefuse/+/decisions", session=True,
                          client_id="outage-collector")
    mqtt_chunks = synthetic_chunks("m1", 12.0, seed=1)
    serial_chunks = synthetic_chunks("s1", 12.0, seed=2)
    half = len(mqtt_chunks) // 2
    out = tmp_path / "d.jsonl"
    config = tmp_path / "edgefuse.toml"
    config.write_text("[mqtt]\nreconnect_min_s = 0.2\nreconnect_max_s = 1.0\n")
    daemon = DaemonProcess(tmp_path, ["--config", config, *mqtt_args(broker, out,
                                                                      tmp_path / "ob"),
                                      "--serial", socat_link.device])
    try:
        daemon.wait_ready()
        simulate(mqtt_chunks[:half], mqtt_publisher(broker), speed=50.0)
        daemon.wait_metric("edgefuse_source_decoded_total", half)
        before = len(collector.payloads())
        broker.stop()
        down_since = time.monotonic()
        sender = threading.Thread(target=simulate, args=(serial_chunks,
                                                         SerialPublisher(socat_link.peer)),
                                  kwargs={"speed": 2.0})
        sender.start()
        sender.join(60)
        daemon.wait_metric("edgefuse_source_decoded_total", half + len(serial_chunks))
        daemon.wait_metric("edgefuse_outbox_depth", 1)  # s1's decisions wait on disk
        source = f"mqtt:127.0.0.1:{broker.port}"
        assert daemon.value("edgefuse_source_connected", source=source) == 0
        time.sleep(max(0.0, 30.0 - (time.monotonic() - down_since)))
        assert daemon.proc.poll() is None, daemon.log()
        broker.start()
        daemon.wait_metric("edgefuse_source_subscribed_total", 2)  # re-subscribed
        simulate(mqtt_chunks[half:], mqtt_publisher(broker), speed=50.0)
        daemon.wait_metric("edgefuse_source_decoded_total", len(mqtt_chunks) + len(serial_chunks))
        assert daemon.terminate() == 0, daemon.log()
        written = out.read_text().splitlines()
        wait_until(lambda: set(written) <= {p.decode() for p in collector.payloads()}, 30,
                   "every decision at the subscriber")
        assert len(collector.payloads()) > before
    finally:
        daemon.close()
        collector.close()
        broker.stop(kill=True)
    nodes = by_node(written)
    assert "\n".join(nodes["m1"]) + "\n" == replay_text(write_log(tmp_path / "m.mcap",
                                                                   mqtt_chunks))
    assert "\n".join(nodes["s1"]) + "\n" == replay_text(write_log(tmp_path / "s.mcap",
                                                                   serial_chunks))


@pytest.mark.parametrize("toml,expect", [
    ("[sink.mqtt]\nmax_inflight = 0\n", "[sink.mqtt] max_inflight = 0 is out of range"),
    ("[sourse.mqtt]\nqos = 1\n", "unknown key(s) ['sourse']"),
    ("[pipeline.aligner]\nmin_coverage = 'high'\n", "min_coverage = 'high' has the wrong type"),
])
def test_bad_config_exits_1_naming_the_key(tmp_path, capsys, toml, expect):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    assert main(["run", "--config", str(path), "--model", str(MODEL)]) == 1
    assert expect in capsys.readouterr().err



def test_broker_down_at_start_serial_still_decides_and_the_outbox_delivers_later(
        tmp_path, socat_link):
    """The broker (sensor source and decision sink alike) is down when the daemon starts:
    with the default wait_for_sources = "any" it becomes ready on its serial source,
    names the MQTT source that is not connected and why, decides the serial node's
    chunks into the JSONL file and the outbox; once the broker is up, every queued
    decision reaches a subscriber and the MQTT source subscribes."""
    broker = Mosquitto(tmp_path / "broker", persistence=True)
    broker.start()  # once, so that the subscriber's persistent session exists
    Collector(broker, "edgefuse/+/decisions", session=True, client_id="late-reader").close()
    broker.stop()
    out = tmp_path / "d.jsonl"
    config = tmp_path / "edgefuse.toml"
    config.write_text("[mqtt]\nreconnect_min_s = 0.2\nreconnect_max_s = 1.0\n"
                      "[daemon]\nstart_grace_s = 1.0\n")
    chunks = synthetic_chunks("s1", 8.0, seed=3)
    source = f"mqtt:127.0.0.1:{broker.port}"
    daemon = DaemonProcess(tmp_path, ["--config", config, *mqtt_args(broker, out,
                                                                      tmp_path / "ob"),
                                      "--serial", socat_link.device])
    collector = None
    try:
        daemon.wait_ready(timeout_s=60)
        log = daemon.log()
        assert f"source {source} is not connected after" in log, log
        assert "connection refused" in log.split(f"source {source} is not connected")[1]
        assert daemon.value("edgefuse_ready") == 1
        simulate(chunks, SerialPublisher(socat_link.peer), speed=20.0)
        daemon.wait_metric("edgefuse_source_decoded_total", len(chunks))
        written = wait_until(lambda: out.read_text().splitlines() if out.exists() else [], 30,
                             "decisions in the JSONL file")
        daemon.wait_metric("edgefuse_outbox_depth", 1)  # queued while the broker is down
        assert daemon.value("edgefuse_source_connected", source=source) == 0
        assert daemon.proc.poll() is None

        broker.start()
        collector = Collector(broker, "edgefuse/+/decisions", session=True,
                              client_id="late-reader")
        daemon.wait_metric("edgefuse_source_subscribed_total", 1)  # the source caught up
        wait_until(lambda: f"source {source} connected, " in daemon.log(), 30,
                   "the late connection logged")
        assert daemon.terminate() == 0, daemon.log()
        written = out.read_text().splitlines()
        wait_until(lambda: set(written) <= {p.decode() for p in collector.payloads()}, 30,
                   "every queued decision at the subscriber")
    finally:
        daemon.close()
        if collector is not None:
            collector.close()
        broker.stop(kill=True)
    assert "\n".join(written) + "\n" == replay_text(write_log(tmp_path / "s.mcap", chunks))
