"""Plain-numpy twins of the Numba kernels and of the aligner, slow and obvious on
purpose. tests/test_kernels.py compares every kernel of runtime/core/kernels.py with
its twin here (``TWINS``) on random and edge-case input; tests/test_aligner_property.py
compares the aligner's windows with ``aligned_windows``."""
from __future__ import annotations

import numpy as np
from scipy.signal import sosfilt

from edgefuse.runtime.core.kernels import STATUS_GAP, STATUS_NONFINITE, STATUS_VALID


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
        result[g] = (np.where(np.isfinite(vals), vals, 0.0),
                     STATUS_VALID if ok else STATUS_NONFINITE)
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
    valid = status == STATUS_VALID
    n_nonfinite = (status == STATUS_NONFINITE).sum()
    n_gap = (status == STATUS_GAP).sum()
    n_valid = int(valid.sum())
    out = np.where(valid[None, :], values, 0.0).astype(np.float32)
    if n_valid == 0:
        return out, np.array([0, n_nonfinite, n_gap, 0.0, 0.0, 0.0])
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
    return out, np.array([n_valid, n_nonfinite, n_gap, min(ranges), max(runs) / n_valid, clip])


def mark_gap(status: np.ndarray, g_lo: int, g_hi: int) -> np.ndarray:
    """A copy of the ring's status with grid indices [g_lo, g_hi) marked as gap."""
    out = status.copy()
    out[np.arange(g_lo, g_hi) % len(out)] = STATUS_GAP
    return out


def count_nonfinite(x: np.ndarray) -> int:
    """Number of NaN/inf values in x."""
    return int((~np.isfinite(x)).sum())


# kernel name in runtime/core/kernels.py -> its twin here
TWINS = {"_lowpass4": lowpass4, "_resample_into": resample, "_window_stats": window_stats,
         "_mark_gap": mark_gap, "_count_nonfinite": count_nonfinite}


def aligned_windows(chunks, rate: float, *, grid_hz: float, hop_ns: int, n: int,
                    gap_tolerance: float, origin_ns: int) -> dict:
    """The aligner's twin for one single-channel modality sent at ``rate`` and sampled
    by the model at ``grid_hz``: per window index, (values [n], valid [n], ambiguous
    [n]) by np.interp over the delivered samples, never across a gap of more than
    gap_tolerance input periods, NaN making its neighbours invalid. Times are taken
    relative to origin_ns (a multiple of hop_ns) so that float seconds stay exact."""
    times, values = [], []
    last = -np.inf
    for c in sorted(chunks, key=lambda c: c.t0_ns):
        t = (c.t0_ns - origin_ns) / 1e9 + np.arange(c.n) / rate
        keep = t > last + 1e-12
        times.append(t[keep])
        values.append(c.samples[keep, 0].astype(np.float64))
        if keep.any():
            last = t[keep][-1]
    t = np.concatenate(times)
    v = np.concatenate(values)
    out = {}
    first_k = int(np.ceil(t[0] * 1e9 / hop_ns))
    for k in range(first_k, int(t[-1] * 1e9 // hop_ns) + 1):
        grid = (k * hop_ns + np.arange(n) * 1e9 / grid_hz) / 1e9
        i = np.searchsorted(t, grid, side="right") - 1
        inside = (i >= 0) & (i < len(t) - 1) | (grid == t[-1])
        i = np.clip(i, 0, len(t) - 2)
        span_ok = (t[i + 1] - t[i]) <= gap_tolerance / rate * (1 + 1e-9)
        # A grid point on an input sample (within float rounding) reads that sample only.
        on_left = np.isclose(grid, t[i], rtol=0, atol=1e-9)
        on_right = np.isclose(grid, t[i + 1], rtol=0, atol=1e-9)
        both = np.isfinite(v[i]) & np.isfinite(v[i + 1])
        finite = np.where(on_left, np.isfinite(v[i]),
                          np.where(on_right, np.isfinite(v[i + 1]), both))
        vals = np.interp(grid, t, np.where(np.isfinite(v), v, 0.0))
        valid = inside & span_ok & finite
        # On a sample next to a NaN, whether the NaN is read depends on rounding; so
        # does, on the last sample before a gap (or the first after it), whether the
        # point is on the sample (valid) or just past it (a gap).
        ambiguous = (on_left | on_right) & (~both | ~span_ok)
        out[k + origin_ns // hop_ns] = (np.where(valid, vals, 0.0), valid & ~ambiguous,
                                        ambiguous)
    return out
