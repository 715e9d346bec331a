"""Interval labels for a user's recordings, and the rule that labels windows with them.

The labels file is a CSV with a header naming at least ``node,start,end,label``
(any order; extra columns are kept and can be the split key, e.g. ``group``,
``session``, ``subject``):

    node,start,end,label,session
    pi-a,2026-05-01T12:00:00Z,2026-05-01T12:00:42.5Z,walking,day1
    *,1777636850000000000,1777636851500000000,door,day1

``start``/``end`` are ISO-8601 UTC (``Z``, ``+00:00`` or no zone) or integer ns
since 1970; each interval is [start, end) on the recordings' clock. ``node``
``*`` labels every node. Bad rows are refused with the file and line.

A window [s, e) is labelled from the share of it that each label's intervals
cover (overlapping intervals of one label count once), by ``IntervalRule``:

- ``any_labels`` (every rule, first): the first of these labels that covers any
  part of the window wins (rare, short events: "vehicle", "alarm");
- ``majority`` (default): the label with the largest share wins if that share is
  at least ``min_share`` (else the window is left out);
- ``centre``: the label covering the window's centre instant;
- ``any``: any label that covers part of the window.
Conflicts go to the larger share, then to the order of the [contract] labels.
A window no interval touches gets ``background`` ("" = left out); a winner
that is not one of the model's labels leaves the window out (counted).
"""
from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np

from edgefuse.runtime.core.errors import ConfigError, InputError
from edgefuse.sensors.readers._common import utc_to_ns

log = logging.getLogger(__name__)

IGNORE = -1
RULES = ("majority", "centre", "any")
REQUIRED = ("node", "start", "end", "label")
MAX_INTERVALS = 1_000_000
_Y2000_NS = 946_684_800 * 10**9
_Y2100_NS = 4_102_444_800 * 10**9
_INT = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class IntervalRule:
    """How intervals become window labels (the train config's [labels] table)."""

    rule: str = "majority"
    min_share: float = 0.5
    any_labels: tuple[str, ...] = ()
    background: str = ""

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"[labels] rule must be one of {RULES}, found {self.rule!r}")
        if isinstance(self.min_share, bool) or not isinstance(self.min_share, (int, float)) \
                or not 0.0 < self.min_share <= 1.0:
            raise ConfigError(f"[labels] min_share must be in (0, 1], found {self.min_share!r}")
        if isinstance(self.any_labels, (list, str)):
            object.__setattr__(self, "any_labels", tuple([self.any_labels] if isinstance(
                self.any_labels, str) else self.any_labels))
        if not all(isinstance(x, str) and x for x in self.any_labels):
            raise ConfigError(f"[labels] any_labels must be a list of label names, found "
                              f"{list(self.any_labels)!r}")
        if not isinstance(self.background, str):
            raise ConfigError(f"[labels] background must be a label name or \"\", found "
                              f"{self.background!r}")

    def check(self, labels: tuple[str, ...]) -> None:
        """Every label the rule names must be one of the model's."""
        for name in (*self.any_labels, *([self.background] if self.background else [])):
            if name not in labels:
                raise ConfigError(f"[labels] names {name!r}, which is not one of the "
                                  f"[contract] labels {list(labels)}")

    def to_dict(self) -> dict:
        return {"rule": self.rule, "min_share": float(self.min_share),
                "any_labels": list(self.any_labels), "background": self.background}


@dataclass(frozen=True)
class Intervals:
    """The rows of a labels file (arrays of one length, in file order)."""

    path: str
    node: np.ndarray        # str; "*" = every node
    start_ns: np.ndarray    # int64
    end_ns: np.ndarray      # int64
    label: np.ndarray       # str
    line: np.ndarray        # int64, the CSV line of each row
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # extra columns (str)

    def __len__(self) -> int:
        return int(self.start_ns.size)

    def for_node(self, node: str) -> np.ndarray:
        """Indices of the intervals that apply to ``node``."""
        return np.flatnonzero((self.node == node) | (self.node == "*"))


def _time_ns(text: str) -> int:
    text = text.strip()
    if _INT.match(text):
        value = int(text)
        if not _Y2000_NS <= value < _Y2100_NS:
            raise ValueError(f"integer {text} is not ns since 1970 in the years 2000..2100 "
                             "(seconds or ms?); give integer ns or ISO-8601 UTC")
        return value
    try:
        value = utc_to_ns(text)
    except InputError:
        raise ValueError(f"expected ISO-8601 UTC (2026-05-01T12:00:00.5Z) or integer ns, "
                         f"found {text!r}") from None
    if not _Y2000_NS <= value < _Y2100_NS:
        raise ValueError(f"{text!r} is outside the years 2000..2100")
    return value


def read_intervals(path: str | os.PathLike) -> Intervals:
    """Parse and check a labels CSV; errors name the file and line."""
    path = os.fspath(path)

    def fail(line: int, message: str) -> InputError:
        return InputError(f"{path} line {line}: {message}", path=path)

    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(f"labels file {path}: cannot read: {exc.strerror}", path=path) from exc
    rows: list[tuple] = []
    with f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader, [])]
            if not header or not any(header):
                raise fail(1, f"expected a header with the columns {','.join(REQUIRED)}, "
                              "found an empty line")
            missing = [c for c in REQUIRED if c not in header]
            if missing:
                raise fail(1, f"header lacks {missing}; expected the columns "
                              f"{','.join(REQUIRED)}[,group,...], found {header}")
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes or "" in header:
                raise fail(1, f"header has empty or repeated column names {dupes or ['']}")
            where = {c: header.index(c) for c in header}
            for row in reader:
                line = reader.line_num
                if not row or not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise fail(line, f"{len(row)} fields, the header has {len(header)}")
                cells = {c: row[i].strip() for c, i in where.items()}
                if not cells["node"] or not cells["label"]:
                    raise fail(line, "node and label must not be empty")
                try:
                    start, end = _time_ns(cells["start"]), _time_ns(cells["end"])
                except ValueError as exc:
                    raise fail(line, str(exc)) from None
                if end <= start:
                    raise fail(line, f"end {cells['end']} is not after start {cells['start']}")
                rows.append((line, cells, start, end))
                if len(rows) > MAX_INTERVALS:
                    raise fail(line, f"more than {MAX_INTERVALS} intervals")
        except csv.Error as exc:
            raise fail(reader.line_num, f"not valid CSV: {exc}") from None
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not UTF-8 text ({exc.reason})", path=path) from None
    if not rows:
        raise InputError(f"{path}: no interval after the header; expected rows "
                         "node,start,end,label", path=path)
    extra = [c for c in header if c not in REQUIRED]
    return Intervals(path, np.array([r[1]["node"] for r in rows]),
                     np.array([r[2] for r in rows], np.int64),
                     np.array([r[3] for r in rows], np.int64),
                     np.array([r[1]["label"] for r in rows]),
                     np.array([r[0] for r in rows], np.int64),
                     {c: np.array([r[1][c] for r in rows]) for c in extra})


def covered_ns(starts: np.ndarray, ends: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of [a_i, b_i) covered by the union of the intervals [starts, ends)."""
    if starts.size == 0:
        return np.zeros(a.shape, np.int64)
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], np.maximum.accumulate(ends[order])
    # merge into disjoint runs: a new run starts where an interval begins after all before it
    new = np.ones(s.size, bool)
    new[1:] = s[1:] > e[:-1]
    run_start = s[new]
    run_end = np.append(e[np.flatnonzero(new)[1:] - 1], e[-1])
    before = np.concatenate([[0], np.cumsum(run_end - run_start)])

    def upto(t: np.ndarray) -> np.ndarray:   # covered time in (-inf, t)
        j = np.searchsorted(run_start, t, side="right") - 1
        inside = np.clip(t - run_start[np.maximum(j, 0)], 0,
                         (run_end - run_start)[np.maximum(j, 0)])
        return np.where(j >= 0, before[np.maximum(j, 0)] + inside, 0)

    return upto(np.asarray(b, np.int64)) - upto(np.asarray(a, np.int64))


def window_labels(iv: Intervals, idx: np.ndarray, start: np.ndarray, end: np.ndarray,
                  labels: tuple[str, ...], rule: IntervalRule) -> tuple[np.ndarray, np.ndarray,
                                                                         dict[str, int]]:
    """(codes, share of the winner, outcome counts) of windows [start, end) from the
    intervals ``idx`` of ``iv``. codes index ``labels``; IGNORE = left out."""
    start, end = np.asarray(start, np.int64), np.asarray(end, np.int64)
    # the model's labels first (their order breaks ties), then any others in the file
    names = list(labels) + sorted(set(iv.label[idx].tolist()) - set(labels))
    lab_s, lab_e = iv.start_ns[idx], iv.end_ns[idx]
    per_label = [(lab_s[iv.label[idx] == n], lab_e[iv.label[idx] == n]) for n in names]
    length = np.maximum(end - start, 1).astype(np.float64)
    share = np.stack([covered_ns(s, e, start, end) / length for s, e in per_label], axis=1)
    touched = (share > 0).any(axis=1)
    if rule.rule == "centre":
        mid = start + (end - start) // 2
        cand = np.stack([covered_ns(s, e, mid, mid + 1) > 0 for s, e in per_label], axis=1)
    else:
        cand = share > 0
    # the candidate with the largest share; argmax keeps the first (label order) on ties
    best = np.argmax(np.where(cand, share, -1.0), axis=1)
    win_share = share[np.arange(start.size), best]
    ok = cand.any(axis=1)
    if rule.rule == "majority":
        ok &= win_share >= rule.min_share - 1e-12
    codes = np.where(ok, best, IGNORE)
    win_share = np.where(ok, win_share, 0.0)
    for name in reversed(rule.any_labels):      # the first of any_labels wins: apply it last
        if name in names:
            k = names.index(name)
            hit = share[:, k] > 0
            codes = np.where(hit, k, codes)
            win_share = np.where(hit, share[:, k], win_share)
    unknown = codes >= len(labels)
    codes = np.where(unknown, IGNORE, codes)
    bg = labels.index(rule.background) if rule.background else IGNORE
    codes = np.where(touched, codes, bg)
    win_share = np.where(touched, win_share, 0.0)
    counts = {"labelled": int(((codes >= 0) & touched).sum()),
              "background": int(((codes >= 0) & ~touched).sum()),
              "no_interval": int((~touched & (codes < 0)).sum()),
              "unknown_label": int(unknown.sum()),
              "below_rule": int((touched & (codes < 0) & ~unknown).sum())}
    return codes.astype(np.int64), win_share, counts


def overlapping(iv: Intervals, idx: np.ndarray, start: np.ndarray, end: np.ndarray
                ) -> np.ndarray:
    """bool per interval of idx: it overlaps at least one window [start, end)."""
    if start.size == 0 or idx.size == 0:
        return np.zeros(idx.size, bool)
    order = np.argsort(start, kind="stable")
    s, e = start[order], np.maximum.accumulate(end[order])
    j = np.searchsorted(s, iv.end_ns[idx], side="left")   # windows starting before the end
    return (j > 0) & (e[np.maximum(j - 1, 0)] > iv.start_ns[idx])


def nearest_interval(iv: Intervals, idx: np.ndarray, start: np.ndarray, end: np.ndarray
                     ) -> np.ndarray:
    """Per window, the index (into iv) of the interval of idx that overlaps it most, or
    the nearest one in time when none overlaps; -1 when idx is empty."""
    if idx.size == 0:
        return np.full(start.size, -1, np.int64)
    s, e = iv.start_ns[idx][None, :], iv.end_ns[idx][None, :]
    out = np.empty(start.size, np.int64)
    for lo in range(0, start.size, 1024):     # blocks bound the [windows, intervals] matrix
        a, b = start[lo:lo + 1024, None], end[lo:lo + 1024, None]
        overlap = np.minimum(b, e) - np.maximum(a, s)
        gap = np.where(overlap > 0, -overlap, np.maximum(s - b, a - e))
        out[lo:lo + 1024] = idx[np.argmin(gap, axis=1)]
    return out
