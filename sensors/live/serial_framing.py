"""Pure parsers of the three serial protocols: ``feed(bytes) -> list[Chunk]``.

No port, no thread, no clock: bytes in, chunks out, everything else counted
in ``errors`` (reason -> count, reasons from edgefuse.sensors.live.base and below)
and ``skipped_bytes``. They never raise on bad input; every buffer is bounded.
``take_news()`` hands the caller the errors since its last call, each reason
with a line saying what was expected and found, so the caller (the serial
source) can warn about them with the port named. Time enters only as an
argument: ``poll(now)`` drops a binary frame that started but stalled.

(a) JSON lines: one object per line, ``{"node": .., "modality": .., <the JSON
    chunk fields of runtime.wire>}``, UTF-8, ``\\n`` (or ``\\r\\n``) ended.
(b) CSV lines: ``modality,t_ns,v1,v2,...``, one sample per line, node from
    config; consecutive samples are grouped into chunks (see CsvLineParser).
(c) Binary frames (little-endian), resynchronisable after garbage:

    offset       size  field
    0            4     sync  A5 5A 45 46  (b"\\xa5\\x5aEF")
    4            4     body_len: uint32 = len(node) + len(modality) + len(payload)
    8            1     node_len (1..64)
    9            1     modality_len (1..64)
    10           4     header_crc: zlib.crc32 of bytes 4..9
    14           n     node, UTF-8
    14+n         m     modality, UTF-8
    14+n+m       p     payload: a runtime.wire chunk (binary ``EFCK...``; JSON accepted)
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
from collections.abc import Mapping

import numpy as np

from edgefuse.runtime.core import wire
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import InputError, WireFormatError
from edgefuse.sensors.live.base import (
    BAD_CRC, BAD_CSV, BAD_FIELDS, BAD_FRAME, BAD_JSON, TRUNCATED, ChunkValidator, RejectedPayload,
)

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

# Reasons counted here besides those of edgefuse.sensors.live.base.
OVERSIZED = "oversized"                # a line/frame longer than the configured bound
FRAME_TIMEOUT = "frame_timeout"        # a frame started but did not complete in time


def encode_frame(node: str, modality: str, payload: bytes) -> bytes:
    """One binary frame around an already-encoded runtime.wire payload."""
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


def encode_csv_lines(chunk: Chunk) -> bytes:
    """One ``modality,t_ns,v...`` line per sample; needs the chunk's rate for t_ns."""
    if chunk.rate_hz is None:
        raise WireFormatError("CSV lines carry one time per sample; the chunk needs a rate")
    period = 1e9 / chunk.rate_hz
    return b"".join(
        (f"{chunk.modality},{chunk.t0_ns + int(round(i * period))},"
         + ",".join(repr(float(v)) for v in row) + "\n").encode()
        for i, row in enumerate(chunk.samples))


MAX_NEWS_KEYS = 64  # distinct (reason, node, modality) kept between two take_news()


class _Parser:
    """Counting and bounded line splitting shared by the parsers."""

    def __init__(self, max_bytes: int, validator: ChunkValidator | None):
        if max_bytes < MIN_BUFFER:
            raise ValueError(f"max line/frame length must be >= {MIN_BUFFER} bytes, "
                             f"found {max_bytes!r}")
        self.max_bytes = max_bytes
        self.validator = validator or ChunkValidator()
        self.errors: dict[str, int] = {}
        self.skipped_bytes = 0
        self._buf = bytearray()
        self._discarding = False  # inside an over-long line: drop up to the next newline
        # (reason, node, modality) -> [count, detail of the latest one] since take_news();
        # bounded by MAX_NEWS_KEYS, so a caller that never asks costs nothing
        self._news: dict[str, list] = {}

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

    def take_news(self) -> dict[str, tuple[int, str]]:
        """Errors since the last call: reason -> (count, what the latest one was)."""
        out: dict[str, tuple[int, str]] = {}
        for (reason, _, _), (n, detail) in self.take_stream_news().items():
            out[reason] = (out.get(reason, (0, ""))[0] + n, detail)
        return out

    def poll(self, now: float) -> list[Chunk]:
        """Time-driven work (``now``: time.monotonic()); the line protocols have none."""
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


class JsonLineParser(_Parser):
    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE,
                 validator: ChunkValidator | None = None):
        super().__init__(max_line_bytes, validator)

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
                self.validator.check_modality(modality)
                out.append(self.validator.check_chunk(wire.chunk_from_json_obj(obj, node, modality)))
            except RejectedPayload as exc:
                self._error(exc.reason, str(exc), node, modality)
            except (WireFormatError, KeyError, TypeError, ValueError, OverflowError) as exc:
                reason = getattr(exc, "reason", None) or BAD_FIELDS
                self._error(reason, "a JSON line without a valid chunk "
                            f"({type(exc).__name__}: {str(exc)[:160]}); expected 'node', "
                            "'modality' and the chunk fields of runtime.wire", node, modality)
        return out


class CsvLineParser(_Parser):
    """``modality,t_ns,v1,...`` lines grouped into chunks of one modality.

    A chunk is emitted when it holds ``group_samples`` samples, or before a
    sample that changes the modality or channel count, goes back in time, or
    comes more than ``max_gap_ns`` after the previous one (default: 1.5
    periods when the modality's rate is configured, else 200 ms), and on
    ``flush()``. rate_hz is the configured rate of the modality, else None
    (the aligner estimates it). ``flushes`` counts why chunks were emitted.
    """

    DEFAULT_GAP_NS = 200_000_000

    def __init__(self, node: str, *, group_samples: int = 64, max_gap_ns: int | None = None,
                 rate_hz: Mapping[str, float] | None = None,
                 max_line_bytes: int = 4096, validator: ChunkValidator | None = None):
        super().__init__(max_line_bytes, validator)
        if not node:
            raise ValueError("CSV lines carry no node; give the node name")
        if not 1 <= group_samples <= 1 << 16:
            raise ValueError(f"group_samples must be 1..65536, found {group_samples!r}")
        self.node = node
        self.group_samples = group_samples
        self.max_gap_ns = max_gap_ns
        self.rate_hz = dict(rate_hz or {})
        self.flushes = {"size": 0, "modality": 0, "gap": 0, "backwards": 0, "channels": 0,
                        "explicit": 0}
        self._seq: dict[str, int] = {}
        self._modality: str | None = None
        self._times: list[int] = []
        self._rows: list[list[float]] = []

    def _gap_ns(self, modality: str) -> int:
        if self.max_gap_ns is not None:
            return self.max_gap_ns
        rate = self.rate_hz.get(modality)
        return int(1.5e9 / rate) if rate else self.DEFAULT_GAP_NS

    def _emit(self, why: str) -> list[Chunk]:
        if not self._rows:
            return []
        modality, rows, t0 = self._modality, self._rows, self._times[0]
        self._rows, self._times = [], []
        self.flushes[why] += 1
        seq = self._seq.get(modality, 0)
        self._seq[modality] = seq + 1
        try:
            chunk = Chunk(self.node, modality, t0, self.rate_hz.get(modality),
                          np.asarray(rows, dtype=np.float32), seq)
            return [self.validator.check_chunk(chunk)]
        except RejectedPayload as exc:
            self._error(exc.reason, str(exc), self.node, modality)
        except InputError as exc:
            self._error(BAD_CSV, f"samples that make no chunk: {str(exc)[:160]}", self.node,
                        modality)
        return []

    def _sample(self, line: bytes) -> tuple[str, int, list[float]] | None:
        try:
            fields_ = line.decode("ascii").split(",")
            modality = fields_[0].strip()
            t_ns = int(fields_[1])
            values = [float(v) for v in fields_[2:]]
        except (UnicodeDecodeError, ValueError, IndexError):
            return None
        if (not modality or not values or len(values) > wire.MAX_CHANNELS
                or not -(1 << 63) <= t_ns < (1 << 63)):
            return None
        return modality, t_ns, values

    def feed(self, data: bytes) -> list[Chunk]:
        out: list[Chunk] = []
        for line in self._lines(data):
            if not line.strip() or line.startswith(b"#"):
                continue
            sample = self._sample(line)
            if sample is None:
                self._error(BAD_CSV, f"expected 'modality,t_ns,v1,...' (at most "
                            f"{wire.MAX_CHANNELS} values), found {line[:60]!r}")
                continue
            modality, t_ns, values = sample
            try:
                self.validator.check_modality(modality)
            except RejectedPayload as exc:
                self._error(exc.reason, str(exc), self.node, modality)
                continue
            if self._rows:
                last = self._times[-1]
                why = ("modality" if modality != self._modality
                       else "channels" if len(values) != len(self._rows[0])
                       else "backwards" if t_ns <= last
                       else "gap" if t_ns - last > self._gap_ns(modality) else None)
                if why:
                    out += self._emit(why)
            self._modality = modality
            self._times.append(t_ns)
            self._rows.append(values)
            if len(self._rows) >= self.group_samples:
                out += self._emit("size")
        return out

    def flush(self) -> list[Chunk]:
        """Emit the samples held back (call when the line goes idle)."""
        return self._emit("explicit")

    def reset(self) -> list[Chunk]:
        super().reset()
        return self.flush()


class BinaryFrameParser(_Parser):
    """Frames of the layout in the module docstring; resyncs on the sync bytes.

    max_frame_bytes bounds a whole frame (header and CRCs included) and so the
    buffer. frame_timeout_s: a frame that started (sync seen) is dropped when
    it has not completed within frame_timeout_s plus its own transfer time
    (its length times byte_time_s, i.e. 10 bits / baud), so a large frame on a
    slow line is not cut while a stalled one does not glue itself to the frames
    that follow. None: never time out (``poll`` does nothing).
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME,
                 validator: ChunkValidator | None = None, *,
                 frame_timeout_s: float | None = None, byte_time_s: float = 0.0):
        super().__init__(max_frame_bytes, validator)
        if frame_timeout_s is not None and not frame_timeout_s > 0:
            raise ValueError(f"frame_timeout_s must be > 0 or None, found {frame_timeout_s!r}")
        if not byte_time_s >= 0:
            raise ValueError(f"byte_time_s must be >= 0, found {byte_time_s!r}")
        self.frame_timeout_s = frame_timeout_s
        self.byte_time_s = byte_time_s
        self._since: float | None = None  # when poll() first saw the frame now at the front

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
            # the frame bound is the payload bound: the frame was already accepted by length
            return self.validator.decode(body[n + m:], node, modality, self.max_bytes)
        except RejectedPayload as exc:
            self._error(exc.reason, str(exc), node, modality)
            return None


def make_parser(protocol: str, **kwargs) -> JsonLineParser | CsvLineParser | BinaryFrameParser:
    parsers = {"json": JsonLineParser, "csv": CsvLineParser, "binary": BinaryFrameParser}
    if protocol not in parsers:
        raise ValueError(f"serial protocol must be one of {sorted(parsers)}, found {protocol!r}")
    return parsers[protocol](**kwargs)


__all__ = ["FRAME_TIMEOUT", "OVERSIZED", "SYNC", "BinaryFrameParser", "CsvLineParser",
           "JsonLineParser", "encode_chunk_frame", "encode_csv_lines", "encode_frame",
           "encode_json_line", "make_parser"]
