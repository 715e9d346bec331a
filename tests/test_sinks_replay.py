"""Replay writes through the daemon's sinks: the JSONL sink for a stream, any Sink given."""
from __future__ import annotations

import io
from pathlib import Path

from edgefuse.runtime.cli import bundled_model_path, main
from edgefuse.runtime.core.inference import OnnxModel
from edgefuse.runtime.service.replay import replay
from edgefuse.runtime.service.sinks import JsonlSink, Sink
from edgefuse.sensors.readers.inputs import open_inputs

CLOSE = Path(__file__).resolve().parent / "data" / "goodvibes" / "passes" / "close"


class Recorder(Sink):
    name = "recorder"

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.flushes = 0
        self.closed = False

    def write_many(self, decisions) -> None:
        self.batches.append(list(decisions))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


def test_replay_into_a_sink_equals_its_json_lines(tmp_path):
    model = OnnxModel.load(bundled_model_path())
    text = io.StringIO()
    summary = replay(open_inputs([CLOSE], chunk_s=0.25), model, text)
    recorder = Recorder()
    again = replay(open_inputs([CLOSE], chunk_s=0.25), model, recorder)
    decided = [d for batch in recorder.batches for d in batch]
    assert all(recorder.batches), "empty batches are not handed to sinks"
    assert summary.decisions == again.decisions == len(decided) > 0
    assert text.getvalue() == "".join(d.to_json() + "\n" for d in decided)
    assert recorder.flushes == 1 and not recorder.closed  # the caller's sink: not closed

    out = tmp_path / "d.jsonl"
    with JsonlSink(out) as sink:
        replay(open_inputs([CLOSE], chunk_s=0.25), model, sink)
    assert out.read_text() == text.getvalue()


def test_the_cli_writes_what_the_jsonl_sink_writes(tmp_path):
    out = tmp_path / "cli.jsonl"
    assert main(["replay", str(CLOSE), "--model", str(bundled_model_path()), "--out",
                 str(out), "-q"]) == 0
    text = io.StringIO()
    replay(open_inputs([CLOSE]), OnnxModel.load(bundled_model_path()), JsonlSink(text))
    assert out.read_bytes() == text.getvalue().encode()
