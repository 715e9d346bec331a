"""A start that cannot work fails with one line saying what failed (issue 8, item 6).

Each test runs the real `edgefuse run` process (`python -m edgefuse.runtime.cli`)
and checks its exit status and stderr: status 1, no traceback, and the
error on one line naming what failed (the port, the path and the errno
text, the CA file, the source and the cause it reported).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.conftest import free_port, wait_until
from tests.daemon_helpers import MODEL, ROOT

pytestmark = pytest.mark.timeout(120)

SERIAL_ONLY = ["--no-mqtt-source", "--no-mqtt-sink"]


def _run(args: list, *, log_level: str | None = "WARNING", timeout_s: float = 90.0):
    """`edgefuse [--log-level L] run ARGS`; (status, stderr lines)."""
    cmd = [sys.executable, "-m", "edgefuse.runtime.cli"]
    if log_level:
        cmd += ["--log-level", log_level]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    env.pop("EDGEFUSE_LOG_LEVEL", None)
    proc = subprocess.run([*cmd, "run", "--model", str(MODEL), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout_s, env=env)
    return proc.returncode, proc.stderr.splitlines()


def _one_error_line(rc: int, lines: list[str]) -> str:
    text = "\n".join(lines)
    assert rc == 1, text
    assert "Traceback" not in text, text
    errors = [line for line in lines if line.startswith("edgefuse run: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], text
    return errors[0]


def test_metrics_port_in_use_names_the_address_and_the_key(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, lines = _run([*SERIAL_ONLY, "--serial", tmp_path / "tty", "--out",
                          tmp_path / "d.jsonl", "--metrics", f"127.0.0.1:{port}"])
    line = _one_error_line(rc, lines)
    assert len(lines) == 1, lines  # at WARNING nothing else is said
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in line
    assert "[metrics] port" in line and "--metrics" in line


@pytest.mark.parametrize("where,errno_text", [
    ("missing-folder/d.jsonl", "No such file or directory"),
    ("", "Is a directory"),  # the tmp folder itself
])
def test_unwritable_out_names_the_path_and_the_cause(tmp_path, where, errno_text):
    out = tmp_path / where if where else tmp_path
    rc, lines = _run([*SERIAL_ONLY, "--serial", tmp_path / "tty", "--out", out])
    line = _one_error_line(rc, lines)
    assert len(lines) == 1, lines
    assert f"cannot write decisions to {out}: {errno_text}" in line
    assert "[sink.jsonl] path" in line and "--out" in line


def test_unwritable_record_path_names_the_path_and_the_cause(tmp_path):
    record = tmp_path / "missing-folder" / "in.mcap"
    rc, lines = _run([*SERIAL_ONLY, "--serial", tmp_path / "tty", "--out",
                      tmp_path / "d.jsonl", "--record", record])
    line = _one_error_line(rc, lines)
    assert str(record) in line and "No such file or directory" in line


def test_a_ca_file_that_is_no_certificate_is_one_line_naming_it(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("this is not a certificate\n")
    config = tmp_path / "edgefuse.toml"
    config.write_text(f"[mqtt]\nport = {free_port()}\ntls_ca_file = '{ca}'\n")
    rc, lines = _run(["--config", config, "--out", tmp_path / "d.jsonl",
                      "--outbox", tmp_path / "ob.sqlite"])
    line = _one_error_line(rc, lines)
    assert "tls_ca_file" in line and str(ca) in line, line


def test_a_source_that_never_connects_names_itself_and_the_cause(tmp_path):
    port = free_port()  # nothing listens there
    config = tmp_path / "edgefuse.toml"
    config.write_text("[daemon]\nconnect_timeout_s = 2.0\n")
    rc, lines = _run(["--config", config, "--mqtt", f"127.0.0.1:{port}", "--no-mqtt-sink",
                      "--out", tmp_path / "d.jsonl"])
    line = _one_error_line(rc, lines)
    assert f"source mqtt:127.0.0.1:{port} did not connect within 2.0 s: " in line, line
    assert "refused" in line.lower(), line  # the cause the source saw, not a guess


def test_wait_for_all_sources_keeps_the_strict_start(tmp_path, socat_link):
    """One source connects (serial), the broker is down: with "all" the start fails."""
    port = free_port()
    config = tmp_path / "edgefuse.toml"
    config.write_text("[daemon]\nwait_for_sources = 'all'\nconnect_timeout_s = 2.0\n")
    rc, lines = _run(["--config", config, "--mqtt", f"127.0.0.1:{port}", "--no-mqtt-sink",
                      "--serial", socat_link.device, "--out", tmp_path / "d.jsonl"])
    line = _one_error_line(rc, lines)
    assert f"source mqtt:127.0.0.1:{port} did not connect within 2.0 s" in line, line
    assert "serial:" not in line  # the serial source did connect
    assert "wait_for_sources" in line


def test_default_log_level_shows_the_ready_line(tmp_path, socat_link):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDGEFUSE_LOG_LEVEL", None)
    env.pop("NOTIFY_SOCKET", None)
    port = free_port()
    err = tmp_path / "stderr.log"
    with open(err, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefuse.runtime.cli", "run", "--model", str(MODEL),
             *SERIAL_ONLY, "--serial", socat_link.device, "--out", str(tmp_path / "d.jsonl"),
             "--metrics", f"127.0.0.1:{port}"], stderr=fh, env=env)
    try:
        wait_until(lambda: "ready: model" in err.read_text() or proc.poll() is not None, 90,
                   "the ready line")
        line = next(x for x in err.read_text().splitlines() if "ready: model" in x)
        assert " INFO " in line and "standin-av" in line, line
        assert f"serial:{socat_link.device}" in line and "'jsonl'" in line, line
        assert f"http://127.0.0.1:{port}/metrics" in line, line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "Traceback" not in err.read_text()
    # libraries stay at WARNING: only edgefuse's own loggers speak at INFO
    assert all(" INFO edgefuse" in x for x in err.read_text().splitlines() if " INFO " in x)
