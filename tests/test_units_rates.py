"""Units and rates (issue 11): a t0 in the wrong unit is refused as bad_time with the
unit named; a declared rate that the progress of t0 contradicts is counted as
rate_mismatch, warned, and the measured rate used; drift_ppm is reported for every
stream, saying what it is against. Faults come from runtime.faults (``units``)."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from edgefuse.runtime.core.aligner import Aligner, AlignerConfig
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import ConfigError
from edgefuse.runtime.core.faults import inject, parse_fault
from tests.aligner_helpers import T0, by_time, contract, stream_chunks

pytestmark = pytest.mark.timeout(300)

CONTRACT = contract(rates=(("acoustic", 1, 4934.0), ("seismic", 1, 800.0), ("imu", 6, 100.0)))


def node(seconds: float = 10.0, imu_rate: float = 100.0, imu_declared: float | None = 100.0,
         nominal: bool = False) -> list[Chunk]:
    """One node in time order: acoustic 9868 Hz, seismic 1600 Hz, IMU sent at imu_rate
    in 0.25 s chunks, declaring imu_declared."""
    a, _ = stream_chunks("n1", "acoustic", 9868.0, seconds, 987, seed=1)
    s, _ = stream_chunks("n1", "seismic", 1600.0, seconds, 160, seed=2)
    i, _ = stream_chunks("n1", "imu", imu_rate, seconds, int(imu_rate / 4), channels=6, seed=3)
    i = [dataclasses.replace(c, rate_hz=imu_declared, rate_is_nominal=nominal) for c in i]
    return by_time(a, s, i)


def cut(chunks, config: AlignerConfig | None = None, contract_=CONTRACT):
    aligner = Aligner(contract_, config)
    windows = [w for c in chunks for w in aligner.push(c)] + aligner.flush()
    return aligner, windows


@pytest.mark.parametrize("unit,factor", [("s", "1e9"), ("ms", "1e6"), ("us", "1e3")])
def test_t0_in_the_wrong_unit_is_refused_with_the_unit_named(unit, factor, caplog):
    chunks = list(inject(node(), [parse_fault(f"units:*={unit}")]))
    with caplog.at_level(logging.WARNING, logger="edgefuse.runtime"):
        aligner, windows = cut(chunks)
    assert windows == []
    assert aligner.stats()["aligner"]["bad_time_chunks"] == len(chunks)
    lines = [r.getMessage() for r in caplog.records]
    word = {"s": "seconds", "ms": "milliseconds", "us": "microseconds"}[unit]
    for modality in ("acoustic", "seismic", "imu"):
        said = [x for x in lines if x.startswith(f"n1/{modality} seq 0 refused (bad_time")]
        assert said, lines
        assert f"looks like {word}; ×{factor}" in said[0]


def test_imu_alone_in_seconds_is_named_and_the_others_decided(caplog):
    chunks = [dataclasses.replace(c, t0_ns=c.t0_ns // 10**9) if c.modality == "imu" else c
              for c in node()]
    with caplog.at_level(logging.WARNING, logger="edgefuse.runtime"):
        aligner, windows = cut(chunks)
    n_imu = sum(c.modality == "imu" for c in chunks)
    assert aligner.stats()["aligner"]["bad_time_chunks"] == n_imu
    assert len(windows) >= 17
    assert all(w.present["acoustic"] and w.present["seismic"] for w in windows)
    assert all(w.missing_reason["imu"] == "no_stream" for w in windows)
    lines = [r.getMessage() for r in caplog.records if "n1/imu" in r.getMessage()]
    assert lines and "t0_ns = 1.68e+09 looks like seconds; ×1e9" in lines[0]
    assert not any("n1/acoustic" in r.getMessage() or "n1/seismic" in r.getMessage()
                   for r in caplog.records)


def test_relative_times_are_accepted_with_min_t0_0():
    """Data in relative time (t0 from 0) is refused by default, cut with min_t0_ns = 0."""
    chunks = [dataclasses.replace(c, t0_ns=c.t0_ns - T0) for c in node(4.0)]
    _, windows = cut(chunks)
    assert windows == []
    aligner, windows = cut(chunks, AlignerConfig(min_t0_ns=0))
    assert len(windows) >= 6 and aligner.stats()["aligner"]["bad_time_chunks"] == 0
    assert all(all(w.present.values()) for w in windows[:-1])


def test_a_declared_rate_half_the_real_one_is_caught_and_the_measured_one_used(caplog):
    """Declared 50 Hz, sent at 100 Hz: counted, warned, placed at 100 Hz from the first
    chunk: the IMU windows are those of a sender that declares 100 Hz."""
    right_aligner, right = cut(node(imu_declared=100.0))
    with caplog.at_level(logging.WARNING, logger="edgefuse.runtime"):
        aligner, windows = cut(node(imu_declared=50.0))
    st = aligner.stats()["streams"]["n1/imu"]
    assert st["rate_mismatch"] == st["chunks"] and st["rate_hz"] == pytest.approx(100.0)
    assert st["overlap_samples"] == 0 and st["clock_steps"] == 0
    assert st["drift_vs"] == "declared" and st["drift_ppm"] == pytest.approx(1e6, rel=1e-6)
    lines = [r.getMessage() for r in caplog.records]
    assert any(x.startswith("n1/imu seq 0: declared rate_hz 50 disagrees with the progress "
                            "of t0, which shows 100 Hz") and "placing at 100 Hz" in x
               for x in lines), lines
    assert [w.index for w in windows] == [w.index for w in right]
    for x, y in zip(windows, right):
        assert x.present == y.present and x.coverage == y.coverage
        np.testing.assert_allclose(x.data["imu"], y.data["imu"], rtol=1e-5, atol=1e-5)
    assert right_aligner.stats()["streams"]["n1/imu"]["rate_mismatch"] == 0

    # trust_declared_rate: still counted and warned, but placed as declared.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgefuse.runtime"):
        aligner, _ = cut(node(imu_declared=50.0), AlignerConfig(trust_declared_rate=True))
    st = aligner.stats()["streams"]["n1/imu"]
    assert st["rate_mismatch"] > 0 and st["rate_hz"] == 50.0 and st["overlap_samples"] > 0
    assert any("placing at 50 Hz (aligner.trust_declared_rate)" in r.getMessage()
               for r in caplog.records)


def test_a_small_mismatch_is_caught_over_seconds_and_drift_is_reported():
    """3 % off (declared 100 Hz, sent at 103 Hz) is caught once t0 has progressed 4 s;
    200 ppm is no mismatch, but its drift is reported."""
    aligner, _ = cut(node(seconds=12.0, imu_rate=103.0, imu_declared=100.0))
    st = aligner.stats()["streams"]["n1/imu"]
    assert st["rate_mismatch"] > 0 and st["rate_hz"] == pytest.approx(103.0, rel=1e-3)
    skewed = list(inject(node(seconds=12.0), [parse_fault("skew:imu=+200ppm")]))
    aligner, _ = cut(skewed)
    st = aligner.stats()["streams"]["n1/imu"]
    assert st["rate_mismatch"] == 0 and st["rate_hz"] == 100.0
    # t0 progresses 200 ppm fast: the samples look 200 ppm slower than declared
    assert st["drift_vs"] == "declared" and st["drift_ppm"] == pytest.approx(-200.0, abs=30)
    assert st["rate_measured_hz"] == pytest.approx(100.0 / 1.0002, rel=3e-5)


def test_drift_is_reported_for_every_stream_and_says_against_what():
    chunks = node(seconds=8.0, imu_declared=None)                       # IMU: no rate
    chunks = [dataclasses.replace(c, rate_hz=1600.0 * 1.001, rate_is_nominal=False)
              if c.modality == "seismic" else c for c in chunks]         # seismic: +1000 ppm
    chunks = [dataclasses.replace(c, rate_hz=9800.0, rate_is_nominal=True)
              if c.modality == "acoustic" else c for c in chunks]        # acoustic: nominal
    aligner, _ = cut(chunks)
    st = aligner.stats()["streams"]
    assert st["n1/imu"]["drift_vs"] == "grid"
    assert st["n1/imu"]["drift_ppm"] == pytest.approx(0.0, abs=50)      # 100 Hz vs 100 Hz
    assert st["n1/acoustic"]["drift_vs"] == "nominal"
    assert st["n1/acoustic"]["drift_ppm"] == pytest.approx((9868 / 9800 - 1) * 1e6, abs=50)
    assert st["n1/seismic"]["drift_vs"] == "declared"
    assert st["n1/seismic"]["drift_ppm"] == pytest.approx(-1000.0, abs=50)


@pytest.mark.parametrize("key,value", [("max_lead_ns", -1), ("clock_step_min_ns", 0),
                                       ("skew_tolerance_s", 0.0), ("min_t0_ns", -5),
                                       ("rate_tolerance", 0.0), ("trust_declared_rate", 1)])
def test_new_settings_are_bounded(key, value):
    with pytest.raises(ConfigError, match=f"aligner.{key}"):
        AlignerConfig(**{key: value})


def test_the_new_settings_come_from_the_config_file():
    from edgefuse.runtime.service.config import from_dict
    cfg = from_dict({"pipeline": {"aligner": {
        "max_lead_ns": 3_000_000_000, "clock_step_min_ns": 200_000_000,
        "skew_tolerance_s": 1.0, "min_t0_ns": 0, "rate_tolerance": 0.05,
        "trust_declared_rate": True}}}).pipeline.aligner
    assert (cfg.max_lead_ns, cfg.clock_step_min_ns, cfg.skew_tolerance_s, cfg.min_t0_ns,
            cfg.rate_tolerance, cfg.trust_declared_rate) == \
        (3_000_000_000, 200_000_000, 1.0, 0, 0.05, True)
    with pytest.raises(ConfigError, match="trust_declared_rate"):
        from_dict({"pipeline": {"aligner": {"trust_declared_rate": "yes"}}})
