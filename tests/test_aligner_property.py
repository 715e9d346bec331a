"""The aligner against its plain-numpy twin (tests/reference.py) on adversarial streams
(hypothesis): rate drift, timestamp jitter, lost chunks (gaps), NaN bursts and
reordering; and under hostile rates and times (issue 8): no exception, no hang, other
nodes untouched."""
from __future__ import annotations

import signal
import time

import numpy as np
from hypothesis import given, settings, strategies as st

from edgefuse.runtime.core.aligner import Aligner, AlignerConfig
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import InputError
from tests import reference
from tests.aligner_helpers import T0, by_time, contract, stream_chunks

FS = 200.0      # model rate of the one modality under test
GAP_TOL = 3.0   # AlignerConfig.gap_tolerance


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
    ref = reference.aligned_windows(chunks, rate, grid_hz=FS, hop_ns=c.hop_ns, n=n,
                                    gap_tolerance=GAP_TOL, origin_ns=T0)
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


# --- hostile rates and times (issue 8) ---------------------------------------
HOSTILE_CONTRACT = contract(rates=(("acoustic", 1, 4934.0), ("seismic", 1, 800.0)))
HANG_S = 2.0  # per push: a hang guard, not a performance bound (a push takes ms)

hostile_rates = st.one_of(
    st.none(),
    st.floats(),                                   # nan, inf, subnormal, negative, huge
    st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([5e-324, 1e-300, 1e-5, 1e-3, 7.99, 8.0, 799.7, 4934.0, 8e5, 4.934e6,
                     9.999e6, 1e7]),
    st.floats(1e-3, 1e7, exclude_max=True))        # what Chunk accepts
hostile_t0s = st.one_of(
    st.integers(-(1 << 64), 1 << 64),
    st.floats(),
    st.sampled_from([0, -1, (1 << 62) - 1, 1 << 62, T0 + 10**18, T0 - 10**18]),
    st.integers(T0 - 10**10, T0 + 10**10),         # near the good stream
    st.none())


def _good_node_chunks():
    a, _ = stream_chunks("good", "acoustic", 4935.1, 5.0, 2467, seed=1)
    s, _ = stream_chunks("good", "seismic", 799.7, 5.0, 400, t0=T0 + 1_234_567, seed=2)
    return by_time(a, s)


GOOD = _good_node_chunks()


def _pushed(aligner, chunk):
    """aligner.push(chunk) (flush() for None) under a SIGALRM hang guard."""
    def expired(*_):
        raise TimeoutError(f"push of {chunk!r:.200} took more than {HANG_S} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, HANG_S)
    t = time.monotonic()
    try:
        out = aligner.push(chunk) if chunk is not None else aligner.flush()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.monotonic() - t < HANG_S
    return out


def _run_with_inserts(inserts: dict[int, list[Chunk]]) -> list:
    """The good node's chunks with inserts[i] pushed before GOOD[i]; every window."""
    aligner = Aligner(HOSTILE_CONTRACT)
    windows = []
    for i in range(len(GOOD) + 1):
        for chunk in inserts.get(i, []):
            windows += _pushed(aligner, chunk)
        if i < len(GOOD):
            windows += _pushed(aligner, GOOD[i])
    return windows + _pushed(aligner, None)


@settings(max_examples=150, deadline=None)
@given(hostile=st.lists(st.tuples(st.sampled_from(["evil", "good", "evil2"]),
                                  st.sampled_from(["acoustic", "seismic"]),
                                  hostile_t0s, hostile_rates,
                                  st.integers(0, 40), st.integers(-(1 << 63), (1 << 63) - 1),
                                  st.booleans(), st.integers(0, len(GOOD))),
                        max_size=12))
def test_hostile_rates_and_times_never_crash_hang_or_disturb_other_nodes(hostile):
    """Arbitrary rates (None, nan, inf, subnormal, negative, huge) and times, mixed
    into a good node's stream: Chunk construction may refuse them (InputError, the
    documented refusal); the aligner never raises, never takes over 2 s a push, and
    the good node's windows equal those of a run without the hostile chunks. (Drawn
    for the name "good", a chunk goes to "evil": the next test sends hostile chunks
    in the good node's own name.)"""
    clean = Aligner(HOSTILE_CONTRACT)
    expected = [w for c in GOOD for w in clean.push(c)] + clean.flush()
    inserts: dict[int, list[Chunk]] = {}
    for node, modality, t0, rate, n, seq, nominal, at in hostile:
        try:
            chunk = Chunk("evil" if node == "good" else node, modality, t0, rate,
                          np.full((n, 1), 3.0, np.float32), seq, rate_is_nominal=nominal)
        except InputError:
            continue
        inserts.setdefault(at, []).append(chunk)
    windows = _run_with_inserts(inserts)
    got = [w for w in windows if w.node == "good"]
    assert [w.index for w in got] == [w.index for w in expected]
    for x, y in zip(got, expected):
        assert x.missing_reason == y.missing_reason and x.coverage == y.coverage
        for m in x.data:
            np.testing.assert_array_equal(x.data[m], y.data[m])
    for node in ("evil", "evil2"):
        idx = [w.index for w in windows if w.node == node]
        assert idx == sorted(set(idx)), "a hostile node's windows out of order or repeated"


@settings(max_examples=100, deadline=None)
@given(hostile=st.lists(st.tuples(st.sampled_from(["acoustic", "seismic"]), hostile_t0s,
                                  hostile_rates, st.integers(0, 40),
                                  st.integers(-(1 << 63), (1 << 63) - 1),
                                  st.integers(0, len(GOOD))),
                        max_size=8))
def test_hostile_chunks_in_a_good_nodes_own_name_never_crash_or_hang(hostile):
    """The same chunks under the good node's own name: they may cost that node data
    (a far-future chunk with the next seq is a gap, then data), but nothing raises or
    hangs, and its windows stay in order, each index once."""
    inserts: dict[int, list[Chunk]] = {}
    for modality, t0, rate, n, seq, at in hostile:
        try:
            chunk = Chunk("good", modality, t0, rate, np.full((n, 1), 3.0, np.float32), seq)
        except InputError:
            continue
        inserts.setdefault(at, []).append(chunk)
    windows = _run_with_inserts(inserts)
    idx = [w.index for w in windows]
    assert idx == sorted(set(idx))


class _SteppingAligner(Aligner):
    """The aligner without its fast-forward: steps over empty windows one by one."""

    def _next_data_k(self, node, k):
        return -(1 << 80)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       segments=st.lists(st.tuples(st.sampled_from(["acoustic", "seismic", "both"]),
                                   st.floats(0.0, 40.0),     # silence before it, s
                                   st.floats(0.2, 6.0)),     # its length, s
                         min_size=1, max_size=6),
       late_start=st.floats(0.0, 20.0))
def test_skipping_empty_windows_in_one_step_changes_no_window(seed, segments, late_start):
    """Gaps of up to 40 s in either modality, one modality starting late: the aligner
    that jumps over windows without data emits exactly the windows (and data) of one
    that visits every window."""
    rng = np.random.default_rng(seed)
    chunks = []
    t = T0
    seqs = {"acoustic": 0, "seismic": 0}
    for which, silence, length in segments:
        t += int(silence * 1e9)
        for modality, rate, per in (("acoustic", 4935.1, 1234), ("seismic", 799.7, 200)):
            if which not in (modality, "both"):
                continue
            start = t + (int(late_start * 1e9) if modality == "seismic" else 0)
            part, _ = stream_chunks("n", modality, rate, length, per, t0=start,
                                    seed=int(rng.integers(1 << 30)))
            for c in part:
                chunks.append(Chunk("n", modality, c.t0_ns, c.rate_hz, c.samples,
                                    seqs[modality]))
                seqs[modality] += 1
        t += int(length * 1e9)
    chunks.sort(key=lambda c: (c.t0_ns, c.modality))
    runs = []
    for cls in (Aligner, _SteppingAligner):
        aligner = cls(HOSTILE_CONTRACT)
        runs.append([w for c in chunks for w in aligner.push(c)] + aligner.flush())
    fast, slow = runs
    assert [w.index for w in fast] == [w.index for w in slow]
    for x, y in zip(fast, slow):
        assert (x.present, x.missing_reason, x.coverage) == (y.present, y.missing_reason,
                                                             y.coverage)
        for m in x.data:
            np.testing.assert_array_equal(x.data[m], y.data[m])
