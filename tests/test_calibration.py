"""models.calibration: ECE, temperature, risk-coverage, AURC and the threshold at a target
risk, against hand-worked cases, plain-loop twins and synthetic data whose truth is known."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from edgefuse.models import calibration as cal
from edgefuse.models.calibrators import compare_calibrators
from edgefuse.runtime.core.contract import ModelContract
from edgefuse.runtime.core.errors import InputError


def sampled(n: int, k: int, temperature: float, seed: int,
            spread: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn from softmax(z / temperature): the calibrating T is known."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, spread, (n, k)).astype(np.float32)
    p = cal.calibrated_probs(z, temperature).astype(np.float64)
    u = rng.random(n)[:, None]
    y = np.minimum((u > np.cumsum(p, axis=1)).sum(axis=1), k - 1)
    return z, y


def ece_loop(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """The definition, one window at a time: bin b holds top scores in (b/bins, (b+1)/bins]."""
    sums = [[0, 0.0, 0.0] for _ in range(bins)]
    for p, label in zip(probs, y):
        conf = float(max(p))
        b = 0 if conf <= 0 else min(bins - 1, math.ceil(conf * bins) - 1)
        sums[b][0] += 1
        sums[b][1] += conf
        sums[b][2] += float(int(np.argmax(p)) == label)
    return sum(n / len(y) * abs(ok / n - c / n) for n, c, ok in sums if n)


def test_ece_hand_worked_and_twin():
    # top scores 0.95 (right), 0.95 (wrong), 0.55 (right): bin 14 (0.9333, 1]: acc 0.5,
    # conf 0.95; bin 8 (0.5333, 0.6]: acc 1, conf 0.55 -> 2/3*0.45 + 1/3*0.45 = 0.45
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55]])
    y = np.array([0, 1, 1])
    value, table = cal.reliability(probs, y)
    assert value == pytest.approx(0.45)
    assert [r["n"] for r in table] == [0] * 8 + [1] + [0] * 5 + [2]
    assert table[14]["accuracy"] == 0.5 and table[0]["confidence"] is None
    # right-closed bins: a top score of exactly 2/3 falls in bin 9, as the loop says
    edge = np.array([[2 / 3, 1 / 3]])
    assert cal.reliability(edge, np.array([0]))[1][9]["n"] == 1
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(4) * 0.3, 500)
    y = rng.integers(0, 4, 500)
    assert cal.ece(p, y) == pytest.approx(ece_loop(p, y), abs=1e-12)


def test_ece_is_near_zero_when_calibrated_and_large_when_overconfident():
    z, y = sampled(20_000, 3, 1.0, seed=1)
    assert cal.ece(cal.calibrated_probs(z), y) < 0.015       # scores drawn as stated
    overconfident = z * 3.0                                  # the same ranking, sharper
    assert cal.ece(cal.calibrated_probs(overconfident), y) > 0.1
    t = cal.fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.05)
    assert cal.ece(cal.calibrated_probs(overconfident, t), y) < 0.015
    # NLL is at its minimum at the fitted T
    best = cal.nll(overconfident, y, t)
    assert best < cal.nll(overconfident, y, t * 1.1) and best < cal.nll(overconfident, y, t / 1.1)


@pytest.mark.parametrize("true_t", [0.4, 1.0, 2.5])
def test_fit_temperature_recovers_the_temperature_labels_were_drawn_with(true_t):
    z, y = sampled(8000, 2, true_t, seed=2)
    assert cal.fit_temperature(z, y) == pytest.approx(true_t, rel=0.08)


def test_risk_coverage_hand_worked_with_ties():
    conf = np.array([0.9, 0.8, 0.8, 0.6, 0.99])
    correct = np.array([True, True, False, False, True])
    curve, aurc = cal.risk_coverage(conf, correct)
    assert curve["threshold"].tolist() == [0.99, 0.9, 0.8, 0.6]
    assert curve["kept"].tolist() == [1, 2, 4, 5]
    assert curve["risk"].tolist() == [0.0, 0.0, 0.25, 0.4]
    assert curve["coverage"].tolist() == [0.2, 0.4, 0.8, 1.0]
    # tied windows share their point: (1*0 + 1*0 + 2*0.25 + 1*0.4) / 5
    assert aurc == pytest.approx(0.18)
    perm = np.random.default_rng(0).permutation(5)
    again, aurc2 = cal.risk_coverage(conf[perm], correct[perm])
    assert aurc2 == aurc and again["risk"].tolist() == curve["risk"].tolist()
    assert cal.coverage_at_risk(conf, correct, 0.25) == (0.8, 0.8)
    assert cal.coverage_at_risk(conf, correct, 0.0) == (0.4, 0.9)
    assert cal.coverage_at_risk(conf, ~np.ones(5, bool), 0.1) == (0.0, None)


def test_aurc_of_a_perfect_ranker_and_of_a_random_one():
    n, errors = 1000, 100
    correct = np.r_[np.ones(n - errors, bool), np.zeros(errors, bool)]
    conf = np.linspace(1.0, 0.5, n)           # every right answer more confident
    _, aurc = cal.risk_coverage(conf, correct)
    expected = sum((k - (n - errors)) / k for k in range(n - errors + 1, n + 1)) / n
    assert aurc == pytest.approx(expected, rel=1e-12)
    risk = errors / n                           # the continuous limit, for scale
    assert aurc == pytest.approx(risk + (1 - risk) * math.log(1 - risk), rel=0.02)
    _, worst = cal.risk_coverage(conf[::-1], correct)   # every wrong answer most confident
    rng = np.random.default_rng(4)
    shuffled = np.mean([cal.risk_coverage(rng.permutation(conf), correct)[1]
                        for _ in range(20)])
    assert aurc < shuffled < worst and shuffled == pytest.approx(risk, abs=0.01)


def test_risk_upper_bound_is_clopper_pearson():
    # no errors in n: the bound solves (1 - p)^n = delta
    for n in (10, 100, 1000):
        assert cal.risk_upper_bound(0, n, 0.1) == pytest.approx(1 - 0.1 ** (1 / n))
    # one error in 100 at 95 %: the tabulated exact bound is 0.0466
    assert cal.risk_upper_bound(1, 100, 0.05) == pytest.approx(0.0466, abs=2e-4)
    assert cal.risk_upper_bound(5, 5, 0.1) == 1.0


def test_threshold_meets_the_target_on_validation_and_holds_on_new_windows():
    target = 0.02
    z_val, y_val = sampled(20_000, 2, 1.0, seed=10)
    conf, correct = cal.top(cal.calibrated_probs(z_val), y_val)
    choice = cal.choose_threshold(conf, correct, target, delta=0.1)
    t = choice["threshold"]
    kept = conf >= t
    assert choice["coverage"] == pytest.approx(kept.mean())
    assert choice["val_risk"] == pytest.approx(np.mean(~correct[kept]))
    assert choice["val_risk"] <= choice["risk_bound"] <= target
    # the lowest such threshold: keeping the next window down breaks the bound
    below = conf[conf < t].max()
    wider = conf >= below
    assert cal.risk_upper_bound(np.sum(~correct[wider]), wider.sum(), 0.1) > target
    # more conservative than the empirical point, not absurdly so
    empirical, _ = cal.coverage_at_risk(conf, correct, target)
    assert 0.5 * empirical < choice["coverage"] <= empirical
    # on fresh windows from the same source: the expected error among those decided
    # (known here: these scores are calibrated, so it is the mean of 1 - conf) is within
    # the target, and the error counted on ~5600 of them within the 2.5 %
    for seed in (11, 12, 13):
        z, y = sampled(20_000, 2, 1.0, seed=seed)
        c, ok = cal.top(cal.calibrated_probs(z), y)
        decided = c >= t
        assert np.mean(1.0 - c[decided]) <= target
        assert np.mean(~ok[decided]) <= 0.025
        assert decided.mean() == pytest.approx(choice["coverage"], abs=0.02)


def test_too_few_windows_abstain_unless_certain():
    conf = np.full(40, 0.99)
    choice = cal.choose_threshold(conf, np.ones(40, bool), 0.02, delta=0.1)
    # 0 errors in 40 bounds the risk at 1 - 0.1 ** (1/40) = 5.6 % only
    assert choice["threshold"] == 1.0 and choice["coverage"] == 0.0
    assert choice["risk_bound"] == 1.0


def test_fit_route_calibration_gives_contract_entries():
    z_all, y_all = sampled(6000, 2, 0.5, seed=20)
    z_sub, y_sub = sampled(6000, 2, 2.0, seed=21, spread=6.0)
    out = cal.fit_route_calibration({"all": (z_all, y_all), "subset:seismic": (z_sub, y_sub),
                                     "masked": (np.zeros((0, 2)), np.zeros(0, int))})
    assert set(out) == {"all", "subset:seismic"}  # no windows: left uncalibrated
    assert out["all"]["temperature"] == pytest.approx(0.5, rel=0.1)
    assert out["subset:seismic"]["temperature"] == pytest.approx(2.0, rel=0.1)
    for route, (z, y) in {"all": (z_all, y_all), "subset:seismic": (z_sub, y_sub)}.items():
        e = out[route]
        c, ok = cal.top(cal.calibrated_probs(z, e["temperature"]), y)
        assert np.mean(~ok[c >= e["threshold"]]) == pytest.approx(e["val_risk"])
        assert e["n"] == 6000 and e["target_risk"] == 0.02 and e["threshold"] < 1.0
    doc = {"contract": 1, "name": "m", "version": "1", "window_ns": 10, "hop_ns": 10,
           "modalities": [{"name": "acoustic", "channels": 1, "rate_hz": 1e8, "input": "a"},
                          {"name": "seismic", "channels": 1, "rate_hz": 1e8, "input": "s"}],
           "labels": ["a", "b"], "mask_input": "m", "output": "o",
           "fallbacks": [{"modalities": ["seismic"], "file": "s.onnx"}], "calibration": out}
    c = ModelContract.from_dict(doc)
    assert c.route_calibration("subset:seismic").threshold == out["subset:seismic"]["threshold"]


def test_condition_report():
    z, y = sampled(3000, 3, 2.0, seed=30)
    raw, fitted = cal.calibrated_probs(z), cal.calibrated_probs(z, 2.0)
    abstained = fitted.max(axis=1) < 0.9
    r = cal.condition_report(y, fitted, raw, abstained)
    assert r["ece"] < 0.03 < r["ece_uncalibrated"]
    assert r["n"] == 3000 and len(r["reliability"]) == 15
    assert len(r["risk_coverage"]["coverage"]) <= cal.CURVE_POINTS
    assert r["risk_coverage"]["coverage"][-1] == 1.0
    conf, ok = cal.top(fitted, y)
    assert r["coverage_at_risk"] == cal.coverage_at_risk(conf, ok)[0]
    assert r["decided"] == pytest.approx(1 - abstained.mean())
    assert r["risk_decided"] == pytest.approx(np.mean(~ok[~abstained]))


def test_vector_scaling_is_measured_against_temperature():
    # only the temperature is wrong: vector scaling has nothing more to find
    z, y = sampled(6000, 2, 2.0, seed=40)
    res = compare_calibrators(z, y, folds=2)
    assert res["temperature"]["ece"] < 0.02 < res["none"]["ece"]
    assert res["vector"]["ece"] < 0.03
    # a per-class bias (the model favours class 1 by 1.5 logits): temperature cannot
    # remove it, vector scaling can
    biased = z + np.array([0.0, 1.5], np.float32)
    res = compare_calibrators(biased, y, folds=2)
    assert res["vector"]["ece"] < 0.02 < res["temperature"]["ece"]
    assert res["vector"]["nll"] < res["temperature"]["nll"]


@pytest.mark.parametrize("logits,y,words", [
    (np.zeros((3,)), np.zeros(3, int), "must be [N, K >= 2]"),
    (np.zeros((3, 2)), np.zeros(2, int), "must be [N, K >= 2]"),
    (np.zeros((0, 2)), np.zeros(0, int), "no windows"),
    (np.full((2, 2), np.nan), np.zeros(2, int), "not finite"),
    (np.zeros((2, 2)), np.array([0, 2]), "labels must be integers in [0, 2)"),
    (np.zeros((2, 2)), np.array([0.0, 1.0]), "labels must be integers"),
])
def test_bad_input_is_refused(logits, y, words):
    with pytest.raises(InputError, match=re.escape(words)):
        cal.fit_temperature(logits, y)
