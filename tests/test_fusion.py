"""Fuser: routes (none / masked / subset / abstain), order, seq (= window index), batching.

Runs a real small fusion model (the stand-in architecture at low rates),
exported to ONNX in the test with the project's exporter.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgefuse.runtime.core.errors import ConfigError, ModalityMismatchError
from edgefuse.runtime.core.window import REASON_FLATLINE, REASON_GAP, Window

torch = pytest.importorskip(
    "torch", reason="SKIPPED LOUDLY: torch (train extra) is missing, so the fusion tests "
    "cannot build their model; install with pip install -e '.[train]'")

from edgefuse.exporters.onnx_export import export_with_fallbacks  # noqa: E402
from edgefuse.models import standin  # noqa: E402
from edgefuse.models.frontends import log_bands, log_mel  # noqa: E402
from edgefuse.runtime.core.contract import ModalitySpec, ModelContract  # noqa: E402
from edgefuse.runtime.core.fusion import Fuser  # noqa: E402
from edgefuse.runtime.core.inference import OnnxModel  # noqa: E402

pytestmark = pytest.mark.needs_torch

A = ModalitySpec("acoustic", 1, 200.0, "acoustic")
S = ModalitySpec("seismic", 1, 100.0, "seismic")
NS = 1_000_000_000


def small_net(seed: int = 1) -> standin.FusionNet:
    torch.manual_seed(seed)
    net = standin.FusionNet([
        standin.ModalityEncoder(log_mel(200.0, 200, 32, 32, n_mels=8, fmax=100.0), 1),
        standin.ModalityEncoder(log_bands(100.0, 100, 32, 16, n_bands=4), 1),
    ], 2)
    with torch.no_grad():  # make the batch-norm statistics non-trivial
        for enc in net.encoders:
            enc.body.norm.running_mean.uniform_(-1, 1)
            enc.body.norm.running_var.uniform_(0.5, 2)
    return net.eval()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> OnnxModel:
    net = small_net()
    contract = ModelContract("tiny-fusion", "2", (A, S), NS, NS // 2, ("background", "vehicle"),
                             "modality_mask", "logits", "logits", description="test")
    path = tmp_path_factory.mktemp("fusion") / "tiny.onnx"
    export_with_fallbacks(net, contract, path,
                          {("seismic",): standin.subset_of(net, contract, ("seismic",))})
    return OnnxModel.load(path)


def window(node: str, index: int, present=("acoustic", "seismic"), seed: int | None = None,
           reasons: dict | None = None) -> Window:
    rng = np.random.default_rng(seed if seed is not None else index * 7 + len(node))
    data = {"acoustic": (rng.standard_normal((1, 200)) * 50).astype(np.float32),
            "seismic": (rng.standard_normal((1, 100)) * 5).astype(np.float32)}
    missing = [m for m in ("acoustic", "seismic") if m not in present]
    return Window(node=node, index=index, start_ns=index * NS // 2, end_ns=index * NS // 2 + NS,
                  data=data, present={m: m in present for m in ("acoustic", "seismic")},
                  missing_reason={m: (reasons or {}).get(m, REASON_GAP) for m in missing},
                  coverage={m: (1.0 if m in present else 0.25) for m in ("acoustic", "seismic")})


def main_probs(model: OnnxModel, w: Window, mask=(1.0, 1.0)) -> np.ndarray:
    x = {m: (w.data[m] if k else np.zeros_like(w.data[m]))[None]
         for m, k in zip(("acoustic", "seismic"), mask)}
    return model.run(x, np.array([mask], np.float32))[0]


def test_every_route(model):
    fuser = Fuser(model)
    windows = [window("n1", 0), window("n1", 1, present=("seismic",)),
               window("n1", 2, present=("acoustic",), reasons={"seismic": REASON_FLATLINE}),
               window("n1", 3, present=())]
    windows[2].data["seismic"][:] = np.nan  # a missing modality's data must never be used
    d = fuser.decide(windows)
    assert [x.fallback for x in d] == ["none", "subset:seismic", "masked", "abstain"]

    np.testing.assert_allclose(list(d[0].scores.values()), main_probs(model, windows[0]), atol=1e-6)
    fb = model.fallbacks[("seismic",)]
    fb_probs = fb.run({"seismic": windows[1].data["seismic"][None]}, np.ones((1, 1), np.float32))[0]
    np.testing.assert_allclose(list(d[1].scores.values()), fb_probs, atol=1e-6)
    # The subset model is the masked main model with only the seismic encoder running.
    np.testing.assert_allclose(fb_probs, main_probs(model, windows[1], (0.0, 1.0)), atol=1e-5)
    masked = main_probs(model, windows[2], (1.0, 0.0))
    np.testing.assert_allclose(list(d[2].scores.values()), masked, atol=1e-6)
    assert not np.allclose(masked, main_probs(model, window("n1", 2)), atol=1e-4)  # mask matters

    for x, w in zip(d[:3], windows):
        assert x.label == max(x.scores, key=x.scores.get)
        assert math.isclose(sum(x.scores.values()), 1.0, abs_tol=1e-6)
    assert d[3].label is None and d[3].scores == {"background": 0.0, "vehicle": 0.0}
    assert d[3].used == () and d[3].missing == ("acoustic", "seismic")

    assert (d[1].used, d[1].missing, d[1].missing_reason) == (("seismic",), ("acoustic",),
                                                               {"acoustic": REASON_GAP})
    assert d[2].missing_reason == {"seismic": REASON_FLATLINE}
    assert d[0].missing == () and d[0].missing_reason == {}
    assert all(x.model == "tiny-fusion@2" for x in d)
    assert [(x.window_start_ns, x.window_end_ns) for x in d] == \
        [(w.start_ns, w.end_ns) for w in windows]
    assert d[1].coverage == {"acoustic": 0.25, "seismic": 1.0}
    assert [x.route for x in d] == ["all", "subset:seismic", "masked", None]
    assert fuser.stats() == {
        "decisions": {"none": 1, "subset:seismic": 1, "masked": 1, "abstain": 1},
        "batches": {"none": 1, "subset:seismic": 1, "masked": 1},  # abstain ran nothing
        "abstained": {}}  # no threshold: the abstention is the empty window's
    json.loads(d[2].to_json())  # canonical JSON works for every route


def test_abstain_below_applies_only_when_a_modality_is_missing(model):
    windows = [window("n", 0), window("n", 1, present=("seismic",)),
               window("n", 2, present=("acoustic",))]
    never = Fuser(model, abstain_below=0.0).decide(windows)
    always = Fuser(model, abstain_below=1.0).decide(windows)
    assert [d.fallback for d in never] == ["none", "subset:seismic", "masked"]
    assert [d.fallback for d in always] == ["none", "abstain", "abstain"]
    assert always[0].label == never[0].label is not None
    for a, n in zip(always[1:], never[1:]):
        assert a.label is None and a.scores == n.scores  # scores are kept
    # A threshold between the two missing-modality confidences splits them.
    tops = sorted(max(d.scores.values()) for d in never[1:])
    assert tops[0] < tops[1]
    threshold = (tops[0] + tops[1]) / 2
    mid = Fuser(model, abstain_below=threshold).decide(windows)
    for m, n in zip(mid[1:], never[1:]):
        assert (m.fallback == "abstain") == (max(n.scores.values()) < threshold)
    assert sum(m.fallback == "abstain" for m in mid) == 1


def test_output_order_and_seq_per_node(model):
    fuser = Fuser(model, max_batch=2)
    routes = [("acoustic", "seismic"), ("seismic",), ("acoustic",), ()]
    first = [window(f"node{i % 3}", i, present=routes[i % 4]) for i in range(11)]
    second = [window(f"node{i % 2}", 100 + i, present=routes[(i + 1) % 4]) for i in range(6)]
    d1, d2 = fuser.decide(first), fuser.decide(second)
    assert [(d.node, d.window_start_ns) for d in d1] == [(w.node, w.start_ns) for w in first]
    # seq is the window index, whatever the Fuser, batch or route: (node, seq) names
    # one window, across restarts and model swaps (no counter to lose)
    for d, w in zip(d1 + d2, first + second):
        assert (d.node, d.seq) == (w.node, w.index)
        assert d.window_start_ns == d.seq * (NS // 2)
    assert Fuser(model).decide([window("node0", 7)])[0].seq == 7  # a fresh Fuser agrees


@pytest.mark.parametrize("max_batch", [1, 3, 7, 64])
def test_batch_splitting_equals_one_by_one(model, max_batch):
    routes = [("acoustic", "seismic"), ("seismic",), ("acoustic",), ()]
    windows = [window("n", i, present=routes[(i * 5) % 4], seed=i) for i in range(50)]
    batched_fuser = Fuser(model, max_batch=max_batch)
    batched = batched_fuser.decide(windows)
    one_fuser = Fuser(model)
    single = [one_fuser.decide([w])[0] for w in windows]
    for b, s in zip(batched, single):
        assert (b.label, b.fallback, b.seq) == (s.label, s.fallback, s.seq)
        np.testing.assert_allclose(list(b.scores.values()), list(s.scores.values()), atol=1e-6)
    sizes = {"none": 0, "subset:seismic": 0, "masked": 0}
    for w in windows:
        pattern = (w.present["acoustic"], w.present["seismic"])
        route = {(True, True): "none", (False, True): "subset:seismic",
                 (True, False): "masked"}.get(pattern)
        if route:
            sizes[route] += 1
    assert batched_fuser.stats()["batches"] == {k: math.ceil(v / max_batch)
                                                   for k, v in sizes.items()}


def test_present_modality_with_wrong_data_is_refused(model):
    w = window("n", 0)
    w.data["seismic"] = np.zeros((1, 99), np.float32)
    with pytest.raises(ModalityMismatchError, match=r"seismic is marked present.*\[1, 100\]"):
        Fuser(model).decide([w])


@pytest.mark.parametrize("kwargs", [{"abstain_below": -0.1}, {"abstain_below": 1.5},
                                    {"max_batch": 0}, {"max_batch": 10**6}, {"max_batch": 2.5}])
def test_bad_settings_are_refused(model, kwargs):
    with pytest.raises(ConfigError):
        Fuser(model, **kwargs)


def test_empty_input_gives_no_decisions(model):
    assert Fuser(model).decide([]) == []
