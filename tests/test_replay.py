"""Replay end to end through the CLI: decisions, determinism, missing modalities, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgefuse.runtime.cli import bundled_model_path, main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SAMPLE = ROOT / "examples" / "data" / "sample.mcap"
PASS_WITHOUT_ACOUSTIC = DATA / "goodvibes" / "passes" / "full" / "3A.9.81"
CLOSE = DATA / "goodvibes" / "passes" / "close"
MODEL = bundled_model_path()
MODEL_IDENT = "gv-detect@1.0.0"
HOP_NS = 500_000_000  # the bundled model's window hop


def _replay(tmp_path, *inputs, name="d.jsonl", extra=()):
    out = tmp_path / name
    rc = main(["replay", *map(str, inputs), "--model", str(MODEL), "--out", str(out), "-q",
               *extra])
    return rc, out


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_bundled_model_exists():
    assert MODEL.exists(), f"the bundled model {MODEL} is missing: run models/build_standin.py"


def test_pass_without_acoustic_names_missing_and_fallback_and_is_byte_identical(tmp_path):
    rc1, out1 = _replay(tmp_path, PASS_WITHOUT_ACOUSTIC, name="a.jsonl")
    rc2, out2 = _replay(tmp_path, PASS_WITHOUT_ACOUSTIC, name="b.jsonl")
    assert rc1 == rc2 == 0
    assert out1.read_bytes() == out2.read_bytes()
    decisions = _lines(out1)
    assert len(decisions) > 10
    for d in decisions:
        assert d["missing"] == ["acoustic"] and d["used"] == ["seismic"]
        assert d["missing_reason"]["acoustic"] == "no_stream"
        assert d["fallback"] in ("masked", "subset:seismic", "abstain")
    # seq is the window index: window_start_ns = seq * hop (0.5 s), increasing
    seqs = [d["seq"] for d in decisions]
    assert seqs == sorted(set(seqs))
    assert all(d["window_start_ns"] == d["seq"] * HOP_NS for d in decisions)


def test_decisions_carry_every_field_and_cover_the_passes(tmp_path):
    rc, out = _replay(tmp_path, CLOSE)
    assert rc == 0
    decisions = _lines(out)
    keys = {"node", "seq", "window_start_ns", "window_end_ns", "label", "scores", "used",
            "missing", "fallback", "missing_reason", "model"}
    assert decisions and all(keys <= set(d) for d in decisions)
    nodes = {d["node"] for d in decisions}
    assert nodes == {"123", "129", "121"}
    for d in decisions:
        assert d["window_end_ns"] - d["window_start_ns"] == 1_000_000_000
        assert abs(sum(d["scores"].values()) - 1.0) < 1e-4 or d["fallback"] == "abstain"
        assert d["model"] == MODEL_IDENT
    for node in nodes:
        seqs = [d["seq"] for d in decisions if d["node"] == node]
        starts = [d["window_start_ns"] for d in decisions if d["node"] == node]
        assert seqs == sorted(set(seqs)) and starts == sorted(starts)
        assert starts == [q * HOP_NS for q in seqs]  # seq is the window index


def test_mcap_replay_equals_replay_of_its_sources(tmp_path):
    log = tmp_path / "log.mcap"
    assert main(["record", str(CLOSE), "-o", str(log)]) == 0
    _, direct = _replay(tmp_path, CLOSE, name="direct.jsonl")
    _, via_log = _replay(tmp_path, log, name="log.jsonl")
    assert direct.read_bytes() == via_log.read_bytes()


def test_sample_log_demo_runs(tmp_path):
    rc, out = _replay(tmp_path, SAMPLE)
    assert rc == 0
    decisions = _lines(out)
    assert any(d["missing"] for d in decisions) and any(not d["missing"] for d in decisions)


@pytest.mark.parametrize("case", ["missing_file", "corrupt_log", "wrong_modalities",
                                  "unwritable", "unknown_rate"])
def test_clear_errors_and_nonzero_exit(tmp_path, capsys, case):
    if case == "missing_file":
        args, expect = [tmp_path / "nope.mcap"], "does not exist"
    elif case == "corrupt_log":
        bad = tmp_path / "bad.mcap"
        bad.write_bytes(SAMPLE.read_bytes()[: SAMPLE.stat().st_size // 2])
        args, expect = [bad], ""
    elif case == "wrong_modalities":
        args, expect = [DATA / "sp-sw-har"], "expects ['acoustic', 'seismic']"
    elif case == "unwritable":
        rc = main(["replay", str(CLOSE), "--model", str(MODEL), "--out",
                   str(tmp_path / "no" / "such" / "dir.jsonl"), "-q"])
        assert rc == 1
        assert "cannot write decisions" in capsys.readouterr().err
        return
    else:  # one chunk per stream, no rate: nothing to estimate a rate from
        import numpy as np
        from edgefuse.runtime.core.chunk import Chunk
        from edgefuse.sensors.readers.mcaplog import McapRecorder
        log = tmp_path / "norate.mcap"
        with McapRecorder(log) as rec:
            for m in ("acoustic", "seismic"):
                rec.write(Chunk("9", m, 1_700_000_000_000_000_000, None,
                                np.ones((1000, 1), np.float32), 0))
        args, expect = [log], "rate"
    rc, _ = _replay(tmp_path, *args)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "error:" in err and expect in err


def test_runtime_never_imports_torch(tmp_path):
    code = ("import sys, edgefuse.runtime, edgefuse.sensors\n"
            "from edgefuse.runtime.cli import main\n"
            f"rc = main(['replay', {str(SAMPLE)!r}, '--model', {str(MODEL)!r}, "
            f"'--out', {str(tmp_path / 'o.jsonl')!r}, '-q'])\n"
            "import edgefuse.runtime.core.pipeline, edgefuse.sensors.readers.inputs\n"
            "assert rc == 0, rc\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
