"""Live benchmark: N simulated nodes -> real Mosquitto on loopback -> `edgefuse run`.

    python bench/live.py [--nodes 1,200] [--search 300,400,500] [--seconds 25]
                         [--receivers thread,process] [--daemons 1,2] [--json]

Each node sends three streams in real time, as a sensor would: acoustic
9866.44 Hz (1 ch, int16), seismic 1605.23 Hz (1 ch, int16), imu 100 Hz
(6 ch, float32), one binary chunk per stream every ``--chunk-s`` (0.2 s),
QoS 0, nodes spread evenly over the chunk period. The daemon runs the
bundled bench_3m model (acoustic + seismic + imu, 1 s windows, 0.5 s hop)
with its defaults: MQTT source, MQTT decision sink through the SQLite outbox
(synchronous=full: one fsync per decision batch), plus a latency trace.

Measured per run (the first ``--warmup-s`` excluded):

- decision latency, three ways, p50/p99:
  ``daemon``: the daemon read the chunk that closed the window -> the
  decision was in every sink (outbox fsynced);
  ``e2e_outbox``: the node published that chunk -> the decision was durable
  (adds the broker hop and any wait in the daemon's input queue);
  ``e2e_mqtt``: the node published that chunk -> a subscriber received the
  decision from the broker (everything);
- CPU of the daemon and its MQTT receiver process (utime+stime from
  /proc/PID/stat, summed) per node, in % of one core; the daemon's RSS (VmRSS)
  and peak (VmHWM), the receiver's RSS, and the PSS of both together (shared
  pages counted once); the machine's load average;
- drops: chunks published vs decoded by the daemon, queue-full drops,
  aligner drops (late, duplicate, reorder overflow), malformed messages.

A run is "real time, no drop" when the publishers sent on schedule (p99 of
their lateness under ``--realtime-p99-s``: otherwise the load was not
offered), every published chunk was decoded, no drop counter moved, and the
``e2e_outbox`` latency p99 stayed under ``--realtime-p99-s`` (1 s: chunks did
not pile up in front of the daemon).
``--search`` steps N up and reports the largest N that held, per receiver.
``--receivers thread,process`` measures the baseline (paho inside the daemon's
process) and the receiver process in the same run, and prints their p99 and
CPU ratios (thread / process) at each N. ``--daemons 1,2`` measures one daemon
against D partitioned daemons (``edgefuse run --partition k/D``, each with its
own outbox; the nodes publish to ``edgefuse/p<k>/<node>/<modality>``, k = CRC-32
of the node name mod D) in the same run: latencies over all decisions, CPU and
memory summed over the daemons and their receivers, chunks and drops summed;
it prints the D / 1 ratios at each N. All processes share this machine's
cores (publishers and broker included), which the numbers include.
A benchmark, not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "bundled" / "bench_3m.onnx"
STREAMS = (("acoustic", 9866.44, 1, "<i2", 300.0), ("seismic", 1605.23, 1, "<i2", 20.0),
           ("imu", 100.0, 6, "<f4", 0.3))
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- publisher process -------------------------------------------------------
def publisher_main(args) -> None:
    import paho.mqtt.client as mqtt

    from edgefuse.runtime.core import wire
    from edgefuse.sensors.live.topics import PARTITIONED_PATTERN, TopicPattern
    first, last = map(int, args.publisher.split(":"))
    partitions = args.partitions if args.partitions > 1 else None
    pattern = TopicPattern(PARTITIONED_PATTERN if partitions else "edgefuse/{node}/{modality}")
    topics = {(node, s): pattern.topic(f"node{node}", STREAMS[s][0], partitions)
              for node in range(first, last) for s in range(len(STREAMS))}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{first}",
                         protocol=mqtt.MQTTv5)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", args.port, 60)
    client.loop_start()
    rng = np.random.default_rng(first)
    bodies, lengths = [], []
    for _, rate, ch, dtype, scale in STREAMS:
        n = int(round(rate * args.chunk_s))
        x = rng.standard_normal((n, ch)) * scale
        bodies.append((np.rint(x) if dtype == "<i2" else x).astype(dtype).tobytes())
        lengths.append(n)
    codes = {"<i2": 1, "<f4": 2}
    wall0 = time.monotonic_ns() + int(args.start_delay_s * 1e9)
    event0 = args.event0_ns
    total_nodes = args.total_nodes
    heap = []
    for node in range(first, last):
        phase = int(node / total_nodes * args.chunk_s * 1e9)
        for s, (_, rate, *_rest) in enumerate(STREAMS):
            period = lengths[s] * 1e9 / rate
            heap.append((wall0 + phase + int(period), node, s, 0))
    heapq.heapify(heap)
    end = wall0 + int(args.seconds * 1e9)
    log = []  # (node, stream, seq, publish monotonic ns, due monotonic ns)
    while heap:
        due, node, s, k = heapq.heappop(heap)
        if due > end:
            continue
        now = time.monotonic_ns()
        if due > now:
            time.sleep((due - now) / 1e9)
        modality, rate, ch, dtype, _ = STREAMS[s]
        period = lengths[s] * 1e9 / rate
        phase = int(node / total_nodes * args.chunk_s * 1e9)
        t0 = event0 + phase + int(round(k * period))
        header = wire.HEADER.pack(wire.MAGIC, wire.VERSION, codes[dtype], ch, rate, t0, k,
                                  32767.0 if dtype == "<i2" else 0.0, 0)
        client.publish(topics[(node, s)], header + bodies[s], qos=0)
        log.append((node, s, k, time.monotonic_ns(), due))
        heapq.heappush(heap, (wall0 + phase + int(round((k + 2) * period)), node, s, k + 1))
    time.sleep(0.5)
    client.disconnect()
    client.loop_stop()
    np.save(args.log, np.array(log, dtype=np.int64).reshape(-1, 5), allow_pickle=False)


# --- orchestration -------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(workdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false",
             "max_queued_messages 100000", "log_dest stderr", "log_type error"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not start") from None
            time.sleep(0.02)


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def children(pid: int) -> list[int]:
    """Direct children of pid (the MQTT receiver process of the daemon)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def proc_pss_mb(pid: int) -> float:
    """Proportional set size: shared pages split among the processes sharing them."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def proc_mem_mb(pid: int) -> tuple[float, float]:
    rss = hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return rss, hwm


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name
            if s.name == "edgefuse_outbox_events_total":
                key += ":" + s.labels.get("kind", "")
            out[key] = out.get(key, 0.0) + s.value
    return out


class DecisionSubscriber:
    """Receives the decisions from the broker; stamps each with CLOCK_MONOTONIC."""

    def __init__(self, port: int):
        import paho.mqtt.client as mqtt
        self.received: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sub",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *a: c.subscribe("edgefuse/+/decisions", qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 60)
        self.client.loop_start()
        ready.wait(5)

    def _on_message(self, client, userdata, msg) -> None:
        now = time.monotonic_ns()
        d = json.loads(msg.payload)
        with self._lock:
            self.received.setdefault((d["node"], d["seq"]), now)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def start_daemon(k: int, daemons: int, port: int, args, workdir: Path, nodes: int,
                 receiver: str) -> dict:
    """`edgefuse run` number k of ``daemons`` (partition k/daemons when more than one)."""
    metrics_port = free_port()
    trace = workdir / f"trace-{nodes}-{k}.jsonl"
    config = workdir / "edgefuse.toml"
    config.write_text(f'[source.mqtt]\nreceiver = "{receiver}"\n')
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    partition = ["--partition", f"{k}/{daemons}"] if daemons > 1 else []
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.setswitchinterval(float(sys.argv[1])); "
         "from edgefuse.runtime.cli import main; sys.exit(main(sys.argv[2:]))",
         str(args.switch_interval_s), "run", "--config", str(config), "--model", str(MODEL),
         "--mqtt", f"127.0.0.1:{port}", "--outbox", str(workdir / f"outbox-{nodes}-{k}.sqlite"),
         "--latency-trace", str(trace), "--metrics", f"127.0.0.1:{metrics_port}", *partition],
        env=env, stderr=open(workdir / f"daemon-{nodes}-{k}.log", "wb"))  # noqa: SIM115
    return {"proc": proc, "metrics_port": metrics_port, "trace": trace,
            "log": workdir / f"daemon-{nodes}-{k}.log"}


def wait_ready(daemon: dict) -> None:
    deadline = time.monotonic() + 90
    while True:  # ready = metrics up and edgefuse_ready 1
        try:
            if scrape(daemon["metrics_port"]).get("edgefuse_ready") == 1:
                return
        except OSError:
            pass
        if daemon["proc"].poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"daemon did not start: see {daemon['log']}")
        time.sleep(0.1)


def cpu_of(pids: list[int]) -> float:
    return sum(proc_cpu_s(pid) for pid in pids)


def run_once(nodes: int, args, workdir: Path, receiver: str = "process",
             daemons: int = 1) -> dict:
    workdir = workdir / f"{receiver}-{daemons}"
    workdir.mkdir(exist_ok=True)
    broker, port = start_broker(workdir)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs: list[dict] = []
    subscriber = None
    pubs = []
    try:
        procs = [start_daemon(k, daemons, port, args, workdir, nodes, receiver)
                 for k in range(daemons)]
        for d in procs:
            wait_ready(d)
        subscriber = DecisionSubscriber(port)
        n_pub = max(1, min(args.publishers, nodes))
        bounds = np.linspace(0, nodes, n_pub + 1).astype(int)
        event0 = time.time_ns()
        for i in range(n_pub):
            pubs.append(subprocess.Popen(
                [sys.executable, __file__, "--publisher", f"{bounds[i]}:{bounds[i + 1]}",
                 "--port", str(port), "--seconds", str(args.seconds), "--chunk-s",
                 str(args.chunk_s), "--total-nodes", str(nodes), "--event0-ns", str(event0),
                 "--start-delay-s", "1.0", "--partitions", str(daemons),
                 "--log", str(workdir / f"pub-{nodes}-{i}.npy")], env=env))
        time.sleep(1.0 + args.warmup_s)
        mains = [d["proc"].pid for d in procs]
        kids = [k for pid in mains for k in children(pid)]
        cpu0, kid0, t0 = cpu_of(mains), cpu_of(kids), time.monotonic()
        time.sleep(max(1.0, args.seconds - args.warmup_s - 1.0))
        cpu1, kid1, t1 = cpu_of(mains), cpu_of(kids), time.monotonic()
        for p in pubs:
            p.wait(120)
        time.sleep(2.0)  # let the last chunks and decisions through
        mem = [proc_mem_mb(pid) for pid in mains]
        rss, hwm = sum(r for r, _ in mem), sum(h for _, h in mem)
        kid_rss = sum(proc_mem_mb(k)[0] for k in kids)
        pss = sum(proc_pss_mb(p) for p in [*mains, *kids])
        m: dict[str, float] = {}
        for d in procs:
            for key, value in scrape(d["metrics_port"]).items():
                m[key] = m.get(key, 0.0) + value
    finally:
        for p in pubs:
            if p.poll() is None:
                p.kill()
        for d in procs:
            d["proc"].send_signal(signal.SIGTERM)
        for d in procs:
            try:
                d["proc"].wait(30)
            except subprocess.TimeoutExpired:
                d["proc"].kill()
        if subscriber is not None:
            subscriber.close()
        broker.kill()
        broker.wait(5)
    trace_lines = [line for d in procs for line in d["trace"].read_text().splitlines()]
    published, lag_ms = {}, []
    for i in range(len(pubs)):
        for node, s, k, ns, due in np.load(workdir / f"pub-{nodes}-{i}.npy", allow_pickle=False):
            published[(f"node{node}", STREAMS[s][0], int(k))] = int(ns)
            lag_ms.append((ns - due) / 1e6)
    warm_ns = (args.warmup_s + 1.0) * 1e9
    first_pub = min(published.values()) if published else 0
    lat_daemon, lat_outbox, lat_mqtt = [], [], []
    for line in trace_lines:
        t = json.loads(line)
        node, modality, seq = t["closing"]
        pub_ns = published.get((node, modality, seq))
        if pub_ns is None or pub_ns - first_pub < warm_ns:
            continue
        lat_daemon.append((t["out_ns"] - t["arrival_ns"]) / 1e6)
        lat_outbox.append((t["out_ns"] - pub_ns) / 1e6)
        recv = subscriber.received.get((t["node"], t["seq"]))
        if recv is not None:
            lat_mqtt.append((recv - pub_ns) / 1e6)
    drops = {k: m.get(k, 0.0) for k in (
        "edgefuse_source_dropped_queue_full_total", "edgefuse_stream_drops_total",
        "edgefuse_source_malformed_total", "edgefuse_source_oversized_total")}
    decoded = m.get("edgefuse_source_decoded_total", 0.0)
    p99 = pct(lat_outbox, 99)  # publish -> durable decision: input queue waits included
    # The publishers must have offered the load on time, or the run proves nothing.
    offered = bool(lag_ms) and pct(lag_ms, 99) / 1e3 <= args.realtime_p99_s
    realtime = (offered and decoded == len(published) and not any(drops.values())
                and p99 is not None and p99 / 1e3 <= args.realtime_p99_s)
    return {
        "nodes": nodes, "receiver": receiver, "daemons": daemons, "seconds": args.seconds,
        "chunk_s": args.chunk_s,
        "chunks_published": len(published), "chunks_decoded": int(decoded),
        "decisions": len(trace_lines),
        "decisions_received_mqtt": len(subscriber.received),
        "latency_ms": {name: {"p50": pct(v, 50), "p99": pct(v, 99), "max": max(v, default=None),
                              "n": len(v)}
                       for name, v in (("daemon", lat_daemon), ("e2e_outbox", lat_outbox),
                                       ("e2e_mqtt", lat_mqtt))},
        "cpu_pct_of_core": 100 * (cpu1 - cpu0 + kid1 - kid0) / (t1 - t0),
        "cpu_pct_per_node": 100 * (cpu1 - cpu0 + kid1 - kid0) / (t1 - t0) / nodes,
        "cpu_pct_receiver": 100 * (kid1 - kid0) / (t1 - t0),
        "rss_mb": rss, "peak_rss_mb": hwm, "receiver_rss_mb": kid_rss, "pss_total_mb": pss,
        "drops": drops,
        "outbox_depth_end": m.get("edgefuse_outbox_depth"),
        "publisher_lag_ms": {"p50": pct(lag_ms, 50), "p99": pct(lag_ms, 99)},
        "load_offered_on_time": offered,
        "loadavg": os.getloadavg(), "realtime_no_drop": bool(realtime),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="1,200", help="node counts to measure")
    ap.add_argument("--search", default="", help="node counts to try for the real-time limit")
    ap.add_argument("--seconds", type=float, default=25.0)
    ap.add_argument("--warmup-s", type=float, default=4.0)
    ap.add_argument("--chunk-s", type=float, default=0.2)
    ap.add_argument("--publishers", type=int, default=2, help="publisher processes")
    ap.add_argument("--realtime-p99-s", type=float, default=1.0)
    ap.add_argument("--switch-interval-s", type=float, default=0.005,
                    help="the daemon's sys.setswitchinterval (Python's default: 0.005)")
    ap.add_argument("--receivers", default="process",
                    help="MQTT receivers to measure, e.g. thread,process (thread: the baseline, "
                         "paho inside the daemon's process)")
    ap.add_argument("--daemons", default="1",
                    help="daemon counts to measure, e.g. 1,2 (D > 1: D partitioned daemons, "
                         "edgefuse run --partition k/D, nodes on edgefuse/p<k>/...)")
    ap.add_argument("--json", action="store_true")
    # publisher-process arguments (internal)
    ap.add_argument("--publisher", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--total-nodes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--event0-ns", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--start-delay-s", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--log", default="", help=argparse.SUPPRESS)
    ap.add_argument("--partitions", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.publisher:
        publisher_main(args)
        return
    counts = [int(x) for x in args.nodes.split(",") if x]
    search = [int(x) for x in args.search.split(",") if x]
    receivers = [x for x in args.receivers.split(",") if x]
    daemon_counts = [int(x) for x in args.daemons.split(",") if x]
    setups = [(rc, d) for rc in receivers for d in daemon_counts]
    results = []
    with tempfile.TemporaryDirectory(prefix="edgefuse-live-") as tmp:
        for receiver, daemons in setups:
            for n in counts + search:
                r = run_once(n, args, Path(tmp), receiver, daemons)
                results.append(r)
                _print_run(r, len(receivers) > 1, len(daemon_counts) > 1)
                if n in search and not r["realtime_no_drop"]:
                    break
    by = {(r["receiver"], r["daemons"], r["nodes"]): r for r in results}
    for receiver in receivers:
        for d in daemon_counts[1:]:
            for n in counts + search:
                one, many = by.get((receiver, daemon_counts[0], n)), by.get((receiver, d, n))
                if one is None or many is None:
                    continue
                ratios = {k: _ratio(many["latency_ms"][k]["p99"], one["latency_ms"][k]["p99"])
                          for k in ("daemon", "e2e_outbox", "e2e_mqtt")}
                print(f"N={n:4d}  {d}/{daemon_counts[0]} daemons p99 ratio: daemon "
                      f"{ratios['daemon']}, e2e(outbox) {ratios['e2e_outbox']}, e2e(mqtt) "
                      f"{ratios['e2e_mqtt']}; cpu "
                      f"{_ratio(many['cpu_pct_of_core'], one['cpu_pct_of_core'])}",
                      file=sys.stderr)
    if {"thread", "process"} <= set(receivers):
        for n in counts + search:
            t = by.get(("thread", daemon_counts[0], n))
            p = by.get(("process", daemon_counts[0], n))
            if t is None or p is None:
                continue
            ratios = {k: _ratio(t["latency_ms"][k]["p99"], p["latency_ms"][k]["p99"])
                      for k in ("daemon", "e2e_outbox", "e2e_mqtt")}
            print(f"N={n:4d}  thread/process p99 ratio: daemon {ratios['daemon']}, "
                  f"e2e(outbox) {ratios['e2e_outbox']}, e2e(mqtt) {ratios['e2e_mqtt']}; "
                  f"cpu {_ratio(t['cpu_pct_of_core'], p['cpu_pct_of_core'])}", file=sys.stderr)
    held = {f"{rc}/{d}": max((r["nodes"] for r in results
                              if (r["receiver"], r["daemons"]) == (rc, d) and r["nodes"] in search
                              and r["realtime_no_drop"]), default=None) for rc, d in setups}
    summary = {"runs": results, "max_realtime_nodes_tried": held, "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps(summary, indent=1))


def _print_run(r: dict, label: bool, daemons: bool = False) -> None:
    lat = r["latency_ms"]
    print(f"{r['receiver'] + ' ' if label else ''}"
          f"{str(r['daemons']) + ' daemon(s) ' if daemons else ''}N={r['nodes']:4d}"
          f"  daemon p50/p99 {_fmt(lat['daemon']['p50'])}/{_fmt(lat['daemon']['p99'])} ms"
          f"  e2e(outbox) {_fmt(lat['e2e_outbox']['p50'])}/{_fmt(lat['e2e_outbox']['p99'])} ms"
          f"  e2e(mqtt) {_fmt(lat['e2e_mqtt']['p50'])}/{_fmt(lat['e2e_mqtt']['p99'])} ms"
          f"  cpu {r['cpu_pct_of_core']:.0f}% ({r['cpu_pct_per_node']:.2f}%/node,"
          f" receiver {r['cpu_pct_receiver']:.0f}%)"
          f"  rss {r['rss_mb']:.0f} MB (peak {r['peak_rss_mb']:.0f})"
          f" + receiver {r['receiver_rss_mb']:.0f} MB, pss {r['pss_total_mb']:.0f} MB"
          f"  chunks {r['chunks_decoded']}/{r['chunks_published']}"
          f"  drops {sum(r['drops'].values()):.0f}"
          f" {({k.split('_', 1)[1]: v for k, v in r['drops'].items() if v}) or ''}"
          f"  publishers late p99 {_fmt(r['publisher_lag_ms']['p99'])} ms"
          f"  realtime={r['realtime_no_drop']}"
          f"  load {r['loadavg'][0]:.1f}", file=sys.stderr, flush=True)


def _ratio(a, b) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


if __name__ == "__main__":
    main()
