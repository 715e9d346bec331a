"""Calibration in the runtime: set_calibration writes it into a real exported model (and
its fallback), the Fuser applies each route's temperature and threshold, the overrides
work, old models decide as before, and the pipeline's settings reach the Fuser."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgefuse.runtime.core.contract import METADATA_KEY, ModelContract
from edgefuse.runtime.core.errors import ConfigError, ModelContractError
from edgefuse.runtime.core.inference import OnnxModel, softmax
from edgefuse.runtime.core.pipeline import Pipeline, PipelineConfig

torch = pytest.importorskip(
    "torch", reason="SKIPPED LOUDLY: torch (train extra) is missing, so the calibration "
    "tests cannot build their model; install with pip install -e '.[train]'")

import onnx  # noqa: E402  (train extra, with torch)

from edgefuse.exporters.calibrate import set_calibration  # noqa: E402
from edgefuse.exporters.onnx_export import export_with_fallbacks  # noqa: E402
from edgefuse.models import standin  # noqa: E402
from edgefuse.runtime.core.fusion import Fuser  # noqa: E402
from tests.test_fusion import A, NS, S, small_net, window  # noqa: E402

pytestmark = pytest.mark.needs_torch

ROUTES = [("acoustic", "seismic"), ("seismic",), ("acoustic",)]  # all, subset, masked
CALIBRATION = {"all": {"temperature": 2.0, "threshold": 0.999},
               "subset:seismic": {"temperature": 0.5, "threshold": 0.0, "coverage": 0.8,
                                  "target_risk": 0.02, "n": 100},
               "masked": {"temperature": 3.0}}


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    net = small_net()
    contract = ModelContract("tiny-fusion", "2", (A, S), NS, NS // 2, ("background", "vehicle"),
                             "modality_mask", "logits", "logits", description="test")
    path = tmp_path_factory.mktemp("plain") / "tiny.onnx"
    export_with_fallbacks(net, contract, path,
                          {("seismic",): standin.subset_of(net, contract, ("seismic",))})
    model = onnx.load(str(path))  # another metadata entry, which calibrating must keep
    model.metadata_props.add(key="edgefuse.eval", value='{"task": "detection"}')
    onnx.save(model, str(path))
    return path.parent


def calibrated_copy(plain_dir, tmp_path, calibration) -> OnnxModel:
    for f in plain_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    set_calibration(tmp_path / "tiny.onnx", calibration)
    return OnnxModel.load(tmp_path / "tiny.onnx")


@pytest.fixture(scope="module")
def plain(plain_dir) -> OnnxModel:
    return OnnxModel.load(plain_dir / "tiny.onnx")


@pytest.fixture(scope="module")
def calibrated(plain_dir, tmp_path_factory) -> OnnxModel:
    return calibrated_copy(plain_dir, tmp_path_factory.mktemp("cal"), CALIBRATION)


def windows(n: int = 12):
    return [window("n", i, present=ROUTES[i % 3], seed=i) for i in range(n)]


def raw_logits(model: OnnxModel, w) -> np.ndarray:
    present = tuple(m for m in ("acoustic", "seismic") if w.present[m])
    target = model.fallbacks.get(present, model)
    names = target.contract.modality_names
    x = {m: (w.data[m] if m in present else np.zeros_like(w.data[m]))[None] for m in names}
    mask = np.array([[1.0 if m in present else 0.0 for m in names]], np.float32)
    return target.logits(x, mask)


def test_set_calibration_writes_the_model_and_its_fallback(calibrated, plain):
    c = calibrated.contract
    assert c.route_calibration("subset:seismic").temperature == 0.5
    assert c.route_calibration("subset:seismic").coverage == 0.8
    assert c.route_calibration("masked:acoustic", "masked").temperature == 3.0
    # the fallback file, loaded on its own, reads its route's entry as its "all"
    fb = OnnxModel.load(calibrated.path.parent / c.fallbacks[0].file)
    assert fb.contract.route_calibration("all") == c.route_calibration("subset:seismic")
    # nothing else changed: graph, other metadata, the contract but for calibration
    meta = calibrated.session.get_modelmeta().custom_metadata_map
    assert meta["edgefuse.eval"] == '{"task": "detection"}'
    assert c.__class__(**{**c.__dict__, "calibration": ()}) == plain.contract
    w = window("n", 0)
    np.testing.assert_array_equal(raw_logits(calibrated, w), raw_logits(plain, w))


def test_set_calibration_refuses_bad_values_and_leaves_the_files_alone(plain_dir, tmp_path):
    calibrated_copy(plain_dir, tmp_path, CALIBRATION)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    for bad, words in [({"subset:seismic": {"temperature": 0.0}},
                        "calibration['subset:seismic'].temperature"),
                       ({"all": {"temperature": 1.0, "threshold": 1.2}},
                        "calibration['all'].threshold"),
                       ({"subset:acoustic": {"temperature": 1.0}}, "'subset:acoustic'")]:
        with pytest.raises(ModelContractError, match=words.replace("[", r"\[")):
            set_calibration(tmp_path / "tiny.onnx", bad)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before  # no temp left
    # numpy scalars (as fitting returns them) are accepted; None removes calibration
    c = set_calibration(tmp_path / "tiny.onnx", {"all": {"temperature": np.float64(1.5),
                                                         "n": np.int64(7)}})
    assert dict(c.calibration)["all"].n == 7
    c = set_calibration(tmp_path / "tiny.onnx", None)
    assert c.calibration == ()
    assert "calibration" not in json.loads(
        OnnxModel.load(tmp_path / "tiny.onnx").session.get_modelmeta()
        .custom_metadata_map[METADATA_KEY])


def test_each_route_applies_its_temperature(calibrated):
    ws = windows()
    decided = Fuser(calibrated, abstain_below=0.0).decide(ws)
    temps = {"all": 2.0, "subset:seismic": 0.5, "masked": 3.0}
    for d, w in zip(decided, ws):
        expected = softmax(raw_logits(calibrated, w), temps[d.route])[0]
        np.testing.assert_allclose(list(d.scores.values()), expected, rtol=0, atol=1e-7)
        assert d.label == max(d.scores, key=d.scores.get)
    assert [d.route for d in decided[:3]] == ["all", "subset:seismic", "masked"]
    # the most specific masked key wins over "masked"
    assert Fuser(calibrated).route(("acoustic",)).temperature == 3.0


def test_thresholds_per_route_abstain_and_keep_the_scores(plain_dir, plain, tmp_path):
    ws = windows(30)  # 10 windows per route
    probe = Fuser(plain).decide(ws)
    tops = {r: sorted(max(d.scores.values()) for d in probe if d.route == r)
            for r in ("all", "subset:seismic", "masked")}
    cut = {r: (t[4] + t[5]) / 2 for r, t in tops.items()}  # 5 of each route below
    model = calibrated_copy(plain_dir, tmp_path, {
        "all": {"temperature": 1.0, "threshold": cut["all"]},
        "subset:seismic": {"temperature": 1.0, "threshold": cut["subset:seismic"]},
        "masked": {"temperature": 1.0, "threshold": cut["masked"]}})
    fuser = Fuser(model)
    d = fuser.decide(ws)
    for got, ref in zip(d, probe):
        assert got.scores == ref.scores and got.route == ref.route
        below = max(ref.scores.values()) < cut[ref.route]
        if ref.route == "all":  # the all-present route decides unless abstain_all
            assert got.fallback == "none"
        else:
            assert (got.fallback == "abstain") == below
            assert (got.label is None) == below
    counts = fuser.stats()["abstained"]
    assert counts == {"subset:seismic": 5, "masked": 5}
    line = json.loads(next(x for x in d if x.fallback == "abstain").to_json())
    assert line["label"] is None and line["route"] in ("subset:seismic", "masked")
    assert sum(line["scores"].values()) == pytest.approx(1.0, abs=1e-5)

    every = Fuser(model, abstain_all=True).decide(ws)
    assert sum(x.fallback == "abstain" and x.route == "all" for x in every) == 5
    # abstain_below overrides every threshold; 0 never abstains
    assert all(x.label is not None for x in Fuser(model, abstain_below=0.0).decide(ws))
    assert {x.fallback for x in Fuser(model, abstain_below=1.0).decide(ws)} == \
        {"none", "abstain"}
    # calibration off: the contract's thresholds go too
    assert all(x.label is not None for x in Fuser(model, calibrate=False).decide(ws))


def test_no_calibration_and_old_models_decide_as_before(calibrated, plain):
    ws = windows()
    raw = [d.to_json() for d in Fuser(plain).decide(ws)]
    assert [d.to_json() for d in Fuser(calibrated, calibrate=False).decide(ws)] == raw
    old = Fuser(plain, abstain_below=0.0).decide(ws)
    for d, w in zip(old, ws):  # an uncalibrated route: the plain softmax, bit for bit
        assert list(d.scores.values()) == [float(p) for p in softmax(raw_logits(plain, w))[0]]
    assert [d.to_json() for d in Fuser(calibrated).decide(ws)] != raw


def test_logits_give_each_window_its_route_key(calibrated):
    ws = windows(6) + [window("n", 9, present=())]
    out = Fuser(calibrated).logits(ws)
    assert [k for k, _ in out] == ["all", "subset:seismic", "masked:acoustic"] * 2 + [None]
    for (key, z), w in zip(out[:6], ws):
        np.testing.assert_array_equal(z, raw_logits(calibrated, w)[0])
    assert out[-1] == (None, None)


@pytest.mark.parametrize("max_batch", [1, 4])
def test_pipeline_settings_reach_the_fuser_and_batching_changes_nothing(calibrated, max_batch):
    ws = windows(20)
    one = Fuser(calibrated, abstain_all=True)
    single = [one.decide([w])[0].to_json() for w in ws]
    p = Pipeline(calibrated, PipelineConfig(max_batch=max_batch, abstain_all=True))
    assert (p.fuser.abstain_all, p.fuser.abstain_below, p.fuser.calibrate) == (True, None, True)
    assert [d.to_json() for d in p.fuser.decide(ws)] == single
    p.swap_model(calibrated)
    assert p.fuser.abstain_all
    off = Pipeline(calibrated, PipelineConfig(calibration=False, abstain_below=0.5)).fuser
    assert (off.calibrate, off.abstain_below) == (False, 0.5)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_pipeline_refuses_a_bad_abstain_below(value):
    with pytest.raises(ConfigError, match="abstain_below"):
        PipelineConfig(abstain_below=value)


def test_daemon_config_takes_the_overrides():
    from edgefuse.runtime.service.config import from_dict
    c = from_dict({"pipeline": {"abstain_below": 0.7, "abstain_all": True,
                                "calibration": False}})
    assert (c.pipeline.abstain_below, c.pipeline.abstain_all, c.pipeline.calibration) == \
        (0.7, True, False)
    assert from_dict({}).pipeline.abstain_below is None
    with pytest.raises(ConfigError, match=r"\[pipeline\].*abstain_below"):
        from_dict({"pipeline": {"abstain_below": 2}})


def test_a_probabilities_model_is_calibrated_on_its_log_probabilities(tmp_path):
    from tests.test_inference import contract_doc, rand_inputs, write_model
    path = write_model(tmp_path / "p.onnx", contract_doc(output_kind="probabilities"))
    model = OnnxModel.load(path)
    x, mask = rand_inputs(4)
    raw = model.session.run(["scores"], {"acoustic": x["acoustic"], "seismic": x["seismic"],
                                         "mask": mask})[0]
    logp = np.log(np.maximum(raw, np.finfo(np.float32).tiny))
    np.testing.assert_array_equal(model.logits(x, mask), logp)
    np.testing.assert_array_equal(model.run(x, mask, 2.0), softmax(logp, 2.0))
    np.testing.assert_array_equal(model.run(x, mask), raw)  # T = 1: passed through
