"""Is temperature scaling enough? Vector scaling (a scale and a bias per class) fitted
and compared with it on held-out folds (numpy, scipy). Training stores the comparison
per route in summary.json (models/route_calibration.py); the runtime applies only a
temperature (models/calibration.py)."""
from __future__ import annotations

import numpy as np
from scipy import optimize, special

from edgefuse.models.calibration import N_BINS, _checked, calibrated_probs, ece, fit_temperature


def fit_vector_scaling(logits: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(w, b) minimising the NLL of softmax(logits * w + b): a scale and a bias per class."""
    logits, y = _checked(logits, y)
    n, k = logits.shape
    onehot = np.eye(k)[y]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        z = logits * theta[:k] + theta[k:]
        logp = special.log_softmax(z, axis=1)
        g = (np.exp(logp) - onehot) / n
        return float(-np.sum(logp * onehot) / n), np.r_[(g * logits).sum(0), g.sum(0)]

    res = optimize.minimize(loss, np.r_[np.ones(k), np.zeros(k)], jac=True, method="L-BFGS-B")
    return res.x[:k], res.x[k:]


def compare_calibrators(logits: np.ndarray, y: np.ndarray, folds: int = 2, seed: int = 0,
                        groups: np.ndarray | None = None, bins: int = N_BINS) -> dict:
    """ECE and NLL of none / temperature / vector scaling, each fitted on the other
    folds and measured on the held-out fold (split by ``groups`` when given)."""
    logits, y = _checked(logits, y)
    keys = np.asarray(groups) if groups is not None else np.arange(y.size)
    uniq = np.unique(keys)
    fold_of = dict(zip(uniq, np.random.default_rng(seed).permutation(uniq.size) % folds))
    fold = np.array([fold_of[k] for k in keys])
    probs = {name: np.zeros(logits.shape, np.float32) for name in ("none", "temperature",
                                                                   "vector")}
    for f in range(folds):
        test, fit = fold == f, fold != f
        if not test.any() or not fit.any():
            continue
        probs["none"][test] = calibrated_probs(logits[test])
        probs["temperature"][test] = calibrated_probs(
            logits[test], fit_temperature(logits[fit], y[fit]))
        w, b = fit_vector_scaling(logits[fit], y[fit])
        probs["vector"][test] = calibrated_probs(logits[test] * w + b)
    done = probs["none"].sum(axis=1) > 0
    rows = np.arange(int(done.sum()))
    return {name: {"ece": ece(p[done], y[done], bins),
                   "nll": float(-np.mean(np.log(np.maximum(p[done][rows, y[done]], 1e-12))))}
            for name, p in probs.items()}
