"""Interval labels (models/intervals.py): the CSV, every window rule, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from edgefuse.models.intervals import (IGNORE, IntervalRule, covered_ns, nearest_interval,
                                       overlapping, read_intervals, window_labels)
from edgefuse.runtime.core.errors import ConfigError, InputError

S = 1_000_000_000
T0 = 1_777_636_800 * S          # 2026-05-01T12:00:00Z
LABELS = ("idle", "walk", "vehicle")


def write(tmp_path, *rows: str, header: str = "node,start,end,label,session") -> str:
    path = tmp_path / "labels.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def windows(*starts_s: float, length_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    start = np.array([T0 + int(s * S) for s in starts_s], np.int64)
    return start, start + int(length_s * S)


def labels_of(path: str, rule: IntervalRule, *starts_s: float, node: str = "a") -> list:
    iv = read_intervals(path)
    codes, _, _ = window_labels(iv, iv.for_node(node), *windows(*starts_s), LABELS, rule)
    return [LABELS[c] if c >= 0 else None for c in codes]


def test_iso_and_integer_ns_times_and_extra_columns(tmp_path):
    path = write(tmp_path, "a,2026-05-01T12:00:00Z,2026-05-01T12:00:02.5Z,walk,d1",
                 f"*,{T0 + 3 * S},{T0 + 4 * S},vehicle,d2",
                 "b,2026-05-01 12:00:01.000000001,2026-05-01T12:00:02+00:00,idle,d1")
    iv = read_intervals(path)
    assert iv.start_ns.tolist() == [T0, T0 + 3 * S, T0 + S + 1]
    assert iv.end_ns.tolist() == [T0 + 2_500_000_000, T0 + 4 * S, T0 + 2 * S]
    assert iv.line.tolist() == [2, 3, 4]
    assert iv.columns["session"].tolist() == ["d1", "d2", "d1"]
    assert iv.for_node("a").tolist() == [0, 1] and iv.for_node("b").tolist() == [1, 2]


def test_majority_takes_the_largest_share_if_it_reaches_min_share(tmp_path):
    path = write(tmp_path, f"a,{T0},{T0 + 2 * S},walk,x", f"a,{T0 + 2 * S},{T0 + 4 * S},idle,x")
    rule = IntervalRule()
    # [1.5, 2.5): half walk, half idle: a tie goes to the first of the contract's labels;
    # [3.5, 4.5): half idle, half nothing: 0.5 >= min_share
    assert labels_of(path, rule, 0.0, 1.0, 1.5, 1.7, 3.5, 3.6) == \
        ["walk", "walk", "idle", "idle", "idle", None]
    assert labels_of(path, IntervalRule(min_share=0.8), 0.0, 1.1, 1.3, 1.9) == \
        ["walk", "walk", None, "idle"]


def test_majority_counts_overlapping_intervals_of_one_label_once(tmp_path):
    path = write(tmp_path, f"a,{T0},{T0 + S // 2},walk,x", f"a,{T0 + S // 4},{T0 + S // 2},walk,x",
                 f"a,{T0 + S // 2},{T0 + S},idle,x", f"a,{T0 + S // 2},{T0 + S},idle,x")
    iv = read_intervals(path)
    codes, share, _ = window_labels(iv, iv.for_node("a"), *windows(0.0), LABELS, IntervalRule())
    assert codes.tolist() == [0] and share.tolist() == [0.5]   # 0.5 each: tie -> idle


def test_centre_rule_takes_the_label_at_the_middle(tmp_path):
    path = write(tmp_path, f"a,{T0},{T0 + 1200 * S // 1000},walk,x",
                 f"a,{T0 + 1200 * S // 1000},{T0 + 3 * S},vehicle,x")
    rule = IntervalRule(rule="centre")
    # [0,1) centre 0.5 walk; [0.5,1.5) centre 1.0 walk (vehicle has 0.3); [1,2) centre 1.5
    assert labels_of(path, rule, 0.0, 0.5, 1.0, 2.5) == ["walk", "walk", "vehicle", None]
    assert labels_of(path, IntervalRule(), 0.5, 1.0) == ["walk", "vehicle"]


def test_any_rule_and_any_labels_win_on_any_overlap(tmp_path):
    path = write(tmp_path, f"a,{T0},{T0 + 10 * S},idle,x",
                 f"a,{T0 + 5 * S},{T0 + 5 * S + S // 10},vehicle,x")
    # majority: idle everywhere (vehicle covers 0.1 of a window at most)
    assert labels_of(path, IntervalRule(), 4.5, 5.0) == ["idle", "idle"]
    rare = IntervalRule(any_labels=("vehicle",))
    assert labels_of(path, rare, 3.9, 4.1, 5.0, 5.1) == ["idle", "vehicle", "vehicle", "idle"]
    # rule any: several labels overlap -> the larger share
    assert labels_of(path, IntervalRule(rule="any"), 4.5, 10.5) == ["idle", None]


def test_background_and_the_goodvibes_rule_as_intervals(tmp_path):
    """goodvibes: vehicle if it comes near at any time in the window; background only if
    far for the whole window; in between (neither interval covers it all) left out."""
    path = write(tmp_path, f"a,{T0},{T0 + 10 * S},idle,x",            # far: background
                 f"a,{T0 + 12 * S},{T0 + 14 * S},vehicle,x")          # near
    rule = IntervalRule(min_share=1.0, any_labels=("vehicle",))
    assert labels_of(path, rule, 0.0, 9.0, 9.5, 10.5, 11.5, 20.0) == \
        ["idle", "idle", None, None, "vehicle", None]
    bg = IntervalRule(background="idle")
    # untouched windows get the background; a touched one below min_share is left out
    assert labels_of(path, bg, 20.0, 10.2, 9.6) == ["idle", "idle", None]
    iv = read_intervals(path)
    codes, _, counts = window_labels(iv, iv.for_node("a"), *windows(20.0, 10.5), LABELS, bg)
    assert codes.tolist() == [0, 0] and counts["background"] == 2


def test_labels_not_in_the_contract_leave_their_windows_out(tmp_path):
    path = write(tmp_path, f"a,{T0},{T0 + 2 * S},running,x", f"a,{T0 + 2 * S},{T0 + 4 * S},walk,x")
    iv = read_intervals(path)
    codes, _, counts = window_labels(iv, iv.for_node("a"), *windows(0.0, 2.0), LABELS,
                                     IntervalRule())
    assert codes.tolist() == [IGNORE, 1] and counts["unknown_label"] == 1


def test_intervals_outside_every_window_and_nearest_interval(tmp_path):
    path = write(tmp_path, f"a,{T0},{T0 + S},walk,x", f"a,{T0 + 50 * S},{T0 + 51 * S},idle,y",
                 f"a,{T0 + 2 * S},{T0 + 3 * S},idle,z")
    iv = read_intervals(path)
    start, end = windows(0.0, 0.5, 1.0, 2.5)
    assert overlapping(iv, iv.for_node("a"), start, end).tolist() == [True, False, True]
    near = nearest_interval(iv, iv.for_node("a"), *windows(0.2, 1.6, 40.0))
    assert iv.columns["session"][near].tolist() == ["x", "z", "y"]


def test_covered_ns_against_a_brute_force_count():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 1000, 40)
    e = s + rng.integers(1, 100, 40)
    a = rng.integers(0, 1100, 200)
    b = a + rng.integers(1, 200, 200)
    grid = np.zeros(1300, bool)
    for x, y in zip(s, e):
        grid[x:y] = True
    expected = [int(grid[x:y].sum()) for x, y in zip(a, b)]
    assert covered_ns(s, e, a, b).tolist() == expected


@pytest.mark.parametrize("rows,header,message", [
    ((), "node,start,label", r"line 1: header lacks \['end'\]"),
    (("a,2026-05-01T12:00:00Z,2026-05-01T12:00:01Z,walk",), "node,start,end,label,label",
     "line 1: header has empty or repeated"),
    (("a,2026-05-01T12:00:01Z,2026-05-01T12:00:00Z,walk,x",), None, "line 2: end .* is not after"),
    ((f"a,{T0},{T0 + S},walk,x", "a,1777636800,1777636801,walk,x"), None,
     "line 3: integer 1777636800 is not ns since 1970"),
    (("a,yesterday,2026-05-01T12:00:00Z,walk,x",), None, "line 2: expected ISO-8601 UTC"),
    (("a,2026-05-01T12:00:00+02:00,2026-05-01T13:00:00Z,walk,x",), None,
     "line 2: expected ISO-8601 UTC"),
    ((f"a,{T0},{T0 + S},walk",), None, "line 2: 4 fields, the header has 5"),
    ((f",{T0},{T0 + S},walk,x",), None, "line 2: node and label must not be empty"),
    ((), None, "no interval after the header"),
])
def test_bad_labels_files_name_the_file_and_line(tmp_path, rows, header, message):
    path = write(tmp_path, *rows, **({"header": header} if header else {}))
    with pytest.raises(InputError, match=message) as exc:
        read_intervals(path)
    assert "labels.csv" in str(exc.value)


def test_bad_rules_are_config_errors():
    with pytest.raises(ConfigError, match="rule must be one of"):
        IntervalRule(rule="median")
    with pytest.raises(ConfigError, match="min_share"):
        IntervalRule(min_share=0.0)
    with pytest.raises(ConfigError, match="'alarm', which is not one of"):
        IntervalRule(any_labels=("alarm",)).check(LABELS)
    with pytest.raises(ConfigError, match="'noise', which is not one of"):
        IntervalRule(background="noise").check(LABELS)
