"""Which broker mechanism partitions the nodes among daemons: measured, same run.

    python bench/brokers.py [--nodes 300] [--partitions 3] [--seconds 10] [--qos 0,1]

Both candidates deliver every stream of a node to one subscriber of N:

- ``mosquitto``: topic partitions. A node publishes to
  ``edgefuse/p<k>/<node>/<modality>``, k = CRC-32 of the UTF-8 node name mod N
  (``edgefuse.sensors.live.topics.partition_of``); subscriber k takes
  ``edgefuse/p<k>/+/+``.
- ``nats``: the NATS server's MQTT listener with an account subject mapping
  ``edgefuse.*.<modality> -> edgefuse.{{partition(N,1)}}.{{wildcard(1)}}.<modality>``;
  nodes publish unchanged to ``edgefuse/<node>/<modality>``, subscriber k
  takes ``edgefuse/<k>/+/+``. The NATS MQTT listener needs JetStream (its
  session and QoS 1 state live there) and speaks MQTT 3.1.1 only.

The load is the live benchmark's (bench/live.py): per node acoustic (0.2 s of
9866.44 Hz int16), seismic (1605.23 Hz int16) and IMU (100 Hz, 6 x float32)
chunks every 0.2 s, from two publisher processes, nodes spread over the
period. Each payload carries its publish time (CLOCK_MONOTONIC ns); each
subscriber process stamps its receipt. Reported per broker and QoS: messages
published / received (loss), messages of a node seen by more than one
subscriber (must be 0), the largest / smallest partition (balance), latency
publish -> receipt p50 / p99, and the broker's CPU (% of one core, from
/proc). A benchmark: it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STREAMS = (("acoustic", 9866.44, 2), ("seismic", 1605.23, 2), ("imu", 100.0, 24))
STAMP = struct.Struct("<q")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(proc: subprocess.Popen, port: int, what: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen on {port}") from None
            time.sleep(0.05)


def start_mosquitto(workdir: Path, partitions: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false",
             "max_queued_messages 100000", "log_dest stderr", "log_type error"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.DEVNULL)
    _wait_port(proc, port, "mosquitto")
    return proc, port


def nats_conf(port: int, client_port: int, store: Path, partitions: int,
              modalities=tuple(s[0] for s in STREAMS)) -> str:
    """A NATS server config: MQTT on ``port``, nodes partitioned by subject mapping."""
    maps = "\n".join(f'  "edgefuse.*.{m}": "edgefuse.{{{{partition({partitions},1)}}}}.'
                     f'{{{{wildcard(1)}}}}.{m}"' for m in modalities)
    return (f"listen: 127.0.0.1:{client_port}\nserver_name: edgefuse-bench\n"
            f'jetstream {{ store_dir: "{store}" }}\nmqtt {{ listen: 127.0.0.1:{port} }}\n'
            f"mappings = {{\n{maps}\n}}\n")


def start_nats(workdir: Path, partitions: int) -> tuple[subprocess.Popen, int]:
    exe = shutil.which("nats-server")
    if exe is None:
        raise RuntimeError("nats-server is not installed (apt-get install nats-server)")
    port = free_port()
    conf = workdir / "nats.conf"
    conf.write_text(nats_conf(port, free_port(), workdir / "js", partitions))
    proc = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)
    _wait_port(proc, port, "nats-server")
    return proc, port


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --- roles (child processes) --------------------------------------------------
def _client(client_id: str, port: int, broker: str):
    import paho.mqtt.client as mqtt
    protocol = mqtt.MQTTv311 if broker == "nats" else mqtt.MQTTv5
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=protocol)
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port, 60)
    client.loop_start()
    return client


def subscriber_main(args) -> None:
    """Subscriber k: records (node, modality, publish ns, receive ns) per message."""
    import threading
    topic = (f"edgefuse/p{args.k}/+/+" if args.broker == "mosquitto"
             else f"edgefuse/{args.k}/+/+")
    rows: list[tuple[str, str, int, int]] = []
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_message(client, userdata, msg):
        now = time.monotonic_ns()
        *_, node, modality = msg.topic.split("/")
        with lock:
            rows.append((node, modality, STAMP.unpack_from(msg.payload)[0], now))

    client = _client(f"bench-sub-{args.k}", args.port, args.broker)
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.subscribe(topic, qos=args.qos)
    subscribed.wait(10)
    Path(args.ready).touch()
    time.sleep(args.seconds + 3.0)
    client.disconnect()
    client.loop_stop()
    with lock:
        Path(args.out).write_text(json.dumps(rows))


def publisher_main(args) -> None:
    """Nodes [first, last): one chunk per stream every chunk_s, in real time."""
    from edgefuse.sensors.live.topics import partition_of
    first, last = map(int, args.publisher.split(":"))
    client = _client(f"bench-pub-{first}", args.port, args.broker)
    bodies = [bytes(int(round(rate * args.chunk_s)) * width) for _, rate, width in STREAMS]
    topics = {}
    for node in range(first, last):
        name = f"node{node}"
        k = partition_of(name, args.partitions)
        for m, _, _ in STREAMS:
            topics[(node, m)] = (f"edgefuse/p{k}/{name}/{m}" if args.broker == "mosquitto"
                                 else f"edgefuse/{name}/{m}")
    sent = 0
    wall0 = time.monotonic_ns() + 500_000_000
    period = int(args.chunk_s * 1e9)
    rounds = int(args.seconds / args.chunk_s)
    pending = []
    for r in range(rounds):
        for node in range(first, last):
            due = wall0 + r * period + int(node / args.total_nodes * period)
            ahead = due - time.monotonic_ns()
            if ahead > 0:
                time.sleep(ahead / 1e9)
            for (m, _, _), body in zip(STREAMS, bodies):
                info = client.publish(topics[(node, m)],
                                      STAMP.pack(time.monotonic_ns()) + body, qos=args.qos)
                sent += 1
                if args.qos:
                    pending.append(info)
        if len(pending) > 5000:
            pending = [i for i in pending if not i.is_published()]
    for info in pending:
        info.wait_for_publish(10)
    time.sleep(0.5)
    client.disconnect()
    client.loop_stop()
    Path(args.out).write_text(json.dumps({"sent": sent}))


# --- orchestration ------------------------------------------------------------
def dotted_name_delivered(broker: str, port: int, partitions: int) -> bool:
    """Does a node named like a goodvibes pass folder ("2D.16.123") get through?"""
    import threading

    from edgefuse.sensors.live.topics import partition_of
    node = "2D.16.123"
    k = partition_of(node, partitions)
    got = threading.Event()
    sub = _client("bench-probe-sub", port, broker)
    sub.on_message = lambda *a: got.set()
    sub.subscribe(f"edgefuse/p{k}/+/+" if broker == "mosquitto" else f"edgefuse/{k}/+/+")
    pub = _client("bench-probe-pub", port, broker)
    time.sleep(0.5)
    pub.publish(f"edgefuse/p{k}/{node}/acoustic" if broker == "mosquitto"
                else f"edgefuse/{node}/acoustic", STAMP.pack(0), qos=0)
    ok = got.wait(2.0)
    for client in (pub, sub):
        client.disconnect()
        client.loop_stop()
    return ok


def run_once(broker: str, qos: int, args, tmp: Path) -> dict:
    work = tmp / f"{broker}-q{qos}"
    work.mkdir()
    proc, port = (start_mosquitto if broker == "mosquitto" else start_nats)(work, args.partitions)
    env = dict(os.environ)
    dotted = dotted_name_delivered(broker, port, args.partitions)
    common = ["--broker", broker, "--port", str(port), "--qos", str(qos), "--seconds",
              str(args.seconds), "--partitions", str(args.partitions), "--chunk-s",
              str(args.chunk_s), "--total-nodes", str(args.nodes)]
    kids = []
    try:
        for k in range(args.partitions):
            kids.append(subprocess.Popen([sys.executable, __file__, "--k", str(k), *common,
                                          "--ready", str(work / f"ready{k}"),
                                          "--out", str(work / f"sub{k}.json")], env=env))
        deadline = time.monotonic() + 20
        while not all((work / f"ready{k}").exists() for k in range(args.partitions)):
            if time.monotonic() > deadline:
                raise RuntimeError("subscribers did not subscribe")
            time.sleep(0.05)
        bounds = np.linspace(0, args.nodes, args.publishers + 1).astype(int)
        pubs = [subprocess.Popen([sys.executable, __file__, "--publisher",
                                  f"{bounds[i]}:{bounds[i + 1]}", *common,
                                  "--out", str(work / f"pub{i}.json")], env=env)
                for i in range(args.publishers)]
        kids += pubs
        time.sleep(1.5)
        cpu0, t0 = proc_cpu_s(proc.pid), time.monotonic()
        time.sleep(max(1.0, args.seconds - 2.0))
        cpu1, t1 = proc_cpu_s(proc.pid), time.monotonic()
        for p in kids:
            p.wait(args.seconds + 60)
    finally:
        for p in kids:
            if p.poll() is None:
                p.kill()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    sent = sum(json.loads((work / f"pub{i}.json").read_text())["sent"]
               for i in range(args.publishers))
    seen: dict[str, set[int]] = {}
    lat, per_part = [], []
    for k in range(args.partitions):
        rows = json.loads((work / f"sub{k}.json").read_text())
        per_part.append(len({r[0] for r in rows}))
        for node, _, pub, rec in rows:
            seen.setdefault(node, set()).add(k)
            lat.append((rec - pub) / 1e6)
    return {"broker": broker, "qos": qos, "nodes": args.nodes, "sent": sent,
            "received": len(lat), "split_nodes": sum(len(v) > 1 for v in seen.values()),
            "nodes_per_partition": per_part,
            "latency_ms": {"p50": float(np.percentile(lat, 50)) if lat else None,
                           "p99": float(np.percentile(lat, 99)) if lat else None},
            "broker_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0), "dotted_node_delivered": dotted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brokers", default="mosquitto,nats")
    ap.add_argument("--nodes", type=int, default=300)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--chunk-s", type=float, default=0.2)
    ap.add_argument("--qos", default="0,1")
    ap.add_argument("--publishers", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    # child roles (internal)
    ap.add_argument("--broker", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--publisher", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--total-nodes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--ready", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.k is not None or args.publisher:
        args.qos = int(args.qos)
        (subscriber_main if args.k is not None else publisher_main)(args)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="edgefuse-brokers-") as tmp:
        for qos in (int(q) for q in args.qos.split(",")):
            for broker in args.brokers.split(","):
                r = run_once(broker, qos, args, Path(tmp))
                results.append(r)
                lat = r["latency_ms"]
                print(f"{broker:9s} qos {qos}  {r['nodes']} nodes / {args.partitions} "
                      f"partitions  received {r['received']}/{r['sent']}  split nodes "
                      f"{r['split_nodes']}  nodes per partition {r['nodes_per_partition']}  "
                      f"latency p50/p99 {lat['p50']:.1f}/{lat['p99']:.1f} ms  broker cpu "
                      f"{r['broker_cpu_pct']:.0f}%  node '2D.16.123' delivered "
                      f"{r['dotted_node_delivered']}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
