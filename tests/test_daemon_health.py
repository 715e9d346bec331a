"""A stuck main loop is visible, and every counter is exported (issue 8, items 2 and 7).

The stall test blocks the real daemon's main loop for real: its JSONL sink
writes into a FIFO whose reader stops reading, so once the pipe buffer is
full the write() blocks in the kernel. The metrics endpoint and a stand-in
NOTIFY_SOCKET (a real unix datagram socket) are read while it is stuck.
"""
from __future__ import annotations

import fcntl
import logging
import os
import select
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.service.health import StallMonitor
from edgefuse.runtime.service.metrics import DaemonMetrics
from edgefuse.runtime.service.simulate import SerialPublisher, simulate
from tests.conftest import wait_until
from tests.daemon_helpers import MODEL, T0, DaemonProcess, replay_text, synthetic_chunks, write_log

pytestmark = pytest.mark.timeout(240)


# --- the monitor alone ---------------------------------------------------------------
def _stuck_here(fd: int) -> bytes:
    return os.read(fd, 1)  # blocks until the test writes a byte


def test_stall_monitor_names_where_a_blocked_thread_is_and_clears_when_it_moves(caplog):
    r, w = os.pipe()
    beating, block = threading.Event(), threading.Event()
    changes: list[bool] = []

    def loop():
        while beating.is_set():
            if block.is_set():
                block.clear()
                _stuck_here(r)
            monitor.beat()
            time.sleep(0.01)

    beating.set()
    worker = threading.Thread(target=loop, name="fake-main-loop", daemon=True)
    monitor = StallMonitor(0.4, changes.append, watched=worker)
    worker.start()
    monitor.start()
    try:
        with caplog.at_level(logging.WARNING, logger="edgefuse.runtime.service.health"):
            time.sleep(1.0)
            assert changes == [] and not monitor.stalled  # a moving loop is never flagged
            block.set()
            wait_until(lambda: monitor.stalled, 10, "the monitor to flag the blocked loop")
            assert changes == [True] and monitor.stalls == 1
            assert monitor.idle_s() >= 0.4
            stuck = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert len(stuck) == 1 and "main loop stuck" in stuck[0], stuck
            assert "_stuck_here (test_daemon_health.py:" in stuck[0], stuck[0]
            os.write(w, b"x")
            wait_until(lambda: not monitor.stalled, 10, "the monitor to see the loop move")
            assert changes == [True, False]
            assert any("moving again" in r.getMessage() for r in caplog.records)
    finally:
        beating.clear()
        os.write(w, b"x")
        monitor.stop()
        worker.join(5)
        os.close(r)
        os.close(w)
    assert not any(t.name == "loop-stall-monitor" for t in threading.enumerate())


def test_stall_monitor_repeats_its_error_while_stuck_not_every_check(caplog):
    now = [100.0]
    changes: list[bool] = []
    monitor = StallMonitor(5.0, changes.append, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="edgefuse.runtime.service.health"):
        for t in np.arange(100.0, 200.0, 0.25):  # 100 s without a beat, checked 4x a second
            now[0] = float(t)
            monitor.check(now[0])
    errors = [r.getMessage() for r in caplog.records]
    assert changes == [True]
    assert 3 <= len(errors) <= 5, errors  # at 5 s, then every 30 s: bounded, not 380 lines
    assert "still stuck after" in errors[-1]


# --- the generic export --------------------------------------------------------------
def _scrape(metrics: DaemonMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_numeric_stat_is_exported_and_the_old_names_stay():
    metrics = DaemonMetrics()
    metrics.update({
        "streams": {"n1/seismic": {"chunks": 5, "late": 2, "overlap_samples": 7,
                                   "nonfinite_samples": 3, "rate_hz": 800.0,
                                   "rate_estimated": True, "drift_ppm": None,
                                   "brand_new_counter": 11}},
        "aligner": {"windows": 4, "too_many_nodes_chunks": 1, "evicted_nodes": 2, "nodes": 9},
        "sources": {"serial:/dev/x": {"decoded": 3, "bytes": 1000, "skipped_bytes": 12,
                                      "open_failures": 2, "connected": True, "queued": 1,
                                      "malformed": {"bad_crc": 4}, "malformed_total": 4,
                                      "last_error": "a string is not a number",
                                      "csv_flushes": {"idle": 2}}},
        "sinks": {"mqtt": {"published": 6, "inflight": 2, "errors": 99},
                  "jsonl": {"written": 6}},
        "fusion": {"decisions": {"full": 5, "abstain": 1}, "batches": {"full": 2}},
        "timing": {"infer_s": 0.25},
    })
    m = _scrape(metrics)
    stream = (("modality", "seismic"), ("node", "n1"))
    assert m[("edgefuse_stream_chunks_total", stream)] == 5
    assert m[("edgefuse_stream_late_chunks_total", stream)] == 2       # renamed, as before
    assert m[("edgefuse_stream_drops_total", stream)] == 2
    assert m[("edgefuse_stream_overlap_samples_total", stream)] == 7
    assert m[("edgefuse_stream_nonfinite_samples_total", stream)] == 3
    assert m[("edgefuse_stream_brand_new_counter_total", stream)] == 11  # no code needed
    assert m[("edgefuse_stream_rate_hz", stream)] == 800.0               # a gauge
    assert m[("edgefuse_stream_rate_estimated", stream)] == 1.0
    assert not any(name.startswith("edgefuse_stream_drift_ppm") for name, _ in m)  # None
    assert m[("edgefuse_aligner_evicted_nodes_total", ())] == 2
    assert m[("edgefuse_aligner_too_many_nodes_chunks_total", ())] == 1
    assert m[("edgefuse_aligner_nodes", ())] == 9                        # a level
    assert m[("edgefuse_aligner_events_total", (("kind", "windows"),))] == 4
    assert ("edgefuse_aligner_events_total", (("kind", "nodes"),)) not in m
    src = (("source", "serial:/dev/x"),)
    assert m[("edgefuse_source_bytes_total", src)] == 1000
    assert m[("edgefuse_source_skipped_bytes_total", src)] == 12
    assert m[("edgefuse_source_open_failures_total", src)] == 2
    assert m[("edgefuse_source_malformed_total", (("reason", "bad_crc"), *src))] == 4
    assert m[("edgefuse_source_csv_flushes_total", (("kind", "idle"), *src))] == 2
    assert m[("edgefuse_source_connected", src)] == 1 and m[("edgefuse_source_queued", src)] == 1
    assert m[("edgefuse_source_receiver_starts_total", src)] == 0  # fixed family, 0 here
    assert not any("last_error" in name for name, _ in m)
    assert m[("edgefuse_sink_published_total", (("sink", "mqtt"),))] == 6
    assert m[("edgefuse_sink_inflight", (("sink", "mqtt"),))] == 2
    assert m[("edgefuse_sink_written_total", (("sink", "jsonl"),))] == 6
    # a stat named like a metric of the daemon's own is not exported over it
    assert ("edgefuse_sink_errors_total", (("sink", "mqtt"),)) not in m
    assert m[("edgefuse_fusion_decisions_total", (("route", "full"),))] == 5
    assert m[("edgefuse_fusion_batches_total", (("route", "full"),))] == 2
    assert m[("edgefuse_pipeline_infer_seconds_total", ())] == 0.25


def test_healthy_and_ready_combine_the_loop_check_and_the_stall_monitor():
    metrics = DaemonMetrics()
    m = _scrape(metrics)
    assert m[("edgefuse_healthy", ())] == 0 and m[("edgefuse_ready", ())] == 0
    metrics.set_state(loop_ok=True, ready=True)
    m = _scrape(metrics)
    assert m[("edgefuse_healthy", ())] == 1 and m[("edgefuse_ready", ())] == 1
    metrics.set_state(stalled=True)
    metrics.set_state(loop_ok=True)  # a stale verdict of the loop does not hide the stall
    m = _scrape(metrics)
    assert m[("edgefuse_healthy", ())] == 0 and m[("edgefuse_ready", ())] == 0
    assert m[("edgefuse_loop_stalls_total", ())] == 1
    metrics.set_state(stalled=False)
    m = _scrape(metrics)
    assert m[("edgefuse_healthy", ())] == 1 and m[("edgefuse_ready", ())] == 1


# --- the real daemon, stuck on a full pipe ----------------------------------------------
class FifoReader:
    """The read end of a FIFO with a one-page pipe buffer; pause() stops reading."""

    def __init__(self, path: Path):
        os.mkfifo(path)
        self.path = path
        # Opened first (non-blocking), so the daemon's open for writing does not wait.
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, 4096)  # fills after a dozen decisions
        self.data = bytearray()
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fifo-reader", daemon=True)
        self._thread.start()

    def _read_some(self) -> bool:
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return False
        with self._lock:
            self.data += data
        return bool(data)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._flowing.wait(0.05):
                continue
            select.select([self.fd], [], [], 0.05)
            if not self._read_some():
                time.sleep(0.02)  # no writer yet, or nothing written: EOF/EAGAIN

    def lines(self) -> list[str]:
        with self._lock:
            return bytes(self.data).decode().splitlines()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> str:
        """Stop the thread, read what is left; the whole text read."""
        self._stop.set()
        self._thread.join(5)
        while self._read_some():
            pass
        os.close(self.fd)
        return bytes(self.data).decode()


def test_a_blocked_main_loop_turns_unhealthy_stops_the_watchdog_and_recovers(tmp_path,
                                                                           socat_link):
    fifo = FifoReader(tmp_path / "decisions.fifo")
    chunks = synthetic_chunks("s1", 24.0)
    first = [c for c in chunks if c.t0_ns < T0 + 4_000_000_000]
    rest = chunks[len(first):]
    config = tmp_path / "edgefuse.toml"
    config.write_text("[daemon]\nstall_timeout_s = 60.0\n")  # WatchdogSec (3 s) is shorter
    daemon = DaemonProcess(tmp_path, ["--config", config, "--model", MODEL,
                                      "--serial", socat_link.device, "--no-mqtt-source",
                                      "--no-mqtt-sink", "--out", fifo.path],
                           watchdog_usec=3_000_000)
    try:
        daemon.wait_ready()
        wait_until(lambda: daemon.value("edgefuse_healthy") == 1, 10, "healthy 1")
        wait_until(lambda: daemon.notify.count("WATCHDOG=1") >= 2, 10, "WATCHDOG=1 pings")
        simulate(first, SerialPublisher(socat_link.peer), speed=20.0)
        wait_until(lambda: len(fifo.lines()) >= 2, 30, "decisions through the FIFO")
        assert daemon.value("edgefuse_loop_stalls_total") == 0

        fifo.pause()  # the pipe fills; the loop's next write() blocks in the kernel
        simulate(rest, SerialPublisher(socat_link.peer), speed=20.0)
        wait_until(lambda: daemon.value("edgefuse_healthy") == 0, 60,
                   f"healthy 0 while the loop is stuck (log:\n{daemon.log()[-3000:]})", 0.2)
        assert daemon.value("edgefuse_ready") == 0
        assert daemon.value("edgefuse_loop_stalls_total") == 1
        assert daemon.value("edgefuse_loop_idle_seconds") >= 3.0
        log = daemon.log()
        assert "main loop stuck" in log and "(jsonl_sink.py:" in log, log[-3000:]
        # only the loop pings: none while it is stuck (systemd would restart it)
        pings = daemon.notify.count("WATCHDOG=1")
        time.sleep(4.0)  # more than two ping periods (1.5 s)
        assert daemon.notify.count("WATCHDOG=1") == pings
        assert daemon.value("edgefuse_healthy") == 0 and daemon.proc.poll() is None

        fifo.resume()
        wait_until(lambda: daemon.value("edgefuse_healthy") == 1
                   and daemon.value("edgefuse_ready") == 1, 60, "healthy and ready again", 0.2)
        wait_until(lambda: daemon.notify.count("WATCHDOG=1") > pings, 10, "pings again")
        assert "main loop moving again" in daemon.log()
        daemon.wait_metric("edgefuse_source_decoded_total", len(chunks))
        assert daemon.terminate() == 0, daemon.log()
    finally:
        daemon.close()
        text = fifo.close()
    # nothing was lost while the loop waited on the pipe
    assert text == replay_text(write_log(tmp_path / "in.mcap", chunks))


# --- every counter of a running daemon ------------------------------------------------
def _seismic(seq: int, t0_ns: int, n: int, nan_at: tuple[int, ...] = ()) -> Chunk:
    x = np.rint(np.random.default_rng(seq).standard_normal((n, 1)) * 20.0).astype(np.float32)
    x[list(nan_at), 0] = np.nan
    return Chunk("x1", "seismic", t0_ns, 1605.23, x, seq, 32767.0)


def test_running_daemon_exports_overlap_nonfinite_and_serial_byte_counters(tmp_path,
                                                                         socat_link):
    missing = tmp_path / "no-such-tty"   # a second device that never opens
    config = tmp_path / "edgefuse.toml"
    config.write_text("[daemon]\nstart_grace_s = 0.5\n")
    daemon = DaemonProcess(tmp_path, ["--config", config, "--model", MODEL,
                                      "--serial", socat_link.device, "--serial", missing,
                                      "--no-mqtt-source", "--no-mqtt-sink",
                                      "--out", tmp_path / "d.jsonl"])
    rate, n = 1605.23, 800
    step_ns = int(round(n * 1e9 / rate))
    chunks = [_seismic(0, T0, n, nan_at=(10, 11, 12)),
              # starts 50 samples before the end of chunk 0: those 50 overlap
              _seismic(1, T0 + int(round((n - 50) * 1e9 / rate)), n)]
    chunks += [_seismic(seq, chunks[1].t0_ns + (seq - 1) * step_ns, n) for seq in range(2, 6)]
    try:
        daemon.wait_ready()
        pub = SerialPublisher(socat_link.peer)
        for i, chunk in enumerate(chunks):
            pub.send(chunk)
            if i == 2:
                pub.port.write(b"line noise between frames " * 4)
        pub.close()
        daemon.wait_metric("edgefuse_source_decoded_total", len(chunks))
        wait_until(lambda: daemon.value("edgefuse_stream_overlap_samples_total", node="x1") > 0,
                   30, "overlap_samples exported")
        m = daemon.metrics()
        names = {name for name, _ in m}
        stream = (("modality", "seismic"), ("node", "x1"))
        assert m[("edgefuse_stream_nonfinite_samples_total", stream)] >= 3
        assert 45 <= m[("edgefuse_stream_overlap_samples_total", stream)] <= 55
        dev = (("source", f"serial:{socat_link.device}"),)
        gone = (("source", f"serial:{missing}"),)
        assert m[("edgefuse_source_bytes_total", dev)] >= len(chunks) * n * 2
        assert m[("edgefuse_source_skipped_bytes_total", dev)] >= 26
        assert m[("edgefuse_source_open_failures_total", gone)] >= 1
        assert m[("edgefuse_source_connected", gone)] == 0
        # the aligner's and the pipeline's own counters, under the generic names
        assert "edgefuse_aligner_windows_total" in names
        assert {"edgefuse_pipeline_align_seconds_total",
                "edgefuse_pipeline_infer_seconds_total"} <= names
        assert "not connected after" in daemon.log() and str(missing) in daemon.log()
        assert daemon.terminate() == 0, daemon.log()
    finally:
        daemon.close()
