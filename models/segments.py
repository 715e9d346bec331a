"""Labelled recording segments of the goodvibes data pack (numpy only, no torch).

A segment is what one node recorded during one labelled event: a vehicle pass
(``passes/``) or a noise recording between runs (``noise/``). It holds the
samples of each modality on the sensor clock (t0 and the sensor's measured
rate from the sensor metadata, not the labelled times, which are late by up
to 1.8 s) and the vehicle-to-node distance track used for labels.

The files are read by the readers replay uses (``edgefuse.sensors.readers``:
``goodvibes.load_pass`` for meta.json and distance.csv, ``goodvibes_noise`` for
noise.csv and the raw files' measured rates): a segment's pieces are the
readers' ``WavSpan``s, and models/dataset.py cuts them into chunks with
``WavSpan.chunks``, so training sees the samples at the times serving sees them
(tests/test_training_equals_serving.py). Only the label sources that serving
never reads are parsed here: the run log, the node positions and the GPS logs.

Choices (see models/README.md):
- items whose ``window_check.status`` is not ``ok`` (``misplaced``) are skipped:
  their samples are not from the labelled run;
- a pass uses ``full/`` where it has the modality and ``close/`` otherwise (the
  close cut lies inside the full run, so this never duplicates samples);
- a modality without the sensor clock in meta.json is refused (its labelled
  times are late by up to 1.8 s, which would misplace every label);
- noise recordings are split into their sensor-clock spans; each span is one
  piece with its own t0 and its source file's measured rate (spliced files
  thus keep their real times).
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field

from edgefuse.models.labels import DistanceTrack, load_gps_track
from edgefuse.runtime.core.errors import InputError
from edgefuse.sensors.readers import goodvibes, goodvibes_noise
from edgefuse.sensors.readers.goodvibes import MODALITIES, PassInfo, WavSpan

log = logging.getLogger(__name__)


@dataclass
class Segment:
    site: str
    date: str
    node: str
    group: str            # event id shared by every node that saw it (split unit)
    kind: str             # "pass" or "noise"
    target: str           # vehicle target id for passes, "" for noise
    pieces: list[WavSpan]  # contiguous samples of one modality each, in recording order
    track: DistanceTrack
    background_without_gps: bool
    source: str = ""      # folder or file the samples came from
    notes: list[str] = field(default_factory=list)


def default_data_dir() -> str | None:
    """../shared/data relative to the repository root, when it exists."""
    here = os.path.dirname(os.path.abspath(__file__))
    cand = os.path.normpath(os.path.join(here, "..", "..", "shared", "data"))
    return cand if os.path.isdir(cand) else None


def _sensor_clock_span(info: PassInfo, modality: str) -> WavSpan:
    if info.modalities[modality].rate_is_nominal:
        raise InputError(f"{info.path}/meta.json lacks the sensor clock of {modality} "
                         "(t0_unix_s_sensor_clock, sensor_rate_hz_actual)", path=info.path)
    return info.span(modality)


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
        infos = {k: goodvibes.load_pass(f) for k, f in folders.items()}
        if not all(info.window_ok for info in infos.values()):
            skipped["misplaced"] += 1
            continue
        pieces = []
        for modality in MODALITIES:
            for kind in ("full", "close"):
                if kind in infos and modality in infos[kind].modalities:
                    pieces.append(_sensor_clock_span(infos[kind], modality))
                    break
        if not pieces:
            skipped["no_samples"] += 1
            continue
        first = infos.get("full") or infos["close"]
        if first.distance_m.size == 0:
            log.warning("%s: no distance.csv (or no fix in it): every window of this pass "
                        "is left unlabelled", first.path)
        out.append(Segment(site=first.location, date=first.date, node=first.node,
                           group=f"{first.location}:{first.date}:pass:{first.target}.{first.run}",
                           kind="pass", target=first.target, pieces=pieces,
                           track=DistanceTrack(first.distance_unix_ns, first.distance_m),
                           background_without_gps=False, source=name))
    return out, skipped


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
    rates = goodvibes_noise.signature_rates(os.path.join(gv_dir, "raw"))
    tracks = _gps_tracks(gv_dir)
    by_name: dict[str, Segment] = {}
    for modality in MODALITIES:
        folder = os.path.join(gv_dir, "noise", modality)
        if not os.path.exists(os.path.join(folder, "noise.csv")):
            continue
        for info in goodvibes_noise.load_noise(folder):
            if info.samples == 0:
                continue
            site, date, node = info.location, info.date, info.node
            filename = os.path.basename(info.path)
            key = f"{site}:{date}:{node}:{filename}"
            seg = by_name.get(key)
            if seg is None:
                seg = by_name[key] = Segment(
                    site=site, date=date, node=node,
                    group=f"{site}:{date}:noise:{info.row['start'].replace(' ', 'T')}",
                    kind="noise", target="", pieces=[],
                    track=tracks.get((site, date, node), DistanceTrack.merge([])),
                    background_without_gps=True, source=f"noise/{filename}")
            seg.pieces.extend(info.spans(rates))
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
