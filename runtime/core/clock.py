"""The model a stream keeps of its sender's clock (issue 11): ``StreamClock``.

One per ``stream.StreamState``, fed every chunk the stream takes in order. It
knows the time it expects the next chunk at (the previous chunk's t0 + n / rate,
plus the chunks its seq says are missing), the rate measured from the progress of
t0 (``rates.RateMeter``), the rate estimated from chunk times when none is
declared, and what the seq counts per chunk. Against that model it tells apart

- a gap: the next chunk starts later by about the time its missing seqs
  explain (lost chunks), or by less than ``clock_step_min_ns``;
- a clock step: the labels jump, forward or backward, by at least
  ``clock_step_min_ns`` more than the missing seqs explain (a consecutive seq
  with a time jump is a step). It starts a new clock segment: counted
  (``clock_steps``), warned with the step in seconds, and the windows that
  span the seam (the first sample of the new clock on the timeline) carry
  reason ``clock_step`` for this modality.

Placement after a step: at the new labels. The labels are the only absolute
reference the stream has, and a step is most often the sender's clock being
corrected (NTP), so the new labels are the better estimate of when the samples
were taken. Shifting the later data back by the step instead would keep the
old (wrong) clock forever, and would turn a silence misread as a step (senders
whose seq runs on through a pause look exactly like a forward step) into every
later sample misplaced by the length of the silence; at the new labels such a
misreading costs one reason label. Data already on the timeline is never moved
(the stream drops what a backward step puts on covered time). The stream's
offset against the node's other streams is reported by the aligner
(``clock_offset_ms``, ``clock_skew``) from ``arrival_offset_ns`` (live) or
``step_total_ns`` (replay); it never changes placement, so live and replay
place alike.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.rates import (PAIR_OUTLIER, RATE_SPAN_EARLY_NS, RATE_SPAN_NS,
                                         RateMeter, rate_range)

if TYPE_CHECKING:  # the counters are the stream's; the clock sets its own fields in them
    from edgefuse.runtime.core.stream import StreamCounters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClockRef:
    """The last chunk the stream took in order: its clock's reference."""
    seq: int
    t0_ns: int
    n: int


class StreamClock:
    """The clock model of one (node, modality) stream (module docstring).

    counters are the stream's ``StreamCounters``: the clock keeps clock_steps,
    rate_mismatch, bad_rate_estimates and the rate_* / drift_* fields up to date.
    warn(key, msg, *args) is the stream's rate-limited warning.
    """

    def __init__(self, node: str, modality: str, grid_hz: float, gap_tolerance: float,
                 rate_history: int, counters: StreamCounters, warn: Callable[..., object],
                 *, step_min_ns: int, rate_tolerance: float, trust_declared_rate: bool):
        self.node = node
        self.modality = modality
        self.fs = grid_hz
        self.rate_lo, self.rate_hi = rate_range(grid_hz)
        self.gap_tolerance = gap_tolerance
        self.counters = counters
        self._warn = warn
        self.step_min_ns = step_min_ns
        self.rate_tolerance = rate_tolerance
        self.trust_declared_rate = trust_declared_rate
        self.ref: ClockRef | None = None       # the last chunk taken in order
        self._meter = RateMeter(max(2, rate_history))
        self._primed_upto: int | None = None   # pairs up to this seq came from the buffer
        # What seq counts, learned from time-contiguous pairs: "chunk" (+1), "sample"
        # (+n) or a fixed step ("unit", _unit); trusted for lost-chunk counts after 3.
        self._seq_kind = "chunk"
        self._unit = 1
        self._unit_count = 0
        self._n_same = 0                       # chunks in a row of the reference's size
        # (t0, n) of the recent chunks taken at an estimated rate: what the estimate uses
        self._history: deque[tuple[int, int]] = deque(maxlen=max(2, rate_history))
        self._bad_estimate_of: tuple[int, int] | None = None  # (t0, seq) last counted
        self.step_total_ns = 0                 # sum of the steps: the clock's offset from the data
        self.steps: deque[int] = deque(maxlen=16)  # seams of recent steps (window flags)
        self._arrivals: deque[int] = deque(maxlen=32)  # label end - receipt time, ns (live)
        self.arrival_offset_ns: int | None = None  # their median

    def rate_in_use(self) -> float:
        """The rate the stream places at now; the grid rate before its first chunk."""
        return self.counters.rate_hz or self.fs

    def rate_of(self, chunk: Chunk) -> float:
        """chunk's declared rate, else the rate in use: a guess for its duration."""
        return float(chunk.rate_hz) if chunk.rate_hz is not None else self.rate_in_use()

    # -- seq and steps --------------------------------------------------------
    def consecutive(self, seq: int, ref: ClockRef | None = None) -> bool:
        """seq directly follows the reference chunk's: +1 for a chunk counter (the
        default), +n for a sample counter, the fixed step for another (what it counts
        is learned from time-contiguous pairs)."""
        ref = ref or self.ref
        if ref is None:
            return False
        inc = seq - ref.seq
        if self._seq_kind == "sample":
            return inc == ref.n
        if self._seq_kind == "unit":
            return inc == self._unit
        return inc == 1

    def _clock_rate(self, rate: float) -> float:
        """The rate the stream's own clock is extrapolated at: the measured one when
        there is one within the modality's range, else rate (the one in use)."""
        measured = self._meter.rate() if len(self._meter) >= 2 else None
        if measured is not None and self.rate_lo <= measured < self.rate_hi:
            return measured
        return rate

    def expected(self, chunk: Chunk, rate: float,
                 ref: ClockRef | None = None) -> tuple[float, float] | None:
        """(t0 the stream's clock expects chunk at, the time of the data its seq says
        is missing before it, ns), from ref (default: the clock's reference); None
        when the seq cannot tell (an older seq, or what it counts not learned yet)."""
        ref = ref or self.ref
        if ref is None:
            return None
        inc = chunk.seq - ref.seq
        if inc <= 0:
            return None
        clock = self._clock_rate(rate)
        period = ref.n * 1e9 / clock
        if self.consecutive(chunk.seq, ref):
            missing = 0.0
        elif self._unit_count < 3:
            return None
        elif self._seq_kind == "sample":
            missing = (inc - ref.n) * 1e9 / clock
        else:
            missing = (inc / self._unit - 1.0) * period
        if missing < 0:
            return None
        return ref.t0_ns + period + missing, missing

    def step_threshold(self, missing_ns: float) -> float:
        """The least jump that is a step, beyond what the missing seqs explain: their
        time is exact for chunks of one size (5 % slack), a guess for varying sizes."""
        return max(self.step_min_ns,
                   (0.05 if self._n_same >= 3 else 0.5) * missing_ns)

    def classify(self, chunk: Chunk, rate: float) -> int | None:
        """The clock step (ns) chunk shows against the stream's own extrapolated time;
        None when there is none: within clock_step_min_ns of it, or of what its missing
        seqs explain (a gap: lost chunks), or no reference yet (no chunk taken)."""
        expected = self.expected(chunk, rate)
        if expected is None:
            return None
        t_exp, missing = expected
        jump = chunk.t0_ns - t_exp
        if abs(jump) < self.step_threshold(missing):
            return None
        return int(round(jump))

    def note_step(self, chunk: Chunk, jump_ns: int, end_ns: int) -> None:
        """A new clock segment: counted, warned, its seam kept for the window flags.
        end_ns: where the stream's data ends on the timeline."""
        self.counters.clock_steps += 1
        self.step_total_ns += jump_ns
        seam = max(chunk.t0_ns, end_ns)  # the new clock's first sample on the timeline
        self.steps.append(seam)
        self._history.clear()   # rate estimates from one clock only
        self._warn((self.node, self.modality, "clock_step"),
                   "%s/%s: clock step of %+.3f s at seq %d (t0_ns %d): its labels jumped "
                   "against its own clock (previous t0 + n/rate); placed at the new labels%s, "
                   "windows spanning t=%d ns flag it clock_step", self.node, self.modality,
                   jump_ns / 1e9, chunk.seq, chunk.t0_ns,
                   "" if jump_ns > 0 else " after the data it already has", seam)

    def step_within(self, start_ns: int, end_ns: int) -> bool:
        """True when a clock step's seam lies inside (start_ns, end_ns)."""
        return any(start_ns < seam < end_ns for seam in self.steps)

    def advance(self, chunk: Chunk, rate: float, stepped: bool) -> None:
        """chunk was taken in order: it becomes the clock's reference; a consecutive
        pair adds to the measured rate, a contiguous one teaches the seq's step."""
        ref = self.ref
        if ref is not None and chunk.seq > ref.seq and not stepped:
            inc = chunk.seq - ref.seq
            dt = chunk.t0_ns - ref.t0_ns
            if self._primed_upto is not None and chunk.seq <= self._primed_upto:
                pass  # this pair was measured from the reorder buffer already
            elif self.consecutive(chunk.seq):
                self._meter.add(ref.n, dt)
            duration = ref.n * 1e9 / rate
            if abs(dt - duration) <= max(self.gap_tolerance * 1e9 / rate, 0.1 * duration):
                # Time-contiguous: nothing is missing in between, so inc is one chunk.
                kind = "chunk" if inc == 1 else "sample" if inc == ref.n else "unit"
                if kind == self._seq_kind and (kind != "unit" or inc == self._unit):
                    self._unit_count = min(self._unit_count + 1, 1000)
                else:
                    self._seq_kind, self._unit, self._unit_count = kind, inc, 1
        if self._primed_upto is not None and chunk.seq > self._primed_upto:
            self._primed_upto = None
        if ref is not None and ref.n == chunk.n:
            self._n_same = min(self._n_same + 1, 1000)
        else:
            self._n_same = 0
        self.ref = ClockRef(chunk.seq, chunk.t0_ns, chunk.n)

    # -- rates ------------------------------------------------------------------
    def _prime_meter(self, chunks: list[Chunk]) -> None:
        """At the first chunk (chunks[0]), measure the rate from the chunks waiting
        behind it, so a wrong declared rate is caught before the first sample is placed."""
        for a, b in zip(chunks, chunks[1:]):
            if b.seq - a.seq != 1 or b.t0_ns <= a.t0_ns:  # a chunk counter's next chunk
                break
            self._meter.add(a.n, b.t0_ns - a.t0_ns)
            self._primed_upto = b.seq

    def placement_rate(self, chunk: Chunk, rate: float,
                       waiting: Callable[[], list[Chunk]]) -> float:
        """The rate chunk is placed at: a declared (actual) rate unless the progress
        of t0 shows another beyond rate_tolerance (rate_mismatch; the measured rate is
        used unless trust_declared_rate); estimated rates as rate_for found them.
        waiting() gives the chunks in the reorder buffer behind chunk, in order (asked
        for at the stream's first chunk only)."""
        if self.ref is None and not len(self._meter):
            self._prime_meter([chunk] + waiting())
        if chunk.rate_hz is None or chunk.rate_is_nominal:
            return rate
        measured = self._meter.rate()
        span = self._meter.dt_ns
        if measured is None or span < RATE_SPAN_EARLY_NS or \
                not self.rate_lo <= measured < self.rate_hi:
            return rate
        off = abs(measured / rate - 1.0)
        if off <= (self.rate_tolerance if span >= RATE_SPAN_NS else
                   max(self.rate_tolerance, PAIR_OUTLIER)):
            return rate
        self.counters.rate_mismatch += 1
        use = rate if self.trust_declared_rate else measured
        self._warn((self.node, self.modality, "rate_mismatch"),
                   "%s/%s seq %d: declared rate_hz %g disagrees with the progress of t0, "
                   "which shows %.6g Hz (%+.1f %%, over %.1f s); placing at %g Hz%s",
                   self.node, self.modality, chunk.seq, rate, measured,
                   (measured / rate - 1.0) * 100, self._meter.dt_ns / 1e9, use,
                   " (aligner.trust_declared_rate)" if self.trust_declared_rate else
                   " (the measured rate; fix the sender's rate_hz)")
        return use

    def rate_for(self, chunk: Chunk, next_waiting: Callable[[], Chunk | None]) -> float | None:
        """The given rate, or one estimated from chunk start times (within the
        modality's range), or the nominal one; None when there is none.
        next_waiting() gives the chunk waiting right after chunk in the reorder buffer."""
        if chunk.rate_hz is not None and not chunk.rate_is_nominal:
            return float(chunk.rate_hz)
        for _ in range(2):  # the second try estimates afresh, without the history
            estimate = self._estimate(chunk, next_waiting)
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
        self._warn((self.node, self.modality, "bad_rate_estimate"),
                   "%s/%s seq %d: the rate estimated from chunk times, %g Hz, is outside "
                   "[%g, %g) Hz; not used, estimating afresh (are the sender's t0_ns right? "
                   "send rate_hz)", self.node, self.modality, chunk.seq, estimate,
                   self.rate_lo, self.rate_hi)

    def _estimate(self, chunk: Chunk, next_waiting: Callable[[], Chunk | None]) -> float | None:
        """The rate implied by the start times of this stream's recent chunks."""
        hist = self._history
        if len(hist) >= 2 and hist[-1][0] > hist[0][0]:
            return sum(n for _, n in list(hist)[:-1]) * 1e9 / (hist[-1][0] - hist[0][0])
        if len(hist) == 1 and chunk.t0_ns > hist[0][0]:
            return hist[0][1] * 1e9 / (chunk.t0_ns - hist[0][0])
        if len(hist) == 0:
            nxt = next_waiting()
            if nxt is not None and nxt.t0_ns > chunk.t0_ns:
                return chunk.n * 1e9 / (nxt.t0_ns - chunk.t0_ns)
        return float(chunk.rate_hz) if chunk.rate_hz is not None else None

    def note_taken(self, chunk: Chunk, rate: float, estimated: bool) -> None:
        """chunk was placed at rate: remember its start for estimates (a gap restarts
        them) and report the rate in use, the measured one and the drift."""
        if estimated:
            if self._history:
                last_t0, last_n = self._history[-1]
                expected_ns = (last_n + self.gap_tolerance) * 1e9 / rate
                if chunk.t0_ns - last_t0 > 1.5 * expected_ns:
                    self._history.clear()  # a gap: estimate from the new segment only
            self._history.append((chunk.t0_ns, chunk.n))
        c = self.counters
        c.rate_hz = rate
        c.rate_estimated = estimated
        measured = self._meter.rate()
        if measured is not None and self._meter.dt_ns < RATE_SPAN_NS:
            measured = None
        c.rate_measured_hz = measured
        if chunk.rate_hz is not None and not chunk.rate_is_nominal:
            declared = float(chunk.rate_hz)  # drift of t0's progress against the declared rate
            c.drift_vs = "declared"
            c.drift_ppm = None if measured is None else (measured - declared) / declared * 1e6
        elif chunk.rate_hz is not None:  # the estimate against the rate the sender calls nominal
            c.drift_vs = "nominal"
            c.drift_ppm = (rate - float(chunk.rate_hz)) / float(chunk.rate_hz) * 1e6
        else:  # no rate given: the estimate against the model's grid rate
            c.drift_vs = "grid"
            c.drift_ppm = (rate - self.fs) / self.fs * 1e6

    # -- offset against the receiver (live) -------------------------------------
    def note_arrival(self, chunk: Chunk) -> None:
        """Label time of the chunk's end minus its receipt time (live): the median of
        the last ones is this stream's clock against the receiver's; the aligner
        compares it across the node's streams. Reporting only."""
        assert chunk.received_ns is not None
        self._arrivals.append(chunk.t0_ns + int(chunk.n * 1e9 / self.rate_of(chunk))
                              - chunk.received_ns)
        ordered = sorted(self._arrivals)
        self.arrival_offset_ns = ordered[len(ordered) // 2]
