"""Calibration and abstention at a target risk, fitted on validation logits.

numpy and scipy only (no torch), so training fits it and evaluation reports it from
logits and labels alone. A route is a way the runtime scores windows ("all",
"subset:a+b", "masked" or "masked:a+b"; see runtime/core/fusion.py); the logits per
route come from ``Fuser.logits`` on validation windows.

- **Temperature scaling** (``fit_temperature``): one T > 0 minimising the mean
  negative log-likelihood of softmax(logits / T), by a bounded scalar search on
  log T in [1/20, 20] (the NLL is convex in 1/T, so the search finds the minimum).
  One parameter keeps the argmax (accuracy unchanged) and cannot overfit a few
  hundred windows. ``calibrators.compare_calibrators`` measures, on held-out folds,
  whether vector scaling (a scale and a bias per class) would do better.
- **ECE** (``reliability``): 15 equal-width bins of the top probability, right-closed;
  the sum over bins of (share of windows) x |accuracy - mean confidence|.
- **ECE noise floor** (``ece_floor``): the ECE a perfectly calibrated model with these
  very scores would still measure on this many windows, by drawing each window's
  correctness from its own top probability (``FLOOR_DRAWS`` times). On a few hundred
  windows it is 0.01-0.03, so an ECE is only read against its floor.
- **Risk-coverage** (``risk_coverage``): most confident first; at each distinct
  confidence t, coverage = share of windows with conf >= t, risk = error among them.
  AURC = mean over windows of the risk at the window's own confidence (tied windows
  share one point, so neither the curve nor its area depends on sort order).
- **Threshold at a target risk** (``choose_threshold``): the lowest t whose kept
  windows' error has a one-sided Clopper-Pearson upper bound, at confidence
  1 - delta (0.9), at or below the target. Conservative on purpose: the empirical
  risk kept on validation data sits below the target by a margin that shrinks as
  more windows are kept, so the threshold still holds on new windows. A route
  with too few validation windows to vouch for the target gets threshold 1
  (abstain unless certain) rather than an unfounded one.

Probabilities are computed with the runtime's own softmax (float32), so a threshold
chosen here splits windows exactly as the runtime's comparison will.
"""
from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
from scipy import optimize, special, stats

from edgefuse.runtime.core.errors import InputError
from edgefuse.runtime.core.inference import softmax

log = logging.getLogger(__name__)

N_BINS = 15
TARGET_RISK = 0.02
DELTA = 0.1
T_MIN, T_MAX = 0.05, 20.0
CURVE_POINTS = 200  # risk-coverage points kept in reports (JSON, plots)
FLOOR_DRAWS = 200
TABLE_RISKS = (0.01, 0.02, 0.05, 0.1)   # rows of the risk-coverage table in reports


def _checked(logits: np.ndarray, y: np.ndarray, what: str = "logits") -> tuple:
    logits, y = np.asarray(logits), np.asarray(y)
    if logits.ndim != 2 or logits.shape[1] < 2 or y.shape != (logits.shape[0],):
        raise InputError(f"{what} must be [N, K >= 2] with labels [N]; found "
                         f"{list(logits.shape)} and {list(y.shape)}")
    if logits.shape[0] == 0:
        raise InputError(f"{what}: no windows; calibration needs at least one")
    if not np.all(np.isfinite(logits)):
        raise InputError(f"{what}: {int(np.sum(~np.isfinite(logits)))} values are not finite")
    if y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= logits.shape[1]:
        raise InputError(f"labels must be integers in [0, {logits.shape[1]}); found "
                         f"{y.dtype} in [{y.min()}, {y.max()}]")
    return logits.astype(np.float64), y.astype(np.int64)


def calibrated_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) as the runtime computes it (float32 [N, K])."""
    return softmax(np.asarray(logits, np.float32), float(temperature))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T)."""
    logits, y = _checked(logits, y)
    logp = special.log_softmax(logits / temperature, axis=1)
    return float(-np.mean(logp[np.arange(y.size), y]))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T in [T_MIN, T_MAX] minimising the NLL (1.0 = the model was calibrated)."""
    logits, y = _checked(logits, y)
    rows = np.arange(y.size)

    def loss(u: float) -> float:
        return float(-np.mean(special.log_softmax(logits * np.exp(-u), axis=1)[rows, y]))

    res = optimize.minimize_scalar(loss, bounds=(np.log(T_MIN), np.log(T_MAX)),
                                   method="bounded", options={"xatol": 1e-5})
    t = float(np.exp(res.x))
    if not T_MIN * 1.01 < t < T_MAX / 1.01:
        log.warning("temperature %.3g is at the search bound [%g, %g] (%d windows): the "
                    "validation windows are separable or degenerate", t, T_MIN, T_MAX, y.size)
    return t


def top(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top probability, whether its label is right) per window."""
    probs = np.asarray(probs)
    return probs.max(axis=1), probs.argmax(axis=1) == np.asarray(y)


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = N_BINS) -> tuple[float, list]:
    """(ECE, table): one row per equal-width bin of the top probability with lo, hi,
    n, confidence and accuracy (None where the bin is empty)."""
    _checked(np.asarray(probs, np.float64), y, "probabilities")
    conf, correct = top(probs, y)
    conf = conf.astype(np.float64)
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    n = np.bincount(which, minlength=bins)
    sum_conf = np.bincount(which, conf, minlength=bins)
    sum_ok = np.bincount(which, correct.astype(np.float64), minlength=bins)
    table, ece = [], 0.0
    for b in range(bins):
        row = {"lo": b / bins, "hi": (b + 1) / bins, "n": int(n[b]),
               "confidence": None, "accuracy": None}
        if n[b]:
            row["confidence"], row["accuracy"] = sum_conf[b] / n[b], sum_ok[b] / n[b]
            ece += n[b] / conf.size * abs(row["accuracy"] - row["confidence"])
        table.append(row)
    return float(ece), table


def ece(probs: np.ndarray, y: np.ndarray, bins: int = N_BINS) -> float:
    return reliability(probs, y, bins)[0]


def ece_floor(probs: np.ndarray, bins: int = N_BINS, draws: int = FLOOR_DRAWS,
              seed: int = 0) -> tuple[float, float]:
    """(mean, 90th percentile) of the ECE of a model calibrated by construction: the same
    top probabilities, each window right with exactly that probability."""
    conf = np.asarray(probs, np.float64).max(axis=1)
    if conf.size == 0:
        raise InputError("ece_floor: no windows")
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    sum_conf = np.bincount(which, conf, minlength=bins)
    right = np.random.default_rng(seed).random((draws, conf.size)) < conf
    # ECE = sum over bins of n_b/N |acc_b - conf_b| = sum of |right_b - sum_conf_b| / N
    sum_right = np.stack([np.bincount(which, r.astype(np.float64), minlength=bins)
                          for r in right])
    values = np.abs(sum_right - sum_conf).sum(axis=1) / conf.size
    return float(values.mean()), float(np.quantile(values, 0.9))


def risk_coverage(conf: np.ndarray, correct: np.ndarray) -> tuple[dict, float]:
    """(curve, AURC). curve: arrays threshold, coverage, risk, kept, errors, one entry
    per distinct confidence, most confident first."""
    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, bool)
    if conf.ndim != 1 or conf.shape != correct.shape or conf.size == 0:
        raise InputError(f"risk_coverage needs conf and correct [N >= 1]; found "
                         f"{list(conf.shape)} and {list(correct.shape)}")
    order = np.argsort(-conf, kind="stable")
    c, errors = conf[order], np.cumsum(~correct[order])
    ends = np.flatnonzero(np.r_[c[1:] != c[:-1], True])  # last window of each tie group
    kept = ends + 1
    risk = errors[ends] / kept
    sizes = np.diff(np.r_[0, kept])
    curve = {"threshold": c[ends], "coverage": kept / conf.size, "risk": risk,
             "kept": kept, "errors": errors[ends]}
    return curve, float(np.sum(sizes * risk) / conf.size)


def coverage_at_risk(conf: np.ndarray, correct: np.ndarray,
                     target_risk: float = TARGET_RISK) -> tuple[float, float | None]:
    """(coverage, threshold): the most windows one can keep, least confident abstained
    on first, with the error among those kept <= target_risk (empirical, no margin).
    (0.0, None) when not even the most confident windows meet it."""
    curve, _ = risk_coverage(conf, correct)
    ok = np.flatnonzero(curve["risk"] <= target_risk)
    if ok.size == 0:
        return 0.0, None
    return float(curve["coverage"][ok[-1]]), float(curve["threshold"][ok[-1]])


def risk_upper_bound(errors: np.ndarray, n: np.ndarray, delta: float = DELTA) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound on an error rate at confidence 1 - delta."""
    errors, n = np.asarray(errors, np.float64), np.asarray(n, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ub = stats.beta.ppf(1.0 - delta, errors + 1, np.maximum(n - errors, 1e-300))
    return np.where(errors >= n, 1.0, ub)


def choose_threshold(conf: np.ndarray, correct: np.ndarray, target_risk: float = TARGET_RISK,
                     delta: float = DELTA) -> dict:
    """The lowest confidence threshold whose decided windows' risk bound is <= target.

    Returns threshold, coverage, val_risk (empirical error among the kept windows),
    risk_bound, target_risk, n. Infeasible (too few windows, or too many errors
    even among the most confident): threshold 1.0, and what it keeps."""
    return _choose(conf, correct, target_risk, delta)[0]


def _choose(conf: np.ndarray, correct: np.ndarray, target_risk: float,
            delta: float) -> tuple[dict, float]:
    """(choose_threshold's answer, the lowest risk bound over every threshold)."""
    if not 0.0 < target_risk < 1.0 or not 0.0 < delta < 1.0:
        raise InputError(f"target_risk and delta must be in (0, 1); found {target_risk}, "
                         f"{delta}")
    conf = np.asarray(conf)
    curve, _ = risk_coverage(conf, correct)
    bound = risk_upper_bound(curve["errors"], curve["kept"], delta)
    ok = np.flatnonzero(bound <= target_risk)
    out = {"target_risk": float(target_risk), "n": int(conf.size)}
    if ok.size:
        k = ok[-1]
        return {**out, "threshold": float(curve["threshold"][k]),
                "coverage": float(curve["coverage"][k]), "val_risk": float(curve["risk"][k]),
                "risk_bound": float(bound[k])}, float(bound.min())
    sure = conf >= 1.0
    kept, errs = int(sure.sum()), int(np.sum(sure & ~np.asarray(correct, bool)))
    return {**out, "threshold": 1.0, "coverage": kept / conf.size,
            "val_risk": errs / kept if kept else 0.0,
            "risk_bound": float(risk_upper_bound(errs, kept, delta)) if kept else 1.0
            }, float(bound.min())


def fit_route_calibration(logits_by_route: Mapping[str, tuple[np.ndarray, np.ndarray]],
                          target_risk: float = TARGET_RISK, delta: float = DELTA
                          ) -> dict[str, dict]:
    """route -> contract entry (temperature, threshold, coverage, target_risk,
    val_risk, risk_bound, n), from each route's validation (logits [N, K], labels [N]).
    A temperature at the lower search bound (separable windows) is replaced by 1.
    Routes without windows are left out (the runtime then leaves them uncalibrated)."""
    out = {}
    for route, (logits, y) in logits_by_route.items():
        if len(y) == 0:
            log.warning("route %s has no validation windows: left uncalibrated", route)
            continue
        t = fit_temperature(logits, y)
        if t <= T_MIN * 1.01 or np.all(np.argmax(logits, axis=1) == y):
            # no errors (or only ones that sharpening hides): the NLL keeps falling as T
            # shrinks until every score is 1.0 and the ranking thresholds rely on is
            # lost. Such windows say nothing about over- or under-confidence: keep T = 1.
            log.warning("route %s: its %d validation windows are separable (no error, or "
                        "temperature at the bound %g); its temperature is left at 1",
                        route, len(y), T_MIN)
            t = 1.0
        conf, correct = top(calibrated_probs(logits, t), y)
        choice, best = _choose(conf, correct, target_risk, delta)
        if best > target_risk:
            log.warning("route %s: %d validation windows cannot show a risk <= %g (lowest "
                        "bound %.3g at confidence %g); it abstains unless certain", route,
                        choice["n"], target_risk, best, 1 - delta)
        out[route] = {"temperature": t, **choice}
    return out


def _thin(curve: dict, points: int = CURVE_POINTS) -> dict:
    idx = np.unique(np.linspace(0, curve["coverage"].size - 1, points).round().astype(int))
    return {k: v[idx].tolist() for k, v in curve.items()}


def condition_report(y: np.ndarray, probs: np.ndarray,
                     probs_uncalibrated: np.ndarray | None = None,
                     abstained: np.ndarray | None = None, target_risk: float = TARGET_RISK,
                     bins: int = N_BINS) -> dict:
    """What evaluate reports per condition: ece (and ece_uncalibrated), each with its
    noise floor (``ece_floor``, ``ece_floor_p90``, ``ece_uncalibrated_floor``), aurc,
    coverage_at_risk, the reliability table, the risk-coverage curve (at most
    CURVE_POINTS points), the coverage at each risk of TABLE_RISKS and the target
    (``coverage_by_risk``) and, given the runtime's abstentions, the share decided and
    the error among the decided windows (``risk_decided``; None if none decided)."""
    value, table = reliability(probs, y, bins)
    conf, correct = top(probs, y)
    curve, aurc = risk_coverage(conf, correct)
    coverage, threshold = coverage_at_risk(conf, correct, target_risk)
    floor, floor90 = ece_floor(probs, bins)
    rows = []
    for risk in sorted({*TABLE_RISKS, float(target_risk)}):
        c, t = coverage_at_risk(conf, correct, risk)
        rows.append({"risk": risk, "coverage": c, "threshold": t})
    out = {"n": int(conf.size), "ece": value, "ece_floor": floor, "ece_floor_p90": floor90,
           "aurc": aurc, "coverage_at_risk": coverage, "threshold_at_risk": threshold,
           "target_risk": float(target_risk), "reliability": table,
           "risk_coverage": _thin(curve), "coverage_by_risk": rows}
    if probs_uncalibrated is not None:
        out["ece_uncalibrated"] = ece(probs_uncalibrated, y, bins)
        out["ece_uncalibrated_floor"] = ece_floor(probs_uncalibrated, bins)[0]
    if abstained is not None:
        decided = ~np.asarray(abstained, bool)
        out["decided"] = float(decided.mean())
        out["risk_decided"] = float(np.mean(~correct[decided])) if decided.any() else None
    return out
