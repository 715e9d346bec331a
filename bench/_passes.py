"""Real goodvibes passes laid out as the inputs the whole-process benchmarks replay.

- ``long_pass``: ONE pass folder of ``seconds`` (default an hour) of one node,
  acoustic + seismic: the samples of every real pass that has the modality
  (passes/close and passes/full, sorted), concatenated and tiled to the length,
  at node 123's sensor rates (acoustic 9867.44 Hz, seismic 1576.215 Hz);
- ``fleet``: a folder of ``passes`` pass folders (default 1,000) over ``nodes``
  nodes: copy i goes to node ``1000 + k`` (k = i mod nodes) as its j-th pass
  (j = i div nodes), starting ``j * spacing_s`` after the first; node k replays
  the real passes of one real node in turn (the six real nodes taken round
  robin), so its sensor rates stay one node's. The WAVs are hard-linked, the
  meta.json moved in time. A spacing under aligner.evict_after_s (600 s)
  with every node recording side by side keeps each node tracked between its
  passes in a single-process replay, the condition under which a fleet replay
  split by node gives the same lines (runtime/service/fleet.py).

Both are written once into a cache folder and reused while their recipe is
unchanged (a ``recipe.json`` says which). Only the standard library and numpy:
the inputs do not depend on the code under test.
"""
from __future__ import annotations

import json
import os
import shutil
import wave
from pathlib import Path

import numpy as np

RECIPE_VERSION = 3
LONG_NODE = "900"
# node 123's sensor clock (passes/*/2D.16.123/meta.json, sensor_rate_hz_actual)
LONG_RATES = {"acoustic": (9867.440044597608, 9867), "seismic": (1576.215, 1576)}
LONG_T0_S = 1_681_200_000.0           # 2023-04-11 08:00:00 UTC
FLEET_T0_S = 1_681_300_000.0          # a day later: the two inputs never share a node anyway
MODALITIES = ("acoustic", "seismic")


def real_passes(data: Path) -> list[Path]:
    """Every real pass folder of the data pack (close, then full), sorted."""
    root = Path(data) / "goodvibes" / "passes"
    found = sorted(root.glob("close/*/meta.json")) + sorted(root.glob("full/*/meta.json"))
    if not found:
        raise FileNotFoundError(f"no goodvibes pass under {root}; expected the data pack "
                                "(--data, default ../shared/data)")
    return [p.parent for p in found]


def _read_pcm16(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected mono 16-bit PCM")
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


def _write_pcm16(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(samples, "<i2").tobytes())


def _cached(folder: Path, recipe: dict) -> bool:
    stamp = folder / "recipe.json"
    return stamp.is_file() and json.loads(stamp.read_text()) == recipe


def _stamp(folder: Path, recipe: dict) -> None:
    (folder / "recipe.json").write_text(json.dumps(recipe, sort_keys=True))


def _utc(unix_s: float) -> str:
    import time
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix_s))


def long_pass(cache: Path, data: Path, seconds: float = 3600.0) -> Path:
    """The one-node pass folder of ``seconds``; returns its path."""
    folder = Path(cache) / f"long_{seconds:g}s" / f"bench.0.{LONG_NODE}"
    recipe = {"v": RECIPE_VERSION, "kind": "long", "seconds": seconds, "data": str(data)}
    if _cached(folder, recipe):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    passes = real_passes(data)
    meta_mods = {}
    for k, m in enumerate(MODALITIES):
        rate, nominal = LONG_RATES[m]
        pieces = [_read_pcm16(p / f"{m}.wav") for p in passes if (p / f"{m}.wav").is_file()]
        joined = np.concatenate(pieces)
        n = int(seconds * rate)
        tiled = np.tile(joined, -(-n // len(joined)))[:n]
        _write_pcm16(folder / f"{m}.wav", tiled, nominal)
        t0 = LONG_T0_S + 0.25 * k            # the streams do not start together
        meta_mods[m] = {"t0_unix_s": t0, "rate_hz": float(nominal), "rate_hz_nominal": nominal,
                        "samples": n, "t0_unix_s_sensor_clock": t0,
                        "sensor_rate_hz_actual": rate,
                        "source_note": f"{len(pieces)} real passes' {m}.wav "
                                       f"({len(joined) / rate:.0f} s), concatenated and tiled"}
    meta = {"target_id": "bench", "run": 0, "node": int(LONG_NODE), "location": "bench",
            "date": _utc(LONG_T0_S)[:10], "start_datetime": _utc(LONG_T0_S),
            "stop_datetime": _utc(LONG_T0_S + seconds), "modalities": meta_mods,
            "missing_modalities": {}, "window_check": {"status": "ok"}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    _stamp(folder, recipe)
    return folder


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _moved_meta(meta: dict, node: str, start_s: float) -> dict:
    """meta.json of a copy: its node, and every time moved so its first sample is
    at start_s (the modalities keep their offsets to each other)."""
    mods = meta["modalities"]
    # chunks carry the sensor clock (labelled time where absent): place by that one
    first = min(m.get("t0_unix_s_sensor_clock", m["t0_unix_s"]) for m in mods.values())
    delta = start_s - first
    out = dict(meta, node=int(node))
    out["modalities"] = {}
    for name, m in mods.items():
        m = dict(m, t0_unix_s=m["t0_unix_s"] + delta)
        if "t0_unix_s_sensor_clock" in m:
            m["t0_unix_s_sensor_clock"] += delta
        m.pop("source_segments", None)
        out["modalities"][name] = m
    whole = round(delta)
    from datetime import datetime, timedelta
    for key in ("start_datetime", "stop_datetime"):
        t = datetime.strptime(meta[key], "%Y-%m-%d %H:%M:%S") + timedelta(seconds=whole)
        out[key] = t.strftime("%Y-%m-%d %H:%M:%S")
    return out


def fleet(cache: Path, data: Path, passes: int = 1000, nodes: int = 50,
          spacing_s: float = 300.0) -> tuple[Path, float]:
    """The folder of pass copies; returns (its path, the data seconds it holds:
    per pass the longest of its streams, summed)."""
    folder = Path(cache) / f"fleet_{passes}x{nodes}_{spacing_s:g}s"
    recipe = {"v": RECIPE_VERSION, "kind": "fleet", "passes": passes, "nodes": nodes,
              "spacing_s": spacing_s, "data": str(data)}
    if _cached(folder, recipe):
        return folder, _data_seconds(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # a copy node keeps one real node's passes (its sensor rates stay its own)
    by_node: dict[str, list[Path]] = {}
    for p in real_passes(data):
        by_node.setdefault(p.name.rsplit(".", 1)[1], []).append(p)
    groups = [by_node[k] for k in sorted(by_node)]
    for i in range(passes):
        k, j = i % nodes, i // nodes
        group = groups[k % len(groups)]
        src = group[(j + k // len(groups)) % len(group)]
        node = str(1000 + k)
        start = FLEET_T0_S + j * spacing_s + 0.37 * k
        dst = folder / f"{src.name.rsplit('.', 1)[0]}.c{i:04d}.{node}"
        dst.mkdir()
        meta = json.loads((src / "meta.json").read_text())
        (dst / "meta.json").write_text(json.dumps(_moved_meta(meta, node, start), indent=1))
        for m in MODALITIES:
            if (src / f"{m}.wav").is_file():
                _link(src / f"{m}.wav", dst / f"{m}.wav")
    _stamp(folder, recipe)
    return folder, _data_seconds(folder)


def _data_seconds(folder: Path) -> float:
    """Per pass the longest stream (samples / sensor rate), summed over the passes."""
    total = 0.0
    for meta_path in sorted(Path(folder).rglob("meta.json")):
        mods = json.loads(meta_path.read_text())["modalities"]
        present = [m for name, m in mods.items()
                   if (meta_path.parent / f"{name}.wav").is_file()]
        total += max((m["samples"] / m.get("sensor_rate_hz_actual", m["rate_hz"])
                      for m in present), default=0.0)
    return total


def pass_seconds(folder: Path) -> float:
    """Data seconds of one pass folder or a folder of them."""
    return _data_seconds(folder)
