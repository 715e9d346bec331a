"""Read an MCAP recording the way a tool that knows nothing of edgefuse does: mcap's own
reader, protobuf classes built from the FileDescriptorSet stored in the file, and json.
No edgefuse import here, on purpose: if this decodes a recording, so can Foxglove.

As a script it prints what is in a recording:
    python tests/mcap_standard.py REC.mcap
"""
from __future__ import annotations

import json
import sys

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from mcap.reader import make_reader


def message_classes(summary) -> dict[int, type]:
    """schema id -> protobuf message class, for every protobuf schema in the file."""
    out = {}
    for sid, schema in summary.schemas.items():
        if schema.encoding != "protobuf":
            continue
        pool = descriptor_pool.DescriptorPool()
        for fd in descriptor_pb2.FileDescriptorSet.FromString(schema.data).file:
            pool.Add(fd)
        out[sid] = message_factory.GetMessageClass(pool.FindMessageTypeByName(schema.name))
    return out


def read(path) -> tuple[list[dict], list[tuple[str, int, object]]]:
    """(channels: topic, message/schema encoding, schema name; messages: (topic,
    log_time, decoded) in log-time order: a protobuf message or a JSON value)."""
    with open(path, "rb") as f:
        reader = make_reader(f)
        summary = reader.get_summary()
        classes = message_classes(summary)
        channels = [{"topic": c.topic, "message_encoding": c.message_encoding,
                     "schema": summary.schemas[c.schema_id].name,
                     "schema_encoding": summary.schemas[c.schema_id].encoding}
                    for c in sorted(summary.channels.values(), key=lambda c: c.topic)]
        messages = []
        for schema, channel, message in reader.iter_messages(log_time_order=True):
            if channel.message_encoding == "json":
                decoded = json.loads(message.data)
            elif channel.message_encoding == "protobuf":
                decoded = classes[schema.id].FromString(message.data)
            else:
                raise ValueError(f"{channel.topic}: no standard decoder for "
                                 f"{channel.message_encoding!r}")
            messages.append((channel.topic, message.log_time, decoded))
    return channels, messages


def samples(chunk_message) -> np.ndarray:
    """[n, channels] float32 from the planar pcm16 / f32 fields."""
    return np.stack([np.array(c.pcm16 if len(c.pcm16) else c.f32, dtype=np.float32)
                     for c in chunk_message.channel], axis=1)


def t0_ns(chunk_message) -> int:
    return chunk_message.timestamp.seconds * 1_000_000_000 + chunk_message.timestamp.nanos


def main(path: str) -> None:
    channels, messages = read(path)
    print(f"{path}: {len(channels)} channels, {len(messages)} messages")
    for c in channels:
        print(f"  {c['topic']:<20} {c['message_encoding']:<8} schema {c['schema']} "
              f"({c['schema_encoding']})")
    chunk = next((t, lt, m) for t, lt, m in messages if not isinstance(m, dict))
    decision = next((t, lt, m) for t, lt, m in messages if isinstance(m, dict))
    topic, log_time, msg = chunk
    x = samples(msg)
    print(f"first chunk on {topic} at log_time {log_time}: t0_ns {t0_ns(msg)}, seq {msg.seq}, "
          f"rate_hz {msg.rate_hz!r}, full_scale {msg.full_scale!r}, samples {x.shape} "
          f"first {x[:5, 0].tolist()}")
    topic, log_time, d = decision
    print(f"first decision on {topic} at log_time {log_time}: {json.dumps(d)}")


if __name__ == "__main__":
    main(sys.argv[1])
