"""Recordings other tools can read: `edgefuse replay --record` and `edgefuse record` files
decoded with mcap's reader, protobuf from the file's own descriptors, and json
(tests/mcap_standard.py, no edgefuse code), and replayed again byte for byte."""
from __future__ import annotations

import json

import numpy as np
import pytest
from mcap.reader import make_reader

from edgefuse.runtime.cli import main
from edgefuse.runtime.core.decision import Decision
from edgefuse.sensors.readers.inputs import open_inputs
from edgefuse.sensors.readers.mcap_schemas import DECISION_JSON_SCHEMA
from edgefuse.sensors.readers.mcaplog import ENCODING, read_decisions
from tests import mcap_standard
from tests.daemon_helpers import MODEL, SAMPLE, replay_text

STREAMS = {"/121/acoustic", "/121/seismic", "/123/acoustic", "/123/seismic", "/129/acoustic",
           "/129/seismic", "/81/seismic"}
DECISIONS = {"/121/decisions", "/123/decisions", "/129/decisions", "/81/decisions"}


@pytest.fixture(scope="module")
def replay_recorded(tmp_path_factory):
    """`edgefuse replay SAMPLE --record rec.mcap`: (recording, the JSONL it wrote)."""
    tmp = tmp_path_factory.mktemp("rec")
    rec, out = tmp / "rec.mcap", tmp / "decisions.jsonl"
    assert main(["replay", str(SAMPLE), "--model", str(MODEL), "--record", str(rec),
                 "--out", str(out), "-q"]) == 0
    return rec, out.read_text()


def test_standard_decoders_read_channels_a_chunk_and_a_decision(replay_recorded):
    rec, jsonl = replay_recorded
    channels, messages = mcap_standard.read(rec)
    assert {c["topic"] for c in channels} == STREAMS | DECISIONS
    for c in channels:
        want = ("json", "edgefuse.Decision", "jsonschema") if c["topic"] in DECISIONS else \
            ("protobuf", "edgefuse.SensorChunk", "protobuf")
        assert (c["message_encoding"], c["schema"], c["schema_encoding"]) == want
    # One chunk of every stream, decoded without edgefuse, equals the source's bit for bit.
    source = {}
    for chunk in open_inputs([SAMPLE]).chunks():
        source.setdefault(f"/{chunk.node}/{chunk.modality}", chunk)
    first = {}
    for topic, log_time, msg in messages:
        if topic in STREAMS and topic not in first:
            first[topic] = (log_time, msg)
    assert set(first) == STREAMS
    for topic, (log_time, msg) in first.items():
        chunk = source[topic]
        assert log_time == mcap_standard.t0_ns(msg) == chunk.t0_ns
        assert (msg.seq, msg.rate_hz, msg.full_scale) == (chunk.seq, chunk.rate_hz,
                                                          chunk.full_scale)
        got = mcap_standard.samples(msg)
        assert got.shape == chunk.samples.shape
        np.testing.assert_array_equal(got.view(np.uint32), chunk.samples.view(np.uint32))
    # The decisions are the JSONL lines, at their window end, in the log-time order.
    lines = jsonl.splitlines()
    decoded = [(log_time, d) for topic, log_time, d in messages if topic in DECISIONS]
    assert len(decoded) == len(lines) > 0
    assert sorted(json.dumps(d, separators=(",", ":")) for _, d in decoded) == sorted(lines)
    assert all(t == d["window_end_ns"] for t, d in decoded)
    assert [t for t, _ in decoded] == sorted(t for t, _ in decoded)
    one = decoded[0][1]
    assert one["label"] in one["scores"] and one["fallback"] and one["model"]


def test_replay_of_the_recording_equals_replay_of_the_source(replay_recorded):
    rec, jsonl = replay_recorded
    assert jsonl and replay_text(rec) == jsonl == replay_text(SAMPLE)
    recorded = [json.dumps(d, separators=(",", ":")) for d in read_decisions(rec)]
    assert sorted(recorded) == sorted(jsonl.splitlines())
    ends = [json.loads(line)["window_end_ns"] for line in recorded]
    assert ends == sorted(ends)  # read in log-time order


def test_the_json_schema_describes_every_decision_field():
    d = Decision("n", 1, 0, 1, None, {}, (), (), "abstain", {}, "m")
    assert set(d.to_dict()) <= set(DECISION_JSON_SCHEMA["properties"]), \
        "a Decision field is missing from mcap_schemas.DECISION_JSON_SCHEMA"
    assert set(DECISION_JSON_SCHEMA["required"]) <= set(d.to_dict())


def test_replay_record_chunk_v1_keeps_decisions_and_replays_the_same(tmp_path):
    rec, out = tmp_path / "v1.mcap", tmp_path / "d.jsonl"
    assert main(["replay", str(SAMPLE), "--model", str(MODEL), "--record", str(rec),
                 "--encoding", "chunk-v1", "--out", str(out), "-q"]) == 0
    with open(rec, "rb") as f:
        encodings = {c.topic: c.message_encoding
                     for c in make_reader(f).get_summary().channels.values()}
    assert {t for t, e in encodings.items() if e == ENCODING} == {t[1:] for t in STREAMS}
    assert {t for t, e in encodings.items() if e == "json"} == DECISIONS
    assert replay_text(rec) == out.read_text()


def test_record_command_writes_what_standard_decoders_read(tmp_path):
    rec = tmp_path / "rec.mcap"
    assert main(["record", str(SAMPLE), "-o", str(rec)]) == 0
    channels, messages = mcap_standard.read(rec)
    assert {c["topic"] for c in channels} == STREAMS  # an input recording: no decisions
    assert len(messages) == sum(1 for _ in open_inputs([SAMPLE]).chunks())
    assert replay_text(rec) == replay_text(SAMPLE)


def test_unwritable_record_path_is_one_line(tmp_path, capsys):
    rec = tmp_path / "no-such-folder" / "rec.mcap"
    assert main(["replay", str(SAMPLE), "--model", str(MODEL), "--record", str(rec),
                 "--out", str(tmp_path / "d.jsonl"), "-q"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(rec) in err[0] and "cannot create" in err[0]


def test_encoding_without_record_is_refused(tmp_path, capsys):
    assert main(["replay", str(SAMPLE), "--model", str(MODEL), "--encoding", "chunk-v1",
                 "--out", str(tmp_path / "d.jsonl"), "-q"]) != 0
    assert "--encoding chunk-v1 is the encoding of --record" in capsys.readouterr().err
