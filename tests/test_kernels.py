"""Numba kernels against their plain-numpy twins (tests/reference.py): every kernel of
runtime/core/kernels.py is private, cached, free of fastmath and compared with its twin
on random and edge-case input, compiled and as plain Python (its ``py_func``)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.signal import butter

from edgefuse.runtime.core import kernels
from tests import reference as ref

SOS = butter(4, 0.45 * 4000, fs=9868.0, output="sos")


def _with_nonfinite(rng, x, frac):
    x = x.copy()
    mask = rng.random(x.shape) < frac
    x[mask] = rng.choice([np.nan, np.inf, -np.inf], size=int(mask.sum()))
    return x


@pytest.mark.parametrize("n,ch,bad", [(0, 1, 0.0), (1, 1, 0.0), (500, 1, 0.0), (300, 6, 0.0),
                                      (400, 2, 0.02), (50, 1, 1.0)])
def test_lowpass4_matches_sosfilt(n, ch, bad):
    rng = np.random.default_rng(n + ch)
    x = _with_nonfinite(rng, rng.standard_normal((n, ch)).astype(np.float32) * 100, bad)
    zi = rng.standard_normal((2, ch, 2))
    out = np.empty((n, ch))
    zi_kernel = zi.copy()
    kernels._lowpass4(x, out, SOS, zi_kernel)
    expected, zi_ref = ref.lowpass4(x, SOS, zi)
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(zi_kernel, zi_ref, rtol=1e-9, atol=1e-9)


def test_lowpass4_state_carries_across_calls():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1000, 1)).astype(np.float32)
    whole = np.empty((1000, 1))
    kernels._lowpass4(x, whole, SOS, np.zeros((2, 1, 2)))
    zi = np.zeros((2, 1, 2))
    parts = [np.empty((n, 1)) for n in (1, 333, 666)]
    for part, (lo, hi) in zip(parts, [(0, 1), (1, 334), (334, 1000)]):
        kernels._lowpass4(x[lo:hi], part, SOS, zi)
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-12, atol=1e-12)


def _ring_to_dict(ring, status, g_lo, g_hi, touched):
    cap = ring.shape[1]
    return {g: (ring[:, g % cap].astype(np.float64), int(status[g % cap]))
            for g in range(g_lo, g_hi) if touched[g % cap]}


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 60), ch=st.integers(1, 3), step=st.floats(0.05, 4.0),
       p0=st.floats(-5.0, 20.0), has_prev=st.booleans(), prev_gap=st.floats(0.01, 3.0),
       g_lo=st.integers(-10, 10), span=st.integers(0, 120), cap=st.integers(8, 300),
       bad=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**31 - 1),
       f32=st.booleans())
def test_resample_matches_np_interp(n, ch, step, p0, has_prev, prev_gap, g_lo, span, cap, bad,
                                    seed, f32):
    rng = np.random.default_rng(seed)
    x = _with_nonfinite(rng, rng.standard_normal((n, ch)) * 10, bad)
    if f32:
        x = x.astype(np.float32)
    prev = rng.standard_normal(ch) * 10
    prev_pos = p0 - prev_gap
    g_hi = g_lo + min(span, cap)
    ring = np.full((ch, cap), -999.0, np.float32)
    status = np.full(cap, 9, np.uint8)
    written = kernels._resample_into(x, prev, prev_pos, has_prev, p0, step, np.int64(g_lo),
                                     np.int64(g_hi), ring, status)
    expected = ref.resample(x, prev, prev_pos, has_prev, p0, step, g_lo, g_hi)
    got = _ring_to_dict(ring, status, g_lo, g_hi, status != 9)
    assert written == len(got)
    assert set(got) == set(expected)
    positions = np.concatenate([[prev_pos] if has_prev else [], p0 + np.arange(n) * step])
    for g, (vals, stat) in expected.items():
        near_hit = positions.size and np.min(np.abs(positions - g)) < 1e-6
        if near_hit:
            continue  # which neighbour an exact hit reads is a rounding matter
        assert got[g][1] == stat, g
        np.testing.assert_allclose(got[g][0], vals, rtol=1e-4, atol=1e-3)


@settings(max_examples=100, deadline=None)
@given(ch=st.integers(1, 4), n=st.integers(1, 80), cap=st.integers(1, 200),
       g_lo=st.integers(-500, 500), seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["random", "flat", "stuck", "clipped", "gappy"]),
       full_scale=st.sampled_from([0.0, 10.0]))
def test_window_stats_matches_reference(ch, n, cap, g_lo, seed, kind, full_scale):
    cap = max(cap, n)
    rng = np.random.default_rng(seed)
    ring = (rng.standard_normal((ch, cap)) * 5).astype(np.float32)
    status = rng.choice([0, 1, 2], size=cap, p=[0.1, 0.8, 0.1]).astype(np.uint8)
    if kind == "flat":
        ring[:] = 3.0
    elif kind == "stuck":
        ring[:, : cap // 2 + 1] = 7.0
        status[:] = 1
    elif kind == "clipped":
        ring[:, ::3] = 10.0
    elif kind == "gappy":
        status[:] = 0
    out = np.full((ch, n), -1.0, np.float32)
    stats = np.zeros(6)
    kernels._window_stats(ring, status, np.int64(g_lo), n, full_scale, out, stats)
    idx = (g_lo + np.arange(n)) % cap
    exp_out, exp_stats = ref.window_stats(ring[:, idx].astype(np.float64), status[idx], full_scale)
    np.testing.assert_allclose(out, exp_out, rtol=0, atol=0)
    np.testing.assert_allclose(stats, exp_stats, rtol=1e-9, atol=1e-9)


def test_mark_gap_wraps():
    status = np.ones(10, np.uint8)
    kernels._mark_gap(status, np.int64(8), np.int64(13))
    assert status.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 0, 0]


@pytest.mark.parametrize("shape,bad", [((0, 1), 0.0), ((100, 1), 0.0), ((50, 6), 0.2),
                                       ((7, 2), 1.0)])
def test_count_nonfinite_matches_numpy(shape, bad):
    rng = np.random.default_rng(shape[0])
    x = _with_nonfinite(rng, rng.standard_normal(shape), bad)
    for arr in (x, x.astype(np.float32)):
        assert kernels._count_nonfinite(arr) == int((~np.isfinite(arr)).sum())


@settings(max_examples=100, deadline=None)
@given(cap=st.integers(1, 64), g_lo=st.integers(-100, 200), span=st.integers(-3, 200),
       seed=st.integers(0, 2**31 - 1))
def test_mark_gap_matches_reference(cap, g_lo, span, seed):
    """Any range, empty, reversed or longer than the ring (it wraps more than once)."""
    rng = np.random.default_rng(seed)
    status = rng.choice([kernels.STATUS_GAP, kernels.STATUS_VALID, kernels.STATUS_NONFINITE],
                        size=cap).astype(np.uint8)
    expected = ref.mark_gap(status, g_lo, g_lo + span)
    kernels._mark_gap(status, np.int64(g_lo), np.int64(g_lo + span))
    np.testing.assert_array_equal(status, expected)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 300), ch=st.integers(1, 6), bad=st.sampled_from([0.0, 0.05, 1.0]),
       f32=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_count_nonfinite_matches_reference(n, ch, bad, f32, strided, seed):
    """Empty, all-bad and non-contiguous input (a sliced chunk) included."""
    rng = np.random.default_rng(seed)
    x = _with_nonfinite(rng, rng.standard_normal((2 * n if strided else n, ch)), bad)
    if strided:
        x = x[::2]
    if f32:
        x = x.astype(np.float32)
    assert kernels._count_nonfinite(x) == ref.count_nonfinite(x)


def _kernels() -> dict:
    from numba.core.dispatcher import Dispatcher
    return {name: f for name, f in vars(kernels).items() if isinstance(f, Dispatcher)}


def test_every_kernel_is_private_cached_without_fastmath_small_and_has_a_twin():
    from numba.core.caching import NullCache
    found = _kernels()
    assert set(found) == set(ref.TWINS), ("every kernel needs a twin in tests/reference.py "
                                          "(TWINS) and a test here comparing them")
    for name, kernel in found.items():
        assert name.startswith("_"), f"{name}: kernels are private; wrap them in a checked API"
        assert not isinstance(kernel._cache, NullCache), f"{name}: use @njit(cache=True)"
        assert not kernel.targetoptions.get("fastmath"), f"{name}: fastmath breaks NaN checks"
        lines = len(inspect.getsource(kernel.py_func).splitlines())
        assert lines <= 100, f"{name} is {lines} lines: split it (small enough to review)"


def _python_path_cases():
    """kernel name -> a function giving the arguments of one small call (fresh arrays
    each time, so the compiled and the Python run write to their own)."""
    rng = np.random.default_rng(7)
    x = _with_nonfinite(rng, rng.standard_normal((40, 2)), 0.1).astype(np.float32)
    ring = (rng.standard_normal((2, 30)) * 5).astype(np.float32)
    status = rng.choice([0, 1, 2], size=30).astype(np.uint8)
    return {
        "_lowpass4": lambda: (x, np.empty((40, 2)), SOS, np.zeros((2, 2, 2))),
        "_resample_into": lambda: (x, np.ones(2), -0.7, True, 0.0, 0.6, np.int64(-1),
                                   np.int64(25), np.zeros((2, 30), np.float32),
                                   np.zeros(30, np.uint8)),
        "_window_stats": lambda: (ring, status.copy(), np.int64(17), 25, 4.0,
                                  np.zeros((2, 25), np.float32), np.zeros(6)),
        "_mark_gap": lambda: (status.copy(), np.int64(25), np.int64(70)),
        "_count_nonfinite": lambda: (x,),
    }


@pytest.mark.parametrize("name", sorted(ref.TWINS))
def test_compiled_kernel_equals_its_python_path(name):
    """The kernel's own Python (what NUMBA_DISABLE_JIT=1 runs, and a coverage run
    sees) gives what the compiled kernel gives, outputs and returned value alike."""
    make = _python_path_cases()[name]
    kernel = _kernels()[name]
    compiled_args, python_args = make(), make()
    got = kernel(*compiled_args)
    with np.errstate(all="ignore"):  # inf - inf in numpy scalars warns; compiled it does not
        expected = kernel.py_func(*python_args)
    assert got == expected
    for a, b in zip(compiled_args, python_args):
        if isinstance(a, np.ndarray):
            # float32 arithmetic stays float32 in plain numpy, compiled it is float64:
            # the two differ in float32 rounding, not in logic
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("cutoff,rate", [(0.45 * 4934, 9866.44), (360.0, 1605.23),
                                         (0.45 * 800, 1528.3), (10.0, 1000.0)])
def test_butterworth_design_matches_scipy(cutoff, rate):
    from edgefuse.runtime.core.filters import butter4_lowpass_sos
    from scipy.signal import sosfilt
    ours = butter4_lowpass_sos(cutoff, rate)
    np.testing.assert_allclose(ours, butter(4, cutoff, fs=rate, output="sos"), atol=1e-12)
    x = np.random.default_rng(0).standard_normal(2000)
    np.testing.assert_allclose(sosfilt(ours, x), sosfilt(butter(4, cutoff, fs=rate,
                                                                 output="sos"), x), atol=1e-10)


def test_butterworth_design_refuses_bad_cutoff():
    from edgefuse.runtime.core.filters import butter4_lowpass_sos
    with pytest.raises(ValueError, match="cutoff"):
        butter4_lowpass_sos(600.0, 1000.0)


@pytest.mark.parametrize("cutoff,rate", [(360.0, 1600.0), (2220.3, 9868.0), (45.0, 200.0),
                                         (360.0, 888.0), (90.0, 4000.0)])
def test_lowpass_delay_is_the_low_frequency_group_delay(cutoff, rate):
    """filters.lowpass_delay_samples (the placement shift when decimating) against
    scipy's group delay near 0 Hz and the centroid of the impulse response."""
    from scipy.signal import group_delay, sosfilt
    from edgefuse.runtime.core.filters import butter4_lowpass_sos, lowpass_delay_samples
    sos = butter4_lowpass_sos(cutoff, rate)
    delay = lowpass_delay_samples(sos)
    b, a = np.array([1.0]), np.array([1.0])
    for row in sos:
        b, a = np.convolve(b, row[:3]), np.convolve(a, row[3:])
    _, gd = group_delay((b, a), w=[1e-4])
    assert delay == pytest.approx(gd[0], rel=1e-4)
    h = sosfilt(sos, np.r_[1.0, np.zeros(20000)])
    assert delay == pytest.approx((np.arange(h.size) * h).sum() / h.sum(), rel=1e-6)
