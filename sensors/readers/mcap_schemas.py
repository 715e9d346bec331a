"""The schemas of edgefuse MCAP recordings, written into every file so that MCAP
tools and Foxglove decode the messages without edgefuse.

Stream chunks: protobuf message ``edgefuse.SensorChunk`` (schema encoding
"protobuf": a FileDescriptorSet, the way mcap's protobuf support and Foxglove
expect it), one channel per stream, topic ``/<node>/<modality>``:

    SensorChunk    timestamp  google.protobuf.Timestamp  t0, first sample (exact ns)
                   seq        int64
                   rate_hz    double   0 = unknown (the aligner estimates it)
                   rate_is_nominal bool
                   full_scale double   0 = unknown
                   channel    repeated ChannelSamples, one per sensor channel
    ChannelSamples pcm16      repeated sint32 (packed)  when every sample is an int16
                   f32        repeated float  (packed)  otherwise

Channels are planar so that Foxglove plots one of them (``.channel[0].pcm16``);
PCM as zigzag varints is smaller than raw int16 after compression (README, MCAP
recordings). Values read back bit for bit: int16 and float32 are exact in
protobuf, and the reader turns both into the float32 the Chunk holds.

Decisions: JSON (message encoding "json", schema encoding "jsonschema"), schema
``edgefuse.Decision``, one channel per node, topic ``/<node>/decisions``; the
payload is ``Decision.to_json()``, the same line the JSONL sink writes. Their
rate is one per window per node, so the size of JSON does not matter there, and
``scores.vehicle`` plots directly in Foxglove.
"""
from __future__ import annotations

import json

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2
from google.protobuf.message import DecodeError

from edgefuse.runtime.core.chunk import RATE_MAX_HZ, RATE_MIN_HZ, Chunk, rate_ok, t0_ok
from edgefuse.runtime.core.decision import Decision
from edgefuse.runtime.core.errors import InputError, WireFormatError
from edgefuse.runtime.core.wire import MAX_CHANNELS

CHUNK_SCHEMA = "edgefuse.SensorChunk"
CHUNK_SCHEMA_ENCODING = "protobuf"
CHUNK_ENCODING = "protobuf"
DECISION_SCHEMA = "edgefuse.Decision"
DECISION_SCHEMA_ENCODING = "jsonschema"
DECISION_ENCODING = "json"
_INT16 = np.iinfo(np.int16)
_NS = 1_000_000_000


def payload_dtype(samples: np.ndarray) -> str:
    """int16 when every sample is an integer within int16 (PCM), else float32."""
    if samples.size and np.isfinite(samples).all() and samples.min() >= _INT16.min \
            and samples.max() <= _INT16.max and np.array_equal(samples, np.rint(samples)):
        return "<i2"
    return "<f4"


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """edgefuse/chunk.proto, built in code: no protoc, no generated module."""
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="edgefuse/chunk.proto", package="edgefuse", syntax="proto3",
        dependency=[timestamp_pb2.DESCRIPTOR.name])
    samples = fdp.message_type.add(name="ChannelSamples")
    samples.field.add(name="pcm16", number=1, type=F.TYPE_SINT32, label=F.LABEL_REPEATED)
    samples.field.add(name="f32", number=2, type=F.TYPE_FLOAT, label=F.LABEL_REPEATED)
    chunk = fdp.message_type.add(name="SensorChunk")
    chunk.field.add(name="timestamp", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=".google.protobuf.Timestamp")
    chunk.field.add(name="seq", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    chunk.field.add(name="rate_hz", number=3, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    chunk.field.add(name="rate_is_nominal", number=4, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    chunk.field.add(name="full_scale", number=5, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    chunk.field.add(name="channel", number=6, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                    type_name=".edgefuse.ChannelSamples")
    return fdp


def _build() -> tuple[bytes, type]:
    timestamp = descriptor_pb2.FileDescriptorProto.FromString(
        timestamp_pb2.DESCRIPTOR.serialized_pb)
    ours = _file_descriptor()
    # A private pool: edgefuse's names never clash with a user's own protos.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(timestamp)
    pool.Add(ours)
    fds = descriptor_pb2.FileDescriptorSet(file=[timestamp, ours])  # dependencies first
    return fds.SerializeToString(), message_factory.GetMessageClass(
        pool.FindMessageTypeByName(CHUNK_SCHEMA))


CHUNK_SCHEMA_DATA, SensorChunk = _build()

DECISION_JSON_SCHEMA = {
    "title": DECISION_SCHEMA,
    "description": "One fused decision for window seq of node (edgefuse Decision.to_json).",
    "type": "object",
    "properties": {
        "node": {"type": "string"},
        "seq": {"type": "integer", "description": "window index on the absolute timeline"},
        "window_start_ns": {"type": "integer"},
        "window_end_ns": {"type": "integer", "description": "also the message's log time"},
        "label": {"type": ["string", "null"]},
        "scores": {"type": "object", "additionalProperties": {"type": "number"}},
        "used": {"type": "array", "items": {"type": "string"}},
        "missing": {"type": "array", "items": {"type": "string"}},
        "fallback": {"type": "string",
                     "description": "none, a fallback's tag (subset:seismic), masked or abstain"},
        "route": {"type": ["string", "null"], "description": "the model route that scored it"},
        "missing_reason": {"type": "object", "additionalProperties": {"type": "string"}},
        "coverage": {"type": "object", "additionalProperties": {"type": "number"}},
        "model": {"type": "string"},
    },
    # Fields added to Decision later are optional here, so older files stay valid.
    "required": ["node", "seq", "window_start_ns", "window_end_ns", "label", "scores", "used",
                 "missing", "fallback", "missing_reason", "model"],
}
DECISION_SCHEMA_DATA = json.dumps(DECISION_JSON_SCHEMA, separators=(",", ":")).encode()


def encode_chunk(chunk: Chunk) -> bytes:
    """A SensorChunk; WireFormatError when the chunk cannot be one."""
    if not 1 <= chunk.channels <= MAX_CHANNELS:
        raise WireFormatError(f"channels must be 1..{MAX_CHANNELS}, found {chunk.channels}")
    msg = SensorChunk(rate_hz=float(chunk.rate_hz or 0.0), rate_is_nominal=chunk.rate_is_nominal,
                      full_scale=float(chunk.full_scale or 0.0))
    try:
        msg.seq = chunk.seq
        msg.timestamp.seconds, msg.timestamp.nanos = divmod(chunk.t0_ns, _NS)
    except ValueError as exc:  # beyond int64
        raise WireFormatError(f"t0_ns/seq beyond int64: {exc}") from exc
    pcm = payload_dtype(chunk.samples) == "<i2"
    for column in chunk.samples.T:
        if pcm:
            msg.channel.add().pcm16.extend(column.astype(np.int16).tolist())
        else:
            msg.channel.add().f32.extend(column.tolist())
    return msg.SerializeToString()


def _column(samples, where: str) -> np.ndarray:
    pcm, f32 = samples.pcm16, samples.f32
    if len(pcm) and len(f32):
        raise WireFormatError(f"{where}: a channel holds both pcm16 and f32 samples")
    if len(f32):
        return np.array(f32, dtype=np.float32)
    values = np.array(pcm, dtype=np.int32)
    if values.size and (values.min() < _INT16.min or values.max() > _INT16.max):
        raise WireFormatError(f"{where}: pcm16 samples outside int16")
    return values.astype(np.float32)


def decode_chunk(data: bytes, node: str, modality: str, max_payload: int) -> Chunk:
    """A Chunk from a SensorChunk; WireFormatError saying what is wrong."""
    where = f"{node}/{modality}"
    if len(data) > max_payload:
        raise WireFormatError(f"{where}: message of {len(data)} bytes exceeds the limit of "
                              f"{max_payload} bytes")
    try:
        msg = SensorChunk.FromString(data)
    except DecodeError as exc:
        raise WireFormatError(f"{where}: not a {CHUNK_SCHEMA}: {exc}") from exc
    where = f"{where} seq {msg.seq}"
    if not 1 <= len(msg.channel) <= MAX_CHANNELS:
        raise WireFormatError(f"{where}: channels must be 1..{MAX_CHANNELS}, "
                              f"found {len(msg.channel)}")
    columns = [_column(c, where) for c in msg.channel]
    if len({len(c) for c in columns}) != 1:
        raise WireFormatError(f"{where}: channels of unequal length "
                              f"{sorted({len(c) for c in columns})}")
    if not 0 <= msg.timestamp.nanos < _NS:
        raise WireFormatError(f"{where}: timestamp nanos must be 0..{_NS - 1}, found "
                              f"{msg.timestamp.nanos}", reason="bad_time")
    t0_ns = msg.timestamp.seconds * _NS + msg.timestamp.nanos
    if not t0_ok(t0_ns):
        raise WireFormatError(f"{where}: t0_ns {t0_ns} outside [0, 2**62)", reason="bad_time")
    if msg.rate_hz != 0.0 and not rate_ok(msg.rate_hz):
        raise WireFormatError(f"{where}: rate_hz must be 0 (unknown) or in [{RATE_MIN_HZ:g}, "
                              f"{RATE_MAX_HZ:g}) Hz, found {msg.rate_hz!r}", reason="bad_rate")
    try:
        return Chunk(node, modality, t0_ns, msg.rate_hz or None, np.stack(columns, axis=1),
                     msg.seq, full_scale=msg.full_scale or None,
                     rate_is_nominal=msg.rate_is_nominal)
    except InputError as exc:
        raise WireFormatError(str(exc)) from exc


def encode_decision(decision: Decision) -> bytes:
    return decision.to_json().encode()
