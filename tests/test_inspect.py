"""`edgefuse inspect`: per-stream facts of a recording, without a model.

On the bundled sample the report agrees with the chunks themselves and with the
aligner's own counters of a replay; on constructed recordings it finds the gap,
the clock step, the drift and the non-finite samples that were put there; it
reads every kind of input `open_inputs` reads; the command prints a table or
JSON and exits 1 (after the table) when an input is damaged.
"""
from __future__ import annotations

import argparse
import io
import json
import wave
from pathlib import Path

import numpy as np
import pytest

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.inference import OnnxModel
from edgefuse.runtime.inspect_cmd import register
from edgefuse.runtime.service.replay import replay
from edgefuse.sensors.readers.inputs import InputSet, OfflineSource, StreamInfo, open_inputs
from edgefuse.sensors.readers.mcaplog import McapRecorder
from edgefuse.sensors.readers.inspect import inspect_inputs, iso_utc
from tests.daemon_helpers import MODEL, SAMPLE, T0, write_log

DATA = Path(__file__).resolve().parent / "data"


def _streams(*paths) -> dict[str, dict]:
    report = inspect_inputs(open_inputs(list(paths))).to_json()
    assert report["errors"] == []
    return {f"{s['node']}/{s['modality']}": s for s in report["streams"]}


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="edgefuse")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_bundled_sample_agrees_with_its_chunks_and_the_aligners_counters():
    streams = _streams(SAMPLE)
    chunks: dict[str, list[Chunk]] = {}
    for c in open_inputs([SAMPLE]).chunks():
        chunks.setdefault(f"{c.node}/{c.modality}", []).append(c)
    assert set(streams) == set(chunks)
    summary = replay(open_inputs([SAMPLE]), OnnxModel.load(MODEL), io.StringIO(),
                     progress=False)
    aligner = summary.stats["streams"]
    for name, s in streams.items():
        mine = chunks[name]
        assert s["chunks"] == len(mine)
        assert s["samples"] == sum(c.n for c in mine)
        assert s["channels"] == sorted({c.channels for c in mine})
        assert s["first_ns"] == min(c.t0_ns for c in mine)
        assert s["first"] == iso_utc(s["first_ns"])
        assert s["declared_hz"] == mine[0].rate_hz
        last = mine[-1]
        assert s["last_ns"] == last.t0_ns + round((last.n - 1) * 1e9 / last.rate_hz)
        # the t0 of consecutive chunks progresses at the declared rate in this log
        assert s["actual_hz"] == pytest.approx(last.rate_hz, rel=1e-6)
        # what the aligner counted replaying the same log
        counted = aligner[name]
        assert (s["gaps"], s["clock_steps"], s["nonfinite_samples"]) == \
            (counted["gaps"], counted["clock_steps"], counted["nonfinite_samples"])
        assert s["samples"] == counted["samples"]


def _stream(node: str, modality: str, *, rate: float, chunks: int, per: int = 100,
            start_ns: int = T0, t0_rate: float | None = None, seq0: int = 0,
            skip: range = range(0), step_at: int | None = None, step_ns: int = 0,
            nonfinite_in: int | None = None, channels: int = 1) -> list[Chunk]:
    """Chunks of `per` samples declared at `rate`; their t0 progresses at t0_rate
    (default: rate). `skip` seqs are lost (a gap), from seq `step_at` on the labels
    jump by step_ns with the seq running on (a clock step); chunk `nonfinite_in`
    holds 3 NaN and 1 inf."""
    rng = np.random.default_rng(len(node) + chunks)
    out = []
    for seq in range(chunks):
        if seq in skip:
            continue
        x = rng.standard_normal((per, channels)).astype(np.float32)
        if seq == nonfinite_in:
            x[[1, 5, 9], 0] = np.nan
            x[20, 0] = np.inf
        t0 = start_ns + round(seq * per * 1e9 / (t0_rate or rate))
        if step_at is not None and seq >= step_at:
            t0 += step_ns
        out.append(Chunk(node, modality, t0, rate, x, seq0 + seq))
    return out


def test_constructed_gap_step_drift_and_nonfinite_samples_are_found(tmp_path):
    a = _stream("n1", "acoustic", rate=1000.0, chunks=60, skip=range(20, 25), step_at=40,
                step_ns=2_000_000_000, nonfinite_in=10)
    b = _stream("n1", "seismic", rate=200.0, chunks=30, t0_rate=200.1, channels=3)
    log = write_log(tmp_path / "made.mcap",
                    sorted(a + b, key=lambda c: (c.t0_ns, c.modality, c.seq)))
    streams = _streams(log)
    s = streams["n1/acoustic"]
    assert (s["gaps"], s["clock_steps"], s["nonfinite_samples"]) == (1, 1, 4)
    assert s["gap_s"] == pytest.approx(0.5, abs=1e-6)       # 5 chunks of 0.1 s lost
    assert s["steps"][0]["step_s"] == pytest.approx(2.0, abs=1e-6)
    assert s["steps"][0]["at_ns"] == T0 + 40 * 100_000_000 + 2_000_000_000
    assert s["chunks"] == 55 and s["samples"] == 5500 and s["channels"] == [1]
    assert s["actual_hz"] == pytest.approx(1000.0, rel=1e-9)
    assert s["first_ns"] == T0
    # 60 chunks of 0.1 s (the 5 lost ones included), then the labels jump by 2 s
    assert s["duration_s"] == pytest.approx(8.0, abs=1e-6)
    t = streams["n1/seismic"]
    assert (t["gaps"], t["clock_steps"], t["nonfinite_samples"]) == (0, 0, 0)
    assert t["channels"] == [3] and t["declared_as"] == "actual"
    assert t["actual_hz"] == pytest.approx(200.1, rel=1e-6)
    assert t["drift_ppm"] == pytest.approx(500.0, abs=1.0)  # 200.1 / 200 - 1


def test_a_backward_step_and_a_duplicate_chunk_in_arrival_order():
    chunks = _stream("n2", "imu", rate=100.0, chunks=40, per=50, step_at=20,
                     step_ns=-3_000_000_000)
    chunks.insert(10, chunks[9])  # sent twice
    # an input in arrival order (an MCAP log is read in t0 order, which hides the step)
    info = StreamInfo("n2", "imu", 1, 100.0, "made")
    inputs = InputSet([OfflineSource("made", (info,), T0, lambda: iter(chunks))])
    s = inspect_inputs(inputs).to_json()["streams"][0]
    assert s["clock_steps"] == 1 and s["steps"][0]["step_s"] == pytest.approx(-3.0, abs=1e-6)
    assert s["out_of_order"] == 1 and s["gaps"] == 0


def test_two_inputs_of_one_stream_meet_at_a_gap_not_a_clock_step(tmp_path):
    first = _stream("n3", "seismic", rate=500.0, chunks=10)
    end = first[-1].t0_ns + round(100 * 1e9 / 500.0)
    second = _stream("n3", "seismic", rate=500.0, chunks=10, start_ns=end + 7_000_000_000)
    paths = [write_log(tmp_path / "a.mcap", first), write_log(tmp_path / "b.mcap", second)]
    s = _streams(*paths)["n3/seismic"]
    assert (s["inputs"], s["gaps"], s["clock_steps"]) == (2, 1, 0)
    assert s["gap_s"] == pytest.approx(7.0, abs=1e-6)
    assert s["chunks"] == 20


def test_every_kind_of_input(tmp_path):
    # goodvibes pass folders: one stream per modality and node, exact rates
    passes = _streams(DATA / "goodvibes" / "passes" / "close")
    assert passes and all(s["chunks"] and s["declared_as"] == "actual" for s in
                          passes.values())
    for s in passes.values():
        assert s["actual_hz"] == pytest.approx(s["declared_hz"], rel=1e-6)
    # raw 5-minute WAVs with their sidecars
    raw = _streams(DATA / "goodvibes" / "raw")
    assert {"81/acoustic", "81/seismic"} <= set(raw)
    # sp-sw-har: no declared rate, the actual one is measured from the time stamps
    har = _streams(DATA / "sp-sw-har" / "s15")
    assert har and all(s["declared_hz"] is None and s["drift_ppm"] is None for s in
                       har.values())
    assert all(80 < s["actual_hz"] < 120 for s in har.values())  # phones and watches ~100 Hz
    assert all(s["channels"] == [6] for s in har.values())
    # a user's manifest: a CSV (rate estimated from its stamps) with a NaN, and a WAV
    t_ms = [1_714_564_800_000 + 20 * i + (i % 3) for i in range(300)]
    rows = "\n".join(f"{t},{i % 7}.5,{np.nan if i == 150 else 1.0}" for i, t in enumerate(t_ms))
    (tmp_path / "pi.csv").write_text("t_ms,a,b\n" + rows + "\n")
    with wave.open(str(tmp_path / "pi.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.zeros((8000 * 3, 2), "<i2").tobytes())
    (tmp_path / "recording.toml").write_text(
        '[[stream]]\nnode = "pi"\nmodality = "imu"\nfile = "pi.csv"\n'
        '[[stream]]\nnode = "pi"\nmodality = "acoustic"\nfile = "pi.wav"\n'
        't0 = "2024-05-01T12:00:00Z"\n')
    mine = _streams(tmp_path)
    s = mine["pi/imu"]
    assert (s["gaps"], s["clock_steps"], s["nonfinite_samples"], s["samples"]) == (0, 0, 1, 300)
    assert s["channels"] == [2] and s["actual_hz"] == pytest.approx(50.0, rel=2e-3)
    w = mine["pi/acoustic"]
    assert (w["channels"], w["samples"], w["declared_as"]) == ([2], 24000, "nominal")
    assert w["duration_s"] == pytest.approx(3.0) and w["first"] == "2024-05-01T12:00:00.000000Z"


def test_the_command_prints_a_table_or_json(capsys):
    rc, out, err = _run_cli(["inspect", str(SAMPLE), "--json"], capsys)
    assert rc == 0 and err == ""
    report = json.loads(out)
    rc, table, _ = _run_cli(["inspect", str(SAMPLE)], capsys)
    lines = table.splitlines()
    assert rc == 0 and lines[0].split()[:3] == ["node", "modality", "ch"]
    for s in report["streams"]:
        row = next(line.split() for line in lines[1:] if line.split()[:2] ==
                   [s["node"], s["modality"]])
        assert s["first"][:23] + "Z" in row and s["last"][:23] + "Z" in row
    assert lines[-1] == f"{len(report['streams'])} streams in 1 input(s)"


def test_a_truncated_log_shows_what_was_read_and_exits_1(tmp_path, capsys):
    chunks = _stream("n4", "acoustic", rate=1000.0, chunks=400)
    whole = tmp_path / "whole.mcap"
    with McapRecorder(whole, chunk_bytes=16 * 1024) as rec:  # many MCAP chunks
        for c in chunks:
            rec.write(c)
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.7)])
    rc, out, err = _run_cli(["inspect", str(cut), "--json"], capsys)
    assert rc == 1
    assert str(cut) in err and err.startswith("edgefuse inspect: error:")
    s = json.loads(out)["streams"][0]
    assert 0 < s["chunks"] < len(chunks) and s["gaps"] == 0
