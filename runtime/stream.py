"""Per-stream state of the aligner: reordering, rate estimation, resampling.

One ``StreamState`` per (node, modality). Chunks go in through ``push()``;
the stream reorders them within a bounded horizon, places every sample on
the common timeline from its chunk's t0 and the stream's actual (or
estimated) rate, resamples onto the model's grid (Numba kernels) and keeps
the result in a bounded ring that the aligner cuts windows from.
"""
from __future__ import annotations

import heapq
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgefuse.runtime import kernels
from edgefuse.runtime.chunk import RATE_MAX_HZ, RATE_MIN_HZ, T0_MAX_NS, Chunk, t0_ok
from edgefuse.runtime.contract import ModalitySpec
from edgefuse.runtime.filters import butter4_lowpass_sos

log = logging.getLogger(__name__)

# The input rates a stream accepts, relative to the model's grid rate of its
# modality: [grid / 100, grid * 1000), within chunk's absolute bounds.
# - Below grid/100 one input sample would be stretched over more than 100 grid
#   points: no sensor of the modality runs that slowly, gap_tolerance (in input
#   periods) would bridge minutes, and 100 grid points per input sample is the
#   most resampling work we let one sample cause, so work per chunk stays bounded
#   by its sample count. (At 1e-300 Hz one 3-sample chunk spanned some 1e300 windows.)
# - At grid*1000 and above the order-4 anti-alias low-pass would have to cut at
#   under 0.05 % of the input's Nyquist frequency: no meaningful decimation, and
#   again no sensor of the modality; real drift is a few thousand ppm.
RATE_RATIO_MIN = 0.01
RATE_RATIO_MAX = 1000.0

# Counter names of the reasons a chunk is refused before it touches a stream.
BAD_RATE = "bad_rate_chunks"
BAD_TIME = "bad_time_chunks"


def rate_range(grid_hz: float) -> tuple[float, float]:
    """[low, high) input rates accepted for a modality whose model grid rate is grid_hz."""
    return (max(RATE_MIN_HZ, grid_hz * RATE_RATIO_MIN),
            min(RATE_MAX_HZ, grid_hz * RATE_RATIO_MAX))


def refusal(chunk: Chunk, grid_hz: float) -> tuple[str, str] | None:
    """(counter, what is wrong) when chunk must be refused before it reaches a stream of a
    modality with model grid rate grid_hz; None when it is within bounds."""
    if not t0_ok(chunk.t0_ns):
        return BAD_TIME, (f"t0_ns {chunk.t0_ns} is outside [0, 2**62) ns since the epoch; "
                          "check the sender's clock")
    if chunk.rate_hz is not None:
        lo, hi = rate_range(grid_hz)
        rate = float(chunk.rate_hz)
        if not lo <= rate < hi:
            return BAD_RATE, (f"rate_hz {rate!r} is outside [{lo:g}, {hi:g}) Hz, the range "
                              f"accepted for a modality the model samples at {grid_hz:g} Hz; "
                              "send the sensor's real rate (or null to estimate it)")
    return None


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
    rate_hz: float = 0.0         # rate in use (given or estimated)
    rate_estimated: bool = False
    drift_ppm: float | None = 0.0  # (rate in use - nominal) / nominal; None: no nominal

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(order=True)
class _Pending:
    t0_ns: int
    seq: int
    chunk: Chunk = field(compare=False)


class StreamState:
    """Ring-buffered, resampled view of one (node, modality) stream."""

    def __init__(self, node: str, spec: ModalitySpec, hop_ns: int, window_samples: int,
                 ring_samples: int, reorder_horizon_ns: int, gap_tolerance: float,
                 max_pending: int, rate_history: int, antialias: bool,
                 make_room: Callable[["StreamState", int], None],
                 warn: Callable[..., object] | None = None):
        self.node = node
        self.spec = spec
        self.fs = spec.rate_hz
        self.rate_lo, self.rate_hi = rate_range(spec.rate_hz)
        # warn(key, msg, *args): a WarnLimiter's warn (rate-limited per key)
        self._warn = warn or (lambda key, msg, *args: log.warning(msg, *args))
        self.hop_ns = hop_ns
        self.window_samples = window_samples
        self.cap = ring_samples
        self.ring = np.zeros((spec.channels, ring_samples), np.float32)
        self.status = np.zeros(ring_samples, np.uint8)
        self.horizon_ns = reorder_horizon_ns
        self.gap_tolerance = gap_tolerance
        self.max_pending = max_pending
        self.antialias = antialias
        self._make_room = make_room
        self.counters = StreamCounters()
        self.full_scale = 0.0
        self.anchor_ns: int | None = None
        self.written_g: int | None = None     # grid indices < written_g are final
        self.end_ns: int | None = None        # timeline end of consumed data
        self.segment_start_ns: int | None = None
        self.previous_segment_end_ns: int | None = None
        self._prev = np.zeros(spec.channels, np.float64)
        self._prev_pos = 0.0
        self._has_prev = False
        self._pending: list[_Pending] = []
        self._max_seen_t0 = -(1 << 62)
        self._recent_seqs: deque[int] = deque(maxlen=64)
        self._history: deque[tuple[int, int]] = deque(maxlen=max(2, rate_history))
        self._sos: np.ndarray | None = None
        self._sos_rate = 0.0
        self._zi: np.ndarray | None = None
        self._bad_estimate_of: tuple[int, int] | None = None  # (t0, seq) last counted

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
        lo, hi = max(g, self.written_g - self.cap), self.written_g
        if lo >= hi:
            return None
        a = lo % self.cap
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
        if chunk.t0_ns < self._max_seen_t0:
            c.out_of_order += 1
        self._max_seen_t0 = max(self._max_seen_t0, chunk.t0_ns)
        heapq.heappush(self._pending, _Pending(chunk.t0_ns, chunk.seq, chunk))
        self._drain(final=False)

    def flush(self) -> None:
        self._drain(final=True)

    def _drain(self, final: bool) -> None:
        while self._pending:
            head = self._pending[0].chunk
            rate = self._rate_for(head)
            if rate is None:
                if final or len(self._pending) > self.max_pending:
                    heapq.heappop(self._pending)
                    self.counters.unknown_rate_chunks += 1
                    self._warn((self.node, self.spec.name, "unknown_rate"),
                               "%s/%s: dropped chunk seq %d: its rate is unknown and the chunk "
                               "times give no estimate in [%g, %g) Hz; send rate_hz", self.node,
                               self.spec.name, head.seq, self.rate_lo, self.rate_hi)
                    continue
                return
            if not (final or self._ready(head, rate)):
                if len(self._pending) <= self.max_pending:
                    return
                self.counters.reorder_overflow += 1
            heapq.heappop(self._pending)
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

    def _ready(self, chunk: Chunk, rate: float) -> bool:
        """In order (contiguous, consecutive seq, or behind) or waited long enough.

        The very first chunk of a stream also waits out the horizon: an earlier
        one may still be on its way, and once a stream has started, data
        before its start can only be dropped as late.
        """
        if self.end_ns is None:
            return self._max_seen_t0 - chunk.t0_ns >= self.horizon_ns
        # Contiguous means within half a period: a short chunk that skipped
        # ahead of its predecessor must not pass for a bridgeable seam.
        if chunk.t0_ns - self.end_ns <= 0.5e9 / rate:
            return True
        if self._recent_seqs and chunk.seq == self._recent_seqs[-1] + 1:
            return True
        return self._max_seen_t0 - chunk.t0_ns >= self.horizon_ns

    def _rate_for(self, chunk: Chunk) -> float | None:
        """The given rate, or one estimated from chunk start times (within the
        modality's range), or the nominal one; None when there is none."""
        if chunk.rate_hz is not None and not chunk.rate_is_nominal:
            return float(chunk.rate_hz)
        for _ in range(2):  # the second try estimates afresh, without the history
            estimate = self._estimate(chunk)
            if estimate is None or self.rate_lo <= estimate < self.rate_hi:
                break
            self._refuse_estimate(chunk, estimate)
            estimate = None
        if estimate is not None:
            return estimate
        return float(chunk.rate_hz) if chunk.rate_hz is not None else None

    def _refuse_estimate(self, chunk: Chunk, estimate: float) -> None:
        """An estimate outside the modality's range comes from absurd chunk times
        (chunks 1e18 ns apart), not from a sensor: drop the history it came from.
        Counted once per chunk, however often the reorder buffer asks."""
        self._history.clear()
        key = (chunk.t0_ns, chunk.seq)
        if self._bad_estimate_of == key:
            return
        self._bad_estimate_of = key
        self.counters.bad_rate_estimates += 1
        self._warn((self.node, self.spec.name, "bad_rate_estimate"),
                   "%s/%s seq %d: the rate estimated from chunk times, %g Hz, is outside "
                   "[%g, %g) Hz; not used, estimating afresh (are the sender's t0_ns right? "
                   "send rate_hz)", self.node, self.spec.name, chunk.seq, estimate,
                   self.rate_lo, self.rate_hi)

    def _estimate(self, chunk: Chunk) -> float | None:
        """The rate implied by the start times of this stream's recent chunks."""
        hist = self._history
        if len(hist) >= 2 and hist[-1][0] > hist[0][0]:
            return sum(n for _, n in list(hist)[:-1]) * 1e9 / (hist[-1][0] - hist[0][0])
        if len(hist) == 1 and chunk.t0_ns > hist[0][0]:
            return hist[0][1] * 1e9 / (chunk.t0_ns - hist[0][0])
        if len(hist) == 0 and len(self._pending) >= 2:
            nxt = heapq.nsmallest(2, self._pending)[1].chunk
            if nxt.t0_ns > chunk.t0_ns:
                return chunk.n * 1e9 / (nxt.t0_ns - chunk.t0_ns)
        return float(chunk.rate_hz) if chunk.rate_hz is not None else None

    def _note_rate(self, chunk: Chunk, rate: float, estimated: bool) -> None:
        c = self.counters
        c.rate_hz = rate
        c.rate_estimated = estimated
        if chunk.rate_hz is not None:  # drift against the rate the sender calls nominal
            c.drift_ppm = (rate - float(chunk.rate_hz)) / float(chunk.rate_hz) * 1e6
        else:
            c.drift_ppm = None  # no nominal rate to drift from; rate_hz is the estimate

    def _design_filter(self, rate: float) -> None:
        """Anti-alias low-pass (Butterworth, order 4, 0.45 x output rate) when decimating."""
        if not self.antialias or rate <= 1.1 * self.fs:
            self._sos = None
            return
        if self._sos is None or abs(rate - self._sos_rate) > 0.01 * self._sos_rate:
            self._sos = butter4_lowpass_sos(0.45 * self.fs, rate)
            self._sos_rate = rate
            self._zi = np.zeros((self._sos.shape[0], self.spec.channels, 2))

    def _consume(self, chunk: Chunk, rate: float) -> None:
        c = self.counters
        estimated = chunk.rate_hz is None or chunk.rate_is_nominal
        if self.anchor_ns is None:
            self.anchor_ns = (chunk.t0_ns // self.hop_ns) * self.hop_ns
        step = self.fs / rate
        p0 = self._pos(chunk.t0_ns)
        x = chunk.samples
        if self._has_prev:
            if p0 <= self._prev_pos + 1e-9:
                skip = int(math.floor((self._prev_pos - p0) / step + 1e-9)) + 1
                if skip >= chunk.n:
                    if chunk.seq in self._recent_seqs:
                        c.duplicates += 1
                    else:
                        c.late += 1
                    return
                c.overlap_samples += skip
                x = x[skip:]
                p0 += skip * step
        self._recent_seqs.append(chunk.seq)
        if estimated:
            if self._history:
                last_t0, last_n = self._history[-1]
                expected_ns = (last_n + self.gap_tolerance) * 1e9 / rate
                if chunk.t0_ns - last_t0 > 1.5 * expected_ns:
                    self._history.clear()  # a gap: estimate from the new segment only
            self._history.append((chunk.t0_ns, chunk.n))
        self._note_rate(chunk, rate, estimated)
        if self._has_prev and (p0 - self._prev_pos) > self.gap_tolerance * step:
            self._start_segment(chunk.t0_ns)
        elif self.segment_start_ns is None:
            self.segment_start_ns = chunk.t0_ns
        c.samples += x.shape[0]
        self._design_filter(rate)
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

    def _start_segment(self, t0_ns: int) -> None:
        c = self.counters
        c.gaps += 1
        assert self.end_ns is not None
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
