"""Per-stream state of the aligner: reordering, resampling, the ring.

One ``StreamState`` per (node, modality). Chunks go in through ``push()``;
the stream reorders them within a bounded horizon, places every sample on
the common timeline from its chunk's t0 and the stream's actual (or
estimated) rate, resamples onto the model's grid (Numba kernels) and keeps
the result in a bounded ring that the aligner cuts windows from.

The model of the sender's clock (the expected next t0, gaps versus clock steps,
the measured and estimated rate, the offset against the receiver) is the
stream's ``clock``, a ``clock.StreamClock``; its module docstring has the model.
After a clock step the new labels place the data, and data already on the
timeline is never moved: after a backward step the new clock's samples that
fall on time already covered are dropped (``step_overlap_chunks``) and the
stream continues where its data ended.

The reorder buffer (the horizon, the count bound, clock epochs after a backward
step) is the stream's ``reorder``, a ``reorder.ReorderBuffer``.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgefuse.runtime.core import kernels
from edgefuse.runtime.core.chunk import T0_MAX_NS, Chunk
from edgefuse.runtime.core.clock import StreamClock
from edgefuse.runtime.core.contract import ModalitySpec
from edgefuse.runtime.core.filters import butter4_lowpass_sos, lowpass_delay_samples
from edgefuse.runtime.core.rates import BAD_TIME
from edgefuse.runtime.core.reorder import ReorderBuffer

log = logging.getLogger(__name__)


@dataclass
class StreamCounters:
    chunks: int = 0
    samples: int = 0
    empty_chunks: int = 0
    gaps: int = 0
    gap_ns: int = 0
    duplicates: int = 0          # chunks entirely behind the stream that repeat a seen seq
    late: int = 0                # chunks entirely behind the stream (past the watermark)
    overlap_samples: int = 0     # leading samples dropped because already covered
    out_of_order: int = 0        # chunks that arrived before an earlier-timed one
    reorder_overflow: int = 0    # pending chunks forced out because the buffer was full
    nonfinite_samples: int = 0
    unknown_rate_chunks: int = 0  # dropped: no rate given and none estimable
    bad_rate_chunks: int = 0     # refused: rate outside the modality's range (rate_range)
    bad_time_chunks: int = 0     # refused: t0 or t0 + span outside [0, 2**62) ns
    bad_rate_estimates: int = 0  # estimates outside the range, not used (estimation restarted)
    rate_hz: float = 0.0         # rate in use (given, measured or estimated)
    rate_estimated: bool = False
    # the rate the progress of t0 shows (pairs of consecutive chunks over >= 4 s);
    # None until measurable
    rate_measured_hz: float | None = None
    rate_mismatch: int = 0       # chunks whose declared rate disagreed with rate_measured_hz
    # drift in ppm of the rate the stream runs at against drift_vs: "declared" (a rate
    # given as actual, against the one t0 progresses at), "nominal" (a nominal rate,
    # against the estimate in use) or "grid" (no rate given: the estimate against the
    # model's grid rate); None until there is something to compare
    drift_ppm: float | None = None
    drift_vs: str | None = None
    clock_steps: int = 0         # steps of the clock (labels jumped against their own time)
    step_overlap_chunks: int = 0  # chunks a backward step relabelled onto covered time (dropped)
    # this stream's clock against the node's other streams (set by the aligner): from
    # "arrival" times (live) or from the "steps" the data shows (replay); None: unknown
    clock_offset_ms: float | None = None
    clock_offset_from: str | None = None
    clock_skew: bool = False     # clock_offset_ms beyond aligner.skew_tolerance_s now
    clock_skew_events: int = 0   # times it went beyond

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class StreamState:
    """Ring-buffered, resampled view of one (node, modality) stream."""

    def __init__(self, node: str, spec: ModalitySpec, hop_ns: int, window_samples: int,
                 ring_samples: int, reorder_horizon_ns: int, gap_tolerance: float,
                 max_pending: int, rate_history: int, antialias: bool,
                 make_room: Callable[["StreamState", int], None],
                 warn: Callable[..., object] | None = None, *,
                 clock_step_min_ns: int = 100_000_000, rate_tolerance: float = 0.02,
                 trust_declared_rate: bool = False):
        self.node = node
        self.spec = spec
        self.fs = spec.rate_hz
        # warn(key, msg, *args): a WarnLimiter's warn (rate-limited per key)
        self._warn = warn or (lambda key, msg, *args: log.warning(msg, *args))
        self.hop_ns = hop_ns
        self.window_samples = window_samples
        self.cap = ring_samples
        self.ring = np.zeros((spec.channels, ring_samples), np.float32)
        self.status = np.zeros(ring_samples, np.uint8)
        self.gap_tolerance = gap_tolerance
        self.antialias = antialias
        self._make_room = make_room
        self.counters = StreamCounters()
        self.clock = StreamClock(node, spec.name, spec.rate_hz, gap_tolerance, rate_history,
                                 self.counters, self._warn, step_min_ns=clock_step_min_ns,
                                 rate_tolerance=rate_tolerance,
                                 trust_declared_rate=trust_declared_rate)
        self.full_scale = 0.0
        self.anchor_ns: int | None = None
        self.written_g: int | None = None     # grid indices < written_g are final
        self.end_ns: int | None = None        # timeline end of consumed data
        self.segment_start_ns: int | None = None
        self.previous_segment_end_ns: int | None = None
        self.first_ns: int | None = None      # t0 of the first sample taken
        self._prev = np.zeros(spec.channels, np.float64)
        self._prev_pos = 0.0
        self._has_prev = False
        self._sos: np.ndarray | None = None
        self._sos_rate = 0.0
        self._zi: np.ndarray | None = None
        self._shift = 0.0                     # anti-alias delay, grid samples (placement shift)
        self.reorder = ReorderBuffer(reorder_horizon_ns, max_pending, self.clock, self.counters)
        self._recent_seqs: deque[int] = deque(maxlen=64)
        self._after_back_step = False         # new-clock chunks may land on covered time
        self.pushed_at_ns = 0                 # the node's elapsed time at its last push

    # -- the clock, as the aligner reads it ------------------------------------
    @property
    def steps(self) -> deque[int]:
        """Seams of the recent clock steps on the timeline (window flags)."""
        return self.clock.steps

    @property
    def step_total_ns(self) -> int:
        """Sum of the clock steps: the clock's offset from the data (replay)."""
        return self.clock.step_total_ns

    @property
    def arrival_offset_ns(self) -> int | None:
        """Median label time of a chunk's end minus its receipt time (live)."""
        return self.clock.arrival_offset_ns

    def step_within(self, start_ns: int, end_ns: int) -> bool:
        """True when a clock step's seam lies inside (start_ns, end_ns)."""
        return self.clock.step_within(start_ns, end_ns)

    # -- grid -------------------------------------------------------------
    def grid_index(self, t_ns: int) -> int:
        """Grid index of a window boundary (exact: boundaries are hop multiples)."""
        assert self.anchor_ns is not None
        return int(round((t_ns - self.anchor_ns) * self.fs / 1e9))

    def _pos(self, t_ns: int) -> float:
        assert self.anchor_ns is not None
        return (t_ns - self.anchor_ns) * self.fs / 1e9

    def first_valid_from(self, g: int) -> int | None:
        """The first grid index >= g holding valid data in the ring; None if none.
        Scans at most one ring (older indices are overwritten, newer unwritten)."""
        assert self.written_g is not None
        lo, hi = max(g, self.written_g - self.cap, 0), self.written_g
        if lo >= hi:
            return None
        a = lo % self.cap
        if self.status[a] == kernels.STATUS_VALID:   # the usual case: data right there
            return lo
        first = self.status[a:a + (hi - lo)]
        hits = np.flatnonzero(first == kernels.STATUS_VALID)
        if hits.size:
            return lo + int(hits[0])
        rest = (hi - lo) - first.shape[0]  # the part that wrapped to the ring's start
        hits = np.flatnonzero(self.status[:rest] == kernels.STATUS_VALID)
        return lo + first.shape[0] + int(hits[0]) if hits.size else None

    # -- input ------------------------------------------------------------
    def push(self, chunk: Chunk) -> None:
        c = self.counters
        c.chunks += 1
        if chunk.n == 0:
            c.empty_chunks += 1
            return
        if chunk.full_scale:
            self.full_scale = float(chunk.full_scale)
        if chunk.received_ns is not None:
            self.clock.note_arrival(chunk)
        self.reorder.add(chunk, self.end_ns)
        self._drain(final=False)

    def flush(self) -> None:
        self._drain(final=True)

    def _drain(self, final: bool) -> None:
        """Take the chunks that are ready (all of them when final), in order."""
        buffer = self.reorder
        while buffer:
            entry = buffer.head
            head = entry.chunk
            rate = self.clock.rate_for(head, buffer.after_head)
            if rate is None:
                if final or buffer.overfull:
                    buffer.drop_head()
                    self.counters.unknown_rate_chunks += 1
                    self._warn((self.node, self.spec.name, "unknown_rate"),
                               "%s/%s: dropped chunk seq %d: its rate is unknown and the chunk "
                               "times give no estimate in [%g, %g) Hz; send rate_hz", self.node,
                               self.spec.name, head.seq, self.clock.rate_lo, self.clock.rate_hi)
                    continue
                return
            if not (final or buffer.ready(entry, rate, self.end_ns)):
                if not buffer.overfull:
                    return
                self.counters.reorder_overflow += 1
            buffer.take_head()
            rate = self.clock.placement_rate(head, rate, buffer.waiting)
            if head.t0_ns + head.n * 1e9 / rate >= T0_MAX_NS:
                # t0 and rate are each in range, but a long chunk at a slow rate
                # near the end of the time range would run past it.
                self.counters.bad_time_chunks += 1
                self._warn((self.node, self.spec.name, BAD_TIME),
                           "%s/%s seq %d refused: %d samples at %g Hz from t0_ns %d end past "
                           "2**62 ns; check the sender's clock", self.node, self.spec.name,
                           head.seq, head.n, rate, head.t0_ns)
                continue
            self._consume(head, rate)

    # -- placement on the grid ----------------------------------------------
    def _design_filter(self, rate: float) -> None:
        """Anti-alias low-pass (Butterworth, order 4, 0.45 x output rate) when decimating.

        Its output lags its input by the filter's group delay (about 1.5 input
        samples at 0.45 x a half-rate output: 0.96 ms for seismic 1600 -> 800 Hz,
        0.16 ms for acoustic 9868 -> 4934 Hz). Samples are placed that much earlier
        (``_shift``, grid samples): the low-frequency group delay computed from the
        design, which is the centroid of the filter's impulse response, so a spike
        lands where it was (tests/test_aligner.py measures the residual)."""
        if not self.antialias or rate <= 1.1 * self.fs:
            self._sos = None
            self._shift = 0.0
            return
        if self._sos is None or abs(rate - self._sos_rate) > 0.01 * self._sos_rate:
            self._sos = butter4_lowpass_sos(0.45 * self.fs, rate)
            self._sos_rate = rate
            self._zi = np.zeros((self._sos.shape[0], self.spec.channels, 2))
            self._shift = lowpass_delay_samples(self._sos) * self.fs / rate

    def _consume(self, chunk: Chunk, rate: float) -> None:
        c = self.counters
        estimated = chunk.rate_hz is None or chunk.rate_is_nominal
        if self.anchor_ns is None:
            # One hop before the first window: room before the first sample for the
            # anti-alias shift, so grid indices stay >= 0.
            self.anchor_ns = (chunk.t0_ns // self.hop_ns - 1) * self.hop_ns
        jump = self.clock.classify(chunk, rate)
        self._design_filter(rate)
        step = self.fs / rate
        # Placement position of x[0]; earlier by the filter's delay when decimating.
        p0 = self._pos(chunk.t0_ns) - self._shift
        x = chunk.samples
        if jump is not None:
            assert self.end_ns is not None  # a step needs a reference: a chunk taken
            self.clock.note_step(chunk, jump, self.end_ns)
            self._after_back_step = jump < 0
        ref = self.clock.ref
        newer = ref is None or chunk.seq > ref.seq
        if self._has_prev:
            if p0 <= self._prev_pos + 1e-9:
                skip = int(math.floor((self._prev_pos - p0) / step + 1e-9)) + 1
                if skip >= chunk.n:
                    if newer and self._after_back_step:
                        # The new clock after a backward step, on time already covered.
                        c.step_overlap_chunks += 1
                        self._recent_seqs.append(chunk.seq)
                        self.clock.advance(chunk, rate, jump is not None)
                    elif chunk.seq in self._recent_seqs:
                        c.duplicates += 1
                    else:
                        c.late += 1
                    return
                c.overlap_samples += skip
                x = x[skip:]
                p0 += skip * step
        self._recent_seqs.append(chunk.seq)
        self._after_back_step = False
        self.clock.advance(chunk, rate, jump is not None)
        self.clock.note_taken(chunk, rate, estimated)
        if self._has_prev and (p0 - self._prev_pos) > self.gap_tolerance * step:
            self._start_segment(chunk.t0_ns, gap=jump is None)
        elif self.segment_start_ns is None:
            self.segment_start_ns = self.first_ns = chunk.t0_ns
        c.samples += x.shape[0]
        if self._sos is not None:
            xf = np.empty(x.shape, np.float64)
            kernels._lowpass4(x, xf, self._sos, self._zi)
            x = xf
        c.nonfinite_samples += kernels._count_nonfinite(x)
        # Feed the ring in pieces no longer than half of it, making room first.
        piece = max(1, int((self.cap - self.window_samples) / 2 / step))
        for lo in range(0, x.shape[0], piece):
            self._write(x[lo:lo + piece], p0 + lo * step, step)
        self.end_ns = chunk.t0_ns + int(round(chunk.n * 1e9 / rate))
        self.reorder.taken(chunk.t0_ns)

    def _start_segment(self, t0_ns: int, gap: bool = True) -> None:
        """Data resumes at t0_ns after a silence: a gap (counted), or the hole a
        forward clock step leaves (counted as the step)."""
        c = self.counters
        assert self.end_ns is not None
        if gap:
            c.gaps += 1
            c.gap_ns += max(0, t0_ns - self.end_ns)
        self.previous_segment_end_ns = self.end_ns
        self.segment_start_ns = t0_ns
        self.end_ns = t0_ns  # the silence is known now; data from t0_ns follows
        self._has_prev = False
        if self._zi is not None:
            self._zi[:] = 0.0

    def _write(self, x: np.ndarray, p0: float, step: float) -> None:
        last_pos = p0 + (x.shape[0] - 1) * step
        g_hi = int(math.floor(last_pos)) + 1
        if self.written_g is None:
            self.written_g = int(math.ceil(p0))
        self._make_room(self, max(g_hi, int(math.ceil(p0))))
        g_lo = self.written_g
        if not self._has_prev and g_lo < int(math.ceil(p0)):
            # Grid points between the last data and this segment are gaps.
            first = int(math.ceil(p0))
            gap_lo = max(g_lo, first - self.cap)
            kernels._mark_gap(self.status, gap_lo, first)
            g_lo = first
            self.written_g = first
        if g_hi > g_lo:
            kernels._resample_into(x, self._prev, self._prev_pos, self._has_prev, p0, step,
                                   g_lo, g_hi, self.ring, self.status)
            self.written_g = g_hi
        self._prev = x[-1].astype(np.float64)
        self._prev_pos = last_pos
        self._has_prev = True
