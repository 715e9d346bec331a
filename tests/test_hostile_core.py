"""The streaming core under hostile input (issue 8): absurd rates and times never
crash or hang the aligner, and a flood of node names never locks a real node out.

Each test compares the windows of the well-behaved node with a run that never saw
the hostile chunks: the hostile input must cost that node nothing.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import time

import numpy as np
import pytest

from edgefuse.runtime.core import wire
from edgefuse.runtime.core.aligner import Aligner, AlignerConfig
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.service.config import from_dict
from edgefuse.runtime.core.errors import ConfigError, InputError, WireFormatError
from tests.aligner_helpers import T0, by_time, contract, run, stream_chunks

pytestmark = pytest.mark.timeout(300)

# The rates of the bundled model's grid (acoustic 4934 Hz, seismic 800 Hz).
CONTRACT = contract(rates=(("acoustic", 1, 4934.0), ("seismic", 1, 800.0)))
HANG_S = 2.0  # a hang guard, not a performance bound: a push takes milliseconds


@contextlib.contextmanager
def hang_guard(seconds: float = HANG_S):
    """Fail (TimeoutError) when the body runs longer than seconds (SIGALRM)."""
    def expired(*_):
        raise TimeoutError(f"took more than {seconds} s: the aligner hangs")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def good_node(node: str, seconds: float, t0: int = T0, seed: int = 0) -> list[Chunk]:
    """0.5 s chunks of both modalities, at slightly drifted real rates, in time order."""
    a, _ = stream_chunks(node, "acoustic", 4935.1, seconds, 2467, t0=t0, seed=seed)
    s, _ = stream_chunks(node, "seismic", 799.7, seconds, 400, t0=t0 + 1_234_567, seed=seed + 1)
    return by_time(a, s)


def push_all(aligner: Aligner, chunks: list[Chunk], flush: bool = True) -> list:
    """Push every chunk under the hang guard; the windows that came out."""
    out = []
    for c in chunks:
        with hang_guard():
            out += aligner.push(c)
    if flush:
        with hang_guard():
            out += aligner.flush()
    return out


def of(windows, node: str) -> list:
    return [w for w in windows if w.node == node]


def assert_same_windows(got, expected) -> None:
    assert [w.index for w in got] == [w.index for w in expected]
    for x, y in zip(got, expected):
        assert (x.present, x.missing_reason, x.coverage) == \
            (y.present, y.missing_reason, y.coverage), x.index
        for m in x.data:
            np.testing.assert_array_equal(x.data[m], y.data[m])


def tiny(node: str, modality: str, t0: int, rate: float | None, seq: int,
         n: int = 3) -> Chunk:
    return Chunk(node, modality, t0, rate, np.arange(1, n + 1, dtype=np.float32)[:, None], seq)


def forced_rate(chunk: Chunk, rate: float) -> Chunk:
    """A chunk whose rate went around Chunk's own check (a producer that builds chunks
    by hand): the aligner must hold its own bounds."""
    object.__setattr__(chunk, "rate_hz", rate)
    return chunk


# --- absurd rates ----------------------------------------------------------
ABSURD = [5e-324, 1e-300, 1e-5]


@pytest.mark.parametrize("rate", ABSURD)
def test_absurd_rates_are_refused_at_the_wire_and_at_chunk_construction(rate):
    payload = b'{"t0_ns":%d,"rate_hz":%r,"seq":1,"values":[1,2,3]}' % (T0, rate)
    with pytest.raises(WireFormatError, match="evil5/seismic seq 1: rate_hz"):
        wire.decode_payload(payload, "evil5", "seismic")
    with pytest.raises(InputError, match=r"rate_hz must be a finite number in \[0.001, 1e\+07\)"):
        tiny("evil5", "seismic", T0, rate, 1)


@pytest.mark.parametrize("rate", ABSURD + [1.0, 7.99, 800_000.0, 5e6])
def test_the_aligner_refuses_rates_outside_the_modality_range(rate, caplog):
    """After a normal chunk (as in the issue), the absurd-rate chunk is refused and
    counted with node and modality named; nothing crashes, the good node is untouched."""
    good = good_node("good", 6.0)
    clean = run(Aligner(CONTRACT), good)
    aligner = Aligner(CONTRACT)
    evil = [tiny("evil5", "seismic", T0, 800.0, 0, n=400)]
    evil += [forced_rate(tiny("evil5", "seismic", T0 + 500_000_000 + i, 800.0, 1 + i), rate)
             for i in range(5)]
    mixed = good[:4] + evil[:1] + good[4:8] + evil[1:] + good[8:]
    with caplog.at_level(logging.WARNING, logger="edgefuse.runtime.core.aligner"):
        windows = push_all(aligner, mixed)
    assert_same_windows(of(windows, "good"), clean)
    stats = aligner.stats()
    assert stats["aligner"]["bad_rate_chunks"] == 5
    assert stats["streams"]["evil5/seismic"]["bad_rate_chunks"] == 5
    assert stats["streams"]["evil5/seismic"]["chunks"] == 1
    warned = [r.getMessage() for r in caplog.records if "bad_rate_chunks" in r.getMessage()]
    assert warned and "evil5/seismic seq 1 refused" in warned[0]
    assert "[8, 800000) Hz" in warned[0]


def test_null_rates_1e18_ns_apart_neither_hang_nor_disturb(caplog):
    """Three rate-less chunks 1e18 ns apart imply an estimated rate of 3e-9 Hz: it is
    not used (counted), the chunks are dropped as of unknown rate at the end."""
    good = good_node("good", 6.0)
    clean = run(Aligner(CONTRACT), good)
    evil = [tiny("evil", "seismic", T0, 800.0, 0, n=400)]
    evil += [tiny("evil", "seismic", T0 + 10**9 + i * 10**18, None, 1 + i) for i in range(3)]
    mixed = good[:2] + evil[:1] + good[2:6] + [evil[1]] + good[6:9] + [evil[2]] + good[9:12] \
        + [evil[3]] + good[12:]
    aligner = Aligner(CONTRACT)
    with caplog.at_level(logging.WARNING):
        windows = push_all(aligner, mixed)
    assert_same_windows(of(windows, "good"), clean)
    evil_stats = aligner.stats()["streams"]["evil/seismic"]
    assert evil_stats["bad_rate_estimates"] >= 1
    assert evil_stats["unknown_rate_chunks"] == 3
    assert any("evil/seismic" in r.getMessage() and "estimated" in r.getMessage()
               for r in caplog.records)


def test_null_rates_from_a_stream_start_in_a_replay():
    """The issue's replay hang: a log whose stream starts with such chunks."""
    chunks = [tiny("n", "seismic", T0 + i * 10**18, None, i) for i in range(3)]
    chunks += good_node("n", 4.0, t0=T0 + 2 * 10**18 + 10 * 10**9)
    aligner = Aligner(CONTRACT)
    windows = push_all(aligner, chunks)
    assert len(windows) >= 6
    assert aligner.stats()["streams"]["n/seismic"]["unknown_rate_chunks"] >= 1


def test_an_estimate_across_a_huge_jump_is_not_used():
    """A rate-less stream whose first chunk lies 1e18 ns before the rest: the estimate
    from the first two (4e-7 Hz) is refused; the bogus chunk is dropped once the reorder
    buffer is full, and the stream estimates its real rate from the others."""
    b, _ = stream_chunks("n", "seismic", 801.0, 40.0, 400, t0=T0 + 10**18, give_rate=False)
    first = tiny("n", "seismic", T0, None, 0, n=400)
    b = [Chunk(c.node, c.modality, c.t0_ns, None, c.samples, c.seq + 1) for c in b]
    aligner = Aligner(CONTRACT)
    windows = push_all(aligner, [first] + b)
    st_ = aligner.stats()["streams"]["n/seismic"]
    assert st_["rate_estimated"] and abs(st_["rate_hz"] - 801.0) < 0.5
    assert st_["bad_rate_estimates"] == 1 and st_["unknown_rate_chunks"] == 1
    assert len(windows) >= 70 and all(w.start_ns >= T0 + 10**18 for w in windows)


# --- absurd times ----------------------------------------------------------
@pytest.mark.parametrize("t0", [-1, -(1 << 63), 1 << 62, 1 << 80])
def test_times_outside_the_range_are_refused_and_counted(t0):
    good = good_node("good", 4.0)
    clean = run(Aligner(CONTRACT), good)
    aligner = Aligner(CONTRACT)
    windows = push_all(aligner, good[:5] + [tiny("good", "seismic", t0, 800.0, 99),
                                             tiny("evil", "seismic", t0, 800.0, 0)] + good[5:])
    assert_same_windows(of(windows, "good"), clean)
    assert aligner.stats()["aligner"]["bad_time_chunks"] == 2
    assert aligner.stats()["streams"]["good/seismic"]["bad_time_chunks"] == 1
    assert "evil" not in {w.node for w in windows}


def test_a_chunk_running_past_the_time_range_is_refused():
    aligner = Aligner(CONTRACT)
    end = (1 << 62) - 10**9
    chunks = [tiny("n", "seismic", end - 10**9, 800.0, 0, n=800),
              tiny("n", "seismic", end, 800.0, 1, n=800),              # ends at 2**62
              tiny("n", "seismic", end + 10**9 - 10**6, 8.0, 2, n=800)]  # 100 s from there
    push_all(aligner, chunks)
    assert aligner.stats()["streams"]["n/seismic"]["bad_time_chunks"] == 2


@pytest.mark.parametrize("jump_ns", [10**12, 10**15, 10**18, (1 << 62) - T0 - 10**10])
def test_a_forward_jump_costs_o1_windows(jump_ns):
    """One stream of a node jumps far ahead (consecutive seq, so it is not held back):
    the silent span is skipped in one step, whatever its length."""
    good = good_node("n", 4.0)
    jump = [tiny("n", "seismic", T0 + jump_ns + i * 500_000_000, 800.0, 100 + i, n=400)
            for i in range(4)]
    jump[0] = Chunk("n", "seismic", jump[0].t0_ns, 800.0, jump[0].samples, 8)
    aligner = Aligner(CONTRACT)
    t = time.monotonic()
    windows = push_all(aligner, good + jump + good_node("n", 2.0, t0=T0 + jump_ns, seed=3))
    assert time.monotonic() - t < 30  # generous: it is ~10 ms
    agg = aligner.stats()["aligner"]
    assert agg["empty_windows_skipped"] < 20 and agg["forced_windows"] < 40
    assert [w.index for w in windows] == sorted({w.index for w in windows})


def test_a_new_modality_far_from_the_other_costs_o1_windows():
    a, _ = stream_chunks("n", "acoustic", 4934.0, 3.0, 2467)
    far = [tiny("n", "seismic", T0 + 10**18 + i * 500_000_000, 800.0, i, n=400)
           for i in range(3)]
    aligner = Aligner(CONTRACT)
    windows = push_all(aligner, a + far)
    assert aligner.stats()["aligner"]["empty_windows_skipped"] < 20
    assert any(w.start_ns > T0 + 10**18 for w in windows)


# --- no lock-out ---------------------------------------------------------
def test_a_10000_name_flood_then_a_real_node_gets_its_windows(caplog):
    """10,000 one-chunk fake names fill max_nodes (1000) ten times over; a real node
    starting after the flood is admitted in a fake's slot and decided as if alone."""
    real = good_node("real", 8.0, t0=T0 + 60 * 10**9)
    clean = run(Aligner(CONTRACT), real)
    aligner = Aligner(CONTRACT)
    flood = [tiny(f"fake{i:05d}", "seismic", T0 + i * 1000, 800.0, 0) for i in range(10_000)]
    with caplog.at_level(logging.INFO, logger="edgefuse.runtime.core.aligner"):
        windows = push_all(aligner, flood, flush=False) + push_all(aligner, real)
    assert_same_windows(of(windows, "real"), clean)
    agg = aligner.stats()["aligner"]
    assert agg["too_many_nodes_chunks"] == 0
    assert agg["displaced_nodes"] == 10_000 - 1000 + 1  # the real node took the last slot
    assert len(aligner._nodes) == 1000
    displaced = [r for r in caplog.records if "displaced" in r.getMessage()]
    assert 1 <= len(displaced) < 10  # rate-limited, yet logged
    assert "max_nodes=1000" in displaced[0].getMessage()


@pytest.mark.parametrize("established_first,per_chunk", [(True, 200), (False, 20)])
def test_a_real_node_outlives_an_ongoing_flood(established_first, per_chunk):
    """Fake names interleaved with a real node's stream at max_nodes=50: 200 per real
    chunk once the node is established (8 chunks), or 20 per chunk from its very
    first (fewer than max_nodes between its first two chunks): it loses nothing."""
    real = good_node("real", 6.0)
    clean = run(Aligner(CONTRACT), real)
    aligner = Aligner(CONTRACT, AlignerConfig(max_nodes=50))
    flood_from = 8 if established_first else 0
    mixed, i = real[:flood_from], 0
    for c in real[flood_from:]:
        mixed.append(c)
        for _ in range(per_chunk):
            mixed.append(tiny(f"f{i}", "acoustic", T0 + i, 4934.0, 0))
            i += 1
    windows = push_all(aligner, mixed)
    assert_same_windows(of(windows, "real"), clean)
    assert aligner.stats()["aligner"]["displaced_nodes"] >= i - 50
    assert aligner.stats()["aligner"]["too_many_nodes_chunks"] == 0


def test_a_real_node_in_probation_outlives_a_one_chunk_flood():
    """Two chunks put a node above every one-chunk name: the flood displaces its own."""
    real = good_node("real", 6.0)
    clean = run(Aligner(CONTRACT), real)
    aligner = Aligner(CONTRACT, AlignerConfig(max_nodes=20))
    flood = [tiny(f"f{i}", "seismic", T0 + i, 800.0, 0) for i in range(500)]
    windows = push_all(aligner, real[:2] + flood + real[2:])
    assert_same_windows(of(windows, "real"), clean)


def test_established_nodes_are_never_displaced_and_refusals_are_warned_again(caplog):
    cfg = AlignerConfig(max_nodes=2, probation_chunks=2)
    aligner = Aligner(CONTRACT, cfg)
    now = [0.0]
    aligner._warner._clock = lambda: now[0]
    a, b = good_node("a", 3.0), good_node("b", 3.0)
    push_all(aligner, by_time(a[:4], b[:4]), flush=False)
    with caplog.at_level(logging.WARNING, logger="edgefuse.runtime.core.aligner"):
        for i in range(50):
            assert aligner.push(tiny(f"x{i}", "seismic", T0, 800.0, 0)) == []
        now[0] += 61.0
        aligner.push(tiny("late", "seismic", T0, 800.0, 0))
    assert set(aligner._nodes) == {"a", "b"}
    assert aligner.stats()["aligner"]["too_many_nodes_chunks"] == 51
    lines = [r.getMessage() for r in caplog.records if "too_many_nodes" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "x0/seismic seq 0 refused" in lines[0] and "max_nodes=2" in lines[0]
    assert "late/seismic" in lines[1] and "49 more like this" in lines[1]


def test_a_flood_of_names_is_no_flood_of_log_lines(caplog):
    """Every refusal is counted, and warned about rate-limited: 3,000 fake names with
    bad rates, bad times and one null-rate chunk each give a handful of lines, while
    an established node's own trouble is still logged at once."""
    real = good_node("real", 5.0)
    aligner = Aligner(CONTRACT, AlignerConfig(max_nodes=100))
    flood = []
    for i in range(1000):
        flood += [tiny(f"f{i}", "seismic", T0, 1.0, 0), tiny(f"f{i}", "seismic", -5, 800.0, 1),
                  tiny(f"g{i}", "seismic", T0 + i, None, 0)]
    with caplog.at_level(logging.INFO, logger="edgefuse.runtime"):
        push_all(aligner, real[:10] + flood + [tiny("real", "seismic", T0, 2.0, 99)] + real[10:])
    agg = aligner.stats()["aligner"]
    assert agg["bad_rate_chunks"] == 1001 and agg["bad_time_chunks"] == 1000
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) < 10, lines
    assert any(m.startswith("real/seismic seq 99 refused (bad_rate_chunks)") for m in lines)


def test_a_silent_node_is_evicted_after_its_windows_are_emitted():
    cfg = AlignerConfig(evict_after_s=10.0)
    a_only, b_only = good_node("a", 30.0), good_node("b", 5.0, seed=5)
    clean_b = run(Aligner(CONTRACT, cfg), b_only)
    aligner = Aligner(CONTRACT, cfg)
    windows = push_all(aligner, by_time(a_only, b_only), flush=False)
    # b's last windows came out when it was evicted, not at the end of the input
    assert_same_windows(of(windows, "b"), clean_b)
    assert aligner.stats()["aligner"]["evicted_nodes"] == 1
    assert set(aligner._nodes) == {"a"}
    assert not any(k.startswith("b/") for k in aligner.stats()["streams"])
    # b returns: new windows only, never one of the indices it had before
    back = good_node("b", 3.0, t0=T0 + 31 * 10**9, seed=6)
    later = push_all(aligner, back)
    assert of(later, "b") and min(w.index for w in of(later, "b")) > \
        max(w.index for w in of(windows, "b"))


def test_a_far_future_clock_does_not_evict_live_nodes():
    """An established node jumps to t0 = 2**62 - 1 s and keeps sending: the frontier
    moves a window per push at most, so the live node (which keeps sending) stays."""
    cfg = AlignerConfig(evict_after_s=10.0)
    live = good_node("live", 20.0)
    clean = run(Aligner(CONTRACT, cfg), live)
    evil = good_node("evil", 3.0)
    far = (1 << 62) - 10**12
    evil_far = [Chunk("evil", c.modality, far + c.t0_ns - T0, c.rate_hz, c.samples,
                      c.seq + 100) for c in good_node("evil", 20.0, seed=9)]
    mixed = by_time(live[:12], evil)
    for i, c in enumerate(live[12:]):
        mixed += [c, evil_far[i]]
    aligner = Aligner(CONTRACT, cfg)
    windows = push_all(aligner, mixed)
    assert_same_windows(of(windows, "live"), clean)
    assert aligner.stats()["aligner"]["evicted_nodes"] == 0


def test_the_allow_list_refuses_other_names_counted_and_warned(caplog):
    cfg = AlignerConfig(allowed_nodes=("gw1-*", "lab"))
    ok = good_node("gw1-a", 4.0)
    clean = run(Aligner(CONTRACT), ok)
    aligner = Aligner(CONTRACT, cfg)
    with caplog.at_level(logging.WARNING, logger="edgefuse.runtime.core.aligner"):
        windows = push_all(aligner, by_time(ok, good_node("gw2-a", 4.0), good_node("lab", 2.0)))
    assert_same_windows(of(windows, "gw1-a"), clean)
    assert {w.node for w in windows} == {"gw1-a", "lab"}
    assert aligner.stats()["aligner"]["not_allowed_chunks"] == len(good_node("gw2-a", 4.0))
    assert any("gw2-a/" in r.getMessage() and "allowed_nodes" in r.getMessage()
               for r in caplog.records)


def test_replay_of_a_hostile_sequence_gives_the_same_windows():
    """Admission, displacement and eviction follow push order only: replay == live."""
    seq = []
    for i, c in enumerate(good_node("real", 12.0)):
        seq.append(c)
        seq += [tiny(f"f{i}-{j}", "seismic", T0 + j, 800.0, 0) for j in range(7)]
    seq += [forced_rate(tiny("real", "seismic", T0, 800.0, 999), 1e-300)]
    runs = []
    for _ in range(2):
        aligner = Aligner(CONTRACT, AlignerConfig(max_nodes=10, evict_after_s=5.0))
        runs.append((push_all(aligner, seq), aligner.stats()["aligner"]))
    assert runs[0][1] == runs[1][1]
    assert [(w.node, w.index) for w in runs[0][0]] == [(w.node, w.index) for w in runs[1][0]]
    assert_same_windows(runs[0][0], runs[1][0])


# --- configuration -----------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"evict_after_s": 0.0}, "evict_after_s = 0.0 is out of range"),
    ({"evict_after_s": float("nan")}, "evict_after_s = nan"),
    ({"evict_after_s": 2.0}, "more than"),            # within max_wait + horizon (2.5 s)
    ({"evict_after_s": 1e9}, "at most 30 days"),
    ({"probation_chunks": 0}, "probation_chunks = 0"),
    ({"allowed_nodes": ("gw1-*", "")}, "allowed_nodes"),
    ({"allowed_nodes": (3,)}, "allowed_nodes"),
])
def test_new_aligner_settings_are_checked(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AlignerConfig(**kwargs)


def test_new_aligner_settings_load_from_the_daemon_toml_table():
    c = from_dict({"pipeline": {"aligner": {"evict_after_s": 120.0, "probation_chunks": 4,
                                            "allowed_nodes": ["gw1-*"], "max_nodes": 64}}})
    assert c.pipeline.aligner.allowed_nodes == ("gw1-*",)
    assert (c.pipeline.aligner.evict_after_s, c.pipeline.aligner.probation_chunks) == (120.0, 4)
    with pytest.raises(ConfigError, match="allowed_nodes"):
        from_dict({"pipeline": {"aligner": {"allowed_nodes": "gw1-*"}}})
    assert AlignerConfig(allowed_nodes=["a*"]).allowed_nodes == ("a*",)
