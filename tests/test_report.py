"""`edgefuse evaluate --report DIR`: one self-contained HTML page whose numbers are the
evaluate result's, on the data-pack path (bundled gv_detect on the tests/data fixture)
and the recordings path (tests/own_data.py nodes labelled background/vehicle)."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from edgefuse.models.commands import build_parser
from tests.own_data import labels_csv, write_node

pytest.importorskip("matplotlib")

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
MODEL = HERE.parent / "models" / "bundled" / "gv_detect.onnx"
SECTIONS = ("summary", "subsets", "confusion", "timeline", "calibration")


class Page(HTMLParser):
    """Section ids, image sources, every attribute, the JSON script, and cell texts:
    ``tables[(class, condition)]`` holds the rows of a table that carries a
    data-condition, ``rows[(class, condition)]`` the cells of a row that does."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.images, self.attrs, self.scripts = [], [], [], []
        self.tables: dict[tuple, list] = {}
        self.rows: dict[tuple, list] = {}
        self._class, self._table, self._row, self._cell, self._script = None, None, None, \
            None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag == "section":
            self.sections.append(a.get("id"))
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "table":
            self._class = a.get("class")
            if "data-condition" in a:
                self._table = self.tables.setdefault((self._class, a["data-condition"]), [])
        elif tag == "tr":
            self._row = []
            if self._table is not None:
                self._table.append(self._row)
            if "data-condition" in a:
                self.rows[(self._class, a["data-condition"])] = self._row
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "script":
            self._script = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._class, self._table, self._row = None, None, None
        elif tag == "script":
            self._script = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._script:
            self.scripts[-1] += data


def run_evaluate(argv: list[str], capsys) -> dict:
    capsys.readouterr()
    args = build_parser().parse_args(["evaluate", *argv, "--json"])
    assert args.func(args) == 0
    return json.loads(capsys.readouterr().out)


def check_page(out: Path, result: dict) -> tuple[Page, str]:
    """What every report holds: one file, nothing fetched, every section, PNG images,
    the result embedded, and the confusion matrices and metrics equal to the result."""
    assert sorted(os.listdir(out)) == ["index.html"]
    text = (out / "index.html").read_text(encoding="utf-8")
    page = Page(text)
    assert "http://" not in text and "https://" not in text
    for tag, key, value in page.attrs:    # nothing the page would fetch
        assert key not in ("src", "href") or value.startswith("data:image/png;base64,"), \
            (tag, key, value[:60])
    assert set(SECTIONS) <= set(page.sections)
    for src in page.images:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(page.scripts[-1].replace("<\\/", "</")) == result
    labels = result["labels"]
    for name, row in result["conditions"].items():
        table = page.tables[("confusion", name)]
        assert table[0][1:] == labels and [r[0] for r in table[1:]] == labels
        assert [[int(v) for v in r[1:]] for r in table[1:]] == row["confusion"]
        cells = page.rows[("metrics", name)]
        assert cells[0] == name and int(cells[2]) == row["n"]
        metrics = ("accuracy", "balanced_accuracy", "macro_f1")
        assert [float(c) for c in cells[3:6]] == [round(row[k], 3) for k in metrics]
        assert int(cells[-1]) == row["abstained"]
    return page, text


def timeline_text(text: str) -> str:
    return text.split("id='timeline'")[1].split("</p>")[0]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFUSE_CACHE", str(tmp_path / "cache"))


def test_report_on_the_data_pack_path(tmp_path, cache, capsys):
    from edgefuse.models.report import calibration_of
    out = tmp_path / "report"
    result = run_evaluate([str(MODEL), str(DATA), "--report", str(out)], capsys)
    page, text = check_page(out, result)
    calibrated = {n: calibration_of(r) for n, r in result["conditions"].items()}
    assert all(calibrated.values())     # evaluate reports calibration per condition
    for name, cal in calibrated.items():
        cells = page.rows[("calibration", name)]
        assert [float(c) for c in cells[1:3]] == [round(cal["ece"], 3),
                                                  round(cal["ece_uncalibrated"], 3)]
    # bars, reliability, risk-coverage, timeline
    assert len(page.images) == 4
    assert "bprf:2023-04-11" in timeline_text(text)   # a recording of the held-out day-site


def test_report_on_the_recordings_path(tmp_path, cache, capsys):
    plan = (("background", 4), ("vehicle", 4), ("background", 3))
    rec = [str(write_node(tmp_path / "rec", n, seed=i, plan=plan,
                          modalities=("acoustic", "seismic")))
           for i, n in enumerate(("n1", "n2"))]
    labels = labels_csv(tmp_path / "labels.csv", {"n1": "day1", "n2": "day2"}, plan=plan)
    out = tmp_path / "report"
    result = run_evaluate([str(MODEL), "--recordings", *rec, "--labels", str(labels),
                           "--test", "n2", "--report", str(out)], capsys)
    _, text = check_page(out, result)
    timeline = timeline_text(text)
    assert "node n2" in timeline and "node n1" not in timeline   # only held-out windows
    n_windows = np.sum(result["class_counts"])
    assert f"{n_windows} windows" in timeline


def test_report_without_calibration_says_so(tmp_path, cache, capsys):
    from edgefuse.models.report import render
    result = run_evaluate([str(MODEL), str(DATA)], capsys)
    for row in result["conditions"].values():
        for key in ("reliability", "risk_coverage", "calibration"):
            row.pop(key, None)
    page = Page(render(result, str(MODEL), {"data pack": str(DATA)}))
    assert "calibration" in page.sections and len(page.images) == 1  # the metric bars only
    assert not any(cls == "calibration" for cls, _ in page.rows)


def test_without_matplotlib_the_report_fails_in_one_line(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from edgefuse.runtime.cli import main\n"
            f"sys.exit(main(['evaluate', {str(MODEL)!r}, {str(DATA)!r}, '--report', "
            f"{str(tmp_path / 'r')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=HERE.parent, env={**os.environ,
                                                "EDGEFUSE_CACHE": str(tmp_path / "c")})
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'edgefuse[train]'" in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()


def test_the_recording_shown_has_its_labels_most_evenly_and_the_cut_keeps_the_changes():
    from edgefuse.models.dataset import WindowSet
    from edgefuse.models.report_timeline import MAX_WINDOWS, pick_recording
    # (node, group, labels in time order)
    plan = [("a", "quiet", [0] * 50), ("a", "stray", [0] * 29 + [1]),
            ("b", "pass", [0] * 10 + [1] * 5 + [0] * 5),
            ("c", "long", [0] * 400 + [1, 0] * 10 + [0] * 80)]
    node = np.concatenate([[n] * len(y) for n, _, y in plan])
    group = np.concatenate([[g] * len(y) for _, g, y in plan])
    label = np.concatenate([y for *_, y in plan]).astype(np.int64)
    start = np.concatenate([np.arange(len(y))[::-1] for *_, y in plan]) * 500_000_000
    order = np.random.default_rng(0).permutation(label.size)   # rows in any order
    ws = WindowSet(("m",), {"m": np.zeros((label.size, 1, 4), np.float32)},
                   np.ones((label.size, 1), np.float32), label[order],
                   {"node": node[order], "group": group[order]},
                   {"start_ns": start[order]})
    every = np.arange(label.size)
    rows = pick_recording(ws, every[group[order] != "long"])
    assert set(group[order][rows]) == {"pass"} and rows.size == 20
    assert np.all(np.diff(ws.num["start_ns"][rows]) > 0)
    rows = pick_recording(ws, every)
    assert set(group[order][rows]) == {"long"} and rows.size == MAX_WINDOWS
    assert np.all(np.diff(ws.num["start_ns"][rows]) > 0)
    assert np.sum(ws.label[rows] == 1) == 10      # every change inside the stretch kept
