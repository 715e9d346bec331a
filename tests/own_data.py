"""Tiny synthetic recordings of a user's own 3-sensor nodes, written by the tests.

Each node records acoustic (int16 WAV, 8 kHz), seismic (int16 WAV, 500 Hz) and a
6-axis IMU (CSV, t_ms, 100 Hz) through a recording.toml manifest; it goes through
labelled activities whose signals differ in every sensor:

    idle     noise only, gravity on the IMU's z axis
    walk     2 Hz steps: IMU swing, seismic footfalls
    vehicle  a 300 Hz engine tone, 40 Hz ground vibration

``labels_csv`` writes the matching intervals (node,start,end,label,session).
"""
from __future__ import annotations

import os
import wave
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

T0_NS = 1_777_636_800_000_000_000          # 2026-05-01T12:00:00Z
RATES = {"acoustic": 8000, "seismic": 500, "imu": 100}
LABELS = ("idle", "walk", "vehicle")
PLAN = (("idle", 6), ("walk", 6), ("vehicle", 6), ("idle", 4), ("walk", 4), ("vehicle", 4))


def _signals(label: str, seconds: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    t = {m: np.arange(int(seconds * r)) / r for m, r in RATES.items()}
    acoustic = rng.normal(0, 200, t["acoustic"].size)
    seismic = rng.normal(0, 20, t["seismic"].size)
    imu = rng.normal(0, 0.05, (t["imu"].size, 6))
    imu[:, 2] += 9.81
    if label == "walk":
        imu[:, 0] += 3.0 * np.sin(2 * np.pi * 2.0 * t["imu"])
        imu[:, 4] += 1.5 * np.cos(2 * np.pi * 2.0 * t["imu"])
        seismic += 2000 * np.exp(-((t["seismic"] % 0.5) / 0.02))
    elif label == "vehicle":
        acoustic += 3000 * np.sin(2 * np.pi * 300.0 * t["acoustic"])
        seismic += 800 * np.sin(2 * np.pi * 40.0 * t["seismic"])
    return {"acoustic": acoustic, "seismic": seismic, "imu": imu}


def _wav(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.clip(samples, -32767, 32767).astype("<i2").tobytes())


def write_node(folder: Path, node: str, seed: int, plan=PLAN, t0_ns: int = T0_NS,
               modalities: tuple[str, ...] = ("acoustic", "seismic", "imu")) -> Path:
    """A node's files and its recording.toml in folder/node; returns that folder."""
    rng = np.random.default_rng(seed)
    parts = [_signals(label, seconds, rng) for label, seconds in plan]
    out = folder / node
    out.mkdir(parents=True, exist_ok=True)
    streams = []
    for m in modalities:
        data = np.concatenate([p[m] for p in parts])
        if m == "imu":
            times = t0_ns // 1_000_000 + np.arange(data.shape[0]) * 10
            rows = [f"{t}," + ",".join(f"{v:.4f}" for v in row) for t, row in zip(times, data)]
            (out / f"{m}.csv").write_text("t_ms,ax,ay,az,gx,gy,gz\n" + "\n".join(rows) + "\n")
            streams.append(f'[[stream]]\nnode = "{node}"\nmodality = "{m}"\nfile = "{m}.csv"\n')
        else:
            _wav(out / f"{m}.wav", data, RATES[m])
            streams.append(f'[[stream]]\nnode = "{node}"\nmodality = "{m}"\nfile = "{m}.wav"\n'
                           f"t0_ns = {t0_ns}\n")
    (out / "recording.toml").write_text("\n".join(streams))
    return out


def labels_csv(path: Path, nodes: dict[str, str], plan=PLAN, t0_ns: int = T0_NS,
               extra_rows: tuple[str, ...] = ()) -> Path:
    """Intervals of every node's plan (nodes: node -> session), integer ns times."""
    rows = ["node,start,end,label,session"]
    for node, session in nodes.items():
        t = t0_ns
        for label, seconds in plan:
            end = t + int(seconds * 1e9)
            rows.append(f"{node},{t},{end},{label},{session}")
            t = end
    path.write_text("\n".join([*rows, *extra_rows]) + "\n")
    return path


@contextmanager
def own_recordings(root: Path, nodes: dict[str, str], extra_rows: tuple[str, ...] = ()
                   ) -> Iterator[Path]:
    """root/rec/<node> for every node (seed = its position), root/labels.csv, and
    EDGEFUSE_CACHE pointed at root/cache while the block runs; yields root."""
    for i, node in enumerate(nodes):
        write_node(root / "rec", node, seed=i)
    labels_csv(root / "labels.csv", nodes, extra_rows=extra_rows)
    os.environ["EDGEFUSE_CACHE"] = str(root / "cache")
    try:
        yield root
    finally:
        os.environ.pop("EDGEFUSE_CACHE", None)


def contract_toml(modalities: tuple[str, ...] = ("acoustic", "seismic", "imu"),
                  name: str = "own-3s") -> str:
    channels = {"acoustic": 1, "seismic": 1, "imu": 6}
    mods = "".join(f"[contract.modalities.{m}]\nchannels = {channels[m]}\n"
                   f"rate_hz = {float(RATES[m])}\n" for m in modalities)
    return (f'[contract]\nname = "{name}"\nversion = "1.2.0"\nwindow_s = 1.0\nhop_s = 0.5\n'
            f"labels = {list(LABELS)!r}\n{mods}").replace("'", '"')
