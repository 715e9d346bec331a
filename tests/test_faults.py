"""Fault injection (runtime.faults, `edgefuse replay --inject`): every fault does what its
spec says, deterministically for a seed; bad specs are one-line errors; memory is bounded."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.cli import main
from edgefuse.runtime.core.errors import EdgefuseError
from edgefuse.runtime.core.faults import (
    MAX_HORIZON, Fault, FaultSpecError, Injector, inject, parse_fault, parse_faults,
)
from tests.daemon_helpers import MODEL, T0, synthetic_chunks, write_log

S = 1_000_000_000


def _stream(node="n1", modality="imu", n=200, period_ns=100_000_000, start=T0):
    return [Chunk(node, modality, start + i * period_ns, 100.0,
                  np.full((10, 1), i, np.float32), i) for i in range(n)]


def _mixed(n=200):
    """Two nodes, three modalities, interleaved in time order (as a replay merges them)."""
    out = []
    for node in ("n1", "n2"):
        for k, m in enumerate(("acoustic", "seismic", "imu")):
            out += _stream(node, m, n, start=T0 + k * 1000)
    out.sort(key=lambda c: (c.t0_ns, c.node, c.modality, c.seq))
    return out


def _key(c: Chunk) -> tuple:
    return (c.node, c.modality, c.seq, c.t0_ns)


def _run(chunks, *specs, seed=0):
    inj = Injector(chunks, parse_faults(specs), seed=seed)
    return list(inj), inj.counts


# --- each fault ------------------------------------------------------------------------

def test_drop_removes_exactly_the_span_of_the_target_stream():
    chunks = _mixed()
    out, counts = _run(chunks, "drop:seismic@5s+3s")
    gone = [c for c in chunks if c.modality == "seismic" and 5 * S <= c.t0_ns - T0 < 8 * S]
    assert len(gone) == 2 * 30  # both nodes, 30 chunks of 0.1 s each
    assert counts["dropped"] == len(gone)
    assert [_key(c) for c in out] == [_key(c) for c in chunks if c not in gone]
    # a node-qualified target and an open span
    out, _ = _run(chunks, "drop:n2/imu@15s")
    assert not [c for c in out if c.node == "n2" and c.modality == "imu"
                and c.t0_ns - T0 >= 15 * S]
    assert len([c for c in out if c.node == "n1" and c.modality == "imu"]) == 200
    # the whole stream
    out, _ = _run(chunks, "drop:acoustic")
    assert {c.modality for c in out} == {"seismic", "imu"}


@pytest.mark.parametrize("step", ["+2s", "-2s", "+5s", "-5s", "+300ms"])
def test_step_shifts_every_later_chunk_and_keeps_arrival_order(step):
    chunks = _mixed()
    out, counts = _run(chunks, f"step:acoustic@10s={step}")
    shift = int(float(step[:-2] if step.endswith("ms") else step[:-1])
                * (1e6 if step.endswith("ms") else 1e9))
    assert len(out) == len(chunks)
    # the same chunks in the same positions: nothing is re-sorted by its new t0
    assert [(c.node, c.modality, c.seq) for c in out] == \
        [(c.node, c.modality, c.seq) for c in chunks]
    stepped = 0
    for before, after in zip(chunks, out):
        if before.modality == "acoustic" and before.t0_ns - T0 >= 10 * S:
            assert after.t0_ns == before.t0_ns + shift
            stepped += 1
        else:
            assert after is before  # untouched chunks are the very same objects
    assert stepped == counts["stepped"] == 2 * 100


def test_two_steps_add_up():
    chunks = _stream(n=100)
    out, _ = _run(chunks, "step:imu@2s=+1s", "step:imu@5s=-3s")
    for before, after in zip(chunks, out):
        rel = before.t0_ns - T0
        assert after.t0_ns - before.t0_ns == (S if rel >= 2 * S else 0) + \
            (-3 * S if rel >= 5 * S else 0)


def test_jitter_stays_within_its_amplitude_and_depends_on_the_seed():
    chunks = _stream(modality="seismic", n=500)
    out, counts = _run(chunks, "jitter:seismic=0.3ms", seed=7)
    d = np.array([a.t0_ns - b.t0_ns for a, b in zip(out, chunks)])
    assert counts["jittered"] == 500
    assert np.abs(d).max() <= 300_000 and np.abs(d).max() > 250_000
    assert abs(d.mean()) < 30_000 and d.std() > 100_000  # uniform in [-0.3, 0.3] ms
    again, _ = _run(chunks, "jitter:seismic=0.3ms", seed=7)
    other, _ = _run(chunks, "jitter:seismic=0.3ms", seed=8)
    assert [c.t0_ns for c in again] == [c.t0_ns for c in out]
    assert [c.t0_ns for c in other] != [c.t0_ns for c in out]


def test_skew_stretches_time_from_the_start_and_keeps_the_rate():
    chunks = _stream(modality="acoustic", n=600)  # 60 s
    out, _ = _run(chunks, "skew:acoustic=+200ppm")
    for before, after in zip(chunks, out):
        rel = before.t0_ns - T0
        assert after.t0_ns - T0 == round(rel * (1 + 200e-6))
        assert after.rate_hz == before.rate_hz and after.seq == before.seq
    assert out[-1].t0_ns - chunks[-1].t0_ns == round(59.9 * S * 200e-6)  # 11.98 ms
    out, _ = _run(chunks, "skew:acoustic=-50ppm")
    assert out[-1].t0_ns < chunks[-1].t0_ns


@pytest.mark.parametrize("unit,divisor", [("s", 10**9), ("ms", 10**6), ("us", 10**3)])
def test_units_divide_t0_as_a_sender_with_the_wrong_unit_would(unit, divisor):
    chunks = _mixed(50)
    out, counts = _run(chunks, f"units:imu={unit}")
    assert counts["units"] == 100
    for before, after in zip(chunks, out):
        want = before.t0_ns // divisor if before.modality == "imu" else before.t0_ns
        assert after.t0_ns == want
        assert np.array_equal(after.samples, before.samples)


def test_dup_repeats_chunks_right_after_themselves():
    chunks = _stream(n=2000)
    out, counts = _run(chunks, "dup:imu=5%", seed=3)
    assert len(out) == 2000 + counts["duplicated"]
    assert 60 <= counts["duplicated"] <= 140  # 5 % of 2000, +- 4 sigma
    seqs = [c.seq for c in out]
    assert sorted(set(seqs)) == list(range(2000))
    for a, b in zip(out, out[1:]):
        assert b.seq in (a.seq, a.seq + 1)
    twice = [s for s, n in Counter(seqs).items() if n == 2]
    assert len(twice) == counts["duplicated"]


def test_reorder_is_a_bounded_permutation_within_the_stream():
    chunks = _mixed(300)
    out, counts = _run(chunks, "reorder:n1/imu=10%,horizon=3", seed=5)
    assert sorted(map(_key, out)) == sorted(map(_key, chunks))
    assert 12 <= counts["reordered"] <= 50  # ~10 % of 300
    imu = [c.seq for c in out if (c.node, c.modality) == ("n1", "imu")]
    assert imu != sorted(imu)
    for pos, seq in enumerate(imu):
        assert abs(pos - seq) <= 3  # displaced by at most the horizon
    # every other stream keeps its order
    for node in ("n1", "n2"):
        for m in ("acoustic", "seismic", "imu"):
            if (node, m) != ("n1", "imu"):
                seqs = [c.seq for c in out if (c.node, c.modality) == (node, m)]
                assert seqs == list(range(300))


def test_a_reordered_chunk_still_held_at_the_end_comes_out():
    chunks = _stream(n=3)
    out, counts = _run(chunks, "reorder:imu=100%,horizon=64")
    assert counts["reordered"] >= 1
    assert sorted(c.seq for c in out) == [0, 1, 2]


def test_faults_apply_in_the_documented_order_and_other_streams_pass_untouched():
    chunks = _mixed(100)
    specs = ["drop:imu@1s+1s", "step:imu@5s=+2s", "jitter:imu=1ms", "dup:imu=20%",
             "reorder:imu=20%"]
    out, counts = _run(chunks, *specs, seed=11)
    others_in = [c for c in chunks if c.modality != "imu"]
    others_out = [c for c in out if c.modality != "imu"]
    assert [id(c) for c in others_out] == [id(c) for c in others_in]
    assert counts["dropped"] == 20 and counts["stepped"] == 2 * 50
    imu_seqs = Counter((c.node, c.seq) for c in out if c.modality == "imu")
    assert sum(imu_seqs.values()) == 2 * 100 - 20 + counts["duplicated"]


@pytest.mark.parametrize("spec", ["drop:acoustic@60s+10s", "step:acoustic@300s=+2s",
                                  "jitter:seismic=0.3ms", "skew:acoustic=+200ppm",
                                  "units:imu=s", "dup:imu=5%", "reorder:imu=5%"])
def test_every_fault_is_deterministic_for_a_seed(spec):
    chunks = synthetic_chunks("n1", 20.0) + [
        Chunk("n1", "imu", c.t0_ns, 100.0, c.samples[:5], c.seq) for c in _stream(n=100)]
    chunks.sort(key=lambda c: c.t0_ns)
    spec = spec.replace("60s", "5s").replace("300s", "10s")
    a = [(c.node, c.modality, c.seq, c.t0_ns) for c in inject(chunks, [parse_fault(spec)], 42)]
    b = [(c.node, c.modality, c.seq, c.t0_ns) for c in inject(chunks, [parse_fault(spec)], 42)]
    assert a == b


def test_start_ns_sets_what_the_times_are_relative_to():
    chunks = _stream(n=100)
    out = list(inject(chunks, [parse_fault("drop:imu@2s+1s")], start_ns=T0 - S))
    assert [c.seq for c in out] == [c.seq for c in chunks if not 1 * S <= c.t0_ns - T0 < 2 * S]


# --- specs -------------------------------------------------------------------------------

def test_specs_parse_into_the_documented_fields():
    f = parse_fault("drop:acoustic@60s+10s")
    assert (f.kind, f.node, f.modality, f.start_ns, f.span_ns) == \
        ("drop", None, "acoustic", 60 * S, 10 * S)
    f = parse_fault("step:n7/acoustic@5min=-2.5s")
    assert (f.node, f.start_ns, f.value) == ("n7", 300 * S, -2.5e9)
    assert parse_fault("jitter:seismic=300us").value == 300_000
    assert parse_fault("skew:*=-12.5ppm").value == -12.5
    assert parse_fault("units:imu=ms").value == 1e6
    assert parse_fault("dup:imu=0.05").value == parse_fault("dup:imu=5%").value == 0.05
    f = parse_fault("reorder:imu=5%,horizon=8")
    assert (f.value, f.horizon) == (0.05, 8)
    assert isinstance(f, Fault) and f.spec == "reorder:imu=5%,horizon=8"


@pytest.mark.parametrize("spec,expected", [
    ("", "KIND:TARGET"),
    ("acoustic", "KIND:TARGET"),
    ("delay:acoustic=2s", "a kind in drop, step"),
    ("drop:acoustic@60+10s", "a start time as a number with a unit"),
    ("drop:acoustic@60s+0s", "a positive duration"),
    ("drop:acoustic@60s=3", "no =VALUE for drop"),
    ("step:acoustic=+2s", "the step's time after @"),
    ("step:acoustic@300s=2", "the step as a signed number with a unit"),
    ("step:acoustic@300s=+0s", "a non-zero step"),
    ("step:acoustic@300s+5s=+2s", "@START only for a step"),
    ("jitter:seismic=-0.3ms", "the jitter amplitude as a number with a unit"),
    ("jitter:seismic@5s=0.3ms", "no @WHEN for jitter"),
    ("skew:acoustic=200", "a signed rate error in ppm"),
    ("skew:acoustic=+2000000ppm", "a signed rate error in ppm"),
    ("units:imu=ns", "s, ms or us"),
    ("units:imu", "=VALUE"),
    ("dup:imu=150%", "a percentage (5%) or a fraction in [0, 1]"),
    ("dup:imu=lots", "a percentage (5%) or a fraction in [0, 1]"),
    ("reorder:imu=5%,horizon=0", f"horizon=N with N in 1..{MAX_HORIZON}"),
    ("reorder:imu=5%,depth=3", "no options except ,horizon=N"),
    ("dup:imu=5%,horizon=3", "no options except ,horizon=N"),
    ("drop:a/b/c@1s", "a target MODALITY or NODE/MODALITY"),
    ("drop:n 1/imu@1s", "a target MODALITY or NODE/MODALITY"),
])
def test_bad_specs_are_one_line_errors_naming_spec_expectation_and_example(spec, expected):
    with pytest.raises(FaultSpecError) as info:
        parse_fault(spec)
    msg = str(info.value)
    assert isinstance(info.value, EdgefuseError)
    assert "\n" not in msg
    assert msg.startswith(f"fault spec {spec!r}: expected ")
    assert expected in msg, msg
    assert "e.g. " in msg


# --- bounded memory ------------------------------------------------------------------------

def test_memory_is_bounded_on_a_long_input():
    """The injector is lazy: on 100k chunks it never holds more than the reorder horizon
    per stream, however long the input."""
    pulled = [0]
    tiny = np.zeros((1, 1), np.float32)

    def source():
        for i in range(100_000):
            pulled[0] += 1
            yield Chunk("n1", ("acoustic", "imu")[i % 2], T0 + i * 1_000_000, 100.0, tiny,
                        i // 2)

    specs = ["jitter:*=1ms", "step:imu@30s=+2s", "dup:*=10%", "reorder:*=30%,horizon=16",
             "reorder:imu=30%,horizon=8"]
    inj = Injector(source(), parse_faults(specs), seed=1)
    emitted = dups = 0
    worst = 0
    seen = Counter()
    for c in inj:
        seen[(c.modality, c.seq)] += 1
        if seen[(c.modality, c.seq)] > 1:
            dups += 1
        else:
            emitted += 1
        worst = max(worst, pulled[0] - emitted, inj.held)
    assert pulled[0] == 100_000 and emitted == 100_000
    assert dups == inj.counts["duplicated"] > 5000
    # at most horizon chunks per stream and reorder stage held back (+ the one being read)
    assert worst <= 2 * 16 + 8 + 1


# --- through the CLI -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def log_path(tmp_path_factory) -> Path:
    return write_log(tmp_path_factory.mktemp("faults") / "n1.mcap",
                     synthetic_chunks("n1", 20.0))


def _replay(tmp_path, log, *extra, name="d.jsonl"):
    out = tmp_path / name
    rc = main(["replay", str(log), "--model", str(MODEL), "--out", str(out), "-q", *extra])
    return rc, out


def test_replay_inject_is_deterministic_and_changes_the_decisions(tmp_path, log_path, capsys):
    specs = ["--inject", "drop:seismic@5s+3s", "--inject", "jitter:acoustic=0.3ms",
             "--inject", "reorder:acoustic=20%"]
    rc0, clean = _replay(tmp_path, log_path, name="clean.jsonl")
    rc1, a = _replay(tmp_path, log_path, *specs, "--inject-seed", "4", name="a.jsonl")
    rc2, b = _replay(tmp_path, log_path, *specs, "--inject-seed", "4", name="b.jsonl")
    err = capsys.readouterr().err
    assert rc0 == rc1 == rc2 == 0, err
    assert a.read_bytes() == b.read_bytes() != clean.read_bytes()
    def seismic_missing(path):
        return {d["seq"]: d for x in path.read_text().splitlines()
                if "seismic" in (d := json.loads(x))["missing"]}

    before, after = seismic_missing(clean), seismic_missing(a)
    new = [d for seq, d in after.items() if seq not in before]
    assert new and all(d["missing_reason"]["seismic"] == "gap" for d in new)
    # only the windows that overlap the dropped span [5 s, 8 s)
    assert all(d["window_end_ns"] - T0 > 5 * S and d["window_start_ns"] - T0 < 8 * S
               for d in new)
    assert "injected: dropped 6" in err and "jittered 40" in err


@pytest.mark.parametrize("spec,expected", [("drop:acoustic@5", "a start time"),
                                           ("drop:imu@5s+1s", "none matching"),
                                           ("drop:n9/acoustic@5s", "none matching")])
def test_replay_refuses_a_bad_or_empty_fault_with_one_line_and_exit_2(tmp_path, log_path,
                                                                      capsys, spec, expected):
    rc, _ = _replay(tmp_path, log_path, "--inject", spec)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("edgefuse replay: error: fault spec")
    assert expected in err[0] and spec in err[0]


def test_rate_declares_a_wrong_or_no_rate():
    chunks = _stream(n=20)  # 100 Hz
    out, counts = _run(chunks, "rate:imu=x0.5")
    assert {c.rate_hz for c in out} == {50.0} and counts["rate"] == 20
    assert [c.t0_ns for c in out] == [c.t0_ns for c in chunks]
    out, _ = _run(chunks, "rate:imu=800Hz")
    assert {c.rate_hz for c in out} == {800.0}
    out, _ = _run(chunks, "rate:imu=0")
    assert {c.rate_hz for c in out} == {None}
    for bad in ("rate:imu=half", "rate:imu=x0", "rate:imu=5", "rate:imu=1e9Hz"):
        with pytest.raises(FaultSpecError, match="a factor of the real one"):
            parse_fault(bad)
