"""Pure parsers of the serial protocols: ``feed(bytes) -> list[Chunk]``.

JSON lines and binary frames here, CSV lines in sensors.live.serial_csv; the
one table naming the three is ``serial_source.PROTOCOLS``.

No port, no thread, no clock: bytes in, chunks out, everything else counted
in ``errors`` (reason -> count, reasons of sensors.live.accounting and
below) and ``skipped_bytes``, both in ``stats()``. They never raise on bad
input; every buffer is bounded. ``take_stream_news()`` hands the caller the
errors since its last call, each with a line saying what was expected and
found, so the caller (the serial source) can warn about them with the port
named. Time enters only as an argument: ``poll(now)`` drops a binary frame
that started but stalled; ``idle()`` is called when the line went quiet.

The parsers own the checks of the serial path: a line's or frame's size
(``max_line_bytes``, ``max_frame_bytes``) and the allowed modalities. The
channel count is the aligner's check (sensors.live.accounting).


(a) JSON lines: one object per line, ``{"node": .., "modality": .., <the JSON
    chunk fields of runtime.core.wire>}``, UTF-8, ``\\n`` (or ``\\r\\n``) ended.
(b) CSV lines: ``modality,t_ns,v1,v2,...``, one sample per line, node from
    config; consecutive samples are grouped into chunks (serial_csv.CsvLineParser).
(c) Binary frames (little-endian), resynchronisable after garbage:

    offset       size  field
    0            4     sync  A5 5A 45 46  (b"\\xa5\\x5aEF")
    4            4     body_len: uint32 = len(node) + len(modality) + len(payload)
    8            1     node_len (1..64)
    9            1     modality_len (1..64)
    10           4     header_crc: zlib.crc32 of bytes 4..9
    14           n     node, UTF-8
    14+n         m     modality, UTF-8
    14+n+m       p     payload: a runtime.core.wire chunk (binary ``EFCK...``; JSON accepted)
    14+body_len  4     body_crc: zlib.crc32 of bytes 14 .. 14+body_len-1

    The header CRC rejects a false sync after 14 bytes, so garbage never makes
    the reader wait for a bogus length. A valid header announcing a frame
    longer than ``max_frame_bytes`` is refused at once (``oversized``), never
    awaited. On any bad frame the reader skips ONE byte past the sync and
    scans for the next sync, so a good frame right after a corrupt one is
    still found. A frame that started but does not complete in time (see
    ``BinaryFrameParser.poll``) is dropped the same way (``frame_timeout``).
"""
from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from edgefuse.runtime.core import wire
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import WireFormatError
from edgefuse.sensors.live.accounting import (
    BAD_CRC, BAD_FIELDS, BAD_FRAME, BAD_JSON, OVERSIZED, TRUNCATED, RejectedMessage,
    check_modality,
)
from edgefuse.sensors.live.base import decode_payload

if TYPE_CHECKING:  # the settings import this module
    from edgefuse.sensors.live.serial_source import SerialSettings

SYNC = b"\xa5\x5aEF"
FRAME_HEAD = struct.Struct("<4sIBBI")   # sync, body_len, node_len, modality_len, header_crc
FRAME_HEAD_SIZE = FRAME_HEAD.size       # 14
CRC = struct.Struct("<I")
MAX_NAME = 64
DEFAULT_MAX_LINE = 256 * 1024
# Whole frame, header and CRCs included. 64 KiB holds 1.6 s of 9.9 kHz float32
# audio (3.3 s as int16); the chunks sent in practice are 0.5-1 s (~20 KB). A
# bound far below wire's 1 MiB keeps one lying header from holding the line
# while its body is awaited (115200 baud moves ~11 KB/s).
DEFAULT_MAX_FRAME = 64 * 1024
MAX_FRAME_LIMIT = 16 * 1024 * 1024    # the largest max_frame_bytes / max_line_bytes allowed
MIN_BUFFER = 64                       # the smallest max_frame_bytes / max_line_bytes allowed
BITS_PER_BYTE = 10                    # UART 8N1: start + 8 data + stop bits

# Reasons counted here besides those of sensors.live.accounting (and OVERSIZED: a
# line/frame longer than the configured bound, counted as stats()["oversized"]).
FRAME_TIMEOUT = "frame_timeout"        # a frame started but did not complete in time


def encode_frame(node: str, modality: str, payload: bytes) -> bytes:
    """One binary frame around an already-encoded runtime.core.wire payload."""
    n, m = node.encode(), modality.encode()
    if not (1 <= len(n) <= MAX_NAME and 1 <= len(m) <= MAX_NAME):
        raise WireFormatError(f"node and modality must be 1..{MAX_NAME} UTF-8 bytes, "
                              f"found {len(n)} and {len(m)}")
    lengths = struct.pack("<IBB", len(n) + len(m) + len(payload), len(n), len(m))
    body = n + m + payload
    return (SYNC + lengths + CRC.pack(zlib.crc32(lengths)) + body + CRC.pack(zlib.crc32(body)))


def encode_chunk_frame(chunk: Chunk, dtype: str = "<f4") -> bytes:
    return encode_frame(chunk.node, chunk.modality, wire.encode_binary(chunk, dtype))


def encode_json_line(chunk: Chunk) -> bytes:
    obj = json.loads(wire.encode_json(chunk))
    return json.dumps({"node": chunk.node, "modality": chunk.modality, **obj},
                      separators=(",", ":")).encode() + b"\n"


MAX_NEWS_KEYS = 64  # distinct (reason, node, modality) kept between two take_stream_news()


class Parser:
    """What the parsers share: counting by reason, news for the warnings, stats,
    bounded line splitting (the line protocols), and ``from_settings``."""

    def __init__(self, max_bytes: int, allowed: Iterable[str] | None):
        """allowed: the modalities accepted (None: any)."""
        if max_bytes < MIN_BUFFER:
            raise ValueError(f"max line/frame length must be >= {MIN_BUFFER} bytes, "
                             f"found {max_bytes!r}")
        self.max_bytes = max_bytes
        self.allowed = None if allowed is None else frozenset(allowed)
        self.errors: dict[str, int] = {}
        self.skipped_bytes = 0
        self._buf = bytearray()
        self._discarding = False  # inside an over-long line: drop up to the next newline
        # (reason, node, modality) -> [count, detail of the latest one] since the last
        # take_stream_news();
        # bounded by MAX_NEWS_KEYS, so a caller that never asks costs nothing
        self._news: dict[tuple[str, str | None, str | None], list] = {}

    @classmethod
    def from_settings(cls, s: SerialSettings, allowed: Iterable[str] | None) -> Parser:
        """The parser the serial settings describe; allowed: the modalities accepted."""
        raise NotImplementedError(f"{cls.__name__} is built directly")

    def _error(self, reason: str, detail: str, node: str | None = None,
               modality: str | None = None) -> None:
        """Count one refused line/frame; node/modality where the data named them."""
        self.errors[reason] = self.errors.get(reason, 0) + 1
        key = (reason, node, modality)
        if key not in self._news and len(self._news) >= MAX_NEWS_KEYS:
            key = (reason, None, None)  # bounded: names sent by the peer are not trusted
        entry = self._news.get(key)
        if entry is None:
            self._news[key] = [1, detail]
        else:
            entry[0] += 1
            entry[1] = detail

    def take_stream_news(self) -> dict[tuple[str, str | None, str | None], tuple[int, str]]:
        """Errors since the last call: (reason, node, modality) -> (count, what the
        latest one was); node/modality None where the data did not name them."""
        news, self._news = self._news, {}
        return {key: (n, detail) for key, (n, detail) in news.items()}

    def stats(self) -> dict:
        """``malformed``: reason -> count (``oversized`` among them), ``skipped_bytes``."""
        return {"malformed": dict(self.errors), "skipped_bytes": self.skipped_bytes}

    def poll(self, now: float) -> list[Chunk]:
        """Time-driven work (``now``: time.monotonic()); the line protocols have none."""
        return []

    def idle(self) -> list[Chunk]:
        """The line went quiet (``idle_flush_s``): chunks held back, if the protocol
        holds any (CSV does)."""
        return []

    def _lines(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines = []
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end < 0:
                break
            line = bytes(self._buf[start:end])
            start = end + 1
            if self._discarding:
                self._discarding = False
                self.skipped_bytes += len(line) + 1
                continue
            if len(line) > self.max_bytes:
                self._error(OVERSIZED, f"a line of {len(line)} bytes, longer than "
                            f"max_line_bytes {self.max_bytes}; send shorter lines or raise it")
                self.skipped_bytes += len(line) + 1
                continue
            lines.append(line.rstrip(b"\r"))
        del self._buf[:start]
        if len(self._buf) > self.max_bytes:  # bound the buffer: the line is too long already
            if not self._discarding:
                self._error(OVERSIZED, f"a line longer than max_line_bytes {self.max_bytes} "
                            "(no newline yet); send shorter lines or raise it")
            self._discarding = True
            self.skipped_bytes += len(self._buf)
            self._buf.clear()
        return lines

    def reset(self) -> list[Chunk]:
        """Forget a partial line/frame (port reopened); returns chunks still pending."""
        if self._buf and not self._discarding:
            self._error(TRUNCATED, f"a partial line of {len(self._buf)} bytes when the port "
                        "closed")
        self.skipped_bytes += len(self._buf)
        self._buf.clear()
        self._discarding = False
        return []


class JsonLineParser(Parser):
    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE,
                 allowed: Iterable[str] | None = None):
        super().__init__(max_line_bytes, allowed)

    @classmethod
    def from_settings(cls, s: SerialSettings, allowed: Iterable[str] | None) -> JsonLineParser:
        return cls(s.max_line_bytes, allowed)

    def feed(self, data: bytes) -> list[Chunk]:
        out = []
        for line in self._lines(data):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as exc:  # bad JSON/UTF-8, huge ints, deep nesting
                self._error(BAD_JSON, f"a line that is not JSON ({type(exc).__name__}: "
                            f"{str(exc)[:120]}), starting {line[:40]!r}")
                continue
            node = modality = None
            try:
                node, modality = obj["node"], obj["modality"]
                if not (isinstance(node, str) and isinstance(modality, str) and node and modality):
                    node = modality = None
                    raise WireFormatError("'node' and 'modality' must be non-empty strings")
                check_modality(modality, self.allowed)
                out.append(wire.chunk_from_json_obj(obj, node, modality))
            except RejectedMessage as exc:
                self._error(exc.reason, str(exc), node, modality)
            except (WireFormatError, KeyError, TypeError, ValueError, OverflowError) as exc:
                reason = getattr(exc, "reason", None) or BAD_FIELDS
                self._error(reason, "a JSON line without a valid chunk "
                            f"({type(exc).__name__}: {str(exc)[:160]}); expected 'node', "
                            "'modality' and the chunk fields of runtime.core.wire", node, modality)
        return out


class BinaryFrameParser(Parser):
    """Frames of the layout in the module docstring; resyncs on the sync bytes.

    max_frame_bytes bounds a whole frame (header and CRCs included) and so the
    buffer. frame_timeout_s: a frame that started (sync seen) is dropped when
    it has not completed within frame_timeout_s plus its own transfer time
    (its length times byte_time_s, i.e. 10 bits / baud), so a large frame on a
    slow line is not cut while a stalled one does not glue itself to the frames
    that follow. None: never time out (``poll`` does nothing).
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME,
                 allowed: Iterable[str] | None = None, *,
                 frame_timeout_s: float | None = None, byte_time_s: float = 0.0):
        super().__init__(max_frame_bytes, allowed)
        if frame_timeout_s is not None and not frame_timeout_s > 0:
            raise ValueError(f"frame_timeout_s must be > 0 or None, found {frame_timeout_s!r}")
        if not byte_time_s >= 0:
            raise ValueError(f"byte_time_s must be >= 0, found {byte_time_s!r}")
        self.frame_timeout_s = frame_timeout_s
        self.byte_time_s = byte_time_s
        self._since: float | None = None  # when poll() first saw the frame now at the front

    @classmethod
    def from_settings(cls, s: SerialSettings,
                      allowed: Iterable[str] | None) -> BinaryFrameParser:
        return cls(s.max_frame_bytes, allowed, frame_timeout_s=s.frame_timeout_s,
                   byte_time_s=BITS_PER_BYTE / s.baud)

    def reset(self) -> list[Chunk]:
        if self._buf.startswith(SYNC):
            self._error(TRUNCATED, f"a partial frame ({len(self._buf)} bytes) when the port "
                        "closed")
        self._skip(len(self._buf))
        return []

    def _skip(self, n: int) -> None:
        self.skipped_bytes += n
        self._consume(n)

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        self._since = None  # whatever is at the front now is another frame

    def _pending_length(self) -> int:
        """Length of the frame at the front (a started one: the buffer begins with SYNC)."""
        if len(self._buf) < FRAME_HEAD_SIZE:
            return FRAME_HEAD_SIZE
        # the header was checked by feed() already: only a valid one waits here
        return FRAME_HEAD_SIZE + FRAME_HEAD.unpack_from(self._buf)[1] + CRC.size

    def poll(self, now: float) -> list[Chunk]:
        """Drop the frame at the front if it stalled; call after every read, data or not.

        ``now`` is time.monotonic(). A frame is timed from the first poll that
        sees it at the front of the buffer. The dropped frame is counted
        (``frame_timeout``) and scanning resumes one byte past its sync, so a
        frame that hid inside its bytes is still found; returns such frames.
        """
        out: list[Chunk] = []
        # a buffer starting with SYNC after feed() is exactly a frame awaiting bytes;
        # each pass drops at least one byte, so the loop is bounded by the buffer
        while self.frame_timeout_s is not None and self._buf.startswith(SYNC):
            if self._since is None:
                self._since = now
                break
            length = self._pending_length()
            allowed = self.frame_timeout_s + length * self.byte_time_s
            if now - self._since <= allowed:
                break
            self._error(FRAME_TIMEOUT, f"a frame of {length} bytes started but only "
                        f"{len(self._buf)} arrived within {allowed:.2f} s; the sender "
                        "stalled or bytes were lost on the line")
            self._skip(1)
            out += self.feed(b"")
        return out

    def feed(self, data: bytes) -> list[Chunk]:
        self._buf += data
        out = []
        while True:
            start = self._buf.find(SYNC)
            if start < 0:
                # keep a tail that may be the start of a sync split across reads
                keep = len(SYNC) - 1
                if len(self._buf) > keep:
                    self._skip(len(self._buf) - keep)
                return out
            if start:
                self._skip(start)
            if len(self._buf) < FRAME_HEAD_SIZE:
                return out
            _, body_len, n, m, head_crc = FRAME_HEAD.unpack_from(self._buf)
            if (head_crc != zlib.crc32(self._buf[4:10]) or not 1 <= n <= MAX_NAME
                    or not 1 <= m <= MAX_NAME or body_len <= n + m):
                self._error(BAD_FRAME, f"a frame header with body_len {body_len}, node_len "
                            f"{n}, modality_len {m}, header CRC {head_crc:#010x}; expected "
                            f"CRC {zlib.crc32(self._buf[4:10]):#010x}, names of 1..{MAX_NAME} "
                            "bytes and a payload (garbage or a damaged header)")
                self._skip(1)
                continue
            total = FRAME_HEAD_SIZE + body_len + CRC.size
            if total > self.max_bytes:
                # refused at the header: waiting for the body would hold the line
                self._error(OVERSIZED, f"a frame header announcing {total} bytes, more than "
                            f"max_frame_bytes {self.max_bytes}; send smaller chunks or raise "
                            "max_frame_bytes")
                self._skip(1)
                continue
            if len(self._buf) < total:
                return out
            body = bytes(self._buf[FRAME_HEAD_SIZE:FRAME_HEAD_SIZE + body_len])
            (body_crc,) = CRC.unpack_from(self._buf, FRAME_HEAD_SIZE + body_len)
            if body_crc != zlib.crc32(body):
                self._error(BAD_CRC, f"a frame of {total} bytes with body CRC {body_crc:#010x}, "
                            f"expected {zlib.crc32(body):#010x}; bytes were corrupted or lost "
                            "on the line (check baud rate and cabling)")
                self._skip(1)  # the length may lie too: rescan from the next byte
                continue
            self._consume(total)
            chunk = self._decode(body, n, m)
            if chunk is not None:
                out.append(chunk)

    def _decode(self, body: bytes, n: int, m: int) -> Chunk | None:
        try:
            node, modality = body[:n].decode(), body[n:n + m].decode()
        except UnicodeDecodeError:
            self._error(BAD_FRAME, f"a frame whose node/modality are not UTF-8: {body[:n + m]!r}")
            return None
        try:
            # The frame was accepted by its length (feed): no second size check here.
            check_modality(modality, self.allowed)
            return decode_payload(body[n + m:], node, modality)
        except RejectedMessage as exc:
            self._error(exc.reason, str(exc), node, modality)
            return None


__all__ = ["FRAME_TIMEOUT", "OVERSIZED", "SYNC", "BinaryFrameParser", "JsonLineParser",
           "Parser", "encode_chunk_frame", "encode_frame", "encode_json_line"]
