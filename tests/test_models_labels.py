"""Detection labels from GPS distance (numpy only)."""
import os

import numpy as np
import pytest

from edgefuse.models.labels import (BACKGROUND, IGNORE, VEHICLE, DistanceTrack, LabelRule,
                                    detection_labels, haversine_m, window_distance)
from edgefuse.runtime.core.errors import ConfigError
# the one parser of the data pack's UTC texts (noise spans), which training now uses
from edgefuse.sensors.readers._common import utc_to_ns as utc_iso_ns

S = 1_000_000_000
DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def test_rule_refuses_inverted_radii():
    with pytest.raises(ConfigError):
        LabelRule(near_m=50, far_m=10)


def test_labels_by_radius_and_gps_coverage():
    rule = LabelRule(near_m=25, far_m=100)
    dmin = np.array([3.0, 25.0, 25.1, 100.0, 100.1, np.nan])
    got = detection_labels(dmin, dmin, rule, background_without_gps=False)
    assert got.tolist() == [VEHICLE, VEHICLE, IGNORE, IGNORE, BACKGROUND, IGNORE]
    got = detection_labels(dmin, dmin, rule, background_without_gps=True)
    assert got[-1] == BACKGROUND


def test_window_distance_takes_min_over_window_and_nan_outside_fixes():
    # vehicle approaches linearly: 100 m at t=0 to 0 m at t=10 s, fixes every 0.2 s
    t = np.arange(0, 51) * S // 5
    track = DistanceTrack(t.astype(np.int64), 100.0 - 10.0 * t / S)
    start = np.array([2 * S, 9 * S, 20 * S], np.int64)
    dmin, dmax = window_distance(track, start, start + S, LabelRule())
    assert dmin[0] == pytest.approx(70.0) and dmax[0] == pytest.approx(80.0)
    assert dmin[1] == pytest.approx(0.0)
    assert np.isnan(dmin[2])


def test_gap_in_fixes_is_not_interpolated():
    track = DistanceTrack(np.array([0, S, 10 * S], np.int64), np.array([5.0, 5.0, 5.0]))
    d = track.at(np.array([S // 2, 5 * S]), max_gap_s=2.0)
    assert d[0] == 5.0 and np.isnan(d[1])


def test_utc_iso():
    assert utc_iso_ns("1970-01-01T00:00:01.5") == 1_500_000_000
    assert utc_iso_ns("2023-04-11T16:56:59.852") == 1681232219852000000


@pytest.mark.skipif(not os.path.isdir(DATA), reason="data pack not present")
def test_haversine_agrees_with_pack_geodesic_distances():
    """distance.csv holds WGS-84 geodesic distances of the GPS fixes to the node; our
    spherical distance from the raw GPS log must agree within 0.5 % + 0.2 m."""
    from edgefuse.models.labels import load_gps_track
    folder = os.path.join(DATA, "goodvibes", "passes", "full", "2H.22.123")
    ref = np.loadtxt(os.path.join(folder, "distance.csv"), delimiter=",", skiprows=1)
    track = load_gps_track(os.path.join(DATA, "goodvibes", "gps", "L12_2023-04-11.csv"),
                           38.409148, -77.1046607)
    got = track.at(np.round(ref[:, 0] * 1e9).astype(np.int64), max_gap_s=1.0)
    ok = ~np.isnan(got)
    assert ok.mean() > 0.95
    assert np.all(np.abs(got[ok] - ref[ok, 1]) <= 0.005 * ref[ok, 1] + 0.2)
    assert haversine_m(np.array([0.0]), np.array([0.0]), 0.0, 1.0)[0] == pytest.approx(
        111195, rel=1e-3)
