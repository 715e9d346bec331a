"""Hostile serial input: lying frame headers, stalled frames, floods of bad frames.

The framing rules are driven directly on the pure parser (time passed in as an
argument); the behaviour users see is checked over real ptys with the real
SerialSource thread.
"""
from __future__ import annotations

import logging
import struct
import threading
import time
import zlib

import pytest

from edgefuse.runtime.core.errors import ConfigError
from edgefuse.runtime.core.ratelimit import WarnLimiter
from edgefuse.runtime.service.simulate import payload_of
from edgefuse.sensors.readers.inputs import open_inputs
from edgefuse.sensors.live.serial_framing import (
    DEFAULT_MAX_FRAME, SYNC, BinaryFrameParser, encode_chunk_frame, encode_frame,
    encode_json_line,
)
from edgefuse.sensors.live.serial_source import SerialSettings, SerialSource

from tests.conftest import wait_until
from tests.daemon_helpers import SAMPLE, synthetic_chunks
from tests.test_serial_source import make_chunk, read_n, same

SERIAL_LOG = "edgefuse.sensors.live.serial_source"


def lying_header(body_len: int, node: str = "n1", modality: str = "imu") -> bytes:
    """A frame header whose header CRC is valid but whose body never comes."""
    lengths = struct.pack("<IBB", body_len, len(node), len(modality))
    return SYNC + lengths + struct.pack("<I", zlib.crc32(lengths))


def bad_crc_frame(seq: int) -> bytes:
    frame = bytearray(encode_chunk_frame(make_chunk(seq=seq)))
    frame[-10] ^= 0xFF  # a payload byte: the body CRC no longer matches
    return bytes(frame)


class FakeClock:
    """The WarnLimiter's clock, moved by the test (read from the reader thread)."""

    def __init__(self) -> None:
        self._now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


def warnings_about(caplog, reason: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == SERIAL_LOG and r.levelno == logging.WARNING and f"({reason})" in
            r.getMessage()]


# --- the parser, time passed in ---------------------------------------------------
def test_oversized_header_is_refused_at_once_and_the_next_frame_decoded():
    good = [make_chunk(seq=i) for i in range(2)]
    parser = BinaryFrameParser(max_frame_bytes=4096)
    got = parser.feed(lying_header(200_000) + b"".join(encode_chunk_frame(c) for c in good))
    assert [c.seq for c in got] == [0, 1] and all(same(g, c) for g, c in zip(got, good))
    assert parser.errors == {"oversized": 1}
    news = parser.take_stream_news()  # refused at the header: no node/modality read yet
    (count, detail), = news.values()
    assert news.keys() == {("oversized", None, None)} and count == 1
    assert "200018 bytes" in detail and "max_frame_bytes 4096" in detail
    assert parser.take_stream_news() == {}  # handed out once


def test_stalled_frame_times_out_and_a_frame_inside_it_is_found():
    big = encode_chunk_frame(make_chunk(seq=9, n=400))       # ~4.8 KB announced
    good = encode_chunk_frame(make_chunk(seq=1))
    parser = BinaryFrameParser(frame_timeout_s=1.0)
    assert parser.feed(big[:100] + good) == []               # good is held inside big's length
    assert parser.poll(10.0) == []                           # the stall is timed from here
    assert parser.poll(10.9) == [] and parser.errors == {}
    got = parser.poll(11.1)
    assert [c.seq for c in got] == [1] and parser.errors == {"frame_timeout": 1}
    assert "started but only" in parser.take_stream_news()[("frame_timeout", None, None)][1]
    assert parser.feed(good)[0].seq == 1 and len(parser._buf) == 0


def test_frame_timeout_allows_for_the_transfer_time_and_restarts_per_frame():
    frame = encode_chunk_frame(make_chunk(seq=3, n=80))      # ~1 KB
    parser = BinaryFrameParser(frame_timeout_s=0.5, byte_time_s=0.001)  # ~1 s to transfer
    parser.feed(frame[:50])
    parser.poll(0.0)
    parser.feed(frame[50:-1])
    assert parser.poll(1.4) == [] and parser.errors == {}    # 0.5 s + ~1 s transfer allowed
    got = parser.feed(frame[-1:] + frame[:20])               # completes; the next one starts
    assert [c.seq for c in got] == [3]
    parser.poll(5.0)                                          # the new frame is timed from now
    assert parser.poll(5.3) == [] and parser.errors == {}
    parser.poll(7.0)
    assert parser.errors == {"frame_timeout": 1}


def test_without_a_timeout_poll_never_drops():
    parser = BinaryFrameParser()
    parser.feed(encode_chunk_frame(make_chunk())[:30])
    assert parser.poll(0.0) == [] and parser.poll(1e9) == [] and parser.errors == {}


def test_default_frame_bound_is_small_but_fits_the_chunks_we_send():
    assert DEFAULT_MAX_FRAME < (1 << 20) // 8
    # the bundled recording and the tests' synthetic streams, as `edgefuse simulate` frames them
    chunks = list(open_inputs([SAMPLE]).chunks()) + synthetic_chunks("s1", 2.0)
    largest = max(len(encode_frame(c.node, c.modality, payload_of(c))) for c in chunks)
    assert largest <= DEFAULT_MAX_FRAME // 2, largest


@pytest.mark.parametrize(("key", "value"), [("max_frame_bytes", 10), ("max_frame_bytes", 1 << 30),
                                            ("max_line_bytes", 0), ("frame_timeout_s", 0.0)])
def test_settings_refuse_bad_bounds(key, value):
    with pytest.raises(ConfigError, match=key):
        SerialSettings(device="/dev/null", **{key: value})
    assert SerialSettings(device="/dev/null").max_frame_bytes == DEFAULT_MAX_FRAME


# --- over real ptys --------------------------------------------------------------
def test_200k_body_header_does_not_stall_the_line(pty_pair, caplog):
    good = [make_chunk(seq=i, n=50) for i in range(3)]
    with SerialSource(SerialSettings(device=pty_pair.path, protocol="binary")) as source:
        assert source.wait_connected(5)
        start = time.monotonic()
        pty_pair.write(lying_header(200_000) + b"".join(encode_chunk_frame(c) for c in good))
        got = read_n(source, 3, timeout_s=10)
        elapsed = time.monotonic() - start
        stats = source.stats()
    assert elapsed < 2.0, f"good frames took {elapsed:.1f} s behind a lying header"
    assert all(same(g, c) for g, c in zip(got, good))
    assert stats["oversized"] == 1 and stats["malformed"] == {}
    (line,) = warnings_about(caplog, "oversized")
    assert pty_pair.path in line and "max_frame_bytes 65536" in line


def test_truncated_frame_then_silence_times_out(pty_pair):
    big = encode_chunk_frame(make_chunk(seq=9, n=400))       # announces ~4.8 KB
    good = [make_chunk(seq=i) for i in range(3)]               # ~0.4 KB together
    with SerialSource(SerialSettings(device=pty_pair.path, protocol="binary")) as source:
        assert source.wait_connected(5)
        pty_pair.write(big[:100])                               # the sender dies mid-frame
        wait_until(lambda: source.stats()["malformed"].get("frame_timeout"), 10,
                   "the stalled frame to time out")
        pty_pair.write(b"".join(encode_chunk_frame(c) for c in good))
        got = read_n(source, 3)
        stats = source.stats()
    assert all(same(g, c) for g, c in zip(got, good))
    assert stats["malformed"] == {"frame_timeout": 1}
    assert stats["skipped_bytes"] == 100


def test_bad_crc_frames_are_counted_and_warned_beyond_the_first(pty_pair, caplog):
    clock = FakeClock()
    limiter = WarnLimiter(logging.getLogger(SERIAL_LOG), clock=clock)
    settings_ = SerialSettings(device=pty_pair.path, protocol="binary")
    with SerialSource(settings_, warn_limiter=limiter) as source:
        assert source.wait_connected(5)
        pty_pair.write(b"".join(bad_crc_frame(i) for i in range(3))
                       + encode_chunk_frame(make_chunk(seq=10)))
        assert [c.seq for c in read_n(source, 1)] == [10]
        first = warnings_about(caplog, "bad_crc")
        assert len(first) == 1                                # the first at once, then quiet
        assert pty_pair.path in first[0] and "expected 0x" in first[0]
        clock.advance(61)                                     # a minute later
        pty_pair.write(b"".join(bad_crc_frame(i) for i in range(2))
                       + encode_chunk_frame(make_chunk(seq=11)))
        assert [c.seq for c in read_n(source, 1)] == [11]
        stats = source.stats()
    lines = warnings_about(caplog, "bad_crc")
    assert len(lines) == 2 and "(2 more like this in the last 60 s)" in lines[1]
    assert pty_pair.path in lines[1]
    assert stats["malformed"] == {"bad_crc": 5} and stats["decoded"] == 2
    assert stats["received"] == 7


def test_bad_json_lines_are_warned_with_the_port(pty_pair, caplog):
    with SerialSource(SerialSettings(device=pty_pair.path, protocol="json")) as source:
        assert source.wait_connected(5)
        pty_pair.write(b"{not json\n" + b'{"node":"n1"}\n' + encode_json_line(make_chunk()))
        read_n(source, 1)
        stats = source.stats()
    assert stats["malformed"] == {"bad_json": 1, "bad_fields": 1}
    (bad_json,) = warnings_about(caplog, "bad_json")
    (bad_fields,) = warnings_about(caplog, "bad_fields")
    assert pty_pair.path in bad_json and "{not json" in bad_json
    assert pty_pair.path in bad_fields and "'modality'" in bad_fields


def test_stats_are_flat_numbers_with_the_serial_counters(pty_pair):
    settings_ = SerialSettings(device=pty_pair.path, protocol="csv", node="w")
    with SerialSource(settings_) as source:
        assert source.wait_connected(5)
        pty_pair.write(b"garbage line\nacc,1000,1,2\n")
        wait_until(lambda: source.stats()["decoded"] >= 1, 5, "the idle flush")
        stats = source.stats()
    for key in ("bytes", "skipped_bytes", "open_failures", "oversized", "csv_flushes_explicit"):
        assert key in stats
    assert all(isinstance(v, (int, float)) for k, v in stats.items() if k != "malformed")
    assert all(isinstance(v, int) for v in stats["malformed"].values())
    assert stats["bytes"] == 26 and stats["malformed"] == {"bad_csv": 1}


def test_pyserial_urls_open():
    with SerialSource(SerialSettings(device="loop://", protocol="binary")) as source:
        assert source.wait_connected(5)
        assert source.stats()["open_failures"] == 0
