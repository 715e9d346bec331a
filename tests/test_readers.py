"""Offline readers on the committed real-data fixtures (tests/data, see its README)."""
from __future__ import annotations

import calendar
import csv
import json
import logging
import math
import os
import shutil
import struct
import wave
from decimal import Decimal

import numpy as np
import pytest

from edgefuse.runtime.core.errors import InputError
from edgefuse.sensors.readers import goodvibes, goodvibes_noise, sphar
from edgefuse.sensors.readers._common import OfflineSource, StreamInfo, offset_ns, seconds_to_ns, utc_to_ns
from edgefuse.sensors.readers.inputs import InputSet, open_inputs
from edgefuse.sensors.readers.wavfile import WavReader, read_wav, read_wav_info

DATA = os.path.join(os.path.dirname(__file__), "data")
GV = os.path.join(DATA, "goodvibes")
CLOSE = os.path.join(GV, "passes", "close")
CLOSE_PASSES = ["2D.16.123", "2H.22.129", "3A.9.121"]
FULL_NO_ACOUSTIC = os.path.join(GV, "passes", "full", "3A.9.81")
RAW = os.path.join(GV, "raw")
RAW_AC = os.path.join(RAW, "Node81-Ch1-23-2023_04_11_18_20_00-9866Hz.wav")
RAW_SE = os.path.join(RAW, "Node81-Ch2-23-2023_04_11_18_20_00-1528Hz.wav")
SPHAR = os.path.join(DATA, "sp-sw-har")
SP_04 = os.path.join(SPHAR, "s15", "s15_04_sp.csv")


def _ns_from_text(text: str) -> int:
    """Independent exact seconds->ns: split the decimal text at the point."""
    whole, _, frac = text.partition(".")
    return int(whole) * 10**9 + int((frac + "0" * 9)[:9]) + (int(frac[9]) >= 5 if len(frac) > 9
                                                               else 0)


def _meta_text(folder: str) -> dict:
    with open(os.path.join(folder, "meta.json")) as f:
        return json.load(f, parse_float=str)  # the numbers exactly as written


def _per_stream(chunks):
    out = {}
    for c in chunks:
        out.setdefault(c.stream, []).append(c)
    return out


# ----------------------------------------------------------------- wavfile
def test_placeholder_header_is_clamped_to_the_file(caplog):
    with caplog.at_level(logging.WARNING):
        info, frames = read_wav(RAW_AC)
    assert info.declared_data_bytes == 0x7FFFFFFF
    assert info.frames == (os.path.getsize(RAW_AC) - 44) // 2
    assert "placeholder" in caplog.text
    with wave.open(RAW_AC) as w:  # the stdlib returns the frames that are there
        expected = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    np.testing.assert_array_equal(frames[:, 0], expected)
    assert info.rate_hz == 9866 and info.channels == 1 and info.full_scale == 32767


def _write_wav(path, data: np.ndarray, rate=1000, extra=b""):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(data.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.astype("<i2").tobytes())
    with open(path, "ab") as f:
        f.write(extra)


def test_multichannel_and_odd_trailing_bytes(tmp_path, caplog):
    data = np.arange(-30, 30, dtype=np.int16).reshape(20, 3)
    path = tmp_path / "multi.wav"
    _write_wav(path, data)
    # Claim 7 more bytes than the data holds and append 3: 1.5 frames of junk.
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 40, data.nbytes + 7)
    path.write_bytes(bytes(raw) + b"\x01\x02\x03")
    with caplog.at_level(logging.WARNING):
        info, frames = read_wav(path)
    np.testing.assert_array_equal(frames, data)
    assert info.channels == 3 and info.frames == 20
    assert "trailing" in caplog.text
    with WavReader(path) as r:
        np.testing.assert_array_equal(r.read(18, 10), data[18:])
        assert r.read(25, 5).shape == (0, 3)


def test_non_wav_and_unsupported_formats_say_what_was_found(tmp_path):
    text = tmp_path / "notes.wav"
    text.write_text("hello, this is not audio at all")
    with pytest.raises(InputError, match="expected a RIFF/WAVE file"):
        read_wav_info(text)
    eight = tmp_path / "eight.wav"
    with wave.open(str(eight), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(bytes(range(100)))
    with pytest.raises(InputError, match="found format tag 0x0001 with 8 bits"):
        read_wav_info(eight)
    with pytest.raises(InputError, match="cannot read"):
        read_wav_info(tmp_path / "absent.wav")
    short = tmp_path / "short.wav"
    short.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt ")
    with pytest.raises(InputError, match="no 'data' chunk"):
        read_wav_info(short)


def test_empty_wav_has_no_frames():
    info, frames = read_wav(os.path.join(GV, "noise", "acoustic", "node-123_location-bprf_noise-3.wav"))
    assert info.frames == 0 and frames.shape == (0, 1)


# -------------------------------------------------------------- time helpers
def test_exact_time_conversions():
    assert seconds_to_ns("1681140928.4378273") == 1681140928437827300
    assert seconds_to_ns(1681140928.4378273) == 1681140928437827300  # via the float's repr
    assert seconds_to_ns("0.0000000005") == 0 and seconds_to_ns("0.0000000015") == 2
    assert utc_to_ns("2023-04-11T18:19:59.788") == (
        calendar.timegm((2023, 4, 11, 18, 19, 59, 0, 0, 0)) * 10**9 + 788_000_000)
    assert utc_to_ns("1970-01-01 00:00:01") == 10**9
    with pytest.raises(InputError, match="expected a UTC time"):
        utc_to_ns("11/04/2023")
    # No accumulation: the offset of sample k is computed from k, not summed.
    assert offset_ns(3 * 10**6, 9866.44) == round(3 * 10**15 / Decimal("9866.44"))


# -------------------------------------------------------------- pass folders
@pytest.mark.parametrize("name", CLOSE_PASSES)
def test_close_pass_chunks_follow_the_sensor_clock(name):
    folder = os.path.join(CLOSE, name)
    meta = _meta_text(folder)
    chunks = _per_stream(goodvibes.iter_pass(folder))
    assert sorted(m for _, m in chunks) == ["acoustic", "seismic"]
    for (node, modality), cs in chunks.items():
        m = meta["modalities"][modality]
        rate = float(m["sensor_rate_hz_actual"])
        t0 = _ns_from_text(m["t0_unix_s_sensor_clock"])
        step = round(rate)  # chunk_s = 1.0
        assert node == str(meta["node"])
        assert len(cs) == math.ceil(int(m["samples"]) / step)
        assert [c.seq for c in cs] == list(range(len(cs)))
        assert cs[0].t0_ns == t0
        for i, c in enumerate(cs):
            assert c.rate_hz == rate and c.full_scale == 32767 and not c.rate_is_nominal
            assert abs(c.t0_ns - t0 - i * step * 1e9 / rate) <= 1  # offset in float, 1 ns slack
        assert all(b.t0_ns > a.t0_ns for a, b in zip(cs, cs[1:]))
        _, wav = read_wav(os.path.join(folder, f"{modality}.wav"))
        np.testing.assert_array_equal(np.concatenate([c.samples for c in cs]), wav)


def test_pass_lacking_acoustic():
    info = goodvibes.load_pass(FULL_NO_ACOUSTIC)
    assert list(info.modalities) == ["seismic"]
    assert "acoustic" in info.missing_modalities and info.set_name == "full"
    chunks = list(goodvibes.iter_pass(FULL_NO_ACOUSTIC))
    assert {c.stream for c in chunks} == {("81", "seismic")}
    assert sum(c.n for c in chunks) == 91680


def test_load_pass_metadata():
    folder = os.path.join(CLOSE, "2D.16.123")
    info = goodvibes.load_pass(folder)
    assert (info.target, info.run, info.node, info.location, info.date) == \
        ("2D", 16, "123", "bprf", "2023-04-10")
    assert info.set_name == "close" and info.window_ok and info.missing_modalities == {}
    assert info.label_start_ns == utc_to_ns("2023-04-10 15:35:28")
    assert info.label_stop_ns == utc_to_ns("2023-04-10 15:35:31")
    with open(os.path.join(folder, "distance.csv")) as f:
        rows = list(csv.reader(f))[1:]
    assert len(info.distance_m) == len(rows) == len(info.distance_unix_ns)
    nearest = min(rows, key=lambda r: float(r[1]))
    assert info.cpa_ns == _ns_from_text(nearest[0])
    ac = info.modalities["acoustic"]
    assert ac.label_t0_ns == 1681140928500000000 and ac.header_rate_hz == 9867
    assert ac.source_values_integer is False
    assert info.sensor_minus_label_ns("acoustic") == ac.t0_ns - ac.label_t0_ns < 0
    assert info.run_facts["make"] == "Ford" and info.run_facts["speed-kph"] == 30


def test_pass_without_sensor_clock_falls_back(tmp_path, caplog):
    dst = tmp_path / "2D.16.123"
    shutil.copytree(os.path.join(CLOSE, "2D.16.123"), dst)
    meta = json.loads((dst / "meta.json").read_text())
    for m in meta["modalities"].values():
        del m["t0_unix_s_sensor_clock"], m["sensor_rate_hz_actual"]
    (dst / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.DEBUG, logger="edgefuse.sensors.readers.goodvibes"):
        chunks = list(goodvibes.iter_pass(dst))
    assert "no sensor-clock fields" in caplog.text
    first = {c.modality: c for c in chunks if c.seq == 0}
    assert first["seismic"].t0_ns == 1681140928500000000
    assert first["seismic"].rate_hz == meta["modalities"]["seismic"]["rate_hz"]
    assert first["seismic"].rate_is_nominal


def test_folder_of_passes_and_malformed_meta(tmp_path):
    assert [os.path.basename(p) for p in goodvibes.find_passes(os.path.join(GV, "passes"))] == \
        sorted(CLOSE_PASSES) + ["3A.9.81"]
    inputs = open_inputs(CLOSE)
    assert len(inputs.streams) == 6
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text('{"target_id": "x"}')
    with pytest.raises(InputError, match="malformed pass metadata"):
        goodvibes.load_pass(bad)


# ---------------------------------------------------------------- raw WAVs
def test_raw_wav_with_sidecar():
    r = goodvibes.raw_wav_info(RAW_AC)
    assert (r.node, r.modality, r.rate_hz, r.rate_is_nominal) == ("81", "acoustic", 9866.44, False)
    assert r.t0_ns == calendar.timegm((2023, 4, 11, 18, 19, 59, 0, 0, 0)) * 10**9 + 788 * 10**6
    chunks = list(goodvibes.iter_raw_wav(RAW_AC, chunk_s=2.0))
    assert sum(c.n for c in chunks) == r.frames == 304618
    assert all(c.n == 19733 for c in chunks[:-1])  # round(2.0 * 9866.44)
    assert chunks[5].t0_ns == r.t0_ns + round(5 * 19733 * 10**9 / Decimal("9866.44"))
    se = goodvibes.raw_wav_info(RAW_SE)
    assert se.modality == "seismic" and se.rate_hz == 1528.3


def test_raw_wav_without_sidecar_uses_nominal_values(tmp_path, caplog):
    dst = tmp_path / os.path.basename(RAW_SE)
    shutil.copy(RAW_SE, dst)
    with caplog.at_level(logging.WARNING):
        chunks = list(goodvibes.iter_raw_wav(dst))
    assert "no sidecar" in caplog.text
    assert chunks[0].t0_ns == utc_to_ns("2023-04-11T18:20:00")
    assert chunks[0].rate_hz == 1528.0 and chunks[0].rate_is_nominal
    with pytest.raises(InputError, match="expected a raw goodvibes name"):
        goodvibes.raw_wav_info(os.path.join(CLOSE, "2D.16.123", "seismic.wav"))


def test_folder_of_raw_wavs_and_sidecar_path():
    inputs = open_inputs(RAW)
    assert sorted((s.node, s.modality) for s in inputs.streams) == \
        [("81", "acoustic"), ("81", "seismic")]
    assert [s.samples for s in inputs.streams] == [304618, 46570]
    same = open_inputs([RAW_AC, RAW_AC + ".xml"])  # the sidecar stands for its WAV
    assert len(same.streams) == 1


# --------------------------------------------------------------- noise WAVs
def test_noise_wav_and_empty_noise():
    rows = goodvibes_noise.load_noise(os.path.join(GV, "noise", "seismic"))
    assert len(rows) == 2
    full = next(r for r in rows if r.samples)
    assert full.t0_ns == utc_to_ns("2023-04-11T15:22:10.447") and full.rate_hz == 1576
    chunks = list(open_inputs(full.path).chunks())
    assert chunks[0].t0_ns == full.t0_ns and chunks[0].rate_is_nominal
    assert sum(c.n for c in chunks) == full.samples == 80376
    empty = os.path.join(GV, "noise", "acoustic", "node-123_location-bprf_noise-3.wav")
    assert list(open_inputs(empty).chunks()) == []


def test_noise_spans_keep_each_source_file_time_and_rate(tmp_path):
    """Training reads a noise window as one span per source file: its own t0, its file's
    measured rate (signature_information.csv), the header rate (nominal) without it."""
    full = next(r for r in goodvibes_noise.load_noise(os.path.join(GV, "noise", "seismic"))
                if r.samples)
    (span,) = full.spans()
    assert (span.node, span.modality, span.t0_ns, span.rate_hz, span.rate_is_nominal) == \
        ("123", "seismic", full.t0_ns, 1576.0, True)
    (span,) = full.spans({full.source_files[0]: 1576.215})
    assert span.rate_hz == 1576.215 and not span.rate_is_nominal
    assert sum(c.n for c in span.chunks(1.0)) == full.samples
    # a spliced window: the second file's samples start at its own t0 and rate
    shutil.copy(full.path, tmp_path / os.path.basename(full.path))
    row = dict(full.row, source_files="A.wav;B.wav", spliced="true",
               source_spans_utc="2023-04-11T15:22:10.447/2023-04-11T15:22:20.447;"
                                "2023-04-11T15:22:30.000/2023-04-11T15:23:01.000")
    with open(tmp_path / "noise.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        w.writeheader()
        w.writerow(row)
    (spliced,) = goodvibes_noise.load_noise(tmp_path)
    a, b = spliced.spans({"A.wav": 1576.0, "B.wav": 1575.5})
    assert (a.first, a.frames, a.t0_ns) == (0, 15760, utc_to_ns("2023-04-11T15:22:10.447"))
    assert (b.first, b.frames, b.t0_ns, b.rate_hz) == \
        (15760, 80376 - 15760, utc_to_ns("2023-04-11T15:22:30"), 1575.5)
    ca, cb = list(a.chunks(1.0)), list(b.chunks(1.0, seq0=100))
    assert cb[0].t0_ns == b.t0_ns and cb[0].seq == 100
    assert cb[3].t0_ns == b.t0_ns + offset_ns(3 * 1576, 1575.5)  # round(1.0 s x 1575.5) = 1576
    _, wav = read_wav(full.path)
    np.testing.assert_array_equal(np.concatenate([c.samples for c in ca + cb]), wav)


def test_signature_rates():
    rates = goodvibes_noise.signature_rates(RAW)
    assert rates[os.path.basename(RAW_SE)] == 1528.3
    assert set(rates) == {os.path.basename(RAW_AC), os.path.basename(RAW_SE)}
    with pytest.raises(InputError, match="signature_information.csv"):
        goodvibes_noise.signature_rates(CLOSE)


# --------------------------------------------------------------- sp-sw-har
def test_sphar_execution_matches_the_csv():
    import pandas as pd  # independent parser (dev extra), tests only

    ex = sphar.load_execution(SP_04)
    assert sorted(ex) == ["imu_phone", "imu_watch"]
    for modality, dev in (("imu_phone", "sp"), ("imu_watch", "sw")):
        df = pd.read_csv(os.path.join(SPHAR, "s15", f"s15_04_{dev}.csv"))
        t, v, labels = ex[modality]
        assert t.dtype == np.int64 and v.dtype == np.float32 and v.shape == (len(df), 6)
        np.testing.assert_array_equal(t, df["timestamp"].to_numpy() * 10**6)
        np.testing.assert_array_equal(v, df.iloc[:, :6].to_numpy(np.float32))
        assert labels == df["label"].tolist()


def test_sphar_executions_for_training():
    executions = sphar.find_executions(SPHAR)
    assert [(e.name, e.subject) for e in executions] == [("s15_04", "s15"), ("s15_07", "s15")]
    ex = executions[0]
    assert [os.path.basename(p) for p in ex.paths] == ["s15_04_sp.csv", "s15_04_sw.csv"]
    assert [s.label for s in ex.sources(1.0)] == \
        [s.label for s in open_inputs(SP_04).sources]  # the sources replay reads
    times, labels = ex.activity_rows()
    both = sphar.load_execution(SP_04)
    np.testing.assert_array_equal(times, np.concatenate([both["imu_phone"][0],
                                                         both["imu_watch"][0]]))
    assert labels == both["imu_phone"][2] + both["imu_watch"][2]


def test_sphar_chunks():
    t, v, _ = sphar.read_csv(SP_04)
    chunks = list(sphar.iter_csv(SP_04))
    assert all(c.rate_hz is None and c.channels == 6 and c.node == "s15_04" for c in chunks)
    assert all(c.modality == "imu_phone" for c in chunks)
    assert [c.n for c in chunks[:-1]] == [100] * (len(chunks) - 1)
    assert [c.t0_ns for c in chunks] == list(t[::100])
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), v)
    assert [c.n for c in sphar.iter_csv(SP_04, chunk_s=0.5)][0] == 50


def test_sphar_kinds_and_malformed_rows(tmp_path, caplog):
    assert len(open_inputs(SP_04).streams) == 2                       # the execution
    assert len(open_inputs([SP_04, SP_04.replace("_sp", "_sw")]).streams) == 2
    assert len(open_inputs(os.path.join(SPHAR, "s15")).streams) == 4  # subject
    assert len(open_inputs(SPHAR).streams) == 4                       # root
    lone = tmp_path / "s99_01_sw.csv"
    with open(SP_04) as f:
        lines = f.read().splitlines()
    lone.write_text("\n".join(lines[:5] + ["1,2,oops,4,5,6,7,WALKING"] + lines[5:20]) + "\n")
    with caplog.at_level(logging.WARNING):
        t, v, labels = sphar.read_csv(lone)
    assert len(t) == len(v) == len(labels) == 19 and "malformed" in caplog.text
    assert [s.modality for s in open_inputs(lone).streams] == ["imu_watch"]  # no sibling
    (tmp_path / "s99_02_sp.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(InputError, match="expected header x_acc"):
        sphar.read_csv(tmp_path / "s99_02_sp.csv")


# ------------------------------------------------------------------ inputs
def _keys(chunks):
    return [(c.t0_ns, c.node, c.modality, c.seq) for c in chunks]


def test_merge_is_time_ordered_and_deterministic():
    paths = [CLOSE, FULL_NO_ACOUSTIC, RAW, os.path.join(SPHAR, "s15")]
    a = list(open_inputs(paths).chunks())
    keys = _keys(a)
    assert keys == sorted(keys)
    assert keys == _keys(open_inputs(list(reversed(paths))).chunks())
    for cs in _per_stream(a).values():
        assert all(y.t0_ns > x.t0_ns for x, y in zip(cs, cs[1:]))
    streams = {(s.node, s.modality) for s in open_inputs(paths).streams}
    assert {c.stream for c in a} == streams


def test_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_inputs(tmp_path / "nothing.mcap")
    odd = tmp_path / "readme.txt"
    odd.write_text("x")
    with pytest.raises(InputError, match="supported kinds") as err:
        open_inputs(odd)
    assert "MCAP" in str(err.value) and "sp-sw-har" in str(err.value)
    with pytest.raises(InputError, match="supported kinds"):
        open_inputs(tmp_path)  # an empty folder
    with pytest.raises(InputError, match="chunk_s"):
        open_inputs(CLOSE, chunk_s=0)


def test_overlapping_inputs_of_one_stream_are_refused(tmp_path):
    copy = tmp_path / "copy" / "2D.16.123"
    shutil.copytree(os.path.join(CLOSE, "2D.16.123"), copy)
    with pytest.raises(InputError, match="overlap in time"):
        open_inputs([os.path.join(CLOSE, "2D.16.123"), copy])


def test_one_stream_from_two_inputs_is_renumbered(tmp_path):
    later = tmp_path / "later" / "2D.16.123"
    shutil.copytree(os.path.join(CLOSE, "2D.16.123"), later)
    meta = json.loads((later / "meta.json").read_text())
    for m in meta["modalities"].values():
        m["t0_unix_s_sensor_clock"] += 100.0
    (later / "meta.json").write_text(json.dumps(meta))
    chunks = list(open_inputs([os.path.join(CLOSE, "2D.16.123"), later]).chunks())
    for cs in _per_stream(chunks).values():
        # one sequence: consecutive within each input, and from the first input to the
        # second a hole as long as the silence between them (a gap, not a clock step)
        seqs = [c.seq for c in cs]
        assert len(cs) == 6 and seqs[:3] == [0, 1, 2]
        assert seqs[3:] == list(range(seqs[3], seqs[3] + 3))
        last = cs[2]
        period_ns = last.n * 1e9 / last.rate_hz
        silence_ns = cs[3].t0_ns - (last.t0_ns + period_ns)
        assert silence_ns > 90e9
        assert (seqs[3] - seqs[2] - 1) * period_ns == pytest.approx(silence_ns, rel=0.05)


def test_merge_opens_sources_lazily():
    """A folder of many files must not hold them all open: the merger opens a
    source when the output reaches its start time."""
    from edgefuse.runtime.core.chunk import Chunk

    open_now, peak = [0], [0]

    def make(i):
        def gen():
            open_now[0] += 1
            peak[0] = max(peak[0], open_now[0])
            try:
                for k in range(3):
                    yield Chunk("n", "m", i * 10 + k, 1.0, np.zeros((1, 1), np.float32), i * 3 + k)
            finally:
                open_now[0] -= 1
        return gen

    sources = [OfflineSource(f"s{i}", (StreamInfo("n", "m", 1, 1.0, f"s{i}"),), i * 10, make(i))
               for i in reversed(range(50))]
    out = list(InputSet(sources).chunks())
    assert [c.t0_ns for c in out] == sorted(i * 10 + k for i in range(50) for k in range(3))
    assert peak[0] <= 2
