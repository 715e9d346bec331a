"""Convert goodvibes (acoustic + seismic vehicle passes) into the generic layout.

    python examples/goodvibes_to_generic.py ../shared/data out/generic/goodvibes
    edgefuse train examples/configs/goodvibes_generic.toml

Writes, under OUT:
    recording.toml                         one [[stream]] per WAV, on the SENSOR clock
    bprf_2023-04-11/2H.22.129_acoustic.wav int16 mono, the samples as recorded
    labels.csv                             node,start,end,label,day_site,event

The recordings are the ones the built-in detection dataset uses
(edgefuse.models.segments: every pass whose samples are from the labelled run,
full/ where it has the modality, close/ otherwise, and the noise recordings
between runs, split at their sensor-clock seams), read by the same readers.
Each becomes one node (`2H.22.129`, `noise-2.cochise-2023-04-11.121`), so each is
cut on its own as in the built-in path. Every stream's t0_ns and rate_hz are
the sensor clock's (meta.json t0_unix_s_sensor_clock, sensor_rate_hz_actual;
noise.csv spans and signature_information.csv rates): when the samples were
recorded, not the run log's time, which is late by up to 1.8 s.

Labels follow the present rule (edgefuse.models.labels: GPS distance of the
vehicle to the node, linear between fixes, unknown across fix gaps over 2 s),
written as intervals: `vehicle` where the distance is <= 25 m, `background`
where it is > 100 m (noise recordings: also where no fix is known), nothing
in between. With the train config's [labels] any_labels = ["vehicle"] and
min_share = 1.0, a window is vehicle when it touches a vehicle interval and
background when it lies wholly inside a background interval: the built-in
rule, evaluated continuously rather than at 5 points of the window. Intervals
are clipped to the spans of each recording's files plus one window (1 s) either
side, so the windows at their edges are labelled as the built-in path labels them.

Measured (2026-11-30): 90 streams from 43 recordings, 83 intervals, 7093
labelled windows; on the held-out bprf/2023-04-11, 694 with both modalities
(578 background, 116 vehicle), as the built-in dataset. The bundled gv_detect
scores the same on them as on the built-in windows (accuracy 0.980, balanced
0.940); trained on the converted data alone: 0.977 / 0.931.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import wave
from collections import Counter

import numpy as np

from edgefuse.models.labels import DistanceTrack, LabelRule
from edgefuse.models.segments import Segment, load_segments
from edgefuse.runtime.core.errors import InputError
from edgefuse.sensors.readers._common import offset_ns
from edgefuse.sensors.readers.goodvibes import WavSpan
from edgefuse.sensors.readers.wavfile import WavReader

LABEL_HEADER = ["node", "start", "end", "label", "day_site", "event"]
EDGE_NS = 1_000_000_000  # one window: intervals reach this far past a recording


def linear_runs(track: DistanceTrack, max_gap_s: float, threshold: float,
                below: bool) -> list[tuple[int, int]]:
    """Time intervals where the distance is <= threshold (below) or > threshold (not below),
    linear between consecutive fixes no more than max_gap_s apart (unknown elsewhere, as
    DistanceTrack.at has it); crossings are found exactly on each linear piece."""
    t, d = track.t_ns, track.meters
    out: list[tuple[int, int]] = []
    gap_ns = int(max_gap_s * 1e9)
    for i in range(t.size - 1):
        t0, t1, d0, d1 = int(t[i]), int(t[i + 1]), float(d[i]), float(d[i + 1])
        if t1 <= t0 or t1 - t0 > gap_ns:
            continue
        a, b = (d0 <= threshold, d1 <= threshold) if below else (d0 > threshold, d1 > threshold)
        if not (a or b):
            continue
        if a and b:
            piece = (t0, t1)
        else:
            cross = t0 + int(round((threshold - d0) / (d1 - d0) * (t1 - t0)))
            piece = (t0, cross) if a else (cross, t1)
        if out and out[-1][1] >= piece[0]:
            out[-1] = (out[-1][0], max(out[-1][1], piece[1]))
        elif piece[1] > piece[0]:
            out.append(piece)
    return out


def complement(spans: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """[lo, hi) minus the (sorted, disjoint) spans."""
    out, pos = [], lo
    for a, b in spans:
        if a > pos:
            out.append((pos, min(a, hi)))
        pos = max(pos, b)
        if pos >= hi:
            break
    if pos < hi:
        out.append((pos, hi))
    return [(a, b) for a, b in out if b > a]


def clip(spans: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    return [(max(a, lo), min(b, hi)) for a, b in spans if min(b, hi) > max(a, lo)]


def segment_intervals(seg: Segment, rule: LabelRule, spans: list[tuple[int, int]]
                      ) -> list[tuple[int, int, str]]:
    """(start, end, label) of one recording, inside its (sorted, disjoint) spans."""
    vehicle = linear_runs(seg.track, rule.max_fix_gap_s, rule.near_m, below=True)
    near = linear_runs(seg.track, rule.max_fix_gap_s, rule.far_m, below=True)
    far = linear_runs(seg.track, rule.max_fix_gap_s, rule.far_m, below=False)
    rows = []
    for lo, hi in spans:
        rows += [(a, b, "vehicle") for a, b in clip(vehicle, lo, hi)]
        # a noise recording is background unless a vehicle is known within far_m
        background = complement(clip(near, lo, hi), lo, hi) if seg.background_without_gps \
            else clip(far, lo, hi)
        rows += [(a, b, "background") for a, b in background]
    return sorted(rows)


def union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def iso_ns(ns: int) -> str:
    sec, frac = divmod(int(ns), 1_000_000_000)
    return np.datetime64(sec, "s").astype(str) + f".{frac:09d}Z"


def node_name(seg: Segment) -> str:
    if seg.kind == "pass":
        return seg.source  # the data README's item name: <target>.<run>.<node>
    k = os.path.splitext(os.path.basename(seg.source))[0].rsplit("noise-", 1)[-1]
    return f"noise-{k}.{seg.site}-{seg.date}.{seg.node}"


def write_piece(piece: WavSpan, path: str) -> int:
    """Frames [first, first + frames) of the source WAV into a new int16 mono WAV."""
    with WavReader(piece.wav_path, quiet=True) as reader:
        n = reader.info.frames - piece.first if piece.frames is None else piece.frames
        frames = reader.read(piece.first, n)
        header_rate = reader.info.rate_hz
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(header_rate if piece.rate_is_nominal else max(1, round(piece.rate_hz)))
        w.writeframes(frames.astype("<i2").tobytes())
    return int(frames.shape[0])


def stream_entry(node: str, piece: WavSpan, rel: str) -> str:
    lines = [f'node = "{node}"', f'modality = "{piece.modality}"', f'file = "{rel}"',
             f"t0_ns = {piece.t0_ns}"]
    if not piece.rate_is_nominal:  # a measured rate; else the header's, marked nominal
        lines.append(f"rate_hz = {piece.rate_hz!r}")
    return "\n[[stream]]\n" + "\n".join(lines) + "\n"


def convert(data: str, out: str, rule: LabelRule = LabelRule()) -> dict:
    """Convert the goodvibes recordings under the data pack root `data` into `out`."""
    segments, skipped = load_segments(data)
    os.makedirs(out, exist_ok=True)
    manifest = ["# goodvibes in the generic layout (examples/goodvibes_to_generic.py); "
                "times: the sensor clock\n"]
    labels: list[list[str]] = []
    streams = 0
    for seg in segments:
        node = node_name(seg)
        folder = f"{seg.site}_{seg.date}"
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        per_modality: Counter = Counter()
        spans = []
        for piece in seg.pieces:
            k = per_modality[piece.modality]
            per_modality[piece.modality] += 1
            rel = f"{folder}/{node}_{piece.modality}{f'-{k}' if k else ''}.wav"
            frames = write_piece(piece, os.path.join(out, rel))
            manifest.append(stream_entry(node, piece, rel))
            streams += 1
            spans.append((piece.t0_ns - EDGE_NS,
                          piece.t0_ns + offset_ns(frames, piece.rate_hz) + EDGE_NS))
        for a, b, label in segment_intervals(seg, rule, union(spans)):
            labels.append([node, iso_ns(a), iso_ns(b), label, f"{seg.site}/{seg.date}",
                           seg.group])
    with open(os.path.join(out, "recording.toml"), "w") as f:
        f.write("".join(manifest))
    with open(os.path.join(out, "labels.csv"), "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(LABEL_HEADER)
        w.writerows(labels)
    kinds = Counter(s.kind for s in segments)
    return {"recordings": len(segments), "passes": kinds["pass"], "noise": kinds["noise"],
            "streams": streams, "intervals": len(labels), "skipped": skipped,
            "by_label": dict(sorted(Counter(r[3] for r in labels).items())),
            "day_sites": sorted({r[4] for r in labels})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="the data pack root (holding goodvibes/)")
    ap.add_argument("out", help="output folder (recording.toml, WAVs, labels.csv)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        s = convert(args.data, args.out)
    except InputError as exc:
        print(f"goodvibes_to_generic: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {s['streams']} streams from {s['recordings']} recordings "
          f"({s['passes']} passes, {s['noise']} noise; skipped {s['skipped']}), "
          f"{s['intervals']} label intervals {s['by_label']}, day-sites {s['day_sites']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
