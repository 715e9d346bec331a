"""MCAP recording and replay: exact round trips in both chunk encodings, summary, damaged
and truncated logs, the committed chunk-v1 fixture, decision channels beside the chunks."""
from __future__ import annotations

import itertools
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcap.reader import make_reader
from mcap.writer import Writer

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.decision import Decision
from edgefuse.runtime.core.errors import CorruptLogError, InputError
from edgefuse.runtime.core.wire import DTYPES, HEADER, encode_binary
from edgefuse.sensors.readers import goodvibes, sphar
from edgefuse.sensors.readers.inputs import open_inputs, record
from edgefuse.sensors.readers.mcap_schemas import CHUNK_SCHEMA, SensorChunk
from edgefuse.sensors.readers.mcaplog import (
    ENCODING, SCHEMA_NAME, McapLog, McapRecorder, describe_mcap, read_decisions, read_mcap,
)

DATA = os.path.join(os.path.dirname(__file__), "data")
PASS = os.path.join(DATA, "goodvibes", "passes", "close", "2D.16.123")
FULL = os.path.join(DATA, "goodvibes", "passes", "full", "3A.9.81")
SP = os.path.join(DATA, "sp-sw-har", "s15", "s15_04_sp.csv")
SAMPLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "data",
                      "sample.mcap")
# Written by the chunk-v1 writer before the protobuf encoding existed (commit ef7737b):
# 2D.16.123 (int16 PCM) + the first 4 chunks of s15_04_sp.csv (float32 IMU).
CHUNK_V1_FIXTURE = os.path.join(os.path.dirname(__file__), "data_mcap", "chunk_v1.mcap")
ENCODINGS = ["protobuf", "chunk-v1"]


def _assert_same(got: list[Chunk], want: list[Chunk]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a.node, a.modality, a.t0_ns, a.seq, a.rate_hz, a.full_scale) == \
            (b.node, b.modality, b.t0_ns, b.seq, b.rate_hz, b.full_scale)
        assert a.samples.dtype == b.samples.dtype == np.float32
        np.testing.assert_array_equal(a.samples.view(np.uint32), b.samples.view(np.uint32))


def _write(path, chunks, **kw):
    with McapRecorder(path, **kw) as rec:
        for c in chunks:
            rec.write(c)
    return rec


def _raw_messages(path):
    with open(path, "rb") as f:
        return [(ch, msg) for _, ch, msg in make_reader(f).iter_messages()]


def _message_dtype(msg) -> np.dtype:
    """The sample type a message carries, read without edgefuse's decoders."""
    if msg.data[:4] == b"EFCK":
        return DTYPES[msg.data[5]]
    pb = SensorChunk.FromString(msg.data)
    kinds = {("pcm16" if len(c.pcm16) else "f32") for c in pb.channel}
    assert len(kinds) == 1
    return np.dtype("<i2") if kinds == {"pcm16"} else np.dtype("<f4")


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("compression", ["auto", "lz4", "none"])
def test_round_trip_int16_pcm(tmp_path, compression, encoding):
    chunks = list(goodvibes.iter_pass(PASS))
    path = tmp_path / "pcm.mcap"
    rec = _write(path, chunks, compression=compression, encoding=encoding)
    assert rec.counts == {"rejected": 0, "123/acoustic": 3, "123/seismic": 3}
    _assert_same(list(read_mcap(path)), chunks)
    by_seq = {(c.modality, c.seq): c for c in chunks}
    for channel, msg in _raw_messages(path):
        assert _message_dtype(msg) == np.dtype("<i2")  # PCM travels as int16
        md = channel.metadata
        assert msg.log_time == msg.publish_time == by_seq[(md["modality"], msg.sequence)].t0_ns
        if encoding == "protobuf":
            assert channel.topic == f"/{md['node']}/{md['modality']}"
            assert channel.message_encoding == "protobuf"
        else:
            assert msg.log_time == HEADER.unpack_from(msg.data)[5]
            assert channel.topic == f"{md['node']}/{md['modality']}"
            assert channel.message_encoding == ENCODING


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_round_trip_float32_multichannel_and_unknown_rate(tmp_path, encoding):
    imu = list(sphar.iter_csv(SP))
    rng = np.random.default_rng(1)
    odd = [Chunk("x", "vib", 10**18 + k, 333.25, rng.normal(size=(17, 3)).astype(np.float32), k,
                 full_scale=2.5) for k in range(4)]
    odd.append(Chunk("x", "vib", 10**18 + 9, 333.25,
                     np.array([[np.nan, np.inf, -0.0]], np.float32), 4))
    # quiet NaNs with a payload, the smallest subnormal, the largest float32: bit for bit
    odd.append(Chunk("x", "vib", 10**18 + 10, 333.25, np.array(
        [[0x7FC00001, 0xFFC12345, 0x00000001], [0x7F7FFFFF, 0xFF800000, 0x80000000]],
        np.uint32).view(np.float32), 5))
    path = tmp_path / "f32.mcap"
    _write(path, imu + odd, encoding=encoding)
    got = list(read_mcap(path))
    want = sorted(imu + odd, key=lambda c: c.t0_ns)  # read back in log-time order
    _assert_same(got, want)
    assert all(c.rate_hz is None and c.channels == 6 for c in got if c.node == "s15_04")
    dtypes = {ch.topic.lstrip("/"): _message_dtype(m) for ch, m in _raw_messages(path)}
    assert dtypes["x/vib"] == np.dtype("<f4") and dtypes["s15_04/imu_phone"] == np.dtype("<f4")


def test_protobuf_quiets_a_signaling_nan(tmp_path):
    """The one value protobuf does not keep bit for bit (the CPU quiets it when the float
    passes through a double); the pipeline treats every NaN alike (a gap), and chunk-v1
    keeps it."""
    snan = np.array([[0x7F800001]], np.uint32).view(np.float32)
    for encoding, want in (("protobuf", 0x7FC00001), ("chunk-v1", 0x7F800001)):
        path = tmp_path / f"{encoding}.mcap"
        _write(path, [Chunk("n", "m", 1, 10.0, snan, 0)], encoding=encoding)
        [got] = read_mcap(path)
        assert got.samples.view(np.uint32)[0, 0] == want


def test_written_out_of_order_is_read_in_log_time_order(tmp_path):
    chunks = [Chunk("n", "m", t, 10.0, np.full((2, 1), t, np.float32), i)
              for i, t in enumerate([50, 10, 40, 20, 30])]
    path = tmp_path / "shuffled.mcap"
    _write(path, chunks, chunk_bytes=64)  # many small MCAP chunks
    assert [c.t0_ns for c in read_mcap(path)] == [10, 20, 30, 40, 50]


def test_streams_come_from_the_summary(tmp_path):
    path = tmp_path / "s.mcap"
    _write(path, list(goodvibes.iter_pass(PASS)) + list(sphar.iter_csv(SP)))
    streams = {(s.node, s.modality): s for s in describe_mcap(path)}
    assert set(streams) == {("123", "acoustic"), ("123", "seismic"), ("s15_04", "imu_phone")}
    assert streams[("123", "acoustic")].rate_hz == 9867.440044597608
    assert streams[("s15_04", "imu_phone")].rate_hz is None
    assert streams[("s15_04", "imu_phone")].channels == 6
    log = McapLog(path)
    assert log.summary is not None and log.start_ns == min(c.t0_ns for c in read_mcap(path))
    with open(path, "rb") as f:
        assert [s.name for s in make_reader(f).get_summary().schemas.values()] == [CHUNK_SCHEMA]


def test_nominal_rate_flag_survives_the_log(tmp_path):
    raw = os.path.join(DATA, "goodvibes", "raw", "Node81-Ch2-23-2023_04_11_18_20_00-1528Hz.wav")
    copy = tmp_path / os.path.basename(raw)  # without its sidecar: nominal rate
    shutil.copy(raw, copy)
    chunks = list(goodvibes.iter_raw_wav(copy))
    _write(tmp_path / "n.mcap", chunks)
    got = list(read_mcap(tmp_path / "n.mcap"))
    assert all(c.rate_is_nominal for c in got) and len(got) == len(chunks)
    assert describe_mcap(tmp_path / "n.mcap")[0].rate_is_nominal


def test_negative_time_is_rejected_and_counted(tmp_path):
    path = tmp_path / "neg.mcap"
    rec = _write(path, [Chunk("n", "m", -5, 1.0, np.zeros((1, 1), np.float32), 0),
                        Chunk("n", "m", 5, 1.0, np.zeros((1, 1), np.float32), 1)])
    assert rec.counts["rejected"] == 1
    assert [c.t0_ns for c in read_mcap(path)] == [5]


def test_not_an_mcap_file(tmp_path):
    junk = tmp_path / "junk.mcap"
    junk.write_bytes(b"RIFF not an mcap at all")
    with pytest.raises(CorruptLogError, match="not an MCAP file"):
        McapLog(junk)
    with pytest.raises(InputError, match="does not exist"):
        McapLog(tmp_path / "absent.mcap")


@pytest.fixture(scope="module", params=ENCODINGS)
def small_chunked_log(tmp_path_factory, request):
    """60 one-second chunks of real seismic data in MCAP chunks of ~16 KiB."""
    chunks = list(goodvibes.iter_pass(FULL))
    path = tmp_path_factory.mktemp("log") / "full.mcap"
    _write(path, chunks, chunk_bytes=16 * 1024, encoding=request.param)
    return path, chunks


def _read_until_error(path):
    got = []
    try:
        for c in read_mcap(path):
            got.append(c)
    except CorruptLogError as exc:
        return got, exc
    return got, None


def test_truncated_log_yields_the_valid_prefix_then_raises(small_chunked_log, tmp_path):
    path, chunks = small_chunked_log
    data = path.read_bytes()
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(data[: int(len(data) * 0.8)])
    got, err = _read_until_error(cut)
    assert err is not None and str(cut) in str(err) and "truncated" in str(err)
    assert 0 < len(got) < len(chunks)
    _assert_same(got, chunks[: len(got)])


def test_damaged_chunk_in_a_complete_log(small_chunked_log, tmp_path):
    path, chunks = small_chunked_log
    with open(path, "rb") as f:
        index = make_reader(f).get_summary().chunk_indexes
    assert len(index) > 3
    middle = index[len(index) // 2]
    data = bytearray(path.read_bytes())
    pos = middle.chunk_start_offset + middle.chunk_length // 2  # inside its compressed records
    data[pos:pos + 8] = bytes(b ^ 0xFF for b in data[pos:pos + 8])
    bad = tmp_path / "bad.mcap"
    bad.write_bytes(bytes(data))
    got, err = _read_until_error(bad)
    assert err is not None and "damaged data" in str(err)
    assert 0 < len(got) < len(chunks)
    assert got[-1].t0_ns < middle.message_start_time  # everything before the damaged chunk
    _assert_same(got, chunks[: len(got)])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0.0, 1.0), flip=st.one_of(st.none(), st.tuples(st.floats(0, 1),
                                                                         st.integers(1, 255))))
def test_any_damage_gives_a_prefix_then_corrupt_log_error(small_chunked_log, tmp_path,
                                                         fraction, flip):
    path, chunks = small_chunked_log
    data = bytearray(path.read_bytes())
    if flip is not None:
        pos = 8 + int(flip[0] * (len(data) - 9))
        data[pos] ^= flip[1]
    data = data[: max(0, int(len(data) * fraction))] if fraction < 1 else data
    target = tmp_path / f"h{abs(hash((fraction, flip)))}.mcap"
    target.write_bytes(bytes(data))
    try:
        got, err = _read_until_error(target)
    except CorruptLogError:  # refused at open (bad magic)
        return
    if fraction < 1:
        assert err is not None
    if flip is None:
        _assert_same(got, chunks[: len(got)])


def test_foreign_and_malformed_messages_are_counted_not_fatal(tmp_path):
    path = tmp_path / "mixed.mcap"
    good = Chunk("n", "m", 100, 10.0, np.ones((3, 1), np.float32), 0)
    with open(path, "wb") as f:
        w = Writer(f)
        w.start()
        ours = w.register_channel("n/m", ENCODING, 0, {"node": "n", "modality": "m"})
        other = w.register_channel("/tf", "json", 0, {})
        w.add_message(other, log_time=50, data=b"{}", publish_time=50)
        w.add_message(ours, log_time=60, data=encode_binary(good)[:-1], publish_time=60)
        w.add_message(ours, log_time=100, data=encode_binary(good), publish_time=100)
        w.finish()
    log = McapLog(path)
    got = list(log.chunks())
    _assert_same(got, [good])
    assert log.counters == {"messages": 1, "malformed": 1, "decisions": 0, "foreign": 1}
    assert [(s.node, s.modality) for s in log.streams()] == [("n", "m")]


def test_record_converts_inputs_and_reads_back(tmp_path):
    out = tmp_path / "out.mcap"
    counts = record([PASS, FULL], out)
    want = list(open_inputs([PASS, FULL]).chunks())
    assert counts["chunks"] == len(want) and counts["rejected"] == 0
    assert counts["samples"] == sum(c.n for c in want)
    assert counts["per_stream"] == {"123/acoustic": 3, "123/seismic": 3, "81/seismic": 60}
    assert counts["bytes"] == os.path.getsize(out) and not os.path.exists(f"{out}.partial")
    _assert_same(list(read_mcap(out)), want)
    # An MCAP is itself an input: replaying it gives the same chunks.
    _assert_same(list(open_inputs(out).chunks()), want)


def test_replay_of_a_truncated_log_through_inputs(small_chunked_log, tmp_path):
    path, chunks = small_chunked_log
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(path.read_bytes()[:-5000])
    inputs = open_inputs([cut, PASS])
    got = []
    with pytest.raises(CorruptLogError):
        for c in inputs.chunks():
            got.append(c)
    # The other input is read to the end; the log gives what it has.
    assert sum(1 for c in got if c.node == "123") == 6
    assert 0 < sum(1 for c in got if c.node == "81") < len(chunks)


def test_committed_sample_log():
    streams = {(s.node, s.modality) for s in describe_mcap(SAMPLE)}
    assert streams == {("123", "acoustic"), ("123", "seismic"), ("129", "acoustic"),
                       ("129", "seismic"), ("121", "acoustic"), ("121", "seismic"),
                       ("81", "seismic")}
    chunks = list(read_mcap(SAMPLE))
    assert [c.t0_ns for c in chunks] == sorted(c.t0_ns for c in chunks)
    assert sum(c.n for c in chunks if c.node == "81") == 20 * 1528
    assert os.path.getsize(SAMPLE) < 1 << 20


def test_unloggable_chunks_are_rejected_and_counted(tmp_path):
    path = tmp_path / "wide.mcap"
    rec = _write(path, [Chunk("n", "m", 1, 1.0, np.zeros((2, 65), np.float32), 0),
                        Chunk("n", "m", 2, 1.0, np.zeros((2, 1), np.float32), 1)])
    assert rec.counts["rejected"] == 1
    assert [c.seq for c in read_mcap(path)] == [1]
    with pytest.raises(InputError, match="cannot read"):
        McapLog(tmp_path)  # a folder


def test_committed_chunk_v1_fixture_still_reads():
    """A file of the first encoding, committed: every later reader must read it."""
    with open(CHUNK_V1_FIXTURE, "rb") as f:
        summary = make_reader(f).get_summary()
    assert {c.message_encoding for c in summary.channels.values()} == {ENCODING}
    assert [s.name for s in summary.schemas.values()] == [SCHEMA_NAME]
    imu = list(itertools.islice(sphar.iter_csv(SP), 4))
    want = sorted(list(goodvibes.iter_pass(PASS)) + imu, key=lambda c: c.t0_ns)
    _assert_same(list(read_mcap(CHUNK_V1_FIXTURE)), want)
    assert {(s.node, s.modality, s.channels) for s in describe_mcap(CHUNK_V1_FIXTURE)} == {
        ("123", "acoustic", 1), ("123", "seismic", 1), ("s15_04", "imu_phone", 6)}
    # and is replayed like any input
    _assert_same(list(open_inputs([CHUNK_V1_FIXTURE]).chunks()), want)


def _decision(node: str, seq: int, end_ns: int) -> Decision:
    return Decision(node, seq, end_ns - 1_000_000_000, end_ns, "vehicle",
                    {"background": 0.25, "vehicle": 0.75}, ("acoustic",), ("seismic",),
                    "subset:acoustic", {"seismic": "gap"}, "m@1", {"acoustic": 1.0})


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_decision_channels_beside_the_chunks(tmp_path, encoding):
    chunks = list(goodvibes.iter_pass(PASS))
    ends = [c.t0_ns + 500_000_000 for c in chunks[:3]]
    decisions = [_decision("123", k, end) for k, end in enumerate(ends)]
    path = tmp_path / "d.mcap"
    with McapRecorder(path, encoding=encoding) as rec:
        for c in chunks:
            rec.write(c)
        assert rec.write_decisions(reversed(decisions)) == 3  # out of order: read in order
        assert rec.write_decisions([_decision("123", 9, -1)]) == 0  # before 1970: refused
    assert rec.decisions == 3 and rec.counts["rejected"] == 1
    log = McapLog(path)
    _assert_same(list(log.chunks()), chunks)  # the chunk reader skips the decisions
    assert log.counters == {"messages": 6, "malformed": 0, "decisions": 3, "foreign": 0}
    assert {(s.node, s.modality) for s in log.streams()} == {("123", "acoustic"),
                                                              ("123", "seismic")}
    assert log.decision_nodes() == ["123"]
    assert list(read_decisions(path)) == [d.to_dict() for d in decisions]
    with open(path, "rb") as f:
        reader = make_reader(f)
        topics = {c.topic: c.message_encoding for c in reader.get_summary().channels.values()}
        assert topics["/123/decisions"] == "json"
        times = [m.log_time for _, ch, m in reader.iter_messages(topics=["/123/decisions"])]
    assert times == ends  # log time = window end


def _protobuf_log(path, payloads: list[bytes]) -> McapLog:
    from edgefuse.sensors.readers.mcap_schemas import CHUNK_SCHEMA_DATA
    with open(path, "wb") as f:
        w = Writer(f)
        w.start()
        schema = w.register_schema(CHUNK_SCHEMA, "protobuf", CHUNK_SCHEMA_DATA)
        channel = w.register_channel("/n/m", "protobuf", schema, {"node": "n", "modality": "m"})
        for k, data in enumerate(payloads):
            w.add_message(channel, log_time=100 + k, data=data, publish_time=100 + k)
        w.finish()
    return McapLog(path)


def test_malformed_protobuf_chunks_are_counted_and_skipped(tmp_path):
    def msg(**kw) -> bytes:
        m = SensorChunk(rate_hz=kw.pop("rate_hz", 10.0))
        m.timestamp.FromNanoseconds(kw.pop("t0", 100))
        for column in kw.pop("pcm", [[1, 2]]):
            m.channel.add().pcm16.extend(column)
        for column in kw.pop("f32", []):
            m.channel.add().f32.extend(column)
        return m.SerializeToString()

    both = SensorChunk.FromString(msg())
    both.channel[0].f32.extend([1.0, 2.0])
    bad = [b"\xff\xff\xff", msg(pcm=[[40000]]), msg(pcm=[[1, 2], [3]]), msg(pcm=[]),
           msg(rate_hz=-1.0), both.SerializeToString(), msg(pcm=[[5, 6]], f32=[[0.5, 1.5]])]
    log = _protobuf_log(tmp_path / "bad.mcap", bad)
    got = list(log.chunks())
    assert log.counters["malformed"] == 6 and log.counters["messages"] == 1
    np.testing.assert_array_equal(got[0].samples, [[5, 0.5], [6, 1.5]])  # mixed channels ok


def _valid_message() -> bytes:
    m = SensorChunk(rate_hz=100.0, seq=3)
    m.timestamp.FromNanoseconds(10**18)
    for column in ([0.5, 1.5], [2.0, -3.0]):
        m.channel.add().f32.extend(column)
    return m.SerializeToString()


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=4), cut=st.floats(0.0, 1.0))
def test_any_bytes_decode_to_a_chunk_or_a_wire_format_error(edits, cut):
    from edgefuse.runtime.core.errors import WireFormatError
    from edgefuse.sensors.readers.mcap_schemas import decode_chunk
    data = bytearray(_valid_message())
    for where, value in edits:
        data[int(where * len(data))] = value
    data = data[: int(cut * len(data))] if cut < 1 else data
    try:
        chunk = decode_chunk(bytes(data), "n", "m", 1 << 20)
    except WireFormatError:
        return
    assert chunk.samples.dtype == np.float32 and chunk.samples.ndim == 2
