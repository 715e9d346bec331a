"""The aligner against a plain-numpy reference on adversarial streams (hypothesis):
rate drift, timestamp jitter, lost chunks (gaps), NaN bursts and reordering."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from edgefuse.runtime.aligner import Aligner, AlignerConfig
from edgefuse.runtime.chunk import Chunk
from tests.aligner_helpers import T0, contract

FS = 200.0      # model rate of the one modality under test
GAP_TOL = 3.0   # AlignerConfig.gap_tolerance


def reference_windows(chunks, rate, window_ns, hop_ns, n):
    """Per window index: (values [n], valid [n]) by np.interp over the delivered samples,
    never across a gap of more than GAP_TOL periods, NaN making its neighbours invalid."""
    times, values = [], []
    last = -np.inf
    for c in sorted(chunks, key=lambda c: c.t0_ns):
        t = (c.t0_ns - T0) / 1e9 + np.arange(c.n) / rate
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
        grid = (k * hop_ns + np.arange(n) * 1e9 / FS) / 1e9
        i = np.searchsorted(t, grid, side="right") - 1
        inside = (i >= 0) & (i < len(t) - 1) | (grid == t[-1])
        i = np.clip(i, 0, len(t) - 2)
        span_ok = (t[i + 1] - t[i]) <= GAP_TOL / rate * (1 + 1e-9)
        # A grid point on an input sample (within float rounding) reads that sample only.
        on_left = np.isclose(grid, t[i], rtol=0, atol=1e-9)
        on_right = np.isclose(grid, t[i + 1], rtol=0, atol=1e-9)
        both = np.isfinite(v[i]) & np.isfinite(v[i + 1])
        finite = np.where(on_left, np.isfinite(v[i]),
                          np.where(on_right, np.isfinite(v[i + 1]), both))
        vals = np.interp(grid, t, np.where(np.isfinite(v), v, 0.0))
        valid = inside & span_ok & finite
        # On a sample next to a NaN, whether the NaN is read depends on rounding.
        ambiguous = (on_left | on_right) & ~both
        out[k + T0 // hop_ns] = (np.where(valid, vals, 0.0), valid & ~ambiguous, ambiguous)
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       drift_ppm=st.floats(-5000, 5000),
       chunk_n=st.integers(8, 120),
       jitter=st.floats(0.0, 0.3),            # of one input period
       lost=st.lists(st.integers(0, 60), max_size=4),
       nan_chunks=st.lists(st.integers(0, 60), max_size=3),
       swaps=st.integers(0, 10))
def test_aligner_matches_reference(seed, drift_ppm, chunk_n, jitter, lost, nan_chunks, swaps):
    rng = np.random.default_rng(seed)
    rate = 400.0 * (1 + drift_ppm * 1e-6)
    total = int(rate * 8)
    x = rng.standard_normal(total).astype(np.float32)
    chunks = []
    for seq, lo in enumerate(range(0, total, chunk_n)):
        if seq in lost:
            continue
        vals = x[lo:lo + chunk_n].copy()
        if seq in nan_chunks:
            vals[len(vals) // 2] = np.nan
        j = int(round(rng.uniform(-jitter, jitter) * 1e9 / rate))
        t0 = T0 + int(round(lo * 1e9 / rate)) + j
        chunks.append(Chunk("n", "a", t0, rate, vals[:, None], seq))
    arrival = list(chunks)
    # Swap disjoint neighbour pairs: no chunk moves more than one place, which
    # keeps every displacement (< one 0.3 s chunk) inside the 0.5 s horizon.
    for i in sorted({2 * int(j) for j in rng.integers(0, max(1, len(arrival) // 2), swaps)}):
        if i + 1 < len(arrival):
            arrival[i], arrival[i + 1] = arrival[i + 1], arrival[i]
    c = contract(rates=(("a", 1, FS),))
    aligner = Aligner(c, AlignerConfig(antialias=False, gap_tolerance=GAP_TOL))
    windows = []
    for ch in arrival:
        windows += aligner.push(ch)
    windows += aligner.flush()

    idx = [w.index for w in windows]
    assert idx == sorted(set(idx)), "windows out of order or emitted twice"
    n = c.modality("a").samples(c.window_ns)
    ref = reference_windows(chunks, rate, c.window_ns, c.hop_ns, n)
    for w in windows:
        exp_vals, exp_valid, ambiguous = ref[w.index]
        cov = exp_valid.mean()
        slack = (2.0 + ambiguous.sum()) / n + 1e-9
        assert abs(w.coverage["a"] - cov) <= slack, (w.index, w.coverage["a"], cov)
        if w.present["a"]:
            np.testing.assert_allclose(w.data["a"][0][exp_valid], exp_vals[exp_valid],
                                       rtol=1e-4, atol=1e-4)
        elif cov < 0.9 - slack:
            assert w.missing_reason["a"] in ("gap", "nan")
