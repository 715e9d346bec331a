"""The aligner: ordering, gaps, duplicates, reordering, quality, drift, bounds."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from edgefuse.runtime.core.aligner import Aligner, AlignerConfig
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import ConfigError
from tests.aligner_helpers import T0, by_time, contract, run, stream_chunks

NO_AA = AlignerConfig(antialias=False)


def _reference_window(values, rate, t0_ns, start_ns, fs, n):
    """np.interp of the stream onto a window's grid (the plain-numpy reference)."""
    t_in = (t0_ns - start_ns) / 1e9 + np.arange(values.shape[0]) / rate
    t_out = np.arange(n) / fs
    return np.stack([np.interp(t_out, t_in, values[:, c]) for c in range(values.shape[1])])


def test_windows_match_np_interp_and_are_ordered():
    c = contract()
    a_chunks, a_vals = stream_chunks("n", "a", 401.3, 6.0, 97, seed=1)
    s_chunks, s_vals = stream_chunks("n", "s", 100.7, 6.0, 23, seed=2)
    windows = run(Aligner(c, NO_AA), by_time(a_chunks, s_chunks))
    assert [w.index for w in windows] == sorted({w.index for w in windows})
    assert len(windows) >= 9
    for w in windows:
        assert w.end_ns - w.start_ns == c.window_ns and w.start_ns % c.hop_ns == 0
        assert all(w.present.values()), w.missing_reason
        for name, vals, rate in (("a", a_vals, 401.3), ("s", s_vals, 100.7)):
            spec = c.modality(name)
            expected = _reference_window(vals, rate, T0, w.start_ns, spec.rate_hz,
                                         spec.samples(c.window_ns))
            np.testing.assert_allclose(w.data[name], expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), chunk_n=st.integers(5, 200), swaps=st.integers(0, 30))
def test_reordering_within_horizon_gives_identical_windows(seed, chunk_n, swaps):
    c = contract()
    a, _ = stream_chunks("n", "a", 399.1, 5.0, chunk_n, seed=seed)
    s, _ = stream_chunks("n", "s", 100.2, 5.0, max(1, chunk_n // 4), seed=seed + 1)
    in_order = by_time(a, s)
    shuffled = list(in_order)
    rng = np.random.default_rng(seed)
    # Swap disjoint neighbour pairs: no chunk moves more than one place, so every
    # displacement (< one 0.5 s chunk at most) stays inside the 0.5 s horizon.
    for i in sorted({2 * int(j) for j in rng.integers(0, len(shuffled) // 2, swaps)}):
        if i + 1 < len(shuffled):
            shuffled[i], shuffled[i + 1] = shuffled[i + 1], shuffled[i]
    w1 = run(Aligner(c, NO_AA), in_order)
    w2 = run(Aligner(c, NO_AA), shuffled)
    assert [w.index for w in w1] == [w.index for w in w2]
    for x, y in zip(w1, w2):
        assert x.missing_reason == y.missing_reason
        for m in x.data:
            np.testing.assert_array_equal(x.data[m], y.data[m])


def test_duplicates_are_counted_and_change_nothing():
    c = contract()
    a, _ = stream_chunks("n", "a", 400.0, 4.0, 50)
    s, _ = stream_chunks("n", "s", 100.0, 4.0, 20)
    clean = run(Aligner(c), by_time(a, s))
    aligner = Aligner(c)
    dup = run(aligner, by_time(a, s, a[3:6], s[:2]))
    assert [w.index for w in clean] == [w.index for w in dup]
    for x, y in zip(clean, dup):
        for m in x.data:
            np.testing.assert_array_equal(x.data[m], y.data[m])
    streams = aligner.stats()["streams"]
    assert streams["n/a"]["duplicates"] + streams["n/a"]["late"] == 3
    assert streams["n/s"]["duplicates"] + streams["n/s"]["late"] == 2


def test_gap_makes_modality_missing_only_around_the_gap():
    c = contract()
    a, _ = stream_chunks("n", "a", 400.0, 10.0, 40)          # 0.1 s chunks
    s, _ = stream_chunks("n", "s", 100.0, 10.0, 10)
    a = a[:40] + a[55:]                                          # 1.5 s lost from t=4 s
    aligner = Aligner(c)
    windows = run(aligner, by_time(a, s))
    gap_lo, gap_hi = T0 + 4_000_000_000, T0 + 5_500_000_000
    for w in windows:
        overlaps = w.start_ns < gap_hi and w.end_ns > gap_lo
        assert w.present["s"]
        if overlaps:
            assert not w.present["a"] and w.missing_reason["a"] == "gap"
        else:
            assert w.present["a"], (w.index, w.missing_reason)
    assert aligner.stats()["streams"]["n/a"]["gaps"] == 1


def test_unusable_signals_get_their_reason():
    c = contract()
    n = 400 * 3
    t = np.arange(n) / 400.0
    cases = {
        "nan": np.where(t > 0.0, np.nan, 0.0),
        "flatline": np.full(n, 5.0),
        "stuck": np.where((t % 1.0) < 0.96, 12.0, np.sin(2 * np.pi * 7 * t)),
        "clipped": np.clip(40000 * np.sin(2 * np.pi * 5 * t), -32767, 32767),
    }
    for reason, signal in cases.items():
        chunks = [Chunk("n", "a", T0 + i * 250_000_000, 400.0,
                        signal[i * 100:(i + 1) * 100, None], i, full_scale=32767.0)
                  for i in range(12)]
        s, _ = stream_chunks("n", "s", 100.0, 3.0, 25)
        windows = run(Aligner(c, NO_AA), by_time(chunks, s))
        assert windows, reason
        assert any(w.missing_reason.get("a") == reason for w in windows), \
            (reason, [w.missing_reason for w in windows])
        assert all(w.present["s"] for w in windows)


def test_silent_modality_becomes_missing_then_returns():
    c = contract()
    a, _ = stream_chunks("n", "a", 400.0, 20.0, 40)
    s, _ = stream_chunks("n", "s", 100.0, 20.0, 10)
    s = [x for x in s if not (T0 + 5e9 <= x.t0_ns < T0 + 12e9)]  # seismic silent 7 s
    windows = run(Aligner(c), by_time(a, s))
    missing = [w.index for w in windows if not w.present["s"]]
    assert missing and all(w.present["a"] for w in windows)
    back = [w for w in windows if w.start_ns >= T0 + 12.5e9]
    assert back and all(w.present["s"] for w in back)


def test_late_chunk_past_watermark_is_counted_not_fatal():
    c = contract()
    a, _ = stream_chunks("n", "a", 400.0, 6.0, 40)
    late = a.pop(10)
    aligner = Aligner(c, AlignerConfig(reorder_horizon_ns=200_000_000))
    windows = run(aligner, a[:30] + [late] + a[30:])
    assert windows
    st_ = aligner.stats()["streams"]["n/a"]
    assert st_["late"] + st_["duplicates"] == 1 and st_["gaps"] == 1


def test_rate_is_estimated_when_unknown_and_drift_reported():
    c = contract()
    a, _ = stream_chunks("n", "a", 401.2, 8.0, 100, give_rate=False)
    aligner = Aligner(c)
    windows = run(aligner, a)
    st_ = aligner.stats()["streams"]["n/a"]
    assert st_["rate_estimated"] and abs(st_["rate_hz"] - 401.2) < 0.05
    # nothing nominal given: the estimate's drift against the model's grid rate (issue 11)
    assert st_["drift_vs"] == "grid" and abs(st_["drift_ppm"] - 3000.0) < 150
    assert len(windows) >= 13
    # A sender that declares 400 Hz as nominal while running at 401.2 Hz: 3000 ppm.
    nominal = [Chunk(x.node, x.modality, x.t0_ns, 400.0, x.samples, x.seq, rate_is_nominal=True)
               for x in a]
    aligner = Aligner(c)
    run(aligner, nominal)
    st_ = aligner.stats()["streams"]["n/a"]
    assert st_["rate_estimated"] and abs(st_["rate_hz"] - 401.2) < 0.05
    assert st_["drift_vs"] == "nominal" and abs(st_["drift_ppm"] - 3000.0) < 150


def test_drifting_streams_stay_aligned():
    """An impulse seen by both sensors at the same instant lands in the same place of
    each window even though the rates are 0.3 % off nominal (as on the real nodes)."""
    c = contract(rates=(("a", 1, 400.0), ("s", 1, 400.0)))
    t_event = 250.25  # seconds after T0
    pulse = lambda t: np.exp(-((t - t_event) ** 2) / (2 * 0.01 ** 2))  # noqa: E731
    a, _ = stream_chunks("n", "a", 401.2, 300.0, 400, signal=pulse)
    s, _ = stream_chunks("n", "s", 398.9, 300.0, 400, signal=pulse)
    windows = run(Aligner(c, NO_AA), by_time(a, s))
    w = next(w for w in windows if w.start_ns <= T0 + t_event * 1e9 < w.end_ns - 2e8)
    peak_a = np.argmax(w.data["a"][0]) / 400.0
    peak_s = np.argmax(w.data["s"][0]) / 400.0
    assert abs(peak_a - peak_s) <= 1.0 / 400.0
    assert abs(w.start_ns / 1e9 + peak_a - (T0 / 1e9 + t_event)) <= 2.0 / 400.0


def test_memory_stays_bounded_when_one_stream_runs_ahead():
    c = contract()
    a, _ = stream_chunks("n", "a", 400.0, 60.0, 400)
    s, _ = stream_chunks("n", "s", 100.0, 60.0, 6000)   # one 60 s chunk at the end
    aligner = Aligner(c)
    windows = run(aligner, a + s)
    ring = aligner._nodes["n"].streams["a"].ring
    assert ring.shape[1] < 400 * 10
    assert len(windows) >= 110
    assert aligner.stats()["aligner"]["forced_windows"] > 0 or \
        not all(w.present["s"] for w in windows)


def test_multichannel_and_unknown_modality_and_wrong_channels():
    c = contract(rates=(("imu", 6, 100.0), ("s", 1, 100.0)))
    imu, _ = stream_chunks("n", "imu", 100.0, 3.0, 25, channels=6)
    s, _ = stream_chunks("n", "s", 100.0, 3.0, 25)
    bad = [Chunk("n", "imu", T0, 100.0, np.zeros((5, 3), np.float32), 99),
           Chunk("n", "other", T0, 100.0, np.zeros((5, 1), np.float32), 0)]
    aligner = Aligner(c)
    windows = run(aligner, bad + by_time(imu, s))
    assert windows and windows[0].data["imu"].shape == (6, 100)
    agg = aligner.stats()["aligner"]
    assert agg["wrong_channel_chunks"] == 1 and agg["unknown_modality_chunks"] == 1


def test_long_silence_of_a_node_is_skipped_quickly():
    c = contract()
    a1, _ = stream_chunks("n", "a", 400.0, 3.0, 100)
    s1, _ = stream_chunks("n", "s", 100.0, 3.0, 25)
    day = 86_400_000_000_000
    a2, _ = stream_chunks("n", "a", 400.0, 3.0, 100, t0=T0 + day)
    s2, _ = stream_chunks("n", "s", 100.0, 3.0, 25, t0=T0 + day)
    aligner = Aligner(c)
    windows = run(aligner, by_time(a1, s1) + by_time(a2, s2))
    assert 8 <= len(windows) <= 14
    assert aligner.stats()["aligner"]["empty_windows_skipped"] < 10


def test_empty_and_config_errors():
    c = contract()
    aligner = Aligner(c)
    assert aligner.push(Chunk("n", "a", T0, 400.0, np.zeros((0, 1), np.float32), 0)) == []
    assert aligner.flush() == []
    with pytest.raises(ConfigError, match="min_coverage"):
        AlignerConfig(min_coverage=0.0)


def test_node_count_is_bounded_and_refusals_counted():
    """Established nodes are never displaced: with probation_chunks=1 every node is
    established by its first chunk, so once max_nodes are tracked new names are refused
    (probation and eviction: tests/test_hostile_core.py)."""
    c = contract()
    aligner = Aligner(c, AlignerConfig(max_nodes=3, probation_chunks=1))
    for i in range(10):
        chunks, _ = stream_chunks(f"n{i}", "a", 400.0, 0.5, 100)
        for ch in chunks:
            aligner.push(ch)
    assert len(aligner._nodes) == 3
    assert aligner.stats()["aligner"]["too_many_nodes_chunks"] == 7 * 2


@pytest.mark.parametrize("name,rate_in,fs", [("seismic", 1600.0, 800.0),
                                              ("acoustic", 9868.0, 4934.0),
                                              ("seismic", 1605.23, 800.0)])
def test_a_spike_lands_where_it_was_after_the_anti_alias_filter(name, rate_in, fs):
    """Decimating, the order-4 low-pass delays its output by its group delay (0.96 ms
    for seismic 1600 -> 800 Hz, 0.155 ms for acoustic 9868 -> 4934 Hz); placement is
    shifted back by it. A one-sample spike at a known instant: the centroid of what the
    window holds is where the spike was, within 10 us (without the shift: the delay)."""
    c = contract(rates=((name, 1, fs),))
    for t_spike in (3.1234567, 5.25, 7.0001):
        n = int(10 * rate_in)
        x = np.zeros(n, np.float32)
        i = int(round(t_spike * rate_in))
        x[i] = 1000.0
        true_ns = T0 + int(round(i * 1e9 / rate_in))
        per = int(rate_in / 10)
        chunks = [Chunk("n", name, T0 + int(round(lo * 1e9 / rate_in)), rate_in,
                        x[lo:lo + per, None], k) for k, lo in enumerate(range(0, n, per))]
        w = next(w for w in run(Aligner(c), chunks)
                 if w.start_ns + 2e8 < true_ns < w.end_ns - 2e8)
        y = w.data[name][0].astype(np.float64)
        k0 = int((true_ns - w.start_ns) * fs / 1e9) - 20
        k = np.arange(k0, k0 + 40)
        centroid_ns = w.start_ns + (y[k] * k).sum() / y[k].sum() * 1e9 / fs
        assert abs(centroid_ns - true_ns) < 10_000, (name, t_spike, (centroid_ns - true_ns))
