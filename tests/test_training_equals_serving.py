"""Training cuts the windows `edgefuse replay` cuts, bit for bit (one reader per format).

Training side: models.segments / models.har read a pass or an execution with the
serving readers (sensors/readers) and models.dataset / models.har cut it with a
fresh Aligner. Serving side: `edgefuse replay` (the CLI's main) on the same pass
folder or CSV; every window its Pipeline's aligner emits is recorded.

Both sides use the same chunk length (GridConfig.chunk_s, HarGrid.chunk_s): the
aligner gives the same windows for any chunking only up to float32 rounding.
Runs on the committed fixtures (tests/data); passes of the data pack
(../shared/data) are added when it is present.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from edgefuse.models.dataset import CACHE_FORMAT, GridConfig, cache_key, cut_segment
from edgefuse.models.har import HarGrid, cut_execution
from edgefuse.models.labels import LabelRule
from edgefuse.models.segments import pass_segments
from edgefuse.runtime.cli import main
from edgefuse.runtime.core import pipeline
from edgefuse.runtime.core.aligner import Aligner, AlignerConfig
from edgefuse.runtime.core.inference import OnnxModel
from edgefuse.sensors.readers import sphar
from edgefuse.sensors.readers._common import seconds_to_ns

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
PACK = ROOT.parent / "shared" / "data"
BUNDLED = ROOT / "models" / "bundled"
GV_MODEL = BUNDLED / "gv_detect.onnx"
HAR_MODEL = BUNDLED / "har_imu.onnx"

FIXTURE_PASSES = ["close/2D.16.123", "close/2H.22.129", "close/3A.9.121", "full/3A.9.81"]
# both cuts hold 2H.22.129 (full is used); 3A.4.121: acoustic from close, seismic from
# full; 1A.0.80: close only
PACK_PASSES = ["full/2H.22.129", "full/3A.4.121", "full/2D.16.131", "close/1A.0.80"]


class _Recorded:
    windows: list = []


class RecordingAligner(Aligner):
    """The Pipeline's aligner, keeping a copy of every window it emits."""

    def push(self, chunk):
        out = super().push(chunk)
        _Recorded.windows.extend(out)
        return out

    def flush(self):
        out = super().flush()
        _Recorded.windows.extend(out)
        return out


def _replay_windows(monkeypatch, tmp_path, paths: list, model: Path, chunk_s: float) -> list:
    """Windows of `edgefuse replay PATH... --chunk-s CHUNK_S` (and their decisions' count)."""
    monkeypatch.setattr(pipeline, "Aligner", RecordingAligner)
    _Recorded.windows = []
    out = tmp_path / "decisions.jsonl"
    rc = main(["replay", *map(str, paths), "--model", str(model), "--chunk-s", repr(chunk_s),
               "--out", str(out), "-q"])
    assert rc == 0
    windows = list(_Recorded.windows)
    assert len(out.read_text().splitlines()) == len(windows)  # every window was decided
    return windows


def _assert_same_windows(trained: list, served: list) -> None:
    assert trained, "no window was cut"
    assert [(w.node, w.index, w.start_ns, w.end_ns) for w in trained] == \
        [(w.node, w.index, w.start_ns, w.end_ns) for w in served]
    for a, b in zip(trained, served):
        assert a.present == b.present and a.missing_reason == b.missing_reason, a.start_ns
        assert a.coverage == b.coverage, a.start_ns
        assert a.data.keys() == b.data.keys()
        for m in a.data:
            assert a.data[m].dtype == b.data[m].dtype == np.float32
            assert np.array_equal(a.data[m], b.data[m]), (a.start_ns, m)


def _same_grid(contract, model_contract) -> None:
    """The training grid is the model's: the aligners are set up alike."""
    assert (contract.window_ns, contract.hop_ns) == (model_contract.window_ns,
                                                      model_contract.hop_ns)
    assert [(m.name, m.channels, m.rate_hz) for m in contract.modalities] == \
        [(m.name, m.channels, m.rate_hz) for m in model_contract.modalities]


def _pass_params():
    params = [pytest.param(DATA, p, id=f"fixture:{p}") for p in FIXTURE_PASSES]
    params += [pytest.param(PACK, p, id=f"pack:{p}", marks=pytest.mark.skipif(
        not (PACK / "goodvibes" / "passes" / p).is_dir(), reason="data pack not present"))
        for p in PACK_PASSES]
    return params


@pytest.mark.parametrize("root,item", _pass_params())
def test_pass_windows_of_training_equal_replay(monkeypatch, tmp_path, root, item):
    folder = root / "goodvibes" / "passes" / item
    segments, _ = pass_segments(str(root / "goodvibes"))
    seg = next(s for s in segments if s.source == folder.name)
    wavs = [p.wav_path for p in seg.pieces]
    # Where training takes a modality from the other cut (full lacks it), replay is
    # given the same two WAVs; else the pass folder, as a user would.
    inputs = [folder] if all(os.path.dirname(w) == str(folder) for w in wavs) else wavs
    grid = GridConfig()
    _same_grid(grid.contract(), OnnxModel.load(GV_MODEL).contract)
    trained = cut_segment(seg, grid, grid.contract())
    served = _replay_windows(monkeypatch, tmp_path, inputs, GV_MODEL, grid.chunk_s)
    _assert_same_windows(trained, served)


@pytest.mark.parametrize("execution", ["s15_04", "s15_07"])
def test_har_windows_of_training_equal_replay(monkeypatch, tmp_path, execution):
    (ex,) = [e for e in sphar.find_executions(DATA / "sp-sw-har") if e.name == execution]
    assert [os.path.basename(p) for p in ex.paths] == [f"{execution}_sp.csv",
                                                       f"{execution}_sw.csv"]
    grid = HarGrid()
    _same_grid(grid.contract(), OnnxModel.load(HAR_MODEL).contract)
    trained = cut_execution(ex, grid, grid.contract())
    served = _replay_windows(monkeypatch, tmp_path, [ex.paths[0]], HAR_MODEL, grid.chunk_s)
    _assert_same_windows(trained, served)


def test_own_recording_windows_of_training_equal_replay(monkeypatch, tmp_path):
    """A user's recordings (two nodes of WAV + CSV manifests): training cuts each node
    with its own aligner (models/recordings.py), replay one pipeline for both."""
    pytest.importorskip("torch")   # the model file is written by the exporter
    from edgefuse.exporters.onnx_export import export
    from edgefuse.models.recordings import node_chunks
    from edgefuse.models.dataset import align_chunks
    from edgefuse.runtime.core.contract import ModalitySpec, ModelContract
    from edgefuse.sensors.readers.inputs import open_inputs
    from tests.own_data import LABELS, RATES, write_node
    from tests.own_nets import TinyNet
    plan = (("idle", 3), ("walk", 3), ("vehicle", 3))
    folders = [write_node(tmp_path, n, seed=i, plan=plan, t0_ns=1_777_636_800_000_000_000
                          + i * 700_000_000) for i, n in enumerate(("pi-a", "pi-b"))]
    mods = tuple(ModalitySpec(m, 6 if m == "imu" else 1, float(r), m) for m, r in RATES.items())
    contract = ModelContract("own", "0", mods, 1_000_000_000, 500_000_000, LABELS,
                             "modality_mask", "scores", "logits")
    stats = {m.name: (np.zeros(m.channels, np.float32), np.ones(m.channels, np.float32))
             for m in mods}
    model = export(TinyNet(contract, stats), contract, tmp_path / "own.onnx")
    inputs = open_inputs(folders, 1.0)
    trained = [w for node in ("pi-a", "pi-b")
               for w in align_chunks(node_chunks(inputs, node, contract.modality_names)(),
                                     contract)]
    served = _replay_windows(monkeypatch, tmp_path, folders, model, 1.0)
    served.sort(key=lambda w: (w.node, w.index))   # replay interleaves the nodes in time
    _assert_same_windows(trained, served)


def test_training_takes_the_exact_sensor_clock_t0():
    """The t0 in meta.json, to the ns: not float seconds (256 ns steps in 2023)."""
    segments, _ = pass_segments(str(DATA / "goodvibes"))
    seg = next(s for s in segments if s.source == "2D.16.123")
    with open(DATA / "goodvibes" / "passes" / "close" / "2D.16.123" / "meta.json") as f:
        meta = json.load(f, parse_float=str)
    for piece in seg.pieces:
        text = meta["modalities"][piece.modality]["t0_unix_s_sensor_clock"]
        assert piece.t0_ns == seconds_to_ns(text)
    acoustic = next(p for p in seg.pieces if p.modality == "acoustic")
    assert acoustic.t0_ns == 1681140928437827300
    assert int(round(float("1681140928.4378273") * 1e9)) != acoustic.t0_ns  # the old parse


def test_dataset_cache_is_not_shared_with_the_old_parser():
    """A cache built with the float-seconds parser (its key had no "windows") is not reused."""
    grid, rule = GridConfig(), LabelRule()
    h = hashlib.sha256()
    with open(DATA / "MANIFEST.sha256", "rb") as f:
        h.update(f.read())
    old = {"format": CACHE_FORMAT, "grid": asdict(grid), "rule": asdict(rule),
           "aligner": asdict(AlignerConfig())}
    h.update(json.dumps(old, sort_keys=True).encode())
    assert cache_key(str(DATA), grid, rule, None) != h.hexdigest()[:16]
