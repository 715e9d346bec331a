"""Helpers for the daemon tests: a real `edgefuse run` process, its sd_notify
messages over a real NOTIFY_SOCKET, its metrics over HTTP, synthetic logs and
replays to compare with.
"""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from edgefuse.runtime.core.chunk import Chunk
from tests.conftest import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "data" / "sample.mcap"
MODEL = ROOT / "models" / "bundled" / "standin_av.onnx"
T0 = 1_700_000_000_000_000_000


class NotifySocket:
    """A datagram socket standing in for systemd's: collects sd_notify messages."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-socket", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except OSError:
                continue
            with self._lock:
                for line in data.decode().splitlines():
                    self.messages.append((time.monotonic(), line))

    def lines(self) -> list[str]:
        with self._lock:
            return [m for _, m in self.messages]

    def count(self, line: str) -> int:
        return self.lines().count(line)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class DaemonProcess:
    """`python -m edgefuse.runtime.cli run ARGS` with a notify socket and metrics."""

    def __init__(self, tmp: Path, args: list[str], *, watchdog_usec: int | None = None,
                 env: dict | None = None, name: str = "daemon"):
        self.tmp = Path(tmp)
        self.metrics_port = free_port()
        self.notify = NotifySocket(self.tmp / f"{name}.notify")
        self.log_path = self.tmp / f"{name}.log"
        full_env = {**os.environ, "NOTIFY_SOCKET": self.notify.path,
                    "PYTHONPATH": str(ROOT), **(env or {})}
        if watchdog_usec is not None:
            full_env["WATCHDOG_USEC"] = str(watchdog_usec)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgefuse.runtime.cli", "--log-level", "INFO", "run",
                 "--metrics", f"127.0.0.1:{self.metrics_port}", *map(str, args)],
                stdout=log, stderr=subprocess.STDOUT, env=full_env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            return "READY=1" in self.notify.lines()
        wait_until(ready, timeout_s, "READY=1 from the daemon")

    def metrics(self) -> dict[tuple[str, tuple], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            text = r.read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def value(self, name: str, **labels) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.metrics().items()
                   if n == name and want <= set(lab))

    def wait_metric(self, name: str, at_least: float, timeout_s: float = 30.0, **labels) -> None:
        wait_until(lambda: self.value(name, **labels) >= at_least, timeout_s,
                   f"{name}{labels} >= {at_least} (log:\n{self.log()[-3000:]})", 0.1)

    def terminate(self, timeout_s: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout_s)
        self.notify.close()
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.notify.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.notify.close()


def synthetic_chunks(node: str, seconds: float, chunk_s: float = 0.5, seed: int = 0,
                     pause: tuple[str, float, float] | None = None,
                     start_ns: int = T0) -> list[Chunk]:
    """Acoustic (9866.44 Hz) + seismic (1605.23 Hz) PCM-like noise for ``node``, in the
    order a replay merges them. pause=(modality, from_s, to_s) leaves that modality's
    chunks out in [from_s, to_s): the sensor went silent, the other kept sending."""
    rng = np.random.default_rng(seed)
    out = []
    for modality, rate, scale, offset in (("acoustic", 9866.44, 300.0, 1_234_567),
                                          ("seismic", 1605.23, 20.0, 7_654_321)):
        n_total = int(seconds * rate)
        x = np.rint(rng.standard_normal((n_total, 1)) * scale).astype(np.float32)
        per = int(round(chunk_s * rate))
        for seq, lo in enumerate(range(0, n_total - per + 1, per)):
            t0 = start_ns + offset + int(round(lo * 1e9 / rate))
            t_s = (t0 - start_ns) / 1e9
            if pause and pause[0] == modality and pause[1] <= t_s < pause[2]:
                continue
            out.append(Chunk(node, modality, t0, rate, x[lo:lo + per], seq, 32767.0))
    out.sort(key=lambda c: (c.t0_ns, c.node, c.modality, c.seq))
    return out


def write_log(path: Path, chunks: list[Chunk]) -> Path:
    from edgefuse.sensors.readers.mcaplog import McapRecorder
    with McapRecorder(path) as rec:
        for c in chunks:
            rec.write(c)
    return path


def replay_text(log: Path, config=None) -> str:
    """What `edgefuse replay LOG` writes, computed in this process."""
    from edgefuse.runtime.core.inference import OnnxModel
    from edgefuse.runtime.service.replay import replay
    from edgefuse.sensors.readers.inputs import open_inputs
    out = io.StringIO()
    replay(open_inputs([log]), OnnxModel.load(MODEL), out, config=config)
    return out.getvalue()


def by_node(lines: list[str]) -> dict[str, list[str]]:
    import json
    out: dict[str, list[str]] = {}
    for line in lines:
        out.setdefault(json.loads(line)["node"], []).append(line)
    return out


def mqtt_args(broker, out, outbox, *extra) -> list:
    """`edgefuse run` arguments: the test model, this broker, a JSONL file and an outbox."""
    return [*extra, "--model", MODEL, "--mqtt", f"{broker.host}:{broker.port}", "--out", out,
            "--outbox", outbox]


def mqtt_publisher(broker):
    """A simulate publisher (a node) connected to this broker."""
    from edgefuse.runtime.service.simulate import MqttPublisher
    from edgefuse.sensors.live.mqtt_client import MqttSettings
    return MqttPublisher(MqttSettings(host=broker.host, port=broker.port))
