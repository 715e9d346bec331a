"""Window labels for the goodvibes recordings (no torch; numpy only).

Detection: a window is ``vehicle`` when the logged vehicle comes within
``near_m`` of the node at any time during the window, ``background`` when it
stays farther than ``far_m`` for the whole window (or no vehicle is logged
and the window is a noise recording), and ignored in between: at 25-100 m a
vehicle is audible but not seismically visible, so any label there would be
a guess. See models/README.md for the measurements behind the radii.

Times: window times are on the sensor clock (int64 ns); distances come from
the vehicle's GPS fixes (UTC from the receiver). The run-log labels are late
by up to 1.8 s relative to the sensor clock; GPS times are not, so we compare
sensor-clock window times with GPS times directly and never use the labels'
start/stop times for anything but "is a run logged around here".
"""
from __future__ import annotations

import csv
import datetime as _dt
import math
from dataclasses import dataclass

import numpy as np

from edgefuse.runtime.core.errors import ConfigError, InputError

BACKGROUND = 0
VEHICLE = 1
IGNORE = -1
DETECTION_LABELS = ("background", "vehicle")

_EARTH_RADIUS_M = 6371008.8  # mean radius; < 0.5 % off the WGS-84 geodesic at these ranges


@dataclass(frozen=True)
class LabelRule:
    """Radii (metres) of the detection rule and the largest GPS gap we interpolate over."""

    near_m: float = 25.0
    far_m: float = 100.0
    max_fix_gap_s: float = 2.0

    def __post_init__(self) -> None:
        if not (0.0 < self.near_m <= self.far_m):
            raise ConfigError(
                f"label rule needs 0 < near_m <= far_m, found near_m={self.near_m!r}, "
                f"far_m={self.far_m!r}")
        if not self.max_fix_gap_s > 0.0:
            raise ConfigError(f"max_fix_gap_s must be > 0, found {self.max_fix_gap_s!r}")


@dataclass(frozen=True)
class DistanceTrack:
    """Vehicle-to-node distance at GPS fix times: t_ns int64 [n] (sorted), meters float64 [n]."""

    t_ns: np.ndarray
    meters: np.ndarray

    def __post_init__(self) -> None:
        if self.t_ns.shape != self.meters.shape or self.t_ns.ndim != 1:
            raise InputError(f"distance track needs two 1-D arrays of one length, found "
                             f"{self.t_ns.shape} and {self.meters.shape}")
        if self.t_ns.size > 1 and np.any(np.diff(self.t_ns) < 0):
            order = np.argsort(self.t_ns, kind="stable")
            object.__setattr__(self, "t_ns", self.t_ns[order])
            object.__setattr__(self, "meters", self.meters[order])

    def at(self, t_ns: np.ndarray, max_gap_s: float) -> np.ndarray:
        """Distance at times t_ns by linear interpolation; NaN outside the fixes or where the
        two fixes around t are more than max_gap_s apart."""
        t = np.asarray(t_ns, dtype=np.int64)
        out = np.full(t.shape, np.nan)
        if self.t_ns.size < 2:
            return out
        right = np.searchsorted(self.t_ns, t, side="left")
        exact = (right < self.t_ns.size) & (self.t_ns[np.minimum(right, self.t_ns.size - 1)] == t)
        inside = (right > 0) & (right < self.t_ns.size)
        r = np.clip(right, 1, self.t_ns.size - 1)
        gap_ok = (self.t_ns[r] - self.t_ns[r - 1]) <= int(max_gap_s * 1e9)
        ok = (inside & gap_ok) | exact
        # Interpolate on seconds relative to the first fix to keep float64 precision.
        base = self.t_ns[0]
        ts = (self.t_ns - base) / 1e9
        out[ok] = np.interp((t[ok] - base) / 1e9, ts, self.meters)
        return out

    @staticmethod
    def merge(tracks: list["DistanceTrack"]) -> "DistanceTrack":
        """One track from several (several GPS logs of one day): the nearest vehicle wins
        where they overlap is not modelled; tracks are concatenated and sorted."""
        if not tracks:
            return DistanceTrack(np.zeros(0, np.int64), np.zeros(0))
        return DistanceTrack(np.concatenate([t.t_ns for t in tracks]),
                             np.concatenate([t.meters for t in tracks]))


def haversine_m(lat1: np.ndarray, lon1: np.ndarray, lat2: float, lon2: float) -> np.ndarray:
    """Great-circle distance in metres (spherical Earth, mean radius)."""
    p1, p2 = np.radians(lat1), math.radians(lat2)
    dphi = p2 - p1
    dlmb = math.radians(lon2) - np.radians(lon1)
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * math.cos(p2) * np.sin(dlmb / 2) ** 2
    return 2 * _EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def window_distance(track: DistanceTrack, start_ns: np.ndarray, end_ns: np.ndarray,
                    rule: LabelRule, points: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Minimum and maximum distance over each window [start, end), sampled at `points`
    evenly spaced times (fixes are 0.1-0.2 s apart, windows 1 s: 5 points see every fix
    interval). NaN where any point has no fix nearby."""
    start = np.asarray(start_ns, dtype=np.int64)
    end = np.asarray(end_ns, dtype=np.int64)
    frac = np.linspace(0.0, 1.0, points)
    times = start[:, None] + ((end - start)[:, None] * frac[None, :]).astype(np.int64)
    d = track.at(times.ravel(), rule.max_fix_gap_s).reshape(times.shape)
    bad = np.isnan(d).any(axis=1)
    dmin = np.where(bad, np.nan, np.nanmin(np.where(np.isnan(d), np.inf, d), axis=1))
    dmax = np.where(bad, np.nan, np.nanmax(np.where(np.isnan(d), -np.inf, d), axis=1))
    return dmin, dmax


def detection_labels(dmin: np.ndarray, dmax: np.ndarray, rule: LabelRule,
                     background_without_gps: bool) -> np.ndarray:
    """int64 labels: VEHICLE if dmin <= near_m, BACKGROUND if dmin > far_m, IGNORE between.
    Windows without GPS (NaN) are BACKGROUND when background_without_gps (noise recordings
    outside every logged run), else IGNORE."""
    dmin = np.asarray(dmin, dtype=np.float64)
    out = np.full(dmin.shape, IGNORE, dtype=np.int64)
    known = ~np.isnan(dmin)
    out[known & (dmin <= rule.near_m)] = VEHICLE
    out[known & (dmin > rule.far_m)] = BACKGROUND
    if background_without_gps:
        out[~known] = BACKGROUND
    del dmax  # kept in the signature: callers store it for the report
    return out


def load_gps_track(path: str, node_lat: float, node_lon: float) -> DistanceTrack:
    """Distance track of one vehicle GPS log (gps/*.csv of the data pack) to a node.

    Rows without a date or position are skipped (L12_2023-04-11.csv has one)."""
    t_list: list[int] = []
    lat: list[float] = []
    lon: list[float] = []
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    t_list.append(_utc_ns(row["date"], row["time"]))
                    lat.append(float(row["latitude"]))
                    lon.append(float(row["longitude"]))
                except (KeyError, ValueError):
                    continue
    except OSError as exc:
        raise InputError(f"cannot read GPS log {path}: {exc}", path=path) from exc
    if not t_list:
        raise InputError(f"GPS log {path} has no row with date, time, latitude and longitude; "
                         "expected the gps/*.csv format of the data pack", path=path)
    d = haversine_m(np.array(lat), np.array(lon), node_lat, node_lon)
    return DistanceTrack(np.array(t_list, dtype=np.int64), d)


def _utc_ns(date: str, time: str) -> int:
    """'2023-04-11' + '15:18:00.400000' (UTC) -> int64 ns since the epoch."""
    hms, _, frac = time.strip().partition(".")
    h, m, s = (int(x) for x in hms.split(":"))
    day = _dt.datetime.strptime(date.strip(), "%Y-%m-%d").replace(tzinfo=_dt.timezone.utc)
    whole = int(day.timestamp()) + h * 3600 + m * 60 + s
    ns = int((frac + "000000000")[:9]) if frac else 0
    return whole * 1_000_000_000 + ns
