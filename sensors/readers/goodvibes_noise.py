"""Reader for the goodvibes noise windows: `node-<N>_location-<loc>_noise-<k>.wav`
beside their noise.csv index (see the data README), and the raw recordings'
signature_information.csv that holds each sensor file's measured rate.

A noise window was cut from one or more raw 5-minute files: noise.csv names
them (`source_files`) and the sensor-clock span each contributed
(`source_spans_utc`, ms resolution). Two ways to read one:
- `noise_sources` (replay, `edgefuse record`): one stream at the first span's
  t0 and the header rate, marked nominal; a spliced window is warned about;
- `NoiseInfo.spans` (training): one WavSpan per source span, each at its own
  t0 and at its file's measured rate (`signature_rates`), so a spliced window
  keeps its real times.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from typing import Mapping

from edgefuse.runtime.core.errors import InputError
from edgefuse.sensors.readers._common import OfflineSource, StreamInfo, utc_to_ns
from edgefuse.sensors.readers.goodvibes import WavSpan
from edgefuse.sensors.readers.wavfile import read_wav_info

log = logging.getLogger(__name__)

NOISE_NAME = re.compile(r"^node-(?P<node>\d+)_location-(?P<loc>[^_]+)_noise-(?P<k>\d+)\.wav$")
SIGNATURE_TABLE = "signature_information.csv"


@dataclass(frozen=True)
class NoiseInfo:
    """One noise WAV and its noise.csv row. Times: sensor clock, ms resolution."""

    path: str
    node: str
    location: str
    date: str
    modality: str
    rate_hz: int          # header rate (nominal)
    samples: int
    spans_ns: tuple[tuple[int, int], ...]  # when the samples were recorded
    spliced: bool
    overlapping_runs: tuple[str, ...]
    row: dict[str, str]
    source_files: tuple[str, ...] = ()     # the raw file of each span, in span order

    @property
    def t0_ns(self) -> int | None:
        return self.spans_ns[0][0] if self.spans_ns else None

    def spans(self, actual_rates: Mapping[str, float] | None = None) -> list[WavSpan]:
        """The window's samples as one WavSpan per source span, in order.

        Each span starts at its own sensor-clock t0 and runs at its source file's
        measured rate where `actual_rates` (signature_rates) has it, else at the
        header rate (marked nominal). A span holds round((end - start) x rate)
        samples; the last one takes what is left of the WAV.
        """
        frames = read_wav_info(self.path).frames
        rates = actual_rates or {}
        out: list[WavSpan] = []
        pos = 0
        for i, ((t0, t1), src) in enumerate(zip(self.spans_ns, self.source_files)):
            actual = rates.get(src)
            rate = float(self.rate_hz) if actual is None else float(actual)
            n = frames - pos if i == len(self.spans_ns) - 1 else int(round((t1 - t0) * rate / 1e9))
            n = min(n, frames - pos)
            if n > 0:
                out.append(WavSpan(self.node, self.modality, self.path, t0, rate,
                                   actual is None, pos, n))
            pos += max(n, 0)
        return out


def load_noise(folder: str | os.PathLike) -> list[NoiseInfo]:
    """Every row of `folder`/noise.csv whose WAV is present in `folder`."""
    folder = os.fspath(folder)
    csv_path = os.path.join(folder, "noise.csv")
    out = []
    try:
        f = open(csv_path, newline="")
    except OSError as exc:
        raise InputError(f"{csv_path}: cannot read the noise index: {exc}", path=csv_path) from exc
    with f:
        for row in csv.DictReader(f):
            wav = os.path.join(folder, row.get("filename", ""))
            if not os.path.exists(wav):
                continue
            try:
                spans = tuple((utc_to_ns(a), utc_to_ns(b)) for a, b in
                              (s.split("/") for s in row["source_spans_utc"].split(";") if s))
                out.append(NoiseInfo(
                    wav, row["node-id"], row["location"], row["date"], row["mode"],
                    int(row["rate"]), int(row["samples"]), spans, row["spliced"] == "true",
                    tuple(r for r in row["overlapping_logged_runs"].split(";") if r), row,
                    tuple(s for s in row["source_files"].split(";") if s)))
            except (KeyError, ValueError, InputError) as exc:
                log.warning("%s: skipping malformed row for %s: %s", csv_path, wav, exc)
    return out


def signature_rates(raw_folder: str | os.PathLike) -> dict[str, float]:
    """Raw file name -> its measured rate (`sample-rate-actual`) from
    `raw_folder`/signature_information.csv; malformed rows are skipped with a warning."""
    path = os.path.join(os.fspath(raw_folder), SIGNATURE_TABLE)
    rates: dict[str, float] = {}
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    rates[row["data-file"]] = float(row["sample-rate-actual"])
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("%s: skipping malformed row %r (%s)", path, row, exc)
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the raw recordings' table ({exc}); expected "
                         f"raw/{SIGNATURE_TABLE} of the goodvibes data", path=path) from exc
    return rates


def noise_sources(path: str, chunk_s: float) -> list[OfflineSource]:
    """A noise WAV (its row is looked up in the noise.csv beside it)."""
    folder, name = os.path.split(os.path.abspath(path))
    rows = [n for n in load_noise(folder) if os.path.basename(n.path) == name]
    if not rows:
        raise InputError(f"{path}: no row for it in {os.path.join(folder, 'noise.csv')}; "
                         "expected noise WAVs beside their index", path=path)
    n = rows[0]
    frames = read_wav_info(n.path).frames
    if frames != n.samples:
        log.warning("%s: noise.csv says %d samples, the WAV holds %d; using the WAV",
                    path, n.samples, frames)
    if frames == 0 or n.t0_ns is None:
        log.info("%s: empty noise window (0 samples)", path)
        return []
    if n.spliced:
        log.warning("%s: spliced window: chunk times after the splice are off by the gap "
                    "between its recordings (%s)", path, n.row["source_spans_utc"])
    stream = StreamInfo(n.node, n.modality, 1, float(n.rate_hz), n.path, True, n.t0_ns, frames)
    span = WavSpan(n.node, n.modality, n.path, n.t0_ns, float(n.rate_hz), True)
    return [OfflineSource(path, (stream,), n.t0_ns, lambda: span.chunks(chunk_s))]
