"""Calibration at training time and in evaluate: the validation split by group, the ECE
noise floor, route logits from the exported bundle, what evaluate reports per condition
against what the runtime decides, and the label report's cases of intervals that label
no window. The end-to-end run (train -> calibrated bundle -> evaluate, export) is in
tests/test_user_training.py."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgefuse.models import calibration as cal
from edgefuse.models.config import CalibrationConfig, load_config
from edgefuse.models.dataset import WindowSet
from edgefuse.models.intervals import IntervalRule, read_intervals
from edgefuse.models.interval_labeller import IntervalLabeller
from edgefuse.models.splits import (check_no_leakage, default_val_keys, hold_out_events,
                                    split_by_day_site)
from edgefuse.runtime.core.errors import ConfigError


def test_default_validation_groups_are_whole_training_groups_chosen_by_seed():
    keys = np.array([f"g{i}" for i in range(10) for _ in range(5)])   # 10 groups x 5 windows
    train = np.flatnonzero(~np.isin(keys, ["g0", "g1"]))               # g0, g1 are test
    val = default_val_keys(keys, train, 0.2, seed=0)
    assert len(val) == 2 and not set(val) & {"g0", "g1"}              # round(0.2 x 8)
    assert default_val_keys(keys, train, 0.2, seed=0) == val           # deterministic
    assert len({default_val_keys(keys, train, 0.2, seed=s) for s in range(8)}) > 1
    three = train[np.isin(keys[train], ["g2", "g3", "g4"])]
    assert len(default_val_keys(keys, three, 0.2, seed=0)) == 1       # at least one of 3
    assert default_val_keys(keys, three[:10], 0.2, seed=0) == ()      # 2 groups: keep both
    assert default_val_keys(keys, train, 0.0, seed=0) == ()
    assert len(default_val_keys(keys, train, 0.9, seed=0)) == 6       # 2 left to train on


def _ws(day_sites: list[str], events: list[str]) -> WindowSet:
    n = len(events)
    site, date = zip(*(d.split("/") for d in day_sites))
    meta = {"site": np.array(site), "date": np.array(date), "group": np.array(events),
            "node": np.array(["1"] * n)}
    return WindowSet(("a",), {"a": np.zeros((n, 1, 4), np.float32)},
                     np.ones((n, 1), np.float32), np.zeros(n, np.int64), meta)


def test_events_held_out_for_validation_never_straddle_and_test_stays_whole():
    ws = _ws(["s/1", "s/1", "s/1", "s/2", "t/1", "t/1"], ["e1", "e1", "e2", "e3", "e4", "e4"])
    split = hold_out_events(ws, split_by_day_site(ws, ("t/1",)), ("e1",))
    assert split.val.tolist() == [0, 1] and split.train.tolist() == [2, 3]
    assert split.test.tolist() == [4, 5] and split.val_keys == ("e1",)
    check_no_leakage(ws, split, events_in_val=True)
    with pytest.raises(ConfigError, match="day-site 's/1' has windows in both train and val"):
        check_no_leakage(ws, split)
    bad = type(split)(np.array([2, 3]), np.array([0, 1, 4]), np.array([5]), (), ())
    with pytest.raises(ConfigError, match="event group 'e4'"):
        check_no_leakage(ws, bad, events_in_val=True)


def test_calibration_table_of_the_config(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\ndataset = "sphar"\n[calibration]\ntarget_risk = 0.05\n'
                   'val_by = "event"\n')
    got = load_config(str(cfg)).calibration
    assert got == CalibrationConfig(True, 0.05, 0.1, 0.2, "event")
    for bad, words in [("target_risk = 0", "target_risk must be a number in (0, 1)"),
                       ("delta = 1.0", "delta"), ("val_fraction = 0.95", "val_fraction"),
                       ("val_by = 'window'", "val_by must be one of"),
                       ("enabled = 1", "enabled must be true or false"),
                       ("threshold = 0.9", "unknown key")]:
        cfg.write_text(f'[data]\ndataset = "sphar"\n[calibration]\n{bad}\n')
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            load_config(str(cfg))


def test_ece_floor_is_the_ece_of_a_calibrated_model_on_this_many_windows():
    rng = np.random.default_rng(5)
    for n in (300, 3000):
        probs = rng.dirichlet(np.ones(3) * 0.5, n)
        floor, p90 = cal.ece_floor(probs, seed=1)
        # labels drawn from the scores themselves: calibrated by construction
        drawn = [cal.ece(probs, np.array([rng.choice(3, p=p / p.sum()) for p in probs]))
                 for _ in range(40 if n == 300 else 8)]
        assert np.mean(drawn) == pytest.approx(floor, rel=0.15), n
        assert floor < p90
    assert cal.ece_floor(rng.dirichlet(np.ones(3), 3000))[0] < \
        cal.ece_floor(rng.dirichlet(np.ones(3), 300))[0]                # shrinks with n
    assert cal.ece_floor(np.array([[1.0, 0.0]] * 50)) == (0.0, 0.0)    # certain and right


def test_a_separable_route_keeps_temperature_one():
    z = np.array([[4.0, -4.0]] * 150 + [[-3.0, 3.0]] * 150, np.float32)
    y = np.array([0] * 150 + [1] * 150)
    entry = cal.fit_route_calibration({"all": (z, y)})["all"]
    assert entry["temperature"] == 1.0 and entry["val_risk"] == 0.0


def test_the_label_report_tells_why_an_interval_labels_no_window(tmp_path):
    """Windows of 1 s every 1 s over [0, 10) s and [20, 30) s (a gap between two runs);
    intervals: right (labels windows), outvoted (0.2 s, majority needs 0.5), in the gap
    (no window cut there), after the recording, and one of a label the model lacks."""
    s = 10**9
    t0 = 1_777_000_000 * s
    rows = [(0, 3, "walk"), (4.4, 4.6, "idle"), (12, 14, "walk"), (50, 55, "idle"),
            (5, 9, "door")]
    path = tmp_path / "labels.csv"
    path.write_text("node,start,end,label\n" + "".join(
        f"n1,{t0 + int(a * s)},{t0 + int(b * s)},{lab}\n" for a, b, lab in rows))
    labeller = IntervalLabeller(read_intervals(path), ("walk", "idle"), IntervalRule())
    start = t0 + np.r_[np.arange(0, 10), np.arange(20, 30)].astype(np.int64) * s
    labeller.for_node("n1")(start, start + s)
    report = labeller.report(["n1"], {"n1": (t0, t0 + 30 * s)})
    assert (report["no_window"], report["outvoted"], report["uncut"], report["outside"]) == \
        (3, 1, 1, 1)
    assert report["no_window_lines"] == [3, 4, 5] and report["outside_lines"] == [5]
    assert report["no_window_by_label"] == {"idle": 2, "walk": 1}
    assert report["labels_not_in_contract"] == ["door"]     # warned about on its own


torch = pytest.importorskip("torch")

import onnx  # noqa: E402  (train extra, with torch)

from edgefuse.exporters.calibrate import set_calibration  # noqa: E402
from edgefuse.exporters.onnx_export import export_with_fallbacks  # noqa: E402
from edgefuse.models import standin  # noqa: E402
from edgefuse.models.route_calibration import (calibrate_model, condition_calibration,  # noqa
                                               route_logits, windows)
from edgefuse.runtime.core.contract import ModelContract  # noqa: E402
from edgefuse.runtime.core.fusion import Fuser  # noqa: E402
from edgefuse.runtime.core.inference import OnnxModel  # noqa: E402
from tests.test_fusion import A, NS, S, small_net  # noqa: E402

N = 90


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny exported model with a seismic fallback (acoustic alone runs masked)."""
    net = small_net()
    contract = ModelContract("tiny-cal", "1", (A, S), NS, NS // 2, ("background", "vehicle"),
                             "modality_mask", "logits", "logits")
    path = tmp_path_factory.mktemp("bundle") / "tiny.onnx"
    export_with_fallbacks(net, contract, path,
                          {("seismic",): standin.subset_of(net, contract, ("seismic",))})
    onnx.checker.check_model(str(path))
    return path


@pytest.fixture(scope="module")
def ws(bundle) -> WindowSet:
    """N windows: a third with both modalities, a third seismic only, a third acoustic
    only; labels = the main model's answer on the window, a fifth of them flipped."""
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1], [0, 1], [1, 0]] * (N // 3), np.float32)
    x = {"acoustic": (rng.standard_normal((N, 1, 200)) * 50).astype(np.float32),
         "seismic": (rng.standard_normal((N, 1, 100)) * 5).astype(np.float32)}
    meta = {"node": np.array(["n"] * N), "group": np.array([f"g{i % 4}" for i in range(N)])}
    out = WindowSet(("acoustic", "seismic"), x, mask, np.zeros(N, np.int64), meta,
                    {"start_ns": np.arange(N, dtype=np.int64) * NS})
    model = OnnxModel.load(bundle)
    full = np.ones((N, 2), bool)
    answer = [int(d.scores["vehicle"] > 0.5)
              for d in Fuser(model, abstain_below=0.0).decide(windows(out, np.arange(N), full))]
    out.label = np.array(answer) ^ (rng.random(N) < 0.2)
    return out


def test_route_logits_score_every_subset_of_each_window_as_the_runtime_routes(bundle, ws):
    model = OnnxModel.load(bundle)
    idx = np.arange(N)
    got = route_logits(model, ws, idx)
    assert sorted(got) == ["all", "masked", "masked:acoustic", "subset:seismic"]
    has = ws.mask > 0
    assert got["all"][2].tolist() == np.flatnonzero(has.all(axis=1)).tolist()
    assert sorted(got["subset:seismic"][2].tolist()) == np.flatnonzero(has[:, 1]).tolist()
    assert sorted(got["masked:acoustic"][2].tolist()) == np.flatnonzero(has[:, 0]).tolist()
    for k in ("masked", "masked:acoustic"):   # the pooled entry: every masked window
        np.testing.assert_array_equal(got[k][0], got["masked:acoustic"][0])
    z, y, rows = got["subset:seismic"]
    np.testing.assert_array_equal(y, ws.label[rows])
    i = int(rows[0])
    ref = Fuser(model).logits(windows(ws, np.array([i]), np.array([[False, True]])))
    assert ref[0][0] == "subset:seismic"
    np.testing.assert_array_equal(z[0], ref[0][1])


def test_calibrate_model_writes_the_fitted_table_into_the_bundle(bundle, ws, tmp_path):
    for f in bundle.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / "tiny.onnx"
    idx = np.arange(N)
    out = calibrate_model(path, ws, idx, ws.meta["group"], target_risk=0.3, delta=0.2)
    data = route_logits(OnnxModel.load(bundle), ws, idx)
    expected = cal.fit_route_calibration({k: v[:2] for k, v in data.items()}, 0.3, 0.2)
    assert out["routes"] == expected
    model = OnnxModel.load(path)
    assert {r: e.to_dict() for r, e in model.contract.calibration} == \
        {r: {k: v for k, v in e.items()} for r, e in expected.items()}
    fallback = model.fallbacks[("seismic",)].contract.route_calibration("all")
    assert fallback.temperature == expected["subset:seismic"]["temperature"]
    assert set(out["calibrators"]) == set(expected)     # 4 groups: measured per route
    assert set(out["calibrators"]["all"]) == {"none", "temperature", "vector"}


def test_evaluate_reports_what_the_runtime_decides(bundle, ws, tmp_path):
    for f in bundle.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / "tiny.onnx"
    idx = np.arange(N)
    plain = OnnxModel.load(path)
    temps = {"all": 2.0, "subset:seismic": 0.5, "masked": 1.5}
    table = {}
    for route, t in temps.items():   # each threshold abstains on about a third of its windows
        present = {"all": (True, True), "subset:seismic": (False, True),
                   "masked": (True, False)}[route]
        z = np.stack([v for _, v in Fuser(plain).logits(windows(ws, idx, np.array([present] * N)))])
        table[route] = {"temperature": t,
                        "threshold": float(np.quantile(cal.calibrated_probs(z, t).max(1), 0.33))}
    set_calibration(path, table)
    model = OnnxModel.load(path)
    labels = list(model.contract.labels)
    for abstain_all in (False, True):
        for present in (ws.mask > 0, np.array([[False, True]] * N), np.ones((N, 2), bool)):
            pred, rep = condition_calibration(model, ws, idx, present, abstain_all, 0.1)
            runtime = Fuser(model, abstain_all=abstain_all).decide(windows(ws, idx, present))
            raw = Fuser(model, calibrate=False).decide(windows(ws, idx, present))
            decided = np.array([d.label is not None for d in runtime])
            right = np.array([d.label is not None and labels.index(d.label) == t
                              for d, t in zip(runtime, ws.label)])
            assert rep["decided"] == pytest.approx(decided.mean())
            assert (0.5 < decided.mean() < 0.9) if abstain_all or not present.all() else \
                decided.all()
            assert rep["risk_decided"] == pytest.approx(1 - right[decided].mean())
            probs = np.array([[d.scores[k] for k in labels] for d in runtime])
            assert rep["ece"] == pytest.approx(cal.ece(probs, ws.label))
            assert rep["ece_uncalibrated"] == pytest.approx(
                cal.ece(np.array([[d.scores[k] for k in labels] for d in raw]), ws.label))
            assert pred.tolist() == [labels.index(d.label) for d in raw]   # no threshold
            assert rep["n_scored"] == N and rep["target_risk"] == 0.1
            assert sum(rep["abstained_by_route"].values()) == int((~decided).sum())
    _, rep = condition_calibration(model, ws, idx, np.array([[True, False]] * N))
    assert rep["thresholds"] == {"masked:acoustic": table["masked"]["threshold"]}  # stands in
    _, rep = condition_calibration(model, ws, idx, np.ones((N, 2), bool))
    assert rep["thresholds"] == {"all": None} and rep["decided"] == 1.0   # not abstain_all
    _, rep = condition_calibration(model, ws, idx, np.zeros((N, 2), bool))
    assert rep == {"decided": 0.0, "risk_decided": None, "ece": None}     # nothing scored
