"""Diagnostics (issue 11): the user's mistakes are named, counted and end in a clear exit.

- replay ends with one summary line on stderr; chunks read but no decision: exit 3 and why
  (t0 in seconds / ms / us named);
- live: a t0 far from its receipt time is refused or kept-and-counted, warned with the
  topic or port, node and modality; rate 0 means "unknown" in JSON and binary alike;
- per-stream health metrics of a real daemon while one modality is unplugged for 10 s.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time

import numpy as np
import pytest

from edgefuse.runtime.core import wire
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.cli import main
from edgefuse.runtime.core.decision import Decision
from edgefuse.runtime.service.metrics import DaemonMetrics
from edgefuse.sensors.live.mqtt_client import MqttSettings
from edgefuse.runtime.service.simulate import MqttPublisher, simulate
from edgefuse.sensors.live import serial_framing
from edgefuse.sensors.live.base import ClockCheck
from edgefuse.sensors.live.factory import make_mqtt_source
from edgefuse.sensors.live.mqtt_source import MqttSourceSettings
from edgefuse.sensors.live.serial_source import SerialSettings, SerialSource
from tests.conftest import publish, wait_until
from tests.daemon_helpers import MODEL, T0, DaemonProcess, synthetic_chunks, write_log

pytestmark = pytest.mark.timeout(240)

NOW_NS = 1_790_000_000_000_000_000  # 2026-09-21: the wall clock the clock checks see


def _replay(tmp_path, log, *extra, name="d.jsonl"):
    out = tmp_path / name
    rc = main(["replay", str(log), "--model", str(MODEL), "--out", str(out), "-q", *extra])
    return rc, out


def _scaled(chunks, divisor, modality=None):
    return [dataclasses.replace(c, t0_ns=c.t0_ns // divisor)
            if modality in (None, c.modality) else c for c in chunks]


# --- replay: summary line and exit 3 ---------------------------------------------------------

@pytest.mark.parametrize("unit,divisor", [("seconds", 10**9), ("milliseconds", 10**6),
                                          ("microseconds", 10**3)])
def test_replay_of_a_log_whose_t0_is_not_ns_exits_3_naming_the_unit(tmp_path, capsys, unit,
                                                                    divisor):
    chunks = _scaled(synthetic_chunks("n1", 15.0), divisor)
    log = write_log(tmp_path / "units.mcap", chunks)
    rc, out = _replay(tmp_path, log)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3, err
    assert out.read_text() == ""
    summary, error = err[-2:]
    n = len(chunks)
    assert summary.startswith(f"edgefuse replay: {n} chunks of 2 streams, 0 decisions;")
    assert error.startswith(f"edgefuse replay: error: read {n} chunks of 2 streams but made "
                            "no decision: ")
    assert f"looks like {unit}" in error and "t0_ns = 1.7e+" in error


def test_the_same_mistake_injected_into_a_good_log_gives_the_same_diagnosis(tmp_path, capsys):
    log = write_log(tmp_path / "good.mcap", synthetic_chunks("n1", 15.0))
    rc, _ = _replay(tmp_path, log, "--inject", "units:*=s")
    err = capsys.readouterr().err
    assert rc == 3 and "looks like seconds" in err and "injected: units 59" in err


def test_one_modality_in_seconds_still_decides_and_the_summary_names_it(tmp_path, capsys):
    log = write_log(tmp_path / "good.mcap", synthetic_chunks("n1", 15.0))
    rc, out = _replay(tmp_path, log, "--inject", "units:seismic=s")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0, err
    decisions = [json.loads(x) for x in out.read_text().splitlines()]
    assert decisions and all("seismic" in d["missing"] for d in decisions)
    (summary,) = [x for x in err if x.startswith("edgefuse replay: ")]
    assert "t0 not in ns: n1/seismic (seconds)" in summary
    assert f"{len(decisions)} decisions" in summary
    assert f"seismic/{decisions[0]['missing_reason']['seismic']} " in summary


def test_a_good_replay_ends_with_one_summary_line_and_exit_0(tmp_path, capsys):
    chunks = synthetic_chunks("n1", 15.0, pause=("seismic", 5.0, 8.0))
    log = write_log(tmp_path / "good.mcap", chunks)
    stats = tmp_path / "stats.json"
    rc, out = _replay(tmp_path, log, "--stats", str(stats))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0
    decisions = [json.loads(x) for x in out.read_text().splitlines()]
    gaps = sum(d["missing_reason"].get("seismic") == "gap" for d in decisions)
    assert gaps >= 5
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith(f"edgefuse replay: {len(chunks)} chunks of 2 streams, "
                           f"{len(decisions)} decisions (")
    assert f"; missing windows: seismic/gap {gaps}; drops: none; 0 warnings" in line
    assert "n1/seismic" in json.loads(stats.read_text())["streams"]  # --stats still works


# --- live: the clock check -----------------------------------------------------------------

def _chunk(t0, node="n1", modality="seismic", rate=1605.23, seq=0):
    return Chunk(node, modality, t0, rate, np.zeros((16, 1), np.float32), seq)


@pytest.mark.parametrize("t0,hint", [(NOW_NS // 10**9, "seconds"),
                                     (NOW_NS // 10**6, "milliseconds"),
                                     (NOW_NS // 10**3, "microseconds")])
def test_clock_check_refuses_a_t0_in_the_wrong_unit_and_names_it(t0, hint):
    reason, why = ClockCheck(86400, wall_ns=lambda: NOW_NS).judge(_chunk(t0))
    assert reason == "bad_time"
    assert why.startswith(f"t0_ns = {t0:.3g} looks like {hint} (2026-09-21")
    assert "received 2026-09-21" in why and "ns since the epoch" in why


def test_clock_check_keeps_a_plausible_offset_by_default_and_refuses_it_on_request():
    old = _chunk(T0)  # 2023-11-14, ~2.9 years before NOW_NS
    reason, why = ClockCheck(86400, wall_ns=lambda: NOW_NS).judge(old)
    assert reason == "clock_offset" and "2.9 years behind the receipt time" in why
    assert "kept" in why and "max_clock_offset_s = 86400" in why
    reason, why = ClockCheck(86400, "refuse", wall_ns=lambda: NOW_NS).judge(old)
    assert reason == "bad_time" and "refused" in why
    # within the bound, or the check off: nothing to say
    assert ClockCheck(86400, wall_ns=lambda: NOW_NS).judge(_chunk(NOW_NS - 3600 * 10**9)) is None
    assert ClockCheck(0, wall_ns=lambda: NOW_NS).judge(_chunk(5)) is None
    # no clock time and no unit explains it (5 ns after 1970): refused even with "warn"
    reason, why = ClockCheck(86400, wall_ns=lambda: NOW_NS).judge(_chunk(5))
    assert reason == "bad_time" and "outside 2000..2100" in why


def test_the_clock_settings_are_checked_at_start(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[daemon]\nclock_offset_action = "drop"\n')
    assert main(["run", "--config", str(path), "--model", str(MODEL)]) == 1
    err = capsys.readouterr().err
    assert "clock_offset_action = 'drop' is not allowed; allowed: ['warn', 'refuse']" in err


def _topic(node, modality):
    return f"edgefuse/{node}/{modality}"


def test_live_mqtt_source_refuses_seconds_and_keeps_an_old_clock_naming_topic_node_modality(
        broker, caplog):
    now = time.time_ns()
    in_seconds = wire.encode_json(_chunk(now // 10**9, node="imu7", seq=1))
    two_days_ago = wire.encode_binary(_chunk(now - 2 * 86400 * 10**9, node="old3", seq=1))
    fine = wire.encode_binary(_chunk(now, node="ok1", seq=1))
    settings = MqttSourceSettings(mqtt=MqttSettings(host=broker.host, port=broker.port),
                                  receiver="process")
    with caplog.at_level(logging.WARNING, logger="edgefuse.sensors.live.accounting"):
        with make_mqtt_source(settings, modalities=("seismic",),
                              clock_check=ClockCheck(86400)) as source:
            assert source.wait_connected(5)
            publish(broker, [(_topic("imu7", "seismic"), in_seconds)] * 3
                    + [(_topic("old3", "seismic"), two_days_ago)] * 3
                    + [(_topic("ok1", "seismic"), fine)])
            got = []
            wait_until(lambda: got.extend(source.read(0.05)) or len(got) >= 4, 10,
                       "the kept chunks")
            stats = source.stats()
    assert sorted(c.node for c in got) == ["ok1", "old3", "old3", "old3"]
    assert stats["malformed"] == {"bad_time": 3}
    assert stats["clock_offset"] == 3 and stats["decoded"] == 4
    lines = [r.getMessage() for r in caplog.records]
    refused = [x for x in lines if "bad_time" in x]
    kept = [x for x in lines if "clock_offset" in x]
    assert len(refused) == 1 and len(kept) == 1, lines  # rate-limited per stream and reason
    assert refused[0].startswith("skipped a message from topic 'edgefuse/imu7/seismic', node "
                                 "'imu7', modality 'seismic': bad_time: seq 1: t0_ns = 1.")
    assert "looks like seconds" in refused[0]
    assert kept[0].startswith("message from topic 'edgefuse/old3/seismic', node 'old3', "
                              "modality 'seismic': clock_offset: seq 1: t0 ")
    assert "2.0 days behind the receipt time" in kept[0]


# --- one meaning of rate 0 ----------------------------------------------------------------------

def test_rate_0_is_unknown_in_json_and_binary_through_a_live_source(broker):
    now = time.time_ns()
    json_0 = json.dumps({"t0_ns": now, "rate_hz": 0, "seq": 1, "values": [1, 2, 3]}).encode()
    binary_0 = wire.encode_binary(_chunk(now, rate=None, seq=2))
    assert binary_0[8:16] == b"\0" * 8  # rate_hz 0.0 in the header
    settings = MqttSourceSettings(mqtt=MqttSettings(host=broker.host, port=broker.port),
                                  receiver="thread")
    with make_mqtt_source(settings, modalities=("seismic",)) as source:
        assert source.wait_connected(5)
        publish(broker, [(_topic("n1", "seismic"), json_0), (_topic("n1", "seismic"), binary_0)])
        got = []
        wait_until(lambda: got.extend(source.read(0.05)) or len(got) >= 2, 10, "two chunks")
        stats = source.stats()
    assert [(c.seq, c.rate_hz) for c in got] == [(1, None), (2, None)]
    assert stats["malformed_total"] == 0


# --- serial warnings name node and modality -------------------------------------------------------

def test_serial_warnings_name_port_node_and_modality(pty_pair, caplog):
    """(A wrong channel count is the aligner's check: tests/test_sources_checks.py.)"""
    good = _chunk(time.time_ns(), node="s9", modality="imu", rate=100.0)
    truncated = serial_framing.encode_frame("s9", "imu", wire.encode_binary(good)[:-2])
    with caplog.at_level(logging.WARNING):
        with SerialSource(SerialSettings(device=pty_pair.path, protocol="binary"),
                          modalities=("imu",)) as source:
            assert source.wait_connected(5)
            pty_pair.write(truncated + serial_framing.encode_chunk_frame(good))
            wait_until(lambda: source.read(0.05), 5, "the good chunk")
            stats = source.stats()
    assert stats["malformed"] == {"truncated": 1}
    (line,) = [r.getMessage() for r in caplog.records if "(truncated)" in r.getMessage()]
    assert pty_pair.path in line and "node 's9', modality 'imu'" in line


# --- per-stream metrics, unit level --------------------------------------------------------------

def _scrape(metrics: DaemonMetrics) -> dict:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = (fam.type, s.value)
    return out


def _decision(node, missing, reason="gap"):
    return Decision(node, 1, 0, 1, None, {}, (), tuple(missing), "masked",
                    {m: reason for m in missing}, "m")


def test_stream_health_families_are_exported_and_bounded_by_the_aligners_streams():
    m = DaemonMetrics()
    m.observe([_decision("a", ["seismic"]), _decision("a", ["seismic"], "clock_step"),
               _decision("b", ["acoustic"], "no_stream")], ["acoustic", "seismic"])
    now = time.monotonic()
    streams = {"a/acoustic": {"chunks": 3, "clock_steps": 2, "clock_offset_ms": -5.0,
                              "drift_ppm": 1.5, "rate_measured_hz": 9866.0, "rate_mismatch": 4,
                              "clock_skew": True, "clock_skew_events": 1,
                              "clock_offset_from": "arrival", "drift_vs": "declared"},
               "a/seismic": {"chunks": 1}, "b/seismic": {"chunks": 1}}
    m.update({"streams": streams, "last_seen": {"a/acoustic": now - 7.0, "a/seismic": now}})
    got = _scrape(m)
    age = got[("edgefuse_stream_last_seen_age_seconds",
               (("modality", "acoustic"), ("node", "a")))]
    assert age[0] == "gauge" and 7.0 <= age[1] < 9.0
    key = "edgefuse_stream_missing_windows_total"
    assert got[(key, (("modality", "seismic"), ("node", "a"), ("reason", "gap")))][1] == 1
    assert got[(key, (("modality", "seismic"), ("node", "a"), ("reason", "clock_step")))][1] == 1
    assert got[(key, (("modality", "acoustic"), ("node", "b"), ("reason", "no_stream")))][1] == 1
    # the clock model's levels are gauges, its counts counters
    labels = (("modality", "acoustic"), ("node", "a"))
    assert got[("edgefuse_stream_clock_offset_ms", labels)] == ("gauge", -5.0)
    assert got[("edgefuse_stream_drift_ppm", labels)] == ("gauge", 1.5)
    assert got[("edgefuse_stream_rate_measured_hz", labels)] == ("gauge", 9866.0)
    assert got[("edgefuse_stream_clock_skew", labels)] == ("gauge", 1.0)
    assert got[("edgefuse_stream_clock_steps_total", labels)] == ("counter", 2.0)
    assert got[("edgefuse_stream_rate_mismatch_total", labels)] == ("counter", 4.0)
    assert got[("edgefuse_stream_clock_skew_events_total", labels)] == ("counter", 1.0)
    # node b leaves the aligner (evicted): its series go
    m.update({"streams": {"a/acoustic": {"chunks": 3}}, "last_seen": {}})
    assert not [k for k in _scrape(m) if k[0] == key and ("node", "b") in k[1]]


# --- the must-show: a live run with one modality unplugged for 10 s ------------------------------

def test_live_per_stream_health_while_one_modality_is_unplugged_for_10_s(tmp_path, broker):
    """A real daemon and broker; n1's seismic sensor stops for 10 s while acoustic goes on.
    During the outage the seismic stream's last-seen age grows past 5 s while acoustic's
    stays small, and its missing windows count up; once it is back, its age drops."""
    chunks = synthetic_chunks("n1", 26.0, pause=("seismic", 6.0, 16.0))
    daemon = DaemonProcess(tmp_path, ["--model", MODEL, "--mqtt",
                                      f"{broker.host}:{broker.port}", "--out",
                                      tmp_path / "d.jsonl", "--no-mqtt-sink"])
    age = "edgefuse_stream_last_seen_age_seconds"
    missing = "edgefuse_stream_missing_windows_total"
    samples = []
    try:
        daemon.wait_ready()
        sender = threading.Thread(target=simulate, args=(
            chunks, MqttPublisher(MqttSettings(host=broker.host, port=broker.port))),
            kwargs={"speed": 1.0}, name="sensor-n1", daemon=True)
        t_start = time.monotonic()
        sender.start()
        while sender.is_alive() and time.monotonic() - t_start < 60:
            m = daemon.metrics()
            samples.append((time.monotonic() - t_start,
                            m.get((age, (("modality", "seismic"), ("node", "n1")))),
                            m.get((age, (("modality", "acoustic"), ("node", "n1")))),
                            sum(v for (n, lab), v in m.items() if n == missing
                                and ("modality", "seismic") in lab and ("node", "n1") in lab)))
            time.sleep(0.5)
        sender.join(5)
        daemon.wait_metric("edgefuse_source_decoded_total", len(chunks))
        end = daemon.metrics()
        assert daemon.terminate() == 0, daemon.log()
    finally:
        daemon.close()
    print("t_s seismic_age_s acoustic_age_s seismic_missing_windows")
    for row in samples:
        print(" ".join("-" if v is None else f"{v:.1f}" for v in row))
    outage = [s for s in samples if s[1] is not None and s[1] > 5.0]
    assert outage, "the seismic stream's age never passed 5 s"
    assert all(s[2] is not None and s[2] < 2.0 for s in outage), "acoustic aged too"
    assert max(s[3] for s in outage) > min(s[3] for s in outage), \
        "missing windows did not count up during the outage"
    back = [s for s in samples if s[0] > outage[-1][0] + 1.0 and s[1] is not None]
    assert back and back[-1][1] < 2.0, "the age did not drop once the sensor was back"
    reasons = {dict(lab)["reason"]: v for (n, lab), v in end.items() if n == missing
               and ("modality", "seismic") in lab}
    assert sum(reasons.values()) >= 10, reasons


# --- a modality name that is a near miss ---------------------------------------------------------

def test_replay_names_a_near_miss_modality(tmp_path, capsys, caplog):
    chunks = [dataclasses.replace(c, modality="Acoustic") if c.modality == "acoustic" else c
              for c in synthetic_chunks("n1", 6.0)]
    with caplog.at_level(logging.WARNING):
        rc, out = _replay(tmp_path, write_log(tmp_path / "case.mcap", chunks))
    err = capsys.readouterr().err
    assert rc == 0
    (line,) = [r.getMessage() for r in caplog.records if "are not used by model" in
               r.getMessage()]
    assert line.startswith("modalities ['Acoustic'] are not used by model")
    assert "'Acoustic' (did you mean 'acoustic'?)" in line
    decisions = [json.loads(x) for x in out.read_text().splitlines()]
    assert decisions and all(d["missing_reason"].get("acoustic") == "no_stream"
                             for d in decisions)
    assert "missing windows: acoustic/no_stream" in err
    n_warnings = sum(r.levelno >= logging.WARNING for r in caplog.records)
    assert f"; {n_warnings} warnings" in err and n_warnings >= 2


def test_serial_refuses_a_near_miss_modality_naming_port_node_and_the_fix(pty_pair, caplog):
    chunk = _chunk(time.time_ns(), node="s9", modality="Seismic")
    with caplog.at_level(logging.WARNING):
        with SerialSource(SerialSettings(device=pty_pair.path, protocol="json"),
                          modalities=("acoustic", "seismic")) as source:
            assert source.wait_connected(5)
            pty_pair.write(serial_framing.encode_json_line(chunk))
            wait_until(lambda: source.stats()["malformed"], 5, "the refusal")
    (line,) = [r.getMessage() for r in caplog.records if "unknown_modality" in r.getMessage()]
    assert pty_pair.path in line and "node 's9', modality 'Seismic'" in line
    assert "(did you mean 'seismic'?)" in line


# --- start-up at the default log level -----------------------------------------------------------

def test_broker_down_at_start_is_named_at_once_and_the_ready_line_follows(tmp_path):
    """`edgefuse run` at the default log level, its broker down: within seconds it says
    the connection is refused (not after a timeout); once the broker is up it logs one
    ready line naming model, sources, sinks and metrics."""
    import os
    import subprocess
    import sys

    import urllib.request

    from tests.conftest import Mosquitto, end_process, free_port
    from tests.daemon_helpers import ROOT
    broker = Mosquitto(tmp_path / "broker")  # its port is chosen, nothing listens yet
    metrics_port = free_port()
    log_path = tmp_path / "daemon.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDGEFUSE_LOG_LEVEL", None)
    env.pop("NOTIFY_SOCKET", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefuse.runtime.cli", "run", "--model", str(MODEL),
             "--mqtt", f"{broker.host}:{broker.port}", "--out", str(tmp_path / "d.jsonl"),
             "--no-mqtt-sink", "--metrics", f"127.0.0.1:{metrics_port}"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        t0 = time.monotonic()
        wait_until(lambda: "connection refused" in log_path.read_text(), 10,
                   "the refused connection named")
        named_after_s = time.monotonic() - t0
        line = [x for x in log_path.read_text().splitlines() if "connection refused" in x][0]
        assert " WARNING " in line and f"127.0.0.1:{broker.port}" in line
        assert named_after_s < 10  # at the first failure, not after connect_timeout_s

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                        timeout=5) as r:
                return r.read().decode()
        # while it waits, a scrape shows the source down and its failed attempts
        wait_until(lambda: "edgefuse_source_connect_failures_total{source=" in scrape(), 10,
                   "the source's state in the metrics during the start")
        text = scrape()
        assert f'edgefuse_source_connected{{source="mqtt:127.0.0.1:{broker.port}"}} 0.0' in text
        assert "edgefuse_ready 0.0" in text
        broker.start()
        wait_until(lambda: " ready: " in log_path.read_text(), 30, "the ready line")
        (ready,) = [x for x in log_path.read_text().splitlines() if " ready: " in x]
        assert " INFO " in ready and "model standin-av@" in ready
        assert f"sources ['mqtt:{broker.host}:{broker.port}']" in ready
        assert "sinks ['jsonl']" in ready and "metrics http://127.0.0.1:" in ready
    finally:
        end_process(proc)
        broker.stop(kill=True)
    assert proc.returncode == 0, log_path.read_text()
