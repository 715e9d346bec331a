"""What is in a recording, per stream, without a model: ``edgefuse inspect``.

    report = inspect_inputs(open_inputs(["log.mcap"]))
    report.streams[0].gaps, report.to_json()

Every input (``InputSet.sources``) is read once, one after the other, and each of
its streams is followed chunk by chunk with the aligner's own clock model
(``runtime/core/clock.StreamClock`` with ``AlignerConfig``'s defaults), so a gap
or a clock step here is what the aligner would call one:

- a clock step: the labels jump against the stream's own clock (previous t0 +
  n / rate, plus what the missing seqs explain) by ``clock_step_min_ns`` or more;
- a gap: the next chunk's first sample is more than ``gap_tolerance`` input
  periods after the previous chunk's last one (its time counted in ``gap_ns``);
- an overlap: the next chunk starts at or before the previous chunk's last sample;
- out of order: a chunk not after the previous one (in a log in arrival order).

Two inputs holding the same stream (consecutive raw files, pass folders of one
node) are separate clocks: the seam between them is a gap or an overlap, never a
step (a replay sees such seams as clock steps today: ``InputSet.chunks`` numbers the
stream's chunks on across inputs, and a consecutive seq with a time jump is a step).
The actual rate is the progress of t0 over pairs of consecutive chunks
that are neither gap nor step (samples of the earlier chunk / t0 difference),
summed over the whole stream; the declared rate is what the chunks say, and
``declared_as`` whether the recording calls it the actual or a nominal one.
Non-finite samples are NaN/inf values as recorded (the aligner counts them after
its anti-alias filter, which spreads a NaN).
Nothing is resampled and no model is loaded: the cost is reading the inputs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from edgefuse.runtime.core.aligner import AlignerConfig
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.clock import StreamClock
from edgefuse.runtime.core.errors import InputError
from edgefuse.runtime.core.stream import StreamCounters
from edgefuse.sensors.readers.inputs import InputSet

log = logging.getLogger(__name__)

MAX_STEPS_LISTED = 20  # per stream, in the JSON (all are counted)


def iso_utc(t_ns: int | None) -> str | None:
    """ns since the epoch as ISO-8601 UTC to the microsecond (truncated)."""
    if t_ns is None:
        return None
    seconds, rest = divmod(int(t_ns), 1_000_000_000)
    try:
        text = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return str(t_ns)
    return f"{text}.{rest // 1000:06d}Z"


@dataclass
class StreamReport:
    """One (node, modality) over all the inputs that hold it (see the module docstring)."""

    node: str
    modality: str
    channels: set[int] = field(default_factory=set)
    declared_hz: float | None = None
    declared_nominal: bool | None = None
    inputs: int = 0
    chunks: int = 0
    samples: int = 0
    empty_chunks: int = 0
    nonfinite_samples: int = 0
    first_ns: int | None = None          # the first sample
    last_ns: int | None = None           # the last sample
    end_ns: int | None = None            # just after the last sample
    gaps: int = 0
    gap_ns: int = 0
    overlaps: int = 0
    overlap_ns: int = 0
    clock_steps: int = 0
    steps: list[tuple[int, int]] = field(default_factory=list)  # (t0_ns, jump_ns)
    out_of_order: int = 0
    unknown_rate_chunks: int = 0         # no rate declared and none measurable
    rate_mismatch: int = 0               # declared rate off the progress of t0 (clock model)
    measured_n: int = 0                  # samples and t0 time of the consecutive pairs
    measured_ns: int = 0
    declared_ns: float = 0.0             # their time by the declared rates (drift)
    declared_lo: float | None = None     # the declared rates seen (inputs may differ)
    declared_hi: float | None = None

    @property
    def actual_hz(self) -> float | None:
        return self.measured_n * 1e9 / self.measured_ns if self.measured_ns > 0 else None

    @property
    def drift_ppm(self) -> float | None:
        """The actual rate against the declared ones, over the same pairs of chunks."""
        if self.measured_ns <= 0 or self.declared_ns <= 0:
            return None
        return (self.declared_ns / self.measured_ns - 1.0) * 1e6

    def note_declared(self, rate: float, nominal: bool) -> None:
        if self.declared_hz is None:
            self.declared_hz, self.declared_nominal = rate, nominal
        self.declared_lo = rate if self.declared_lo is None else min(self.declared_lo, rate)
        self.declared_hi = rate if self.declared_hi is None else max(self.declared_hi, rate)

    @property
    def duration_s(self) -> float | None:
        if self.first_ns is None or self.end_ns is None:
            return None
        return (self.end_ns - self.first_ns) / 1e9

    def to_json(self) -> dict:
        declared_as = None if self.declared_hz is None else \
            "nominal" if self.declared_nominal else "actual"
        return {
            "node": self.node, "modality": self.modality, "channels": sorted(self.channels),
            "declared_hz": self.declared_hz, "declared_as": declared_as,
            "declared_hz_range": None if self.declared_lo is None else
            [self.declared_lo, self.declared_hi],
            "actual_hz": self.actual_hz, "drift_ppm": self.drift_ppm,
            "first": iso_utc(self.first_ns), "last": iso_utc(self.last_ns),
            "first_ns": self.first_ns, "last_ns": self.last_ns, "duration_s": self.duration_s,
            "inputs": self.inputs, "chunks": self.chunks, "samples": self.samples,
            "empty_chunks": self.empty_chunks,
            "gaps": self.gaps, "gap_s": self.gap_ns / 1e9,
            "overlaps": self.overlaps, "overlap_s": self.overlap_ns / 1e9,
            "clock_steps": self.clock_steps,
            "steps": [{"at": iso_utc(t), "at_ns": t, "step_s": j / 1e9}
                      for t, j in self.steps[:MAX_STEPS_LISTED]],
            "out_of_order": self.out_of_order, "unknown_rate_chunks": self.unknown_rate_chunks,
            "rate_mismatch": self.rate_mismatch, "nonfinite_samples": self.nonfinite_samples,
        }


@dataclass
class Inspection:
    streams: list[StreamReport]
    inputs: int                          # sources read
    errors: list[str]                    # inputs that failed (what was read is counted)

    def to_json(self) -> dict:
        return {"inputs": self.inputs, "streams": [s.to_json() for s in self.streams],
                "errors": list(self.errors)}


def _debug(key, msg, *args) -> None:
    """The clock's warnings: the report itself carries the anomalies."""
    log.debug(msg, *args)


class _Run:
    """One stream within one input: the aligner's clock model, without placing samples.
    A chunk is judged when the next one is known (the clock's look-ahead for a rate
    it has to estimate)."""

    def __init__(self, report: StreamReport, config: AlignerConfig):
        self.report = report
        self.config = config
        self.counters = StreamCounters()
        self.clock: StreamClock | None = None
        self.pending: Chunk | None = None
        self.prev: Chunk | None = None       # the last chunk taken in order, and its rate
        self.prev_rate = 0.0
        self.first_ns: int | None = None
        self.end_ns: int | None = None
        self.end_rate = 0.0                  # rate of the chunk that ends the run

    def add(self, chunk: Chunk) -> None:
        r = self.report
        r.chunks += 1
        r.channels.add(chunk.channels)
        if chunk.rate_hz is not None:
            r.note_declared(float(chunk.rate_hz), chunk.rate_is_nominal)
        if chunk.n == 0:
            r.empty_chunks += 1
            return
        r.samples += chunk.n
        r.nonfinite_samples += int(chunk.n * chunk.channels
                                   - np.count_nonzero(np.isfinite(chunk.samples)))
        if self.pending is not None:
            self._take(self.pending, chunk)
        self.pending = chunk

    def finish(self) -> None:
        if self.pending is not None:
            self._take(self.pending, None)
            self.pending = None
        self.report.rate_mismatch += self.counters.rate_mismatch

    def _make_clock(self, chunk: Chunk, nxt: Chunk | None) -> StreamClock | None:
        grid = chunk.rate_hz
        if grid is None and nxt is not None and nxt.t0_ns > chunk.t0_ns:
            grid = chunk.n * 1e9 / (nxt.t0_ns - chunk.t0_ns)
        if grid is None:
            return None
        c = self.config
        # the grid rate only bounds the rates the clock accepts ([grid/100, grid*1000))
        return StreamClock(chunk.node, chunk.modality, float(grid), c.gap_tolerance,
                           c.rate_history, self.counters, _debug,
                           step_min_ns=c.clock_step_min_ns, rate_tolerance=c.rate_tolerance,
                           trust_declared_rate=c.trust_declared_rate)

    def _take(self, chunk: Chunk, nxt: Chunk | None) -> None:
        r = self.report
        if self.clock is None:
            self.clock = self._make_clock(chunk, nxt)
        rate = None if self.clock is None else self.clock.rate_for(chunk, lambda: nxt)
        if rate is None:
            r.unknown_rate_chunks += 1
            return
        clock = self.clock
        rate = clock.placement_rate(chunk, rate, lambda: [] if nxt is None else [nxt])
        jump = clock.classify(chunk, rate)
        prev = self.prev
        if jump is not None:
            clock.note_step(chunk, jump, self.end_ns or chunk.t0_ns)
            r.clock_steps += 1
            r.steps.append((chunk.t0_ns, jump))
        elif prev is not None and chunk.t0_ns <= prev.t0_ns:
            r.out_of_order += 1
            return
        elif prev is not None:
            last_sample = prev.t0_ns + (prev.n - 1) * 1e9 / self.prev_rate
            if chunk.t0_ns - last_sample > self.config.gap_tolerance * 1e9 / rate:
                r.gaps += 1
                r.gap_ns += max(0, chunk.t0_ns - self.end_ns)
            else:
                if chunk.t0_ns <= last_sample:
                    r.overlaps += 1
                    r.overlap_ns += self.end_ns - chunk.t0_ns
                r.measured_n += prev.n
                r.measured_ns += chunk.t0_ns - prev.t0_ns
                if prev.rate_hz is not None:
                    r.declared_ns += prev.n * 1e9 / float(prev.rate_hz)
                else:  # no rate declared: no drift (the rate in use is the measured one)
                    r.declared_ns = -math.inf
        clock.advance(chunk, rate, jump is not None)
        clock.note_taken(chunk, rate, chunk.rate_hz is None or chunk.rate_is_nominal)
        self.prev, self.prev_rate = chunk, rate
        end = chunk.t0_ns + round(chunk.n * 1e9 / rate)
        last = chunk.t0_ns + round((chunk.n - 1) * 1e9 / rate)
        if self.first_ns is None or chunk.t0_ns < self.first_ns:
            self.first_ns = chunk.t0_ns
        if self.end_ns is None or end > self.end_ns:
            self.end_ns, self.end_rate = end, rate
        r.first_ns = chunk.t0_ns if r.first_ns is None else min(r.first_ns, chunk.t0_ns)
        r.last_ns = last if r.last_ns is None else max(r.last_ns, last)
        r.end_ns = end if r.end_ns is None else max(r.end_ns, end)


def _seams(report: StreamReport, runs: list[_Run], gap_tolerance: float) -> None:
    """Gaps and overlaps between the inputs of one stream, in time order."""
    spans = sorted((run.first_ns, run.end_ns, run.end_rate) for run in runs
                   if run.first_ns is not None)
    for (_, a_end, a_rate), (b_first, _, _) in zip(spans, spans[1:]):
        seam = b_first - a_end
        if seam > (gap_tolerance - 1.0) * 1e9 / a_rate:
            report.gaps += 1
            report.gap_ns += seam
        elif seam < -1e9 / a_rate:
            report.overlaps += 1
            report.overlap_ns -= seam


def _stream_order(report: StreamReport) -> tuple:
    node = report.node
    return (not node.isdigit(), int(node) if node.isdigit() else 0, node, report.modality)


def inspect_inputs(inputs: InputSet, config: AlignerConfig | None = None) -> Inspection:
    """Read every input once and report each stream (module docstring). An input that
    fails midway keeps what was read before the failure; its error is in ``errors``."""
    config = config or AlignerConfig()
    reports: dict[tuple[str, str], StreamReport] = {}
    for info in inputs.streams:  # from the headers: a stream without chunks is listed too
        rep = reports.setdefault((info.node, info.modality),
                                 StreamReport(info.node, info.modality))
        rep.channels.add(info.channels)
        if rep.declared_hz is None and info.rate_hz is not None:
            rep.note_declared(float(info.rate_hz), info.rate_is_nominal)
    runs: dict[tuple[str, str], list[_Run]] = {}
    errors: list[str] = []
    for source in inputs.sources:
        current: dict[tuple[str, str], _Run] = {}
        try:
            for chunk in source.open():
                run = current.get(chunk.stream)
                if run is None:
                    rep = reports.setdefault(chunk.stream,
                                             StreamReport(chunk.node, chunk.modality))
                    rep.inputs += 1
                    run = current[chunk.stream] = _Run(rep, config)
                    runs.setdefault(chunk.stream, []).append(run)
                run.add(chunk)
        except InputError as exc:  # a corrupt log: keep what was read, go on
            log.warning("input %s failed: %s", source.label, exc)
            errors.append(f"{source.label}: {exc}")
        for run in current.values():
            run.finish()
    for key, stream_runs in runs.items():
        _seams(reports[key], stream_runs, config.gap_tolerance)
    streams = sorted(reports.values(), key=_stream_order)
    return Inspection(streams, len(inputs.sources), errors)

