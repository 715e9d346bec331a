"""Write chunks, and the decisions made from them, to an MCAP file.

Two encodings of the stream chunks (README, MCAP recordings, has the measured
size and speed of both):

- "protobuf" (default): ``edgefuse.SensorChunk`` with its FileDescriptorSet in
  the file (mcap_schemas): Foxglove and any MCAP tool decode it. Topic
  ``/<node>/<modality>``.
- "chunk-v1": the runtime wire binary, message encoding ``edgefuse.chunk.v1``,
  topic ``<node>/<modality>``: only edgefuse reads it. Kept because it writes
  about twice as fast, for a device where the recorder's CPU time matters.

Either way: log time = publish time = the chunk's t0_ns (the sensor's clock),
MCAP sequence = seq mod 2**32. Decisions go to ``/<node>/decisions`` as JSON
(``Decision.to_json()``) at log time = window_end_ns: the instant the window's
last sample was taken, on the same sensor timeline as the chunks and the same
in a live run and in its replay. (The receipt time a live decision carries is a
CLOCK_MONOTONIC reading of the daemon's host: another clock, and absent in
replay.) Chunked and compressed (zstd when the ``zstandard`` package is
importable, else lz4, which mcap itself depends on).
"""
from __future__ import annotations

import logging
import os
from typing import Iterable

from mcap.writer import CompressionType, Writer

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.decision import Decision
from edgefuse.runtime.core.errors import InputError, WireFormatError
from edgefuse.runtime.core.wire import encode_binary
from edgefuse.sensors.readers import mcap_schemas as schemas

log = logging.getLogger(__name__)

ENCODING = "edgefuse.chunk.v1"  # message encoding (and schema name) of "chunk-v1"
SCHEMA_NAME = "edgefuse.chunk.v1"
SCHEMA_ENCODING = "edgefuse-binary"
SCHEMA_TEXT = (b"edgefuse chunk v1: runtime.wire binary format (40-byte little-endian header "
               b"'EFCK', version, dtype, channels, rate_hz, t0_ns, seq, full_scale; then "
               b"samples [n][channels]). Node and modality are in the channel metadata.")
ENCODINGS = ("protobuf", "chunk-v1")
PROFILE = "edgefuse"
DEFAULT_CHUNK_BYTES = 512 * 1024     # a crash loses at most one chunk of this size
_LOG_TIME_END = 1 << 64              # MCAP log times are uint64


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


class McapRecorder:
    """``with McapRecorder(path) as rec: rec.write(chunk); rec.write_decisions(batch)``.

    counts: chunks written per "node/modality", plus 'rejected' (chunks and
    decisions that cannot be logged: a negative time, more channels than the
    format holds). decisions: decisions written.
    """

    def __init__(self, path: str | os.PathLike, *, compression: str = "auto",
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, metadata: dict[str, str] | None = None,
                 encoding: str = "protobuf"):
        if encoding not in ENCODINGS:
            raise InputError(f"encoding must be one of {list(ENCODINGS)}, found {encoding!r}")
        self.path = os.fspath(path)
        self.encoding = encoding
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
        self._schemas: dict[str, int] = {}
        self._channels: dict[tuple[str, str], int] = {}
        self._decision_channels: dict[str, int] = {}
        self.counts: dict[str, int] = {"rejected": 0}
        self.samples = 0
        self.decisions = 0
        self._closed = False
        if metadata:
            self._writer.add_metadata("edgefuse", {str(k): str(v) for k, v in metadata.items()})

    def _schema(self, name: str, encoding: str, data: bytes) -> int:
        if name not in self._schemas:
            self._schemas[name] = self._writer.register_schema(name, encoding, data)
        return self._schemas[name]

    def _channel(self, chunk: Chunk) -> int:
        key = chunk.stream
        if key not in self._channels:
            meta = {"node": chunk.node, "modality": chunk.modality,
                    "channels": str(chunk.channels),
                    "rate_hz": "" if chunk.rate_hz is None else repr(float(chunk.rate_hz)),
                    "rate_is_nominal": str(chunk.rate_is_nominal).lower(),
                    "full_scale": "" if chunk.full_scale is None else repr(float(chunk.full_scale))}
            if self.encoding == "protobuf":
                schema = self._schema(schemas.CHUNK_SCHEMA, schemas.CHUNK_SCHEMA_ENCODING,
                                      schemas.CHUNK_SCHEMA_DATA)
                topic, encoding = f"/{chunk.node}/{chunk.modality}", schemas.CHUNK_ENCODING
            else:
                schema = self._schema(SCHEMA_NAME, SCHEMA_ENCODING, SCHEMA_TEXT)
                topic, encoding = f"{chunk.node}/{chunk.modality}", ENCODING
            self._channels[key] = self._writer.register_channel(topic, encoding, schema, meta)
        return self._channels[key]

    def _check_open(self) -> None:
        if self._closed:
            raise InputError(f"{self.path}: recorder is closed")

    def write(self, chunk: Chunk) -> bool:
        """Log one chunk; False (counted in counts['rejected']) when it cannot be."""
        self._check_open()
        if not 0 <= chunk.t0_ns < _LOG_TIME_END:
            log.warning("%s: cannot log %s/%s seq %d: MCAP log times are unsigned, t0_ns=%d",
                        self.path, chunk.node, chunk.modality, chunk.seq, chunk.t0_ns)
            self.counts["rejected"] += 1
            return False
        try:
            if self.encoding == "protobuf":
                payload = schemas.encode_chunk(chunk)
            else:
                payload = encode_binary(chunk, schemas.payload_dtype(chunk.samples))
        except WireFormatError as exc:
            log.warning("%s: cannot log %s/%s seq %d: %s", self.path, chunk.node,
                        chunk.modality, chunk.seq, exc)
            self.counts["rejected"] += 1
            return False
        self._writer.add_message(self._channel(chunk), log_time=chunk.t0_ns, data=payload,
                                 publish_time=chunk.t0_ns, sequence=chunk.seq & 0xFFFFFFFF)
        topic = f"{chunk.node}/{chunk.modality}"
        self.counts[topic] = self.counts.get(topic, 0) + 1
        self.samples += chunk.n
        return True

    def write_decisions(self, decisions: Iterable[Decision]) -> int:
        """Log decisions on /<node>/decisions at their window end; returns how many."""
        self._check_open()
        written = 0
        for d in decisions:
            if not 0 <= d.window_end_ns < _LOG_TIME_END:
                log.warning("%s: cannot log the decision of %s window %d: MCAP log times are "
                            "unsigned, window_end_ns=%d", self.path, d.node, d.seq,
                            d.window_end_ns)
                self.counts["rejected"] += 1
                continue
            channel = self._decision_channels.get(d.node)
            if channel is None:
                schema = self._schema(schemas.DECISION_SCHEMA, schemas.DECISION_SCHEMA_ENCODING,
                                      schemas.DECISION_SCHEMA_DATA)
                channel = self._decision_channels[d.node] = self._writer.register_channel(
                    f"/{d.node}/decisions", schemas.DECISION_ENCODING, schema,
                    {"node": d.node, "kind": "decisions"})
            self._writer.add_message(channel, log_time=d.window_end_ns,
                                     data=schemas.encode_decision(d),
                                     publish_time=d.window_end_ns, sequence=d.seq & 0xFFFFFFFF)
            written += 1
        self.decisions += written
        return written

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
