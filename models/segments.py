"""Labelled recording segments of the goodvibes data pack (numpy only, no torch).

A segment is what one node recorded during one labelled event: a vehicle pass
(``passes/``) or a noise recording between runs (``noise/``). It holds the
samples of each modality on the sensor clock (t0 and the sensor's measured
rate from the sensor metadata, not the labelled times, which are late by up
to 1.8 s) and the vehicle-to-node distance track used for labels.

Choices (see models/README.md):
- items whose ``window_check.status`` is not ``ok`` (``misplaced``) are skipped:
  their samples are not from the labelled run;
- a pass uses ``full/`` where it has the modality and ``close/`` otherwise (the
  close cut lies inside the full run, so this never duplicates samples);
- noise recordings are split into their sensor-clock spans; each span is one
  piece with its own t0 (spliced files thus keep their real times).
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from edgefuse.models.labels import DistanceTrack, load_gps_track, utc_iso_ns
from edgefuse.runtime.core.errors import InputError
from edgefuse.sensors.readers.wavfile import read_wav

log = logging.getLogger(__name__)

MODALITIES = ("acoustic", "seismic")
FULL_SCALE_INT16 = 32767.0


@dataclass(frozen=True)
class Piece:
    """Contiguous samples of one modality: int16 [n], first sample at t0_ns (sensor clock)."""

    modality: str
    t0_ns: int
    rate_hz: float
    samples: np.ndarray


@dataclass
class Segment:
    site: str
    date: str
    node: str
    group: str            # event id shared by every node that saw it (split unit)
    kind: str             # "pass" or "noise"
    target: str           # vehicle target id for passes, "" for noise
    pieces: list[Piece]
    track: DistanceTrack
    background_without_gps: bool
    source: str = ""      # folder or file the samples came from
    notes: list[str] = field(default_factory=list)


def default_data_dir() -> str | None:
    """../shared/data relative to the repository root, when it exists."""
    here = os.path.dirname(os.path.abspath(__file__))
    cand = os.path.normpath(os.path.join(here, "..", "..", "shared", "data"))
    return cand if os.path.isdir(cand) else None


def _ns(seconds: float) -> int:
    return int(round(float(seconds) * 1e9))


def _distance_csv(path: str) -> DistanceTrack:
    try:
        arr = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read distance table {path}: {exc}", path=path) from exc
    t = np.round(arr[:, 0] * 1e9).astype(np.int64)
    return DistanceTrack(t, arr[:, 1].astype(np.float64))


def _pass_piece(folder: str, modality: str, meta: dict) -> Piece | None:
    info = meta.get("modalities", {}).get(modality)
    wav = os.path.join(folder, f"{modality}.wav")
    if not info or not os.path.exists(wav):
        return None
    _, samples = read_wav(wav)
    t0 = info.get("t0_unix_s_sensor_clock")
    rate = info.get("sensor_rate_hz_actual")
    if t0 is None or rate is None:
        raise InputError(f"{folder}/meta.json lacks the sensor clock of {modality} "
                         "(t0_unix_s_sensor_clock, sensor_rate_hz_actual)", path=folder)
    return Piece(modality, _ns(t0), float(rate), np.asarray(samples).reshape(-1))


def pass_segments(gv_dir: str) -> tuple[list[Segment], dict[str, int]]:
    """One segment per (target, run, node) with status ok; counters of what was skipped."""
    skipped = {"misplaced": 0, "no_samples": 0}
    items: dict[str, dict[str, str]] = {}
    for kind in ("full", "close"):
        base = os.path.join(gv_dir, "passes", kind)
        for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            items.setdefault(name, {})[kind] = os.path.join(base, name)
    out = []
    for name, folders in sorted(items.items()):
        metas = {k: _read_json(os.path.join(f, "meta.json")) for k, f in folders.items()}
        first = metas.get("full") or metas["close"]
        if any(m.get("window_check", {}).get("status") != "ok" for m in metas.values()):
            skipped["misplaced"] += 1
            continue
        pieces = []
        for modality in MODALITIES:
            for kind in ("full", "close"):
                if kind in folders:
                    p = _pass_piece(folders[kind], modality, metas[kind])
                    if p is not None:
                        pieces.append(p)
                        break
        if not pieces:
            skipped["no_samples"] += 1
            continue
        track_folder = folders.get("full") or folders["close"]
        site, date = first["location"], first["date"]
        target, run = first["target_id"], first["run"]
        out.append(Segment(site=site, date=date, node=str(first["node"]),
                           group=f"{site}:{date}:pass:{target}.{run}", kind="pass",
                           target=target, pieces=pieces,
                           track=_distance_csv(os.path.join(track_folder, "distance.csv")),
                           background_without_gps=False, source=name))
    return out, skipped


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}", path=path) from exc


def _sensor_rates(gv_dir: str) -> dict[str, float]:
    """data-file -> sample-rate-actual from raw/signature_information.csv."""
    path = os.path.join(gv_dir, "raw", "signature_information.csv")
    with open(path, newline="") as f:
        return {r["data-file"]: float(r["sample-rate-actual"]) for r in csv.DictReader(f)}


def _gps_tracks(gv_dir: str) -> dict[tuple[str, str, str], DistanceTrack]:
    """(site, date, node) -> distance of the logged vehicle(s) to the node, from every GPS
    log the run log names for that site and day."""
    tables = os.path.join(gv_dir, "tables")
    logs: dict[tuple[str, str], set[str]] = {}
    with open(os.path.join(tables, "target-run-log.csv"), newline="") as f:
        for r in csv.DictReader(f):
            if r.get("gps-log-file"):
                logs.setdefault((r["location"], _iso(r["date"])), set()).add(r["gps-log-file"])
    out = {}
    with open(os.path.join(tables, "emplacement_information.csv"), newline="") as f:
        for r in csv.DictReader(f):
            site, date = r["location"], _iso(r["date"])
            tracks = [load_gps_track(os.path.join(gv_dir, "gps", g), float(r["lat"]),
                                     float(r["lon"]))
                      for g in sorted(logs.get((site, date), ()))
                      if os.path.exists(os.path.join(gv_dir, "gps", g))]
            out[(site, date, r["node-id"])] = DistanceTrack.merge(tracks)
    return out


def _iso(mdy: str) -> str:
    m, d, y = (int(x) for x in mdy.split("/"))
    return f"{y:04d}-{m:02d}-{d:02d}"


def noise_segments(gv_dir: str) -> list[Segment]:
    """One segment per noise window and node (acoustic and seismic files of one name are the
    same window); distance from the day's GPS logs, background where no fix covers."""
    if not os.path.exists(os.path.join(gv_dir, "tables", "target-run-log.csv")):
        # Without the run log and GPS logs a noise window's label is unknown (a vehicle
        # may be near): skip them rather than guess "background".
        log.warning("%s has no tables/target-run-log.csv: noise recordings skipped "
                    "(their labels need the GPS logs)", gv_dir)
        return []
    rates = _sensor_rates(gv_dir)
    tracks = _gps_tracks(gv_dir)
    by_name: dict[str, Segment] = {}
    for modality in MODALITIES:
        index = os.path.join(gv_dir, "noise", modality, "noise.csv")
        if not os.path.exists(index):
            continue
        with open(index, newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            if int(r["samples"]) == 0:
                continue
            _, samples = read_wav(os.path.join(os.path.dirname(index), r["filename"]))
            samples = np.asarray(samples).reshape(-1)
            spans = [s.split("/") for s in r["source_spans_utc"].split(";")]
            files = r["source_files"].split(";")
            pieces, pos = [], 0
            for i, ((a, b), src) in enumerate(zip(spans, files)):
                rate = rates.get(src, float(r["rate"]))
                t0, t1 = utc_iso_ns(a), utc_iso_ns(b)
                n = samples.size - pos if i == len(spans) - 1 else int(round((t1 - t0) * rate / 1e9))
                if n > 0:
                    pieces.append(Piece(modality, t0, rate, samples[pos:pos + n]))
                pos += max(n, 0)
            site, date, node = r["location"], r["date"], r["node-id"]
            key = f"{site}:{date}:{node}:{r['filename']}"
            seg = by_name.get(key)
            if seg is None:
                seg = by_name[key] = Segment(
                    site=site, date=date, node=node,
                    group=f"{site}:{date}:noise:{r['start'].replace(' ', 'T')}", kind="noise",
                    target="", pieces=[],
                    track=tracks.get((site, date, node), DistanceTrack.merge([])),
                    background_without_gps=True, source=f"noise/{r['filename']}")
            seg.pieces.extend(pieces)
    return list(by_name.values())


def load_segments(data_dir: str) -> tuple[list[Segment], dict[str, int]]:
    """All labelled goodvibes segments under data_dir (the data pack root)."""
    gv = os.path.join(data_dir, "goodvibes")
    if not os.path.isdir(gv):
        raise InputError(f"expected the data pack's goodvibes/ folder under {data_dir!r}; "
                         "pass the data pack root (the folder holding README.md)", path=data_dir)
    passes, skipped = pass_segments(gv)
    noise = noise_segments(gv)
    log.info("goodvibes: %d pass segments, %d noise segments, skipped %s",
             len(passes), len(noise), skipped)
    return passes + noise, skipped
