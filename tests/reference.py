"""Plain-numpy twins of the Numba kernels, slow and obvious on purpose."""
from __future__ import annotations

import numpy as np
from scipy.signal import sosfilt


def lowpass4(x: np.ndarray, sos: np.ndarray, zi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy's sosfilt run over the finite stretches; a non-finite sample gives NaN and
    restarts its channel's filter from a zero state."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    zi = zi.copy()
    for c in range(x.shape[1]):
        state = zi[:, c, :].copy()
        i = 0
        n = x.shape[0]
        while i < n:
            if not np.isfinite(x[i, c]):
                out[i, c] = np.nan
                state[:] = 0.0
                i += 1
                continue
            j = i
            while j < n and np.isfinite(x[j, c]):
                j += 1
            y, state = sosfilt(sos, x[i:j, c], zi=state)
            out[i:j, c] = y
            i = j
        zi[:, c, :] = state
    return out, zi


def resample(x, prev, prev_pos, has_prev, p0, step, g_lo, g_hi):
    """np.interp of one segment onto integer grid points [g_lo, g_hi).

    Returns {g: (values[ch], status)} for the grid points bracketed by data.
    """
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    pos = p0 + np.arange(n) * step
    if has_prev:
        pos = np.concatenate([[prev_pos], pos])
        x = np.concatenate([np.asarray(prev, np.float64)[None, :], x])
    result = {}
    if n == 0:
        return result
    for g in range(g_lo, g_hi):
        if g > pos[-1]:
            break
        if g < pos[0]:
            continue
        vals = np.array([np.interp(g, pos, x[:, c]) if np.all(np.isfinite(
            x[_bracket(pos, g), c])) else np.nan for c in range(x.shape[1])])
        ok = bool(np.all(np.isfinite(vals)))
        result[g] = (np.where(np.isfinite(vals), vals, 0.0), 1 if ok else 2)
    return result


def _bracket(pos: np.ndarray, g: float) -> list[int]:
    """Indices of the input samples that linear interpolation at g reads."""
    i = int(np.searchsorted(pos, g, side="right")) - 1
    i = min(max(i, 0), len(pos) - 1)
    if pos[i] == g or i == len(pos) - 1:
        return [i]
    return [i, i + 1]


def window_stats(values: np.ndarray, status: np.ndarray, full_scale: float):
    """values [ch, n] (ring order already unrolled), status [n]."""
    valid = status == 1
    n_valid = int(valid.sum())
    out = np.where(valid[None, :], values, 0.0).astype(np.float32)
    if n_valid == 0:
        return out, np.array([0, (status == 2).sum(), (status == 0).sum(), 0.0, 0.0, 0.0])
    ranges, runs = [], []
    for c in range(values.shape[0]):
        v = values[c]
        ranges.append(v[valid].max() - v[valid].min())
        best = run = 0
        for j in range(len(v)):
            if not valid[j]:
                run = 0
                continue
            same = j > 0 and valid[j - 1] and abs(v[j] - v[j - 1]) <= 1e-5 + 1e-6 * abs(v[j])
            run = run + 1 if same else 1
            best = max(best, run)
        runs.append(best)
    clip = 0.0
    if full_scale > 0:
        clip = (np.abs(values[:, valid]) >= 0.98 * full_scale).sum() / (n_valid * values.shape[0])
    return out, np.array([n_valid, (status == 2).sum(), (status == 0).sum(), min(ranges),
                          max(runs) / n_valid, clip])
