"""The streaming core: micro-batching, max wait, and batch-independent decisions."""
from __future__ import annotations

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
