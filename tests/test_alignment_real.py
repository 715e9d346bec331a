"""The real raw acoustic/seismic pair stays aligned through the runtime (see
examples/check_alignment.py for the printed report)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_check():
    spec = importlib.util.spec_from_file_location("check_alignment",
                                                  ROOT / "examples" / "check_alignment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_raw_pair_clicks_coincide_across_modalities():
    check = _load_check()
    rows = check.measure(*check.PAIR)
    assert len(rows) >= 15                       # clicks over the whole 30 s recording
    assert rows[-1][0] > 25.0
    worst = max(abs(ea - es) for _, ea, es in rows)
    assert worst < 5.0                           # ms; one hop is 500 ms
    assert all(abs(ea) < 5.0 and abs(es) < 5.0 for _, ea, es in rows)
