"""Reader for the sp-sw-har phone + watch IMU CSVs (see the data README).

Files `s<NN>/s<NN>_<EE>_sp.csv` (phone) and `_sw.csv` (watch), columns
x_acc,y_acc,z_acc,x_gyro,y_gyro,z_gyro,timestamp(ms),label. One execution is
one node ("s01_01") with two streams, imu_phone and imu_watch, 6 channels.
The timestamps are irregular, repeat and go backwards, so chunks carry
rate_hz=None: the aligner estimates the rate from the chunk t0s.

This is the one parser of these files: replay reads an execution through
`csv_sources`; the training datasets (edgefuse.models.har) through
`find_executions` -> `Execution.sources` (the same sources, so the same
chunks) and `Execution.activity_rows` (the label of every row).
"""
from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import InputError
from edgefuse.sensors.readers._common import OfflineSource, StreamInfo

log = logging.getLogger(__name__)

COLUMNS = ["x_acc", "y_acc", "z_acc", "x_gyro", "y_gyro", "z_gyro", "timestamp", "label"]
DEVICE_MODALITY = {"sp": "imu_phone", "sw": "imu_watch"}
CHANNELS = 6
NOMINAL_RATE_HZ = 100.0  # only to size chunks: chunk_s worth of rows at ~100 Hz
FILE_NAME = re.compile(r"^(?P<execution>s\d+_\d+)_(?P<device>sp|sw)\.csv$")
SUBJECT_NAME = re.compile(r"^s\d+$")
_MAX_ROWS = 10_000_000  # a bound on one file (real files hold ~1,500 rows)


def parse_name(path: str) -> tuple[str, str]:
    """(execution id, modality) from a file name like s01_02_sw.csv."""
    m = FILE_NAME.match(os.path.basename(path))
    if not m:
        raise InputError(f"{path}: expected an sp-sw-har file name 's<NN>_<EE>_sp.csv' or "
                         "'..._sw.csv'", path=path)
    return m["execution"], DEVICE_MODALITY[m["device"]]


def read_csv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(timestamps int64 ns, values float32 [n, 6], labels) of one file.

    Malformed rows are skipped with a warning (one bad row never loses the file).
    """
    path = os.fspath(path)
    times: list[int] = []
    values: list[list[float]] = []
    labels: list[str] = []
    bad = 0
    try:
        with open(path, newline="") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header != COLUMNS:
                raise InputError(f"{path}: expected header {','.join(COLUMNS)}, found "
                                 f"{','.join(header) if header else 'an empty file'}", path=path)
            for lineno, row in enumerate(rows, start=2):
                if len(times) >= _MAX_ROWS:
                    raise InputError(f"{path}: more than {_MAX_ROWS} rows; expected one "
                                     "execution of ~15 s", path=path)
                try:
                    if len(row) != 8:
                        raise ValueError(f"{len(row)} fields, expected 8")
                    v = [float(x) for x in row[:6]]
                    t = int(row[6]) * 1_000_000
                except ValueError as exc:
                    bad += 1
                    if bad <= 5:
                        log.warning("%s line %d: skipping malformed row (%s)", path, lineno, exc)
                    continue
                times.append(t)
                values.append(v)
                labels.append(row[7])
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}", path=path) from exc
    if bad:
        log.warning("%s: skipped %d malformed row(s) of %d", path, bad, bad + len(times))
    return (np.asarray(times, np.int64), np.asarray(values, np.float32).reshape(-1, CHANNELS),
            labels)


def execution_files(path: str | os.PathLike) -> list[str]:
    """Given either CSV of an execution, both of its CSVs that exist (phone first)."""
    path = os.fspath(path)
    execution, _ = parse_name(path)
    folder = os.path.dirname(path)
    both = [os.path.join(folder, f"{execution}_{d}.csv") for d in DEVICE_MODALITY]
    return [p for p in both if os.path.exists(p)]


def load_execution(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """modality -> (timestamps_ns int64, values float32 [n, 6], labels) for the
    execution that `path` (either of its CSVs) belongs to."""
    return {parse_name(p)[1]: read_csv(p) for p in execution_files(path)}


def iter_csv(path: str | os.PathLike, chunk_s: float = 1.0) -> Iterator[Chunk]:
    """Chunks of chunk_s worth of rows; t0 = the timestamp of the chunk's first row."""
    path = os.fspath(path)
    node, modality = parse_name(path)
    if not chunk_s > 0:
        raise InputError(f"chunk_s must be > 0 seconds, found {chunk_s!r}")
    rows = max(1, int(round(chunk_s * NOMINAL_RATE_HZ)))
    times, values, _ = read_csv(path)
    for seq, start in enumerate(range(0, len(times), rows)):
        yield Chunk(node, modality, int(times[start]), None, values[start:start + rows], seq)


def find_csvs(path: str | os.PathLike) -> list[str]:
    """The CSVs of an execution (either file given), a subject folder or the root."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return execution_files(path)
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        found += [os.path.join(root, n) for n in files if FILE_NAME.match(n)]
    return sorted(found)


@dataclass(frozen=True)
class Execution:
    """One execution: a subject through the activity sequence with a phone and a watch.

    name is the node of its chunks ("s15_04"); paths its CSVs, phone first (one
    of the two may be absent).
    """

    name: str
    paths: tuple[str, ...]

    @property
    def subject(self) -> str:
        """The person ("s15"): the part of the name before the execution number."""
        return self.name.split("_")[0]

    def sources(self, chunk_s: float) -> list[OfflineSource]:
        """One source per CSV, as replay builds them for this execution."""
        return [s for p in self.paths for s in csv_sources(p, chunk_s)]

    def activity_rows(self) -> tuple[np.ndarray, list[str]]:
        """(timestamps int64 ns, activity label) of every row of every CSV, in file
        order (phone first); each device's own clock."""
        times, labels = [], []
        for p in self.paths:
            t, _, labs = read_csv(p)
            times.append(t)
            labels += labs
        return (np.concatenate(times) if times else np.zeros(0, np.int64)), labels


def find_executions(path: str | os.PathLike) -> list[Execution]:
    """The executions under `path` (a CSV, a subject folder or the root), by name."""
    paths: dict[str, list[str]] = {}
    for p in find_csvs(path):
        paths.setdefault(parse_name(p)[0], []).append(p)
    return [Execution(name, tuple(sorted(ps, key=lambda p: p.endswith("_sw.csv"))))
            for name, ps in sorted(paths.items())]


def is_sphar(path: str) -> bool:
    """Does `path` look like sp-sw-har data (file, subject folder or dataset root)?"""
    if os.path.isfile(path):
        return bool(FILE_NAME.match(os.path.basename(path)))
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    if any(FILE_NAME.match(n) for n in names):
        return True
    return any(SUBJECT_NAME.match(n) and os.path.isdir(os.path.join(path, n)) for n in names) \
        and "executions_info.csv" in names


def _first_timestamp_ns(path: str) -> int | None:
    """The first data row's timestamp (a lower bound is all the merger needs)."""
    try:
        with open(path, newline="") as f:
            rows = csv.reader(f)
            next(rows, None)
            for row in rows:
                try:
                    return int(row[6]) * 1_000_000
                except (IndexError, ValueError):
                    continue
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}", path=path) from exc
    return None


def csv_sources(path: str, chunk_s: float) -> list[OfflineSource]:
    """One source per CSV; its first chunk's t0 is the first row's timestamp."""
    node, modality = parse_name(path)
    first = _first_timestamp_ns(path)
    stream = StreamInfo(node, modality, CHANNELS, None, path, False, first, None)
    return [OfflineSource(path, (stream,), first, lambda: iter_csv(path, chunk_s))]
