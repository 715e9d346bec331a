"""The examples of a user's own data: the own-sensors walk-through end to end (as CI runs
it), and the two dataset converters on the committed fixtures (tests/data), whose windows
and labels must be the built-in datasets' through the user-recordings path."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefuse.models.config import load_config
from edgefuse.models.recordings import RecordingSet, build_recordings_windowset
from edgefuse.sensors.readers import csvfile
from edgefuse.sensors.readers.inputs import open_inputs
from edgefuse.sensors.readers.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
FIXTURES = REPO / "tests" / "data"


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generic_windows(config: str, out: Path):
    """The example config's windows of the converted data in `out`."""
    cfg = load_config(str(EXAMPLES / "configs" / config))
    rec = RecordingSet((str(out),), str(out / "labels.csv"), cfg.data.group, cfg.data.chunk_s)
    return build_recordings_windowset(rec, cfg.contract, cfg.labels), cfg


def by_window(ws) -> dict[tuple[str, int], int]:
    return {(n, int(s)): int(y) for n, s, y in zip(ws.meta["node"], ws.num["start_ns"], ws.label)}


def test_sphar_converter_gives_the_builtin_windows_and_labels(tmp_path, monkeypatch):
    from edgefuse.models.har import build_har_windowset
    monkeypatch.setenv("EDGEFUSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sphar"
    summary = example("sphar_to_generic").convert(str(FIXTURES), str(out))
    assert summary["streams"] == 4 and summary["executions"] == 2
    streams = read_manifest(out / "recording.toml")
    assert {(s.node, s.modality) for s in streams} == {
        (e, m) for e in ("s15_04", "s15_07") for m in ("imu_phone", "imu_watch")}
    for s in streams:   # jittered ms stamps would be cut into dozens of runs
        assert len(csvfile.scan(s.path).runs) == 1, s.path

    ws, cfg = generic_windows("sphar_generic.toml", out)
    ref = build_har_windowset(str(FIXTURES))
    assert tuple(cfg.contract.labels) == ("SEATED", "STANDING_UP", "WALKING", "TURNING",
                                          "SITTING_DOWN")
    got, want = by_window(ws), by_window(ref)
    shared = set(got) & set(want)
    assert len(shared) >= 0.97 * len(want) and len(got) <= 1.03 * len(want)
    agree = sum(got[k] == want[k] for k in shared) / len(shared)
    assert agree >= 0.97, f"labels agree on {agree:.3f} of {len(shared)} windows"
    assert set(ws.meta["group"]) == {"s15"}   # the subject column is the split key
    assert (ws.mask > 0).all(axis=1).mean() >= (ref.mask > 0).all(axis=1).mean() - 0.02


def test_goodvibes_converter_gives_the_builtin_windows_and_labels(tmp_path, monkeypatch):
    from edgefuse.models.dataset import GridConfig, cut_segment
    from edgefuse.models.labels import IGNORE, LabelRule, detection_labels, window_distance
    from edgefuse.models.segments import load_segments
    monkeypatch.setenv("EDGEFUSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "gv"
    conv = example("goodvibes_to_generic")
    summary = conv.convert(str(FIXTURES), str(out))
    segments, _ = load_segments(str(FIXTURES))
    assert summary["recordings"] == len(segments) > 0
    # every stream on the sensor clock: the reader's t0 and measured rate, to the ns
    clocks = {(conv.node_name(s), p.modality): (p.t0_ns, p.rate_hz)
              for s in segments for p in s.pieces}
    streams = open_inputs(str(out)).streams
    assert {(s.node, s.modality): (s.t0_ns, s.rate_hz) for s in streams} == clocks

    ws, cfg = generic_windows("goodvibes_generic.toml", out)
    grid = GridConfig(rates_hz=tuple((m.name, m.rate_hz) for m in cfg.contract.modalities),
                      chunk_s=cfg.data.chunk_s)
    assert grid == GridConfig() and cfg.contract.window_ns == grid.window_ns
    want = {}   # the built-in dataset's windows and labels (models/dataset.build_windowset)
    for seg in segments:
        wins = cut_segment(seg, grid, grid.contract())
        start = np.array([w.start_ns for w in wins], np.int64)
        end = np.array([w.end_ns for w in wins], np.int64)
        labels = detection_labels(*window_distance(seg.track, start, end, LabelRule()),
                                  LabelRule(), seg.background_without_gps)
        want.update({(conv.node_name(seg), int(a)): int(y)
                     for a, y in zip(start, labels) if y != IGNORE})
    got = by_window(ws)
    shared = set(got) & set(want)
    assert len(shared) >= 0.99 * len(want) and len(got) <= 1.01 * len(want)
    agree = sum(got[k] == want[k] for k in shared) / len(shared)
    assert agree >= 0.99, f"labels agree on {agree:.3f} of {len(shared)} windows"
    assert set(ws.meta["group"]) == {f"{s.site}/{s.date}" for s in segments}


@pytest.mark.slow
@pytest.mark.needs_torch
def test_own_sensors_example_runs_end_to_end(tmp_path):
    pytest.importorskip("torch", reason="SKIPPED LOUDLY: torch (train extra) is missing, so "
                        "the own-sensors example cannot train")
    env = {k: v for k, v in os.environ.items() if k != "EDGEFUSE_CACHE"}  # the fleet's own
    proc = subprocess.run([sys.executable, str(EXAMPLES / "own_sensors.py"), "--quick",
                           "--out", str(tmp_path / "fleet")], capture_output=True, text=True,
                          timeout=240, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every step passed" in proc.stdout
    for step in ("edgefuse record", "edgefuse export-streams", "edgefuse train",
                 "edgefuse evaluate", "edgefuse replay"):
        assert step in proc.stdout, proc.stdout
    assert (tmp_path / "fleet" / "decisions.jsonl").stat().st_size > 0
    assert list((tmp_path / "fleet" / ".cache").glob("recordings-*.npz"))  # not in ~/.cache


def test_readme_pipeline_embedding_example_runs():
    """README "Embedding Pipeline in an application": the code block, as printed, runs."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Embedding `Pipeline` in an application", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    decisions = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(decisions) == 7      # 4 s of data: windows [k*0.5, k*0.5 + 1) s, k = 0..6
    assert {d["node"] for d in decisions} == {"node7"}
    assert all(d["used"] == ["acoustic", "seismic"] for d in decisions)
