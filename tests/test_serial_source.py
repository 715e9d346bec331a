"""Serial framing parsers (pure, fuzzed) and SerialSource over real ptys and socat links."""
from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefuse.runtime.service import config
from edgefuse.runtime.core import wire
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import ConfigError
from edgefuse.sensors.live.serial_csv import CsvLineParser, encode_csv_lines
from edgefuse.sensors.live.serial_framing import (
    SYNC, BinaryFrameParser, JsonLineParser, encode_chunk_frame, encode_frame, encode_json_line,
)
from edgefuse.sensors.live.serial_source import SerialSettings, SerialSource

from tests.conftest import wait_until


def make_chunk(node="n1", modality="imu", seq=0, n=8, channels=3, rate=100.0):
    rng = np.random.default_rng(seq + 1)
    return Chunk(node, modality, 1_700_000_000_000_000_000 + seq * 10**9, rate,
                 rng.normal(0, 5, (n, channels)).astype(np.float32), seq)


def same(got: Chunk, want: Chunk) -> bool:
    return ((got.node, got.modality, got.t0_ns, got.rate_hz, got.seq) ==
            (want.node, want.modality, want.t0_ns, want.rate_hz, want.seq)
            and np.array_equal(got.samples, want.samples))


def feed_all(parser, data: bytes, step: int | None = None) -> list[Chunk]:
    step = step or len(data) or 1
    out = []
    for i in range(0, len(data), step):
        out += parser.feed(data[i:i + step])
    return out


# --- JSON lines ---------------------------------------------------------------
def test_json_lines_roundtrip_and_bad_lines_counted():
    chunks = [make_chunk(seq=i) for i in range(3)]
    data = (encode_json_line(chunks[0]) + b"{broken\n" + b'{"node":"n1"}\n' + b"\n"
            + encode_json_line(chunks[1]).replace(b"\n", b"\r\n")
            + b'{"node":"n1","modality":"imu","t0_ns":1,"seq":1,"values":[NaN,1]}\n'
            + b"x" * 3000 + b"\n" + b"[" * 100 + b"\n" + encode_json_line(chunks[2]))
    parser = JsonLineParser(max_line_bytes=1024)
    got = feed_all(parser, data, step=7)
    assert [c.seq for c in got] == [0, 1, 1, 2]
    assert same(got[0], chunks[0]) and same(got[1], chunks[1]) and same(got[3], chunks[2])
    assert np.isnan(got[2].samples[0, 0])
    assert parser.errors == {"bad_json": 2, "bad_fields": 1, "oversized": 1}


def test_json_line_parser_checks_the_modality_not_the_channel_count():
    """The channel count is the aligner's check (one owner, live and replay alike)."""
    parser = JsonLineParser(allowed={"imu"})
    data = (encode_json_line(make_chunk(modality="thermal"))
            + encode_json_line(make_chunk(channels=2)) + encode_json_line(make_chunk(seq=4)))
    got = parser.feed(data)
    assert [(c.seq, c.channels) for c in got] == [(0, 2), (4, 3)]
    assert parser.errors == {"unknown_modality": 1}


def test_long_line_without_newline_is_bounded():
    parser = JsonLineParser(max_line_bytes=200)
    for _ in range(50):
        assert parser.feed(b"y" * 64) == []
    assert len(parser._buf) <= 200
    good = make_chunk(n=1, channels=1)
    got = parser.feed(b"tail\n" + encode_json_line(good))
    assert [c.seq for c in got] == [0] and parser.errors == {"oversized": 1}


# --- CSV lines ------------------------------------------------------------------
def test_csv_groups_samples_into_chunks():
    acc = make_chunk(modality="acc", n=10, channels=3, rate=100.0)
    gyro = make_chunk(modality="gyro", seq=0, n=3, channels=3, rate=100.0)
    parser = CsvLineParser("watch", group_samples=4, rate_hz={"acc": 100.0})
    got = feed_all(parser, b"# header comment\n" + encode_csv_lines(acc)
                   + encode_csv_lines(gyro), step=13)
    got += parser.flush()
    assert [(c.modality, c.n) for c in got] == [("acc", 4), ("acc", 4), ("acc", 2), ("gyro", 3)]
    assert all(c.node == "watch" for c in got)
    assert [c.seq for c in got] == [0, 1, 2, 0]
    assert got[0].rate_hz == 100.0 and got[3].rate_hz is None  # gyro rate not configured
    np.testing.assert_array_equal(np.concatenate([c.samples for c in got[:3]]), acc.samples)
    assert got[1].t0_ns == acc.t0_ns + 4 * 10_000_000
    assert parser.flushes["size"] == 2 and parser.flushes["modality"] == 1


def test_csv_flushes_on_gap_backwards_and_channel_change_and_counts_bad_lines():
    lines = [b"acc,1000,1,2", b"acc,2000,1,2", b"acc,900000000,3,4",  # gap
             b"acc,800000000,5,6",                                      # backwards
             b"acc,800000001,5,6,7",                                    # channel change
             b"acc,notatime,1", b"acc,5", b",1,2", b"acc,1,x", b"\xff\xfe,1,2",
             b"acc,1" + b"0" * 5000 + b",1"]
    parser = CsvLineParser("n", group_samples=100, max_line_bytes=8192)
    got = parser.feed(b"\n".join(lines) + b"\n") + parser.flush()
    assert [c.n for c in got] == [2, 1, 1, 1]
    assert parser.flushes == {"size": 0, "modality": 0, "gap": 1, "backwards": 1,
                              "channels": 1, "explicit": 1}
    assert parser.errors == {"bad_csv": 6}


# --- binary frames --------------------------------------------------------------
def test_binary_frames_roundtrip_resync_and_crc():
    chunks = [make_chunk(seq=i) for i in range(4)]
    frames = [encode_chunk_frame(c) for c in chunks]
    corrupt = bytearray(frames[1])
    corrupt[-10] ^= 0xFF                          # body damaged -> bad CRC
    bad_head = bytearray(frames[2])
    bad_head[5] ^= 0x01                           # length damaged -> header CRC fails
    stream = (b"garbage" + SYNC + b"\x00" * 3 + frames[0] + bytes(corrupt) + SYNC[:2]
              + bytes(bad_head) + frames[2] + b"\x00" * 40 + frames[3])
    for step in (1, 5, len(stream)):
        parser = BinaryFrameParser()
        got = feed_all(parser, stream, step)
        assert [c.seq for c in got] == [0, 2, 3]
        assert all(same(g, chunks[g.seq]) for g in got)
        assert parser.errors["bad_crc"] == 1 and parser.errors["bad_frame"] >= 2


def test_binary_frame_payload_errors_are_counted():
    parser = BinaryFrameParser(max_frame_bytes=4096, allowed={"imu"})
    good = make_chunk(seq=7)
    payload = wire.encode_binary(good)
    stream = (encode_frame("n1", "imu", payload[:-2])         # truncated payload, CRC fine
              + encode_frame("n1", "thermal", payload)          # unknown modality
              + encode_frame("n1", "imu", b"EFCK" + b"\x01\x09" + payload[6:])  # dtype
              + encode_frame("n1", "imu", wire.encode_json(good))  # JSON payload accepted
              + encode_frame("n1", "imu", b"z" * 5000)           # longer than max frame
              + encode_chunk_frame(good))
    got = parser.feed(stream)
    assert [c.seq for c in got] == [7, 7]
    # a valid header announcing more than max_frame_bytes is refused at once as oversized
    assert parser.errors == {"truncated": 1, "unknown_modality": 1, "bad_dtype": 1,
                             "oversized": 1}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000), step=st.integers(1, 600))
def test_any_bytes_give_chunks_or_counted_errors(data, step):
    for parser in (JsonLineParser(max_line_bytes=512), CsvLineParser("n", group_samples=3,
                   max_line_bytes=128), BinaryFrameParser(max_frame_bytes=1024)):
        got = feed_all(parser, data, step)
        got += parser.reset()
        assert all(isinstance(c, Chunk) for c in got)
        assert len(parser._buf) <= parser.max_bytes


def _valid_stream() -> bytes:
    c1, c2 = make_chunk(seq=1, n=3), make_chunk(modality="acc", seq=2, n=4, channels=1)
    return (encode_chunk_frame(c1) + encode_json_line(c1) + encode_csv_lines(c2)
            + encode_chunk_frame(c2, "<f4") + encode_json_line(c2) + encode_chunk_frame(c1))


_VALID = _valid_stream()
_mutation = st.tuples(st.sampled_from(["flip", "delete", "insert", "cut"]),
                      st.integers(0, len(_VALID)), st.integers(0, 255), st.integers(1, 40))
_texty = st.text(alphabet='0123456789,.-+eE\n\r{}[]":nodemalityvus_NaIfy \xa5Z',
                 max_size=800).map(lambda s: s.encode("latin-1"))


def _mutate(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    for op, pos, byte, size in mutations:
        pos = min(pos, len(buf))
        if op == "flip" and pos < len(buf):
            buf[pos] ^= byte or 1
        elif op == "delete":
            del buf[pos:pos + size]
        elif op == "insert":
            buf[pos:pos] = bytes([byte]) * size
        elif op == "cut":
            del buf[pos:]
    return bytes(buf)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.lists(_mutation, max_size=8).map(lambda m: _mutate(_VALID, m)), _texty),
       step=st.integers(1, 300))
def test_mutated_and_texty_streams_never_raise(data, step):
    for parser in (JsonLineParser(max_line_bytes=2048), CsvLineParser("n", group_samples=3),
                   BinaryFrameParser(max_frame_bytes=2048)):
        got = feed_all(parser, data, step) + parser.reset()
        assert all(isinstance(c, Chunk) and c.samples.dtype == np.float32 for c in got)
        assert len(parser._buf) <= parser.max_bytes


_frame_sources = st.lists(st.tuples(st.integers(0, 1000), st.sampled_from(["imu", "acc", "s"]),
                                    st.integers(1, 12), st.integers(1, 4)), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(specs=_frame_sources, garbage=st.lists(st.binary(max_size=60), min_size=6, max_size=6),
       step=st.integers(1, 400))
def test_frames_survive_garbage_between_them(specs, garbage, step):
    chunks = [make_chunk(modality=m, seq=s, n=n, channels=ch) for s, m, n, ch in specs]
    stream = b"".join(g + encode_chunk_frame(c) for g, c in zip(garbage, chunks)) + garbage[-1]
    parser = BinaryFrameParser(max_frame_bytes=4096)
    got = feed_all(parser, stream, step)
    assert len(got) == len(chunks)
    assert all(same(g, c) for g, c in zip(got, chunks))


def test_frame_encoder_refuses_bad_names():
    with pytest.raises(ValueError):
        encode_frame("", "imu", b"x")
    with pytest.raises(ValueError):
        encode_frame("n" * 65, "imu", b"x")


def test_settings_validation():
    with pytest.raises(ConfigError, match="node"):
        SerialSettings(device="/dev/null", protocol="csv")
    with pytest.raises(ConfigError, match="protocol"):
        SerialSettings(device="/dev/null", protocol="xml")
    with pytest.raises(ConfigError, match=r"\[source.serial#1\]: unknown key\(s\) \['buad'\]"):
        config.from_dict({"source": {"serial": [{"device": "/dev/null", "buad": 9600}]}})


# --- over real ptys -----------------------------------------------------------------
def read_n(source, n, timeout_s=5.0):
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += source.read(0.1)
    assert len(got) == n, f"expected {n} chunks, read {len(got)}; stats {source.stats()}"
    return got


def test_json_lines_over_pty(pty_pair):
    chunks = [make_chunk(seq=i, n=50) for i in range(5)]
    with SerialSource(SerialSettings(device=pty_pair.path, protocol="json")) as source:
        assert source.wait_connected(5)
        pty_pair.write(b"".join(encode_json_line(c) for c in chunks[:2]) + b"{bad}\n"
                       + b"".join(encode_json_line(c) for c in chunks[2:]))
        got = read_n(source, 5)
        stats = source.stats()
    assert all(same(g, c) for g, c in zip(got, chunks))
    assert stats["malformed"] == {"bad_json": 1} and stats["decoded"] == 5
    assert stats["received"] == 6


def test_csv_over_pty_flushes_when_idle(pty_pair):
    acc = make_chunk(modality="acc", n=10, rate=50.0)
    settings_ = SerialSettings(device=pty_pair.path, protocol="csv", node="watch",
                               csv_group_samples=4, csv_rate_hz={"acc": 50.0}, idle_flush_s=0.1)
    with SerialSource(settings_) as source:
        assert source.wait_connected(5)
        pty_pair.write(encode_csv_lines(acc))
        got = read_n(source, 3)  # 4 + 4 + 2, the last two flushed after the line went idle
    assert [c.n for c in got] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([c.samples for c in got]), acc.samples)
    assert got[0].rate_hz == 50.0 and got[0].node == "watch"


def test_binary_frames_with_garbage_over_pty(pty_pair):
    chunks = [make_chunk(seq=i, n=200) for i in range(6)]
    rng = np.random.default_rng(3)
    stream = b"".join(rng.bytes(int(rng.integers(0, 300))) + encode_chunk_frame(c, "<f4")
                      for c in chunks)
    with SerialSource(SerialSettings(device=pty_pair.path, protocol="binary")) as source:
        assert source.wait_connected(5)
        pty_pair.write(stream)
        got = read_n(source, 6)
        stats = source.stats()
    assert all(same(g, c) for g, c in zip(got, chunks))
    assert stats["skipped_bytes"] > 0 and stats["bytes"] == len(stream)


def test_exclusive_open_refuses_a_second_reader(pty_pair):
    first = SerialSource(SerialSettings(device=pty_pair.path, reopen_min_s=0.05,
                                        reopen_max_s=0.1))
    second = SerialSource(SerialSettings(device=pty_pair.path, reopen_min_s=0.05,
                                         reopen_max_s=0.1))
    with first:
        assert first.wait_connected(5)
        with second:
            wait_until(lambda: second.stats()["open_failures"] >= 2, 5, "refused opens")
            assert not second.wait_connected(0)


@pytest.mark.slow
def test_unplug_and_replug_via_socat(socat_link):
    chunks = [make_chunk(seq=i, n=20) for i in range(4)]
    s = SerialSettings(device=socat_link.device, protocol="binary", reopen_min_s=0.1,
                       reopen_max_s=0.5)
    with SerialSource(s) as source:
        assert source.wait_connected(5)
        socat_link.write(encode_chunk_frame(chunks[0]) + encode_chunk_frame(chunks[1])[:30])
        assert [c.seq for c in read_n(source, 1)] == [0]
        socat_link.stop()                                      # unplug mid-frame
        wait_until(lambda: source.stats()["disconnects"] >= 1, 5, "the disconnect")
        wait_until(lambda: source.stats()["open_failures"] >= 2, 5, "failed reopen attempts")
        assert not source.wait_connected(0)
        socat_link.start()                                     # replug: same path, new pty
        wait_until(lambda: source.stats()["reconnects"] >= 1, 5, "the reopen")
        socat_link.write(b"".join(encode_chunk_frame(c) for c in chunks[1:]))
        assert [c.seq for c in read_n(source, 3)] == [1, 2, 3]
        stats = source.stats()
    assert stats["malformed"].get("truncated") == 1
    assert stats["disconnects"] == 1 and stats["reconnects"] == 1
