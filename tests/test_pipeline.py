"""The streaming core: micro-batching, max wait, and batch-independent decisions."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgefuse.runtime.cli import bundled_model_path
from edgefuse.runtime.core.errors import ConfigError
from edgefuse.runtime.core.inference import OnnxModel
from edgefuse.runtime.core.pipeline import Pipeline, PipelineConfig
from edgefuse.sensors.readers.inputs import open_inputs

CLOSE = Path(__file__).resolve().parent / "data" / "goodvibes" / "passes" / "close"


@pytest.fixture(scope="module")
def model():
    return OnnxModel.load(bundled_model_path())


@pytest.fixture(scope="module")
def chunks():
    return list(open_inputs([CLOSE], chunk_s=0.25).chunks())


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_partial_batch_waits_for_max_wait_then_runs(model, chunks):
    clock = FakeClock()
    p = Pipeline(model, PipelineConfig(max_batch=1000, max_wait_s=0.05), clock=clock)
    out = []
    for c in chunks:
        out += p.push(c)
    assert out == [] and p.pending_windows() > 0
    assert p.poll() == []                  # not waited long enough
    clock.t += 0.06
    decided = p.poll()
    assert len(decided) > 0 and p.pending_windows() == 0
    assert p.poll() == []


def test_full_batch_runs_without_waiting(model, chunks):
    p = Pipeline(model, PipelineConfig(max_batch=2, max_wait_s=10.0), clock=FakeClock())
    got = []
    for c in chunks:
        got += p.push(c)
    assert got, "a full batch of 2 must run at once"


def test_decisions_do_not_depend_on_batch_size(model, chunks):
    def decide(max_batch):
        p = Pipeline(model, PipelineConfig(max_batch=max_batch))
        out = []
        for c in chunks:
            out += p.push(c)
        return out + p.flush()

    one, many = decide(1), decide(64)
    assert len(one) == len(many) > 0
    for a, b in zip(one, many):
        da, db = a.to_dict(), b.to_dict()
        sa, sb = da.pop("scores"), db.pop("scores")
        assert da == db
        assert all(abs(sa[k] - sb[k]) < 1e-5 for k in sa)


def test_config_is_checked():
    with pytest.raises(ConfigError, match="max_wait_s"):
        PipelineConfig(max_wait_s=-1)


def test_each_decision_carries_the_receipt_of_the_chunk_that_closed_its_window(model, chunks):
    """Latency attribution is the pipeline's: a window emitted by a push carries that
    chunk's receipt time and identity, through any batching; flush's windows carry None.
    Neither is data: the JSON and equality of decisions do not change."""
    stamped = [dataclasses.replace(c, received_ns=1_000 + i) for i, c in enumerate(chunks)]
    p = Pipeline(model, PipelineConfig(max_batch=3, max_wait_s=10.0), clock=FakeClock())
    decided, closers = [], {}
    for i, c in enumerate(stamped):
        before = p.pending_windows()
        out = p.push(c)
        for _ in range(len(out) + p.pending_windows() - before):
            closers[len(closers)] = (1_000 + i, (c.node, c.modality, c.seq))
        decided += out
    tail = p.flush()
    assert decided and tail, "both pushed and flushed windows are needed here"
    for k, d in enumerate(decided):
        assert (d.received_ns, d.closed_by) == closers[k], k
    pushed_pending = len(closers) - len(decided)  # decided by the flush, closed by a push
    for k, d in enumerate(tail):
        if k < pushed_pending:
            assert (d.received_ns, d.closed_by) == closers[len(decided) + k]
        else:
            assert d.received_ns is None and d.closed_by is None
    plain = Pipeline(model, PipelineConfig(max_batch=3, max_wait_s=10.0), clock=FakeClock())
    again = [d for c in chunks for d in plain.push(c)] + plain.flush()
    assert [d.to_json() for d in again] == [d.to_json() for d in decided + tail]
    assert again == decided + tail
    # offline (no receipt time) the closing chunk is still named
    assert all(d.received_ns is None for d in again)
    assert [d.closed_by for d in again] == [d.closed_by for d in decided + tail]


def test_stats_are_dicts_of_the_aligner_and_the_fuser(model, chunks):
    p = Pipeline(model)
    decided = [d for c in chunks for d in p.push(c)] + p.flush()
    stats = p.stats()
    assert stats["fusion"] == p.fuser.stats()
    assert sum(stats["fusion"]["decisions"].values()) == len(decided)
    assert stats["aligner"] == p.aligner.stats()["aligner"]
    assert stats["aligner"]["windows"] == len(decided)
    assert set(stats["timing"]) == {"align_s", "infer_s"}


def test_a_model_swap_keeps_the_numbering(model, chunks):
    """seq is the window index: after swap_model the next windows go on from where the
    old model stopped, as if nothing had been swapped."""
    whole = Pipeline(model, PipelineConfig(max_batch=1))
    expect = [d for c in chunks for d in whole.push(c)] + whole.flush()
    swapped = Pipeline(model, PipelineConfig(max_batch=1))
    half = len(chunks) // 2
    got = [d for c in chunks[:half] for d in swapped.push(c)]
    got += swapped.poll(force=True)
    swapped.swap_model(OnnxModel.load(bundled_model_path()))
    got += [d for c in chunks[half:] for d in swapped.push(c)] + swapped.flush()
    assert [(d.node, d.seq) for d in got] == [(d.node, d.seq) for d in expect]
    assert [d.to_json() for d in got] == [d.to_json() for d in expect]
