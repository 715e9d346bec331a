"""Re-run issue 8's hostile-operator fault table against the real daemon.

Each scenario starts its own Mosquitto on a free loopback port and real
``edgefuse run`` processes, does what a hostile operator (or bad luck) would
do, and prints one row: the scenario and what happened, measured.

    .venv/bin/python examples/hostile_operator.py            # every scenario
    .venv/bin/python examples/hostile_operator.py rates seq  # some of them

Needs mosquitto on PATH (deploy/setup.sh installs it). Takes a few minutes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "data" / "sample.mcap"
PY = sys.executable
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, work: Path):
        self.port = free_port()
        self.conf = work / f"mosquitto-{self.port}.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                             "persistence false\n" + ("user root\n" if os.geteuid() == 0 else ""))
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Daemon:
    def __init__(self, work: Path, name: str, args: list[str]):
        self.metrics_port = free_port()
        self.log = work / f"{name}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PY, "-m", "edgefuse.runtime.cli", "--log-level", "INFO", "run",
                 "--metrics", f"127.0.0.1:{self.metrics_port}", *args],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, timeout_s: float = 60) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.metric("edgefuse_ready") == 1:
                return True
            time.sleep(0.2)
        return False

    def metric(self, name: str, **labels) -> float:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                        timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return float("nan")
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] != name:
                continue
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def stop(self, timeout_s: float = 30) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if it ignored it, seconds to exit)."""
        t = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        return rc, time.monotonic() - t

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def publish(port: int, items: list[tuple[str, str | bytes]], qos: int = 0) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = [c.publish(t, p, qos=qos) for t, p in items]
    for info in infos:
        info.wait_for_publish(10)
    c.disconnect()
    c.loop_stop()


def simulate(port: int, speed: float = 20.0, wait: bool = True) -> subprocess.Popen:
    p = subprocess.Popen([PY, "-m", "edgefuse.runtime.cli", "simulate", str(SAMPLE),
                          "--mqtt", f"127.0.0.1:{port}", "--speed", str(speed), "--qos", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    if wait:
        p.wait(300)
    return p


def replay_lines() -> list[str]:
    out = subprocess.run([PY, "-m", "edgefuse.runtime.cli", "replay", str(SAMPLE)],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def decisions(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []


# --- scenarios ------------------------------------------------------------------
def scenario_rates(work: Path) -> list[str]:
    rows = []
    expected = replay_lines()
    hostile = {
        "rate 5e-324": [5e-324], "rate 1e-300": [1e-300], "rate 1e-5": [1e-5],
        "null rates 1e18 ns apart": [None, None, None],
    }
    for what, rates in hostile.items():
        b = Broker(work)
        out = work / f"rates-{len(rows)}.jsonl"
        d = Daemon(work, f"rates-{len(rows)}", ["--mqtt", f"127.0.0.1:{b.port}", "--out", str(out),
                                               "--no-mqtt-sink"])
        d.wait_ready()
        sim = simulate(b.port, speed=10, wait=False)
        time.sleep(2)
        t0 = 1_681_140_930_000_000_000
        items = [("edgefuse/evil5/seismic", json.dumps(
            {"t0_ns": t0, "rate_hz": 1605.23, "seq": 0, "values": [1, 2, 3]}))]
        for i, r in enumerate(rates):
            items.append(("edgefuse/evil5/seismic", json.dumps(
                {"t0_ns": t0 + (i + 1) * (10**18 if r is None else 10**6), "rate_hz": r,
                 "seq": i + 1, "values": [1, 2, 3]})))
        publish(b.port, items)
        sim.wait(300)
        time.sleep(3)
        alive = d.proc.poll() is None
        refused = (d.metric("edgefuse_source_malformed_total", reason="bad_rate")
                   + d.metric("edgefuse_aligner_bad_rate_chunks_total")
                   + d.metric("edgefuse_stream_bad_rate_estimates_total"))
        rc, took = d.stop()
        got = [x for x in decisions(out) if json.loads(x)["node"] != "evil5"]
        rows.append(f"| {what} | alive {alive}, SIGTERM -> rc {rc} in {took:.1f} s, "
                    f"{len(got)} decisions of the sample's nodes, equal to replay: "
                    f"{got == expected}, "
                    f"refused and counted as bad rates: {refused:g} |")
        b.close()
    return rows


def scenario_flood(work: Path) -> list[str]:
    b = Broker(work)
    out = work / "flood.jsonl"
    d = Daemon(work, "flood", ["--mqtt", f"127.0.0.1:{b.port}", "--out", str(out),
                               "--no-mqtt-sink"])
    d.wait_ready()
    t0 = 1_681_140_930_000_000_000
    items = [(f"edgefuse/fake{i:05d}/seismic", json.dumps(
        {"t0_ns": t0, "rate_hz": 1605.23, "seq": 0, "values": [1, 2, 3]}))
        for i in range(10_000)]
    t = time.monotonic()
    publish(b.port, items)
    flood_s = time.monotonic() - t
    time.sleep(2)
    received = d.metric("edgefuse_source_received_total")
    simulate(b.port, speed=10)
    time.sleep(3)
    displaced = d.metric("edgefuse_aligner_displaced_nodes_total")
    refused = d.metric("edgefuse_aligner_too_many_nodes_chunks_total")
    rc, _ = d.stop()
    got = [x for x in decisions(out) if not json.loads(x)["node"].startswith("fake")]
    want = replay_lines()
    b.close()
    return [f"| 10,000-name flood ({flood_s:.1f} s, {received:g} received), then the real "
            f"nodes | rc {rc}, {displaced:g} fake nodes displaced, {refused:g} chunks refused, "
            f"{len(got)}/{len(want)} decisions of the sample's nodes, equal to replay: "
            f"{got == want} |"]


def scenario_seq(work: Path) -> list[str]:
    b = Broker(work)
    out = work / "seq.jsonl"
    outbox = work / "seq-outbox.sqlite"
    args = ["--mqtt", f"127.0.0.1:{b.port}", "--out", str(out), "--outbox", str(outbox)]
    rows = []
    for how in ("SIGTERM", "SIGKILL"):
        d = Daemon(work, f"seq-{how}", args)
        d.wait_ready()
        sim = simulate(b.port, speed=5, wait=False)
        time.sleep(6)
        if how == "SIGTERM":
            d.stop()
        else:
            d.proc.kill()
            d.proc.wait()
        d2 = Daemon(work, f"seq-{how}-2", args)
        d2.wait_ready()
        sim.wait(300)
        time.sleep(3)
        d2.stop()
        windows: dict[tuple, set] = {}
        for line in decisions(out):
            x = json.loads(line)
            windows.setdefault((x["node"], x["seq"]), set()).add(x["window_start_ns"])
        clashes = sum(1 for v in windows.values() if len(v) > 1)
        rows.append(f"| restart by {how} mid-stream | {len(windows)} (node, seq) keys, "
                    f"{clashes} naming two different windows |")
        out.unlink()
    b.close()
    return rows


def scenario_two_outboxes(work: Path) -> list[str]:
    b = Broker(work)
    outbox = work / "shared-outbox.sqlite"
    args = ["--mqtt", f"127.0.0.1:{b.port}", "--outbox", str(outbox)]
    d1 = Daemon(work, "owner", args)
    d1.wait_ready()
    d2 = Daemon(work, "intruder", args)
    try:
        rc2 = d2.proc.wait(60)
    except subprocess.TimeoutExpired:
        rc2 = None
        d2.stop()
    d1.stop()
    b.close()
    last = [line for line in d2.text().splitlines() if line.strip()][-1:]
    return [f"| second daemon on the same outbox | rc {rc2}: {' '.join(last)[:160]} |"]


def scenario_start_errors(work: Path) -> list[str]:
    rows = []
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    bad_ca = work / "not-a-ca.pem"
    bad_ca.write_text("hello\n")
    cfg = work / "bad-ca.toml"
    cfg.write_text(f'[mqtt]\nport = {free_port()}\ntls_ca_file = "{bad_ca}"\n')
    cases = {
        "metrics port in use": ["run", "--metrics", f"127.0.0.1:{busy.getsockname()[1]}",
                                "--no-mqtt-sink", "--out", str(work / "x.jsonl")],
        "unwritable --out": ["run", "--no-mqtt-sink", "--out", "/proc/edgefuse/x.jsonl"],
        "CA file that is not a certificate": ["run", "--config", str(cfg), "--no-mqtt-sink",
                                              "--out", str(work / "y.jsonl")],
    }
    for what, args in cases.items():
        p = subprocess.run([PY, "-m", "edgefuse.runtime.cli", *args], capture_output=True,
                           text=True, cwd=ROOT, timeout=120)
        err = [line for line in p.stderr.splitlines() if line.strip()]
        tb = any("Traceback" in line for line in err)
        rows.append(f"| {what} | rc {p.returncode}, traceback {tb}: {(err or [''])[-1][:150]} |")
    busy.close()
    return rows


def scenario_outage(work: Path) -> list[str]:
    b = Broker(work)
    d = Daemon(work, "outage", ["--mqtt", f"127.0.0.1:{b.port}", "--no-mqtt-sink",
                                "--out", str(work / "outage.jsonl")])
    d.wait_ready()
    b.close()
    time.sleep(20)
    b.start()
    t = time.monotonic()
    while d.metric("edgefuse_source_connected") != 1 and time.monotonic() - t < 60:
        time.sleep(0.1)
    back = time.monotonic() - t
    d.stop()
    b.close()
    return [f"| broker down 20 s | source connected again {back:.1f} s after the broker "
            "returned |"]


def scenario_client_id(work: Path) -> list[str]:
    b = Broker(work)
    cfg = work / "client-id.toml"
    cfg.write_text(f'[mqtt]\nport = {b.port}\nclient_id = "edgefuse-gw1"\n')
    out = work / "client-id.jsonl"
    d = Daemon(work, "client-id", ["--config", str(cfg), "--outbox", str(work / "cid.sqlite"),
                                   "--out", str(out)])
    d.wait_ready()
    simulate(b.port, speed=10)
    time.sleep(3)
    disconnects = (d.metric("edgefuse_source_disconnects_total")
                   + d.metric("edgefuse_sink_disconnects_total"))
    ignored = d.metric("edgefuse_source_ignored_total")
    d.stop()
    b.close()
    labels = [json.loads(x)["fallback"] for x in decisions(out)]
    return [f"| client_id = \"edgefuse-gw1\" for source and publisher | "
            f"{len(labels)} decisions, {labels.count('abstain')} abstain, disconnects "
            f"{disconnects:g}, own decisions counted as ignored: {ignored:g} |"]


SCENARIOS = {"rates": scenario_rates, "flood": scenario_flood, "seq": scenario_seq,
             "outbox": scenario_two_outboxes, "errors": scenario_start_errors,
             "outage": scenario_outage,
             "client_id": scenario_client_id}


def main(argv: list[str]) -> int:
    names = argv or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}", file=sys.stderr)
        return 2
    print("| scenario | outcome |\n|---|---|")
    with tempfile.TemporaryDirectory(prefix="edgefuse-hostile-") as tmp:
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            for row in SCENARIOS[name](work):
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
