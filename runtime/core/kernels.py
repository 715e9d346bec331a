"""Numba kernels of the aligner. Small, private, ``cache=True``, no fastmath.

Each has a plain-numpy twin in tests/reference.py (``TWINS``) and is compared
with it on random and adversarial input; tests/test_kernels.py fails on a kernel
without a twin, and runs each kernel's Python too (``py_func``). Compilation
happens on first call (never at import); ``warm_up()`` compiles them all before a
daemon reports ready.

Grid convention: a stream's output grid index g is the sample index on the
model's rate, counted from the stream's anchor. Input sample i of a segment
sits at the fractional grid position p0 + i * step (step = rate_out/rate_in).

Status codes of ring samples (``status`` arrays, uint8): STATUS_GAP (no data),
STATUS_VALID, STATUS_NONFINITE (the input there was NaN/inf). Numba reads these
module globals as compile-time constants.
"""
from __future__ import annotations

import math
import sys

import numpy as np
from numba import njit


def _import_numba_arraymath_without_scipy() -> None:
    """Import numba's array-math registry with scipy's BLAS hidden.

    Numba installs its lowering registries on the first call of any kernel, even
    one loaded from the cache, and numba.np.arraymath then imports scipy.linalg
    only to learn whether np.correlate/np.convolve may call BLAS (its only use of
    that flag; they fall back to a plain loop). scipy.linalg with its array-API
    layer and numpy.f2py is ~75 ms of every start, a tenth of the start-up of
    ``edgefuse replay``, for functions no kernel here uses. So the module is
    imported once, here, with ``scipy.linalg.cython_blas`` made unimportable for
    the duration; np.dot/np.linalg in other jitted code still find it later
    (numba imports it again when they compile). Nothing is hidden when
    scipy.linalg is already loaded (the flag then costs nothing).
    """
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return
    sys.modules["scipy.linalg.cython_blas"] = None  # type: ignore[assignment]  # -> ImportError
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        if sys.modules.get("scipy.linalg.cython_blas", 0) is None:
            del sys.modules["scipy.linalg.cython_blas"]


_import_numba_arraymath_without_scipy()

STATUS_GAP = 0        # no data
STATUS_VALID = 1
STATUS_NONFINITE = 2  # the input was NaN/inf; the value there is 0


@njit(cache=True)
def _lowpass4(x, out, sos, zi):
    """Order-4 IIR low-pass (two second-order sections, transposed DF-II as
    scipy.signal.sosfilt) of x [n, ch] into out [n, ch] float64.

    zi [2, ch, 2] is the filter state, updated. The sections are unrolled
    into scalars: the state then stays in registers (2x faster than a loop
    over sections, measured). A non-finite input sample passes through as
    NaN and resets its channel's state, so one bad sample cannot poison the
    filter forever.
    """
    n, ch = x.shape
    b00, b01, b02, a01, a02 = sos[0, 0], sos[0, 1], sos[0, 2], sos[0, 4], sos[0, 5]
    b10, b11, b12, a11, a12 = sos[1, 0], sos[1, 1], sos[1, 2], sos[1, 4], sos[1, 5]
    for c in range(ch):
        p0 = zi[0, c, 0]
        p1 = zi[0, c, 1]
        q0 = zi[1, c, 0]
        q1 = zi[1, c, 1]
        for i in range(n):
            v = np.float64(x[i, c])
            if not math.isfinite(v):
                p0 = 0.0
                p1 = 0.0
                q0 = 0.0
                q1 = 0.0
                out[i, c] = np.nan
                continue
            y = b00 * v + p0
            p0 = b01 * v - a01 * y + p1
            p1 = b02 * v - a02 * y
            w = b10 * y + q0
            q0 = b11 * y - a11 * w + q1
            q1 = b12 * y - a12 * w
            out[i, c] = w
        zi[0, c, 0] = p0
        zi[0, c, 1] = p1
        zi[1, c, 0] = q0
        zi[1, c, 1] = q1


@njit(cache=True)
def _resample_into(x, prev, prev_pos, has_prev, p0, step, g_lo, g_hi, ring, status):
    """Linear interpolation of one segment onto grid indices [g_lo, g_hi).

    x [n, ch] input; prev [ch] is the sample before x[0] at grid position
    prev_pos (used only when has_prev, to bridge chunk seams). ring [ch, cap]
    float32 / status [cap] uint8 receive the output at g % cap. Grid points
    not bracketed by two input samples are left untouched. Returns the number
    of grid points written.
    """
    n, ch = x.shape
    cap = ring.shape[1]
    written = 0
    if n == 0 or g_hi <= g_lo:
        return 0
    last_pos = p0 + (n - 1) * step
    inv_step = 1.0 / step
    k = g_lo % cap  # ring slot, advanced without a modulo per sample (it is slow)
    g = g_lo
    # 1. Points between the previous chunk's last sample and x[0]: the seam.
    while g < g_hi and g < p0:
        if has_prev and g >= prev_pos:
            span = p0 - prev_pos
            frac = (g - prev_pos) / span if span > 0.0 else 1.0
            ok = True
            for c in range(ch):
                v = prev[c] + (x[0, c] - prev[c]) * frac
                if math.isfinite(v):
                    ring[c, k] = v
                else:
                    ring[c, k] = 0.0
                    ok = False
            status[k] = STATUS_VALID if ok else STATUS_NONFINITE
            written += 1
        g += 1
        k += 1
        if k == cap:
            k = 0
    # 2. Points within x.
    g_end = min(g_hi, int(math.floor(last_pos)) + 1)
    if ch == 1:
        # One channel (acoustic, seismic): 1-D views and no channel loop, 1.5x faster.
        xs = x[:, 0]
        r = ring[0]
        for gg in range(g, g_end):
            t = (gg - p0) * inv_step
            i = int(t)
            if i >= n - 1:
                v = xs[n - 1]
            else:
                frac = t - i
                a = xs[i]
                v = a if frac == 0.0 else a + (xs[i + 1] - a) * frac
            if math.isfinite(v):
                r[k] = v
                status[k] = STATUS_VALID
            else:
                r[k] = 0.0
                status[k] = STATUS_NONFINITE
            k += 1
            if k == cap:
                k = 0
        return written + max(0, g_end - g)
    for gg in range(g, g_end):
        t = (gg - p0) * inv_step
        i = int(t)
        if i >= n - 1:
            i = n - 1
            frac = 0.0
        else:
            frac = t - i
        ok = True
        for c in range(ch):
            a = x[i, c]
            v = a if frac == 0.0 else a + (x[i + 1, c] - a) * frac
            if math.isfinite(v):
                ring[c, k] = v
            else:
                ring[c, k] = 0.0
                ok = False
        status[k] = STATUS_VALID if ok else STATUS_NONFINITE
        k += 1
        if k == cap:
            k = 0
    return written + max(0, g_end - g)


@njit(cache=True)
def _count_nonfinite(x):
    """Number of NaN/inf values in x [n, ch]."""
    count = 0
    for v in x.ravel():
        if not math.isfinite(v):
            count += 1
    return count


@njit(cache=True)
def _mark_gap(status, g_lo, g_hi):
    """Mark grid indices [g_lo, g_hi) as gap (no data) in the ring's status."""
    cap = status.shape[0]
    for g in range(g_lo, g_hi):
        status[g % cap] = STATUS_GAP


@njit(cache=True)
def _window_stats(ring, status, g_lo, n, full_scale, out, stats):
    """Copy window [g_lo, g_lo+n) of the ring into out [ch, n] and measure it.

    stats (float64[6]) receives: valid count, non-finite count, gap count,
    smallest per-channel range (max-min) over valid samples, longest run of a
    repeated value as a fraction of the valid count (max over channels), and
    the fraction of valid samples at >= 98 % of full scale (0 when
    full_scale <= 0, i.e. unknown). Samples that are not valid are 0 in out.
    """
    ch = ring.shape[0]
    cap = ring.shape[1]
    k0 = g_lo % cap
    n_valid = 0
    n_nonfinite = 0
    n_gap = 0
    k = k0
    for j in range(n):
        s = status[k]
        if s == STATUS_VALID:
            n_valid += 1
        elif s == STATUS_NONFINITE:
            n_nonfinite += 1
        else:
            n_gap += 1
        k += 1
        if k == cap:
            k = 0
    min_range = np.inf
    max_run = 0
    n_clip = 0
    clip_level = 0.98 * full_scale
    for c in range(ch):
        lo = np.inf
        hi = -np.inf
        run = 0
        have_last = False
        last = 0.0
        k = k0
        for j in range(n):
            if status[k] != STATUS_VALID:
                out[c, j] = 0.0
                have_last = False
                run = 0
            else:
                v = ring[c, k]
                out[c, j] = v
                if v < lo:
                    lo = v
                if v > hi:
                    hi = v
                if have_last and abs(v - last) <= 1e-5 + 1e-6 * abs(v):
                    run += 1
                else:
                    run = 1
                if run > max_run:
                    max_run = run
                last = v
                have_last = True
                if full_scale > 0.0 and abs(v) >= clip_level:
                    n_clip += 1
            k += 1
            if k == cap:
                k = 0
        if n_valid > 0 and hi - lo < min_range:
            min_range = hi - lo
    stats[0] = n_valid
    stats[1] = n_nonfinite
    stats[2] = n_gap
    stats[3] = min_range if n_valid > 0 else 0.0
    stats[4] = max_run / n_valid if n_valid > 0 else 0.0
    stats[5] = n_clip / (n_valid * ch) if n_valid > 0 else 0.0


def warm_up() -> None:
    """Compile (or load from the cache) every kernel with the types used at run time."""
    x = np.zeros((4, 1), np.float64)
    x32 = np.zeros((4, 1), np.float32)
    sos = np.array([[1.0, 0, 0, 1.0, 0, 0], [1.0, 0, 0, 1.0, 0, 0]])
    _lowpass4(x32, x, sos, np.zeros((2, 1, 2)))
    ring = np.zeros((1, 8), np.float32)
    status = np.zeros(8, np.uint8)
    for xin in (x, x32):
        _resample_into(xin, np.zeros(1), -1.0, True, 0.0, 1.0, np.int64(0), np.int64(4), ring,
                       status)
    _mark_gap(status, np.int64(0), np.int64(2))
    _count_nonfinite(x)
    _count_nonfinite(x32)
    _window_stats(ring, status, np.int64(0), 4, 0.0, np.zeros((1, 4), np.float32), np.zeros(6))
