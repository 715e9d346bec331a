"""Read edgefuse MCAP logs: the stream chunks for replay, and the decisions.

Files are written by mcap_recorder.McapRecorder. Chunks are read from both
encodings: "protobuf" (``edgefuse.SensorChunk``, mcap_schemas) and the older
"chunk-v1" (message encoding ``edgefuse.chunk.v1``, the runtime wire binary),
even both in one file. Decision channels (``edgefuse.Decision`` JSON) are
skipped by the chunk reader and read by ``decisions()``; channels of any other
schema are counted as foreign and skipped.

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
import json
import logging
import os
import struct
import zlib
from typing import Iterator

from mcap.exceptions import McapError
from mcap.reader import SeekingReader
from mcap.records import Channel, Message, Schema
from mcap.stream_reader import StreamReader

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import CorruptLogError, InputError, WireFormatError
from edgefuse.runtime.core.wire import decode_binary
from edgefuse.sensors.readers import mcap_schemas as schemas
from edgefuse.sensors.readers._common import StreamInfo
# The writer lives in mcap_recorder; these names stay importable from here.
from edgefuse.sensors.readers.mcap_recorder import (  # noqa: F401
    DEFAULT_CHUNK_BYTES, ENCODING, ENCODINGS, PROFILE, SCHEMA_ENCODING, SCHEMA_NAME, SCHEMA_TEXT,
    McapRecorder, best_compression,
)
from edgefuse.sensors.readers.mcap_schemas import payload_dtype  # noqa: F401

__all__ = ["McapLog", "McapRecorder", "read_mcap", "read_decisions", "describe_mcap",
           "payload_dtype", "best_compression", "ENCODING", "ENCODINGS", "SCHEMA_NAME",
           "SCHEMA_ENCODING", "SCHEMA_TEXT", "PROFILE", "DEFAULT_CHUNK_BYTES",
           "DEFAULT_MAX_PAYLOAD", "MAGIC"]

log = logging.getLogger(__name__)

MAGIC = b"\x89MCAP0\r\n"
DEFAULT_MAX_PAYLOAD = 64 << 20       # files may hold longer chunks than network frames
RECORD_SIZE_LIMIT = 256 << 20
REORDER_LIMIT = 1024                 # messages held to restore log-time order when linear

# What a channel carries, from its message encoding and schema name.
CHUNK_V1, CHUNK_PROTOBUF, DECISIONS = "chunk-v1", "protobuf", "decisions"


def _kind(channel: Channel, schema: Schema | None) -> str | None:
    if channel.message_encoding == ENCODING:
        return CHUNK_V1
    name = schema.name if schema is not None else None
    if channel.message_encoding == schemas.CHUNK_ENCODING and name == schemas.CHUNK_SCHEMA:
        return CHUNK_PROTOBUF
    if channel.message_encoding == schemas.DECISION_ENCODING and name == schemas.DECISION_SCHEMA:
        return DECISIONS
    return None


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


def _stream_of(channel: Channel) -> tuple[str, str]:
    md = channel.metadata or {}
    if "node" in md and "modality" in md:
        return md["node"], md["modality"]
    node, _, modality = channel.topic.rpartition("/")
    return node.lstrip("/"), modality


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

    counters: chunks read ("messages"), malformed (payload did not decode),
    decisions (skipped by chunks(), read by decisions()), foreign (channels of
    other schemas, skipped).
    """

    def __init__(self, path: str | os.PathLike, *, max_payload: int = DEFAULT_MAX_PAYLOAD):
        self.path = os.fspath(path)
        self.max_payload = max_payload
        self.counters = {"messages": 0, "malformed": 0, "decisions": 0, "foreign": 0}
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
    def _channels(self) -> list[tuple[Channel, Schema | None]]:
        if self.summary is not None:
            return [(c, self.summary.schemas.get(c.schema_id))
                    for c in self.summary.channels.values()]
        channels, found = [], {}
        try:
            with open(self.path, "rb") as f:
                for record in StreamReader(f, record_size_limit=RECORD_SIZE_LIMIT).records:
                    if isinstance(record, Schema):
                        found[record.id] = record
                    elif isinstance(record, Channel):
                        channels.append(record)
        except _DAMAGE as exc:
            log.warning("%s: streams found before the damage only (%r)", self.path, exc)
        return [(c, found.get(c.schema_id)) for c in channels]

    def streams(self) -> list[StreamInfo]:
        """The edgefuse streams, from the summary when present (no data read)."""
        return [_stream_info(c, self.path)
                for c, schema in sorted(self._channels(), key=lambda cs: cs[0].id)
                if _kind(c, schema) in (CHUNK_V1, CHUNK_PROTOBUF)]

    def decision_nodes(self) -> list[str]:
        """Nodes with a decisions channel, from the summary when present."""
        return sorted({(c.metadata or {}).get("node", _stream_of(c)[0])
                       for c, schema in self._channels() if _kind(c, schema) == DECISIONS})

    @property
    def start_ns(self) -> int | None:
        stats = self.summary.statistics if self.summary is not None else None
        return stats.message_start_time if stats and stats.message_count else None

    # ----------------------------------------------------------------- chunks
    def _malformed(self, channel: Channel, message: Message, problem: object) -> None:
        self.counters["malformed"] += 1
        if self.counters["malformed"] <= 5:
            log.warning("%s: skipping malformed message on %s at %d: %s", self.path,
                        channel.topic, message.log_time, problem)

    def _decode(self, schema: Schema | None, channel: Channel, message: Message) -> Chunk | None:
        kind = _kind(channel, schema)
        if kind not in (CHUNK_V1, CHUNK_PROTOBUF):
            self.counters["decisions" if kind == DECISIONS else "foreign"] += 1
            return None
        node, modality = _stream_of(channel)
        try:
            if kind == CHUNK_PROTOBUF:
                chunk = schemas.decode_chunk(message.data, node, modality, self.max_payload)
            else:
                chunk = decode_binary(message.data, node, modality, self.max_payload)
                if (channel.metadata or {}).get("rate_is_nominal") == "true":
                    # The wire header has no flag for it; the channel metadata keeps it.
                    chunk = dataclasses.replace(chunk, rate_is_nominal=True)
        except WireFormatError as exc:
            self._malformed(channel, message, exc)
            return None
        self.counters["messages"] += 1
        return chunk

    def chunks(self) -> Iterator[Chunk]:
        """All chunks in log-time order; CorruptLogError after the readable ones."""
        for schema, channel, message in self._messages():
            chunk = self._decode(schema, channel, message)
            if chunk is not None:
                yield chunk

    def decisions(self) -> Iterator[dict]:
        """The recorded decisions (Decision.to_dict() form) in log-time order."""
        for schema, channel, message in self._messages():
            if _kind(channel, schema) != DECISIONS:
                continue
            try:
                decision = json.loads(message.data)
            except ValueError as exc:
                self._malformed(channel, message, exc)
                continue
            if not isinstance(decision, dict):
                self._malformed(channel, message, "not a JSON object")
                continue
            self.counters["decisions"] += 1
            yield decision

    def _messages(self) -> Iterator[tuple[Schema | None, Channel, Message]]:
        if self.summary is not None and self.summary.chunk_indexes:
            yield from self._seeking()
        else:
            yield from self._linear()

    def _seeking(self) -> Iterator[tuple[Schema | None, Channel, Message]]:
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
                yield item

    def _linear(self) -> Iterator[tuple[Schema | None, Channel, Message]]:
        """Read records in file order, yield through a bounded reorder heap."""
        schemas_: dict[int, Schema] = {}
        channels: dict[int, Channel] = {}
        heap: list[tuple[int, int, Schema | None, Channel, Message]] = []
        read = 0
        problem = None
        with open(self.path, "rb") as f:
            try:
                for record in StreamReader(io.BufferedReader(f), validate_crcs=True,
                                           record_size_limit=RECORD_SIZE_LIMIT).records:
                    if isinstance(record, Schema):
                        schemas_[record.id] = record
                    elif isinstance(record, Channel):
                        channels[record.id] = record
                    elif isinstance(record, Message):
                        channel = channels.get(record.channel_id)
                        if channel is None:
                            self.counters["malformed"] += 1
                            continue
                        read += 1
                        heapq.heappush(heap, (record.log_time, read,
                                              schemas_.get(channel.schema_id), channel, record))
                        if len(heap) > REORDER_LIMIT:
                            yield heapq.heappop(heap)[2:]
            except _DAMAGE as exc:
                problem = exc
        while heap:
            yield heapq.heappop(heap)[2:]
        if problem is not None or not self.complete:
            what = f"{problem!r}" if problem is not None else "no footer"
            raise CorruptLogError(
                f"{self.path}: {self._summary_problem}; read {read} message(s) linearly, then "
                f"stopped at: {what}. Re-record the log, or use the messages read so far",
                path=self.path) from problem


def read_mcap(path: str | os.PathLike, **kwargs) -> Iterator[Chunk]:
    """Chunks of an edgefuse MCAP log in log-time order (see McapLog)."""
    return McapLog(path, **kwargs).chunks()


def read_decisions(path: str | os.PathLike) -> Iterator[dict]:
    """Decisions recorded in an edgefuse MCAP log, in log-time order."""
    return McapLog(path).decisions()


def describe_mcap(path: str | os.PathLike) -> list[StreamInfo]:
    return McapLog(path).streams()
