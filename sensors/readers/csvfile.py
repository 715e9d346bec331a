"""A user's CSV of one stream: a time column, then one column per channel.

    t_ms,ax,ay,az,gx,gy,gz
    1714564800000,0.01,-0.02,9.81,0.1,0.0,-0.1

The first header names the time unit: `t_ns`, `t_us`, `t_ms`, `t_s` (seconds
since 1970) or `time` (ISO-8601 UTC). Times are parsed from the text exactly
(integers or Decimal; never a float: a float number of seconds since 1970
has only ~0.2 us resolution).

Timestamps may be irregular. The file is cut into *runs* at gaps (a step of
more than GAP_FACTOR typical periods and more than one period plus twice the
unit's resolution, so whole-millisecond stamps don't cut runs); each run's rate is estimated from its
first and last timestamps (or is the manifest's rate_hz), and its chunks are
timed from the run's first timestamp and that rate. Time that goes backwards,
or values outside 2000..2100 for the declared unit, are refused with the file
and line number.

Memory: opening the file scans its timestamps (8 bytes a row, at most
MAX_ROWS rows); reading it streams the values chunk by chunk, so a file is
never held whole.
"""
from __future__ import annotations

import array
import calendar
import csv
import os
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Callable, Iterator

import numpy as np

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import InputError
from edgefuse.sensors.readers._common import (
    NS_PER_S, offset_ns, samples_per_chunk, seq_step_over, utc_to_ns,
)

# unit header -> ns per unit (None: ISO-8601 text)
TIME_UNITS: dict[str, int | None] = {"t_ns": 1, "t_us": 1_000, "t_ms": 1_000_000,
                                     "t_s": NS_PER_S, "time": None}
GAP_FACTOR = 1.5
_INTEGER_RESOLUTION_NS = {"t_ns": 1, "t_us": 1_000, "t_ms": 1_000_000}
MAX_ROWS = 20_000_000  # ~160 MB of timestamps while scanning; 55 h at 100 Hz
_PLAUSIBLE_NS = (calendar.timegm((2000, 1, 1, 0, 0, 0)) * NS_PER_S,
                 calendar.timegm((2100, 1, 1, 0, 0, 0)) * NS_PER_S)


@dataclass(frozen=True)
class Run:
    """Rows [first, first + rows) of the file, timed t0_ns + offset_ns(k, rate_hz)."""

    first: int
    rows: int
    t0_ns: int
    rate_hz: float


@dataclass(frozen=True)
class CsvLayout:
    """What a scan of the timestamps found."""

    path: str
    unit: str
    channels: int
    rows: int
    runs: tuple[Run, ...]
    rate_hz: float  # the typical rate: the manifest's, else 1 / median period

    @property
    def t0_ns(self) -> int | None:
        return self.runs[0].t0_ns if self.runs else None


def _fail(path: str, line: int | None, message: str) -> InputError:
    where = f"{path} line {line}" if line is not None else path
    return InputError(f"{where}: {message}", path=path)


def _likely_unit(ns: int, unit: str) -> str:
    """The unit under which a misread value would fall in 2000..2100, if any."""
    if TIME_UNITS[unit] is None:  # ISO text names its own time
        return ""
    raw = Decimal(ns) / TIME_UNITS[unit]
    for name, scale in TIME_UNITS.items():
        if scale is not None and name != unit and \
                _PLAUSIBLE_NS[0] <= raw * scale < _PLAUSIBLE_NS[1]:
            return f"; the values look like {name}: name the column {name!r}"
    return ""


def _time_parser(path: str, unit: str) -> Callable[[str, int], int]:
    scale = TIME_UNITS[unit]

    def parse(text: str, line: int) -> int:
        try:
            if scale is None:
                ns = utc_to_ns(text)
            else:
                d = Decimal(text.strip())
                if not d.is_finite():
                    raise InvalidOperation
                ns = int((d * scale).to_integral_value(rounding=ROUND_HALF_EVEN))
        except (InvalidOperation, InputError) as exc:
            raise _fail(path, line, f"expected a time in {unit}, found {text!r}") from exc
        if not _PLAUSIBLE_NS[0] <= ns < _PLAUSIBLE_NS[1]:
            raise _fail(path, line, f"time {text!r} read as {unit} is outside the years "
                                    f"2000..2100{_likely_unit(ns, unit)}")
        return ns
    return parse


def _rows(path: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of the data rows; blank lines skipped."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            next(reader, None)
            for row in reader:
                if row and any(x.strip() for x in row):
                    yield reader.line_num, row
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}", path=path) from exc


def read_header(path: str) -> tuple[str, int]:
    """(time unit, channels) from the header line."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}", path=path) from exc
    units = ", ".join(TIME_UNITS)
    if not header:
        raise _fail(path, 1, f"expected a header '<{'|'.join(TIME_UNITS)}>,<channel>,...', "
                             "found an empty file")
    unit = header[0].strip().lower()
    if unit not in TIME_UNITS:
        raise _fail(path, 1, f"expected the first column to name the time unit (one of "
                             f"{units}), found {header[0]!r}")
    if len(header) < 2:
        raise _fail(path, 1, "expected at least one channel column after the time column")
    return unit, len(header) - 1


def _typical_period(t: np.ndarray, span: int = 16) -> float | None:
    """The stream's usual time per row, ns: the median over sliding runs of `span`
    rows, so repeated or coarsely rounded stamps and rare gaps don't bias it; None
    when no two rows have different times."""
    if t.size < 2:
        return None
    w = min(span, t.size - 1)
    per_row = (t[w:] - t[:-w]) / w
    per_row = per_row[per_row > 0]
    return float(np.median(per_row)) if per_row.size else None


def _gap_rows(t: np.ndarray, period: float, allowance: float, recent: int = 16) -> np.ndarray:
    """Rows after which time jumps ahead of the stream's own clock by more than
    `allowance`: the stamp's lead over an ideal clock (t - k*period) against the
    largest lead of the `recent` rows before it. A burst of repeated stamps
    followed by a catch-up step returns to a recent lead and is no gap."""
    if t.size < 2:
        return np.zeros(0, np.int64)
    lead = (t - t[0]).astype(np.float64) - period * np.arange(t.size)
    recent_max = lead[:-1].copy()
    for shift in range(1, min(recent, t.size - 1)):
        np.maximum(recent_max[shift:], lead[:-1 - shift], out=recent_max[shift:])
    return np.flatnonzero(lead[1:] - recent_max > allowance)


def scan(path: str | os.PathLike, rate_hz: float | None = None) -> CsvLayout:
    """Read the timestamps, check them, cut them into runs (no values kept)."""
    path = os.fspath(path)
    unit, channels = read_header(path)
    parse = _time_parser(path, unit)
    stamps = array.array("q")
    prev, prev_line = None, None
    for line, row in _rows(path):
        if len(stamps) >= MAX_ROWS:
            raise _fail(path, line, f"more than {MAX_ROWS} rows; split the file into several "
                                    "files of the same stream (one [[stream]] each)")
        if len(row) != channels + 1:
            raise _fail(path, line, f"expected {channels + 1} fields (time + {channels} "
                                    f"channels, as the header), found {len(row)}")
        t = parse(row[0], line)
        if prev is not None and t < prev:
            raise _fail(path, line, f"time goes backwards by {(prev - t) / 1e6:.3f} ms "
                                    f"(from line {prev_line}); expected rows in time order")
        prev, prev_line = t, line
        stamps.append(t)
    t = np.frombuffer(stamps, dtype=np.int64) if stamps else np.zeros(0, np.int64)
    period = _typical_period(t)
    if rate_hz is None and period is None:
        raise _fail(path, None, f"{t.size} row(s) without two distinct times: the rate cannot "
                                "be estimated; give rate_hz in the manifest")
    if period is None:
        period = NS_PER_S / rate_hz
    typical = rate_hz if rate_hz is not None else NS_PER_S / period
    # A gap is a step well beyond the typical period, and beyond what the stamps'
    # resolution can add: loggers stamping whole ms at 100 Hz write 9, 10 or 11 ms
    # steps (and repeats) that are one steady clock, not 30 runs at odd rates.
    resolution = _INTEGER_RESOLUTION_NS.get(unit, 0)   # t_s and ISO text: decimals
    gap_ns = max(GAP_FACTOR * period, period + 2 * resolution)
    cuts = [0, *(_gap_rows(t, period, gap_ns - period) + 1).tolist(), t.size]
    runs = []
    for a, b in zip(cuts, cuts[1:]):
        if b <= a:
            continue
        span = int(t[b - 1] - t[a])
        rate = rate_hz if rate_hz is not None else \
            (float((b - a - 1) * NS_PER_S / span) if span > 0 else typical)
        runs.append(Run(a, b - a, int(t[a]), rate))
    return CsvLayout(path, unit, channels, int(t.size), tuple(runs), float(typical))


def _parse_values(path: str, line: int, row: list[str]) -> list[float]:
    try:
        return [float(x) for x in row[1:]]
    except ValueError as exc:
        raise _fail(path, line, f"expected numbers in the channel columns: {exc}") from exc


def iter_chunks(layout: CsvLayout, node: str, modality: str, chunk_s: float,
                full_scale: float | None = None) -> Iterator[Chunk]:
    """Chunks of ~chunk_s seconds, never across a run boundary; values streamed."""
    rows = _rows(layout.path)
    seq = 0
    prev: Chunk | None = None
    for run in layout.runs:
        if prev is not None:   # a hole in seq: the time between runs is lost data
            seq += seq_step_over(prev, run.t0_ns) - 1
        step = samples_per_chunk(chunk_s, run.rate_hz)
        for start in range(0, run.rows, step):
            n = min(step, run.rows - start)
            block = np.empty((n, layout.channels), np.float32)
            for k in range(n):
                item = next(rows, None)
                if item is None:
                    raise _fail(layout.path, None,
                                f"the file ended before data row {run.first + start + k + 1}, "
                                "which its first reading found; was it changed meanwhile?")
                line, row = item
                block[k] = _parse_values(layout.path, line, row)
            prev = Chunk(node, modality, run.t0_ns + offset_ns(start, run.rate_hz),
                         run.rate_hz, block, seq, full_scale=full_scale)
            yield prev
            seq += 1
