"""Windows cut from real recordings by the runtime aligner: shapes, labels, cache."""
import os

import numpy as np
import pytest

from edgefuse.models.dataset import GridConfig, WindowSet, cut_segment
from edgefuse.models.labels import LabelRule, detection_labels, window_distance
from edgefuse.models.segments import pass_segments

DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
pytestmark = pytest.mark.skipif(not os.path.isdir(DATA), reason="data pack not present")


@pytest.fixture(scope="module")
def passes():
    segs, skipped = pass_segments(os.path.join(DATA, "goodvibes"))
    return segs, skipped


def test_misplaced_items_are_skipped(passes):
    segs, skipped = passes
    assert skipped["misplaced"] == 4
    assert not any(s.target == "3A" and s.group.endswith(("3A.10", "3A.11")) for s in segs)


def test_pass_windows_shapes_and_labels(passes):
    segs, _ = passes
    seg = next(s for s in segs if s.source == "2H.22.123")
    grid = GridConfig()
    wins = cut_segment(seg, grid, grid.contract())
    assert len(wins) > 30  # 24 s run, 0.5 s hop
    for w in wins:
        assert w.data["acoustic"].shape == (1, 4934) and w.data["seismic"].shape == (1, 800)
        assert w.end_ns - w.start_ns == grid.window_ns and w.start_ns % grid.hop_ns == 0
    start = np.array([w.start_ns for w in wins])
    dmin, dmax = window_distance(seg.track, start, start + grid.window_ns, LabelRule())
    lab = detection_labels(dmin, dmax, LabelRule(), False)
    assert (lab == 1).sum() >= 5          # the vehicle passes within 2 m of node 123
    assert (lab == 0).sum() >= 1          # and is > 100 m away at the ends of the run
    # the loudest acoustic window is a vehicle window
    rms = np.array([w.data["acoustic"].std() for w in wins])
    assert lab[int(np.argmax(rms))] == 1


def test_windowset_roundtrip_without_pickle(tmp_path):
    ws = WindowSet(("a",), {"a": np.arange(8, dtype=np.float32).reshape(2, 1, 4)},
                   np.ones((2, 1), np.float32), np.array([0, 1]),
                   {"site": np.array(["x", "y"]), "group": np.array(["g1", "g2"])},
                   {"start_ns": np.array([1, 2], np.int64)}, {"a": np.array(["", "gap"])})
    path = str(tmp_path / "ws.npz")
    ws.save(path)
    back = WindowSet.load(path)
    assert back.meta["site"].tolist() == ["x", "y"] and back.reasons["a"].tolist() == ["", "gap"]
    assert np.array_equal(back.x["a"], ws.x["a"]) and back.label.tolist() == [0, 1]
