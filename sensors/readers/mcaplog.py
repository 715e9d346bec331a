"""Record chunks to MCAP and replay them.

One MCAP channel per stream: topic "<node>/<modality>", message encoding
"edgefuse.chunk.v1", payload = the binary wire format of runtime.wire
(int16 samples when they are integers within int16, else float32), log time
= publish time = the chunk's t0_ns. Chunked and compressed (zstd when the
`zstandard` package is importable, else lz4, which mcap itself depends on).

Reading: with an intact summary the messages come in log-time order chunk by
chunk (seeking, bounded memory). A file without a summary (truncated: the
recorder died) is read linearly: every message that can be read is yielded
(reordered through a bounded buffer), then CorruptLogError says what is
wrong. One malformed message is counted and skipped, never fatal.
"""
from __future__ import annotations

import dataclasses
import heapq
import io
import logging
import os
import struct
import zlib
from typing import Iterator

import numpy as np
from mcap.exceptions import McapError
from mcap.reader import SeekingReader
from mcap.records import Channel, Message, Schema
from mcap.stream_reader import StreamReader
from mcap.writer import CompressionType, Writer

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import CorruptLogError, InputError, WireFormatError
from edgefuse.runtime.core.wire import decode_binary, encode_binary
from edgefuse.sensors.readers._common import StreamInfo

log = logging.getLogger(__name__)

ENCODING = "edgefuse.chunk.v1"
SCHEMA_NAME = "edgefuse.chunk.v1"
SCHEMA_ENCODING = "edgefuse-binary"
SCHEMA_TEXT = (b"edgefuse chunk v1: runtime.wire binary format (40-byte little-endian header "
               b"'EFCK', version, dtype, channels, rate_hz, t0_ns, seq, full_scale; then "
               b"samples [n][channels]). Node and modality are in the channel metadata.")
PROFILE = "edgefuse"
MAGIC = b"\x89MCAP0\r\n"
DEFAULT_CHUNK_BYTES = 512 * 1024     # a crash loses at most one chunk of this size
DEFAULT_MAX_PAYLOAD = 64 << 20       # files may hold longer chunks than network frames
RECORD_SIZE_LIMIT = 256 << 20
REORDER_LIMIT = 1024                 # messages held to restore log-time order when linear
_INT16 = np.iinfo(np.int16)


def _damage_errors() -> tuple[type[BaseException], ...]:
    """What mcap and its codecs raise on damaged bytes (lz4 raises RuntimeError;
    OSError: a damaged index can point a seek before the file start)."""
    errors: list[type[BaseException]] = [
        McapError, struct.error, ValueError, RuntimeError, EOFError, KeyError, IndexError,
        zlib.error, MemoryError, OverflowError, OSError]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


# Anything of these while reading becomes CorruptLogError.
_DAMAGE = _damage_errors()


def best_compression() -> CompressionType:
    try:
        import zstandard  # noqa: F401  (optional: mcap's writer uses it when present)
        return CompressionType.ZSTD
    except ImportError:
        return CompressionType.LZ4


def _compression(name: str) -> CompressionType:
    table = {"auto": None, "zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4,
             "none": CompressionType.NONE}
    if name not in table:
        raise InputError(f"compression must be one of {sorted(table)}, found {name!r}")
    return table[name] or best_compression()


def payload_dtype(samples: np.ndarray) -> str:
    """int16 when every sample is an integer within int16 (PCM), else float32."""
    if samples.size and np.isfinite(samples).all() and samples.min() >= _INT16.min \
            and samples.max() <= _INT16.max and np.array_equal(samples, np.rint(samples)):
        return "<i2"
    return "<f4"


class McapRecorder:
    """Write chunks to an MCAP file: `with McapRecorder(path) as rec: rec.write(chunk)`.

    counts: messages written per "node/modality", plus 'rejected' (chunks that
    cannot be logged: a negative t0, more channels than the wire format holds).
    """

    def __init__(self, path: str | os.PathLike, *, compression: str = "auto",
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, metadata: dict[str, str] | None = None):
        self.path = os.fspath(path)
        self.compression = _compression(compression)
        try:
            self._file = open(self.path, "wb")
        except OSError as exc:
            raise InputError(f"{self.path}: cannot create the log: {exc}", path=self.path) from exc
        try:
            self._writer = Writer(self._file, chunk_size=chunk_bytes,
                                  compression=self.compression)
            self._writer.start(profile=PROFILE, library="edgefuse")
        except Exception:
            self._file.close()
            raise
        self._schema_id = self._writer.register_schema(SCHEMA_NAME, SCHEMA_ENCODING, SCHEMA_TEXT)
        self._channels: dict[tuple[str, str], int] = {}
        self.counts: dict[str, int] = {"rejected": 0}
        self.samples = 0
        self._closed = False
        if metadata:
            self._writer.add_metadata("edgefuse", {str(k): str(v) for k, v in metadata.items()})

    def _channel(self, chunk: Chunk) -> int:
        key = chunk.stream
        if key not in self._channels:
            meta = {"node": chunk.node, "modality": chunk.modality,
                    "channels": str(chunk.channels),
                    "rate_hz": "" if chunk.rate_hz is None else repr(float(chunk.rate_hz)),
                    "rate_is_nominal": str(chunk.rate_is_nominal).lower(),
                    "full_scale": "" if chunk.full_scale is None else repr(float(chunk.full_scale))}
            self._channels[key] = self._writer.register_channel(
                f"{chunk.node}/{chunk.modality}", ENCODING, self._schema_id, meta)
        return self._channels[key]

    def write(self, chunk: Chunk) -> bool:
        """Log one chunk; False (counted in counts['rejected']) when it cannot be."""
        if self._closed:
            raise InputError(f"{self.path}: recorder is closed")
        if not 0 <= chunk.t0_ns < (1 << 64):
            log.warning("%s: cannot log %s/%s seq %d: MCAP log times are unsigned, t0_ns=%d",
                        self.path, chunk.node, chunk.modality, chunk.seq, chunk.t0_ns)
            self.counts["rejected"] += 1
            return False
        try:
            payload = encode_binary(chunk, payload_dtype(chunk.samples))
        except WireFormatError as exc:
            log.warning("%s: cannot log %s/%s seq %d: %s", self.path, chunk.node,
                        chunk.modality, chunk.seq, exc)
            self.counts["rejected"] += 1
            return False
        channel = self._channel(chunk)
        self._writer.add_message(channel, log_time=chunk.t0_ns, data=payload,
                                 publish_time=chunk.t0_ns, sequence=chunk.seq & 0xFFFFFFFF)
        topic = f"{chunk.node}/{chunk.modality}"
        self.counts[topic] = self.counts.get(topic, 0) + 1
        self.samples += chunk.n
        return True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._writer.finish()
            finally:
                self._file.close()

    def __enter__(self) -> "McapRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # always finish: an aborted recording is still a valid file


def _stream_of(channel: Channel) -> tuple[str, str]:
    md = channel.metadata or {}
    if "node" in md and "modality" in md:
        return md["node"], md["modality"]
    node, _, modality = channel.topic.rpartition("/")
    return node, modality


def _stream_info(channel: Channel, source: str) -> StreamInfo:
    md = channel.metadata or {}
    node, modality = _stream_of(channel)
    try:
        channels = int(md.get("channels", "0")) or 1
        rate = float(md["rate_hz"]) if md.get("rate_hz") else None
    except ValueError:
        channels, rate = 1, None
    return StreamInfo(node, modality, channels, rate, source,
                      md.get("rate_is_nominal") == "true")


class McapLog:
    """An edgefuse MCAP log opened for replay.

    counters: messages read, malformed (payload did not decode), foreign
    (channels of other encodings, skipped).
    """

    def __init__(self, path: str | os.PathLike, *, max_payload: int = DEFAULT_MAX_PAYLOAD):
        self.path = os.fspath(path)
        self.max_payload = max_payload
        self.counters = {"messages": 0, "malformed": 0, "foreign": 0}
        if not os.path.exists(self.path):
            raise InputError(f"{self.path} does not exist", path=self.path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                f.seek(max(0, os.path.getsize(self.path) - 8))
                tail = f.read(8)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read: {exc}", path=self.path) from exc
        if head != MAGIC:
            raise CorruptLogError(f"{self.path}: not an MCAP file: expected magic {MAGIC!r}, "
                                  f"found {head!r}", path=self.path)
        self.complete = tail == MAGIC and os.path.getsize(self.path) > 16
        self.summary = None
        self._summary_problem = "the file does not end with the MCAP magic (truncated?)"
        if self.complete:
            try:
                with open(self.path, "rb") as f:
                    self.summary = SeekingReader(f, record_size_limit=RECORD_SIZE_LIMIT) \
                        .get_summary()
                if self.summary is None:
                    self._summary_problem = "the file has no summary section"
            except _DAMAGE as exc:
                self._summary_problem = f"its summary does not parse ({exc!r})"
        if self.summary is None or not self.summary.chunk_indexes:
            log.debug("%s: reading linearly: %s", self.path, self._summary_problem)

    # ---------------------------------------------------------------- streams
    def streams(self) -> list[StreamInfo]:
        """The edgefuse streams, from the summary when present (no data read)."""
        if self.summary is not None:
            channels = list(self.summary.channels.values())
        else:
            channels = []
            try:
                with open(self.path, "rb") as f:
                    for record in StreamReader(f, record_size_limit=RECORD_SIZE_LIMIT).records:
                        if isinstance(record, Channel):
                            channels.append(record)
            except _DAMAGE as exc:
                log.warning("%s: streams found before the damage only (%r)", self.path, exc)
        return [_stream_info(c, self.path) for c in sorted(channels, key=lambda c: c.id)
                if c.message_encoding == ENCODING]

    @property
    def start_ns(self) -> int | None:
        stats = self.summary.statistics if self.summary is not None else None
        return stats.message_start_time if stats and stats.message_count else None

    # ----------------------------------------------------------------- chunks
    def _decode(self, channel: Channel, message: Message) -> Chunk | None:
        if channel.message_encoding != ENCODING:
            self.counters["foreign"] += 1
            return None
        node, modality = _stream_of(channel)
        try:
            chunk = decode_binary(message.data, node, modality, self.max_payload)
        except WireFormatError as exc:
            self.counters["malformed"] += 1
            if self.counters["malformed"] <= 5:
                log.warning("%s: skipping malformed message on %s at %d: %s", self.path,
                            channel.topic, message.log_time, exc)
            return None
        self.counters["messages"] += 1
        if (channel.metadata or {}).get("rate_is_nominal") == "true":
            # The wire header has no flag for it; the channel metadata keeps it.
            chunk = dataclasses.replace(chunk, rate_is_nominal=True)
        return chunk

    def chunks(self) -> Iterator[Chunk]:
        """All chunks in log-time order; CorruptLogError after the readable ones."""
        if self.summary is not None and self.summary.chunk_indexes:
            yield from self._seeking()
        else:
            yield from self._linear()

    def _seeking(self) -> Iterator[Chunk]:
        read = 0
        with open(self.path, "rb") as f:
            reader = SeekingReader(f, validate_crcs=True, record_size_limit=RECORD_SIZE_LIMIT)
            it = reader.iter_messages(log_time_order=True)
            while True:
                try:
                    item = next(it)
                except StopIteration:
                    return
                except _DAMAGE as exc:
                    raise CorruptLogError(
                        f"{self.path}: damaged data after {read} message(s): {exc!r}; the "
                        "messages before it were read", path=self.path) from exc
                read += 1
                chunk = self._decode(item[1], item[2])
                if chunk is not None:
                    yield chunk

    def _linear(self) -> Iterator[Chunk]:
        """Read records in file order, yield through a bounded reorder heap."""
        channels: dict[int, Channel] = {}
        heap: list[tuple[int, int, Chunk]] = []
        order = 0
        problem = None
        with open(self.path, "rb") as f:
            try:
                for record in StreamReader(io.BufferedReader(f), validate_crcs=True,
                                           record_size_limit=RECORD_SIZE_LIMIT).records:
                    if isinstance(record, Channel):
                        channels[record.id] = record
                    elif isinstance(record, Message):
                        channel = channels.get(record.channel_id)
                        if channel is None:
                            self.counters["malformed"] += 1
                            continue
                        chunk = self._decode(channel, record)
                        if chunk is None:
                            continue
                        heapq.heappush(heap, (chunk.t0_ns, order, chunk))
                        order += 1
                        if len(heap) > REORDER_LIMIT:
                            yield heapq.heappop(heap)[2]
                    elif isinstance(record, Schema):
                        pass
            except _DAMAGE as exc:
                problem = exc
        while heap:
            yield heapq.heappop(heap)[2]
        if problem is not None or not self.complete:
            what = f"{problem!r}" if problem is not None else "no footer"
            raise CorruptLogError(
                f"{self.path}: {self._summary_problem}; read {self.counters['messages']} "
                f"message(s) linearly, then stopped at: {what}. Re-record the log, or use the "
                "messages read so far", path=self.path) from problem


def read_mcap(path: str | os.PathLike, **kwargs) -> Iterator[Chunk]:
    """Chunks of an edgefuse MCAP log in log-time order (see McapLog)."""
    return McapLog(path, **kwargs).chunks()


def describe_mcap(path: str | os.PathLike) -> list[StreamInfo]:
    return McapLog(path).streams()
