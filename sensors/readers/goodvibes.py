"""Readers for the goodvibes acoustic + seismic recordings (see the data README).

Layouts read here:
- a pass folder `<target>.<run>.<node>/` with acoustic.wav and/or seismic.wav,
  meta.json and distance.csv; a folder of such folders (searched recursively);
- raw 5-minute sensor files `Node<N>-Ch<1|2>-<seq>-<date>-<rate>Hz.wav` with
  an optional `.wav.xml` sidecar, or a folder of them.
Noise windows (`node-<N>_location-<loc>_noise-<k>.wav` beside noise.csv) are
read by goodvibes_noise.py.

This is the one parser of these files: replay and the training datasets
(edgefuse.models.segments) both read a pass through `load_pass` and cut its
samples into chunks through `WavSpan.chunks`, so they see the same samples at
the same times.

Chunk times follow the SENSOR clock (meta.json `t0_unix_s_sensor_clock`,
`sensor_rate_hz_actual`; sidecar `sensorTime`, `sampleRateActual`): that is
when the samples were recorded. The labelled (run log) time base is kept in
PassInfo for training and evaluation.

For training, PassInfo is the documented API: target, run, node, location,
date, window_ok (window_check), the GPS distance track (distance_unix_ns,
distance_m) and one WavSpan per modality (`span`).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Iterator

import numpy as np

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import InputError
from edgefuse.sensors.readers._common import (
    OfflineSource, StreamInfo, chunk_frames, merge_chunks, seconds_to_ns, utc_to_ns,
)
from edgefuse.sensors.readers.wavfile import WavReader, read_wav_info

log = logging.getLogger(__name__)

MODALITIES = ("acoustic", "seismic")
CHANNEL_MODALITY = {1: "acoustic", 2: "seismic"}
FULL_SCALE = 32767.0
RAW_NAME = re.compile(
    r"^Node(?P<node>\d+)-Ch(?P<ch>[12])-(?P<seq>\d+)-(?P<date>\d{4}_\d\d_\d\d_\d\d_\d\d_\d\d)"
    r"-(?P<rate>\d+)Hz\.wav$")
_MAX_SIDECAR_BYTES = 64 * 1024


@dataclass(frozen=True)
class WavSpan:
    """Frames [first, first + frames) of one goodvibes WAV as one stream's chunks: the
    first of them recorded at t0_ns (sensor clock), the rest every 1/rate_hz.

    frames None: to the end of the WAV. Sample k's time is t0_ns + offset_ns(k,
    rate_hz), computed exactly from k (no float seconds since 1970, no summing).
    """

    node: str
    modality: str
    wav_path: str
    t0_ns: int
    rate_hz: float
    rate_is_nominal: bool = False
    first: int = 0
    frames: int | None = None

    def chunks(self, chunk_s: float, seq0: int = 0) -> Iterator[Chunk]:
        """Chunks of ~chunk_s seconds, seq counting from seq0; the WAV is opened when
        the first chunk is asked for and closed after the last."""
        with WavReader(self.wav_path, quiet=True) as reader:  # described at open already
            first = min(self.first, reader.info.frames)
            frames = reader.info.frames - first
            if self.frames is not None:
                frames = min(frames, self.frames)
            yield from chunk_frames(self.node, self.modality,
                                    lambda start, n: reader.read(first + start, n), frames,
                                    self.t0_ns, self.rate_hz, chunk_s, full_scale=FULL_SCALE,
                                    rate_is_nominal=self.rate_is_nominal, seq0=seq0)


# ----------------------------------------------------------------- pass folders
@dataclass(frozen=True)
class ModalityInfo:
    """One modality of a pass: its WAV and both time bases of its first sample."""

    name: str
    wav_path: str
    samples: int
    t0_ns: int               # sensor clock (what chunks carry)
    rate_hz: float           # sensor clock rate (sampleRateActual, resampling applied)
    rate_is_nominal: bool    # True when the sensor-clock fields were absent
    label_t0_ns: int         # the source's labelled time base (meta t0_unix_s)
    label_rate_hz: float     # the source's rate for that time base (meta rate_hz)
    header_rate_hz: int
    verified_against_raw: bool | None = None
    source_values_integer: bool | None = None

    def span(self, node: str) -> WavSpan:
        """The whole WAV on the sensor clock (or the labelled one where it lacks it)."""
        return WavSpan(node, self.name, self.wav_path, self.t0_ns, self.rate_hz,
                       self.rate_is_nominal)


@dataclass(frozen=True)
class PassInfo:
    """Everything meta.json and distance.csv say about one (run, node) pass.

    label_start_ns/label_stop_ns: the labelled window (start/stop_datetime,
    whole seconds, UTC). distance_unix_ns/distance_m: GPS fixes of the vehicle
    (GPS UTC, i.e. the labelled time base) and their distance to the node.
    window_ok is False for items whose samples are not from the labelled time
    (window_check.status 'misplaced'/'spliced'): do not use their labels.
    """

    path: str
    name: str
    set_name: str | None
    target: str
    run: int
    node: str
    location: str
    date: str
    modalities: dict[str, ModalityInfo]
    missing_modalities: dict[str, str]
    window_check: dict
    label_start_ns: int
    label_stop_ns: int
    distance_unix_ns: np.ndarray
    distance_m: np.ndarray
    run_facts: dict = field(default_factory=dict)

    @property
    def window_ok(self) -> bool:
        return self.window_check.get("status") == "ok"

    @property
    def cpa_ns(self) -> int | None:
        """Labelled time of the closest point of approach (GPS fix nearest the node)."""
        if self.distance_m.size == 0:
            return None
        return int(self.distance_unix_ns[int(np.argmin(self.distance_m))])

    def sensor_minus_label_ns(self, modality: str) -> int:
        """Sensor clock minus labelled time at the first sample of `modality`."""
        m = self.modalities[modality]
        return m.t0_ns - m.label_t0_ns

    def span(self, modality: str) -> WavSpan:
        """The samples of `modality` with their times: what replay and training chunk."""
        return self.modalities[modality].span(self.node)

    def streams(self) -> list[StreamInfo]:
        return [StreamInfo(self.node, m.name, 1, m.rate_hz, m.wav_path, m.rate_is_nominal,
                           m.t0_ns, m.samples) for m in self.modalities.values()]


_FACT_SKIP = {"target_id", "run", "node", "location", "date", "start_datetime",
              "stop_datetime", "modalities", "missing_modalities", "window_check"}


def _plain(value):
    """Decimals (exact JSON parsing) back to float for the free-form facts."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _modality_info(path: str, name: str, m: dict) -> ModalityInfo:
    wav = os.path.join(path, f"{name}.wav")
    label_t0 = seconds_to_ns(m["t0_unix_s"])
    label_rate = float(m["rate_hz"])
    if "t0_unix_s_sensor_clock" in m and "sensor_rate_hz_actual" in m:
        t0, rate, nominal = seconds_to_ns(m["t0_unix_s_sensor_clock"]), \
            float(m["sensor_rate_hz_actual"]), False
    else:
        log.debug("%s: no sensor-clock fields for %s; using t0_unix_s and rate_hz "
                  "(the source's labelled time base)", path, name)
        t0, rate, nominal = label_t0, label_rate, True
    return ModalityInfo(name, wav, int(m["samples"]), t0, rate, nominal, label_t0, label_rate,
                        int(m.get("rate_hz_nominal", round(label_rate))),
                        m.get("verified_against_raw"), m.get("source_values_integer"))


def _read_distance(path: str) -> tuple[np.ndarray, np.ndarray]:
    times: list[int] = []
    meters: list[float] = []
    csv_path = os.path.join(path, "distance.csv")
    if not os.path.exists(csv_path):
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    with open(csv_path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header != ["unix_s", "meters"]:
            raise InputError(f"{csv_path}: expected header unix_s,meters, found {header}",
                             path=csv_path)
        for row in rows:
            try:
                if len(row) != 2:
                    raise ValueError(f"{len(row)} fields, expected 2")
                t, m = seconds_to_ns(row[0]), float(row[1])
            except (ValueError, InputError) as exc:
                log.warning("%s: skipping malformed row %r (%s)", csv_path, row, exc)
                continue
            times.append(t)
            meters.append(m)
    return np.asarray(times, np.int64), np.asarray(meters, np.float64)


def load_pass(path: str | os.PathLike) -> PassInfo:
    """Read meta.json (+ distance.csv) of one pass folder; no samples are read."""
    path = os.fspath(path)
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f, parse_float=Decimal)  # Decimal keeps the exact digits
    except FileNotFoundError as exc:
        raise InputError(f"{path}: not a goodvibes pass folder (expected meta.json there)",
                         path=path) from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"{meta_path}: cannot read: {exc}", path=meta_path) from exc
    try:
        mods = {}
        for name, m in meta["modalities"].items():
            info = _modality_info(path, name, m)
            if not os.path.exists(info.wav_path):
                log.warning("%s: meta.json lists %s but %s is absent; skipping it",
                            path, name, info.wav_path)
                continue
            mods[name] = info
        distance = _read_distance(path)
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        return PassInfo(
            path=path, name=os.path.basename(os.path.abspath(path)),
            set_name=parent if parent in ("close", "full") else None,
            target=str(meta["target_id"]), run=int(meta["run"]), node=str(meta["node"]),
            location=str(meta["location"]), date=str(meta["date"]), modalities=mods,
            missing_modalities=dict(meta.get("missing_modalities", {})),
            window_check=_plain(meta.get("window_check", {})),
            label_start_ns=utc_to_ns(meta["start_datetime"]),
            label_stop_ns=utc_to_ns(meta["stop_datetime"]),
            distance_unix_ns=distance[0], distance_m=distance[1],
            run_facts={k: _plain(v) for k, v in meta.items() if k not in _FACT_SKIP})
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{meta_path}: malformed pass metadata ({type(exc).__name__}: {exc}); "
                         "expected the layout described in the data README", path=meta_path) from exc


def iter_pass(path: str | os.PathLike, chunk_s: float = 1.0) -> Iterator[Chunk]:
    """Chunks of every modality of one pass, merged in (t0, node, modality, seq) order."""
    info = load_pass(path)
    for m in info.modalities.values():
        _check_frames(m)
    return merge_chunks(info.span(m).chunks(chunk_s) for m in info.modalities)


def _check_frames(m: ModalityInfo) -> None:
    """Warn when meta.json and the WAV disagree on the sample count (the WAV wins)."""
    frames = read_wav_info(m.wav_path).frames
    if frames != m.samples:
        log.warning("%s: meta.json says %d samples, the WAV holds %d; using the WAV",
                    m.wav_path, m.samples, frames)


def find_passes(folder: str | os.PathLike) -> list[str]:
    """Pass folders (holding meta.json) under `folder`, recursively, sorted."""
    found = []
    for root, dirs, files in os.walk(os.fspath(folder)):
        dirs.sort()
        if "meta.json" in files:
            found.append(root)
            dirs[:] = []
    return sorted(found)


def pass_sources(path: str, chunk_s: float) -> list[OfflineSource]:
    """One source per modality of one pass (they are merged later by time)."""
    info = load_pass(path)
    sources = []
    for m, stream in zip(info.modalities.values(), info.streams()):
        _check_frames(m)
        sources.append(OfflineSource(f"{path}:{m.name}", (stream,), m.t0_ns,
                                     lambda span=m.span(info.node): span.chunks(chunk_s)))
    return sources


# ------------------------------------------------------------- raw 5-min files
@dataclass(frozen=True)
class RawWavInfo:
    path: str
    node: str
    modality: str
    t0_ns: int
    rate_hz: float
    rate_is_nominal: bool
    frames: int
    sidecar: dict[str, str]  # the XML attributes; empty without a sidecar

    def span(self) -> WavSpan:
        return WavSpan(self.node, self.modality, self.path, self.t0_ns, self.rate_hz,
                       self.rate_is_nominal)


def _read_sidecar(xml_path: str) -> dict[str, str]:
    with open(xml_path, "rb") as f:
        text = f.read(_MAX_SIDECAR_BYTES + 1)
    if len(text) > _MAX_SIDECAR_BYTES:
        raise InputError(f"{xml_path}: sidecar larger than {_MAX_SIDECAR_BYTES} bytes; "
                         "expected one small <info .../> element", path=xml_path)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise InputError(f"{xml_path}: sidecar XML does not parse: {exc}", path=xml_path) from exc
    if root.tag != "info":
        raise InputError(f"{xml_path}: expected an <info> element, found <{root.tag}>",
                         path=xml_path)
    return dict(root.attrib)


def raw_wav_info(path: str | os.PathLike) -> RawWavInfo:
    """Node, modality, sensor-clock t0 and rate of a raw 5-minute recording."""
    path = os.fspath(path)
    name = os.path.basename(path)
    m = RAW_NAME.match(name)
    if not m:
        raise InputError(f"{path}: expected a raw goodvibes name "
                         "'Node<N>-Ch<1|2>-<seq>-<YYYY_MM_DD_HH_MM_SS>-<rate>Hz.wav'", path=path)
    wav = read_wav_info(path)
    node, modality = m["node"], CHANNEL_MODALITY[int(m["ch"])]
    xml_path = path + ".xml"
    if os.path.exists(xml_path):
        side = _read_sidecar(xml_path)
        try:
            t0 = utc_to_ns(side["sensorTime"])
            rate = float(side["sampleRateActual"])
        except (KeyError, ValueError) as exc:
            raise InputError(f"{xml_path}: expected sensorTime and sampleRateActual "
                             f"attributes, found {sorted(side)}", path=xml_path) from exc
        if side.get("nodeId", node) != node:
            log.warning("%s: sidecar nodeId %s differs from the file name's node %s; "
                        "using the sidecar", path, side["nodeId"], node)
            node = side["nodeId"]
        return RawWavInfo(path, node, modality, t0, rate, False, wav.frames, side)
    y, mo, d, hh, mi, ss = m["date"].split("_")
    t0 = utc_to_ns(f"{y}-{mo}-{d}T{hh}:{mi}:{ss}")
    log.warning("%s: no sidecar %s; using the nominal start in the name and the header rate "
                "%d Hz (nominal: the sensor clock starts up to 0.65 s earlier and runs at a "
                "slightly different rate)", path, os.path.basename(xml_path), wav.rate_hz)
    return RawWavInfo(path, node, modality, t0, float(wav.rate_hz), True, wav.frames, {})


def iter_raw_wav(path: str | os.PathLike, chunk_s: float = 1.0) -> Iterator[Chunk]:
    return raw_wav_info(path).span().chunks(chunk_s)


def find_raw_wavs(folder: str | os.PathLike) -> list[str]:
    folder = os.fspath(folder)
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if RAW_NAME.match(n))


def raw_sources(path: str, chunk_s: float) -> list[OfflineSource]:
    r = raw_wav_info(path)
    stream = StreamInfo(r.node, r.modality, 1, r.rate_hz, r.path, r.rate_is_nominal,
                        r.t0_ns, r.frames)
    return [OfflineSource(path, (stream,), r.t0_ns, lambda: r.span().chunks(chunk_s))]
