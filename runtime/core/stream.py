"""Per-stream state of the aligner: reordering, rate estimation, resampling.

One ``StreamState`` per (node, modality). Chunks go in through ``push()``;
the stream reorders them within a bounded horizon, places every sample on
the common timeline from its chunk's t0 and the stream's actual (or
estimated) rate, resamples onto the model's grid (Numba kernels) and keeps
the result in a bounded ring that the aligner cuts windows from.

The stream keeps a model of its own clock (issue 11): the time it expects
the next chunk at (the previous chunk's t0 + n / rate, plus the chunks its
seq says are missing), the rate measured from the progress of t0 (``_RateMeter``)
and the seq's step per chunk. Against that model it tells apart

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
misreading costs one reason label. Data already on the timeline is never moved:
after a backward step the new clock's samples that fall on time already covered
are dropped (``step_overlap_chunks``) and the stream continues where its data
ended. The stream's offset against the node's other streams is reported by the
aligner (``clock_offset_ms``, ``clock_skew``); it never changes placement, so
live and replay place alike.

Arrival order and log-time order (a replay sorts chunks by t0) must give the
same timeline. After a backward step a t0-sorted log interleaves the old clock's
last chunks with the new clock's first ones; a chunk whose seq says it comes
after chunks not seen yet, but whose t0 leaves no room for them, is held in a
later clock epoch (sorted after every chunk of the current one) until the old
clock's chunks are done, so both orders consume the stream's chunks alike.
"""
from __future__ import annotations

import heapq
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgefuse.runtime.core import kernels
from edgefuse.runtime.core.chunk import RATE_MAX_HZ, RATE_MIN_HZ, T0_MAX_NS, Chunk, t0_ok
from edgefuse.runtime.core.contract import ModalitySpec
from edgefuse.runtime.core.filters import butter4_lowpass_sos, lowpass_delay_samples
from edgefuse.runtime.core.wire import t0_unit_hint

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

# 2000-01-01T00:00:00Z in ns: no device clock of ours reads earlier (the default
# of AlignerConfig.min_t0_ns; 0 accepts any t0 in [0, 2**62), for relative times).
Y2000_NS = 946_684_800_000_000_000
# unit a sender used by mistake (wire.t0_unit_hint) -> the factor that makes it ns
_UNIT_FACTORS = {"seconds": "1e9", "milliseconds": "1e6", "microseconds": "1e3"}

# The measured rate (the progress of t0) decides a rate mismatch only once it
# spans this much time: stamp jitter of 20 ms (a sender stamping at publish time)
# is then 1 %, under any sane tolerance.
# A gross mismatch (beyond _PAIR_OUTLIER, e.g. 50 Hz declared, 100 Hz sent) is
# decided from RATE_SPAN_EARLY_NS already: at a stream's first chunk, from the
# chunks waiting behind it, so its first windows are not stretched either.
RATE_SPAN_NS = 4_000_000_000
RATE_SPAN_EARLY_NS = 200_000_000
# Pairs of chunks whose rate is this far off the measured one are outliers (a
# step, a stall), left out of the measurement; three in a row mean a new rate.
_PAIR_OUTLIER = 0.25


def rate_range(grid_hz: float) -> tuple[float, float]:
    """[low, high) input rates accepted for a modality whose model grid rate is grid_hz."""
    return (max(RATE_MIN_HZ, grid_hz * RATE_RATIO_MIN),
            min(RATE_MAX_HZ, grid_hz * RATE_RATIO_MAX))


def refusal(chunk: Chunk, grid_hz: float, min_t0_ns: int = 0) -> tuple[str, str] | None:
    """(counter, what is wrong) when chunk must be refused before it reaches a stream of a
    modality with model grid rate grid_hz; None when it is within bounds. t0 before
    min_t0_ns (AlignerConfig.min_t0_ns) is implausible for ns since the epoch: the
    message names the unit the sender likely used instead."""
    if not t0_ok(chunk.t0_ns):
        return BAD_TIME, (f"t0_ns {chunk.t0_ns} is outside [0, 2**62) ns since the epoch; "
                          "check the sender's clock")
    if chunk.t0_ns < min_t0_ns:
        hint = t0_unit_hint(chunk.t0_ns)
        what = (f"t0_ns = {chunk.t0_ns:.3g} looks like {hint}; ×{_UNIT_FACTORS[hint]} to "
                "make it ns since the epoch" if hint in _UNIT_FACTORS else
                f"t0_ns = {chunk.t0_ns:.3g} is no ns-since-the-epoch time of a real clock "
                "(a device clock that was never set?)")
        return BAD_TIME, (f"{what}; t0 before aligner.min_t0_ns = {min_t0_ns} is refused "
                          "(set it to 0 for data in relative time)")
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


@dataclass(order=True)
class _Pending:
    # 0: the current clock; 1: a later clock that stepped back (module docstring),
    # sorted after every chunk of the current one
    epoch: int
    t0_ns: int
    seq: int
    chunk: Chunk = field(compare=False)
    # where the reorder horizon counts it from: its t0, or less for a forward step
    # (see _note_seen)
    seen_ns: int = field(default=0, compare=False)


@dataclass(frozen=True)
class _Ref:
    """The last chunk the stream took in order: its clock's reference."""
    seq: int
    t0_ns: int
    n: int


class _RateMeter:
    """The rate t0 progresses at: samples over time of pairs of consecutive chunks,
    O(1) per pair. Pairs are summed into blocks of >= 0.25 s (so short chunks still
    span seconds: 32 blocks >= 8 s) and the last ``maxlen`` blocks kept; jitter of
    the t0 inside a run of pairs cancels out. Robust to the odd pair that spans a
    hiccup, a silence or a step: the first pairs are only taken once two agree
    (within _PAIR_OUTLIER of their median, the others dropped); then a pair that far
    off the measured rate is left out, and three such in a row start afresh."""

    BLOCK_NS = 250_000_000

    def __init__(self, maxlen: int):
        self.blocks: deque[tuple[int, int]] = deque()
        self.maxlen = maxlen
        self.n = 0        # samples and time of the blocks and the open one
        self.dt_ns = 0
        self.pairs = 0
        self._open = [0, 0]
        self._candidates: list[tuple[int, int]] = []  # before the first two agree
        self._outliers: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return self.pairs

    def clear(self) -> None:
        self.blocks.clear()
        self.n = self.dt_ns = self.pairs = 0
        self._open = [0, 0]
        self._candidates = []
        self._outliers = []

    def rate(self) -> float | None:
        return self.n * 1e9 / self.dt_ns if self.dt_ns > 0 else None

    def add(self, n: int, dt_ns: int) -> None:
        if dt_ns <= 0 or n <= 0:
            return
        if not self.pairs:
            self._seed((n, dt_ns))
            return
        rate = self.rate()
        assert rate is not None
        if abs(n * 1e9 / dt_ns / rate - 1.0) > _PAIR_OUTLIER:
            self._outliers.append((n, dt_ns))
            if len(self._outliers) >= 3:  # the rate changed: measure afresh from them
                outliers = self._outliers
                self.clear()
                for pair in outliers:
                    self._seed(pair)
            return
        self._outliers = []
        self._append(n, dt_ns)

    def _seed(self, pair: tuple[int, int]) -> None:
        cand = self._candidates
        cand.append(pair)
        if len(cand) > 5:
            del cand[0]
        if len(cand) < 2:
            return
        rates = sorted(n / dt for n, dt in cand)
        mid = rates[len(rates) // 2] if len(rates) % 2 else \
            (rates[len(rates) // 2 - 1] + rates[len(rates) // 2]) / 2
        good = [(n, dt) for n, dt in cand if abs(n / dt / mid - 1.0) <= _PAIR_OUTLIER]
        if len(good) >= 2:
            self._candidates = []
            for n, dt in good:
                self._append(n, dt)

    def _append(self, n: int, dt_ns: int) -> None:
        self.pairs += 1
        self.n += n
        self.dt_ns += dt_ns
        self._open[0] += n
        self._open[1] += dt_ns
        if self._open[1] < self.BLOCK_NS:
            return
        if len(self.blocks) >= self.maxlen:
            old_n, old_dt = self.blocks.popleft()
            self.n -= old_n
            self.dt_ns -= old_dt
        self.blocks.append((self._open[0], self._open[1]))
        self._open = [0, 0]


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
        # -- the clock model (module docstring) --
        self.clock_step_min_ns = clock_step_min_ns
        self.rate_tolerance = rate_tolerance
        self.trust_declared_rate = trust_declared_rate
        self._ref: _Ref | None = None          # the last chunk taken in order
        self._meter = _RateMeter(max(2, rate_history))
        self._primed_upto: int | None = None   # pairs up to this seq came from the buffer
        # What seq counts, learned from time-contiguous pairs: "chunk" (+1), "sample"
        # (+n) or a fixed step ("unit", _unit); trusted for lost-chunk counts after 3.
        self._seq_kind = "chunk"
        self._unit = 1
        self._unit_count = 0
        self._n_same = 0                       # chunks in a row of the reference's size
        self.first_ns: int | None = None       # t0 of the first sample taken
        self._epoch_seq: int | None = None     # first seq of a later clock epoch (held back)
        self._epoch_expected_ns = 0            # when the current clock reaches that seq
        self._epoch_behind_ns = 0              # later-epoch data seen well behind the data
        self._after_back_step = False          # new-clock chunks may land on covered time
        self.step_total_ns = 0                 # sum of the steps: the clock's offset from the data
        self.steps: deque[int] = deque(maxlen=16)  # seams of recent steps (window flags)
        self._shift = 0.0                      # anti-alias delay, grid samples (placement shift)
        self.pushed_at_ns = 0                  # the node's elapsed time at its last push
        self._arrivals: deque[int] = deque(maxlen=32)  # label end - receipt time, ns (live)
        self.arrival_offset_ns: int | None = None  # their median

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
        first = self.status[a:a + (hi - lo)]
        hits = np.flatnonzero(first == kernels.STATUS_VALID)
        if hits.size:
            return lo + int(hits[0])
        rest = (hi - lo) - first.shape[0]  # the part that wrapped to the ring's start
        hits = np.flatnonzero(self.status[:rest] == kernels.STATUS_VALID)
        return lo + first.shape[0] + int(hits[0]) if hits.size else None

    def step_within(self, start_ns: int, end_ns: int) -> bool:
        """True when a clock step's seam lies inside (start_ns, end_ns)."""
        return any(start_ns < seam < end_ns for seam in self.steps)

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
            self._note_arrival(chunk)
        if chunk.t0_ns < self._max_seen_t0:
            c.out_of_order += 1
        seen = self._note_seen(chunk)
        epoch = self._epoch_of(chunk)
        if epoch and self.end_ns is not None:
            rate = float(chunk.rate_hz) if chunk.rate_hz is not None else \
                (self.counters.rate_hz or self.fs)
            duration = int(chunk.n * 1e9 / rate)
            if chunk.t0_ns + duration <= self.end_ns - self.horizon_ns:
                self._epoch_behind_ns += duration
        heapq.heappush(self._pending, _Pending(epoch, chunk.t0_ns, chunk.seq, chunk, seen))
        self._drain(final=False)

    def flush(self) -> None:
        self._drain(final=True)

    def _note_arrival(self, chunk: Chunk) -> None:
        """Label time of the chunk's end minus its receipt time (live): the median of
        the last ones is this stream's clock against the receiver's; the aligner
        compares it across the node's streams. Reporting only."""
        rate = float(chunk.rate_hz) if chunk.rate_hz is not None else \
            (self.counters.rate_hz or self.fs)
        assert chunk.received_ns is not None
        self._arrivals.append(chunk.t0_ns + int(chunk.n * 1e9 / rate) - chunk.received_ns)
        ordered = sorted(self._arrivals)
        self.arrival_offset_ns = ordered[len(ordered) // 2]

    def _note_seen(self, chunk: Chunk) -> int:
        """Advance the newest t0 seen, which the reorder horizon is measured on, and
        return where the horizon counts chunk from. A chunk whose t0 jumps ahead of the
        stream's own clock (a forward step) counts as if it followed the newest seen,
        and advances it by no more than its own duration until it is taken (then by all
        of it): a step is no elapsed time, and must neither release chunks reordered
        around it nor make itself wait for data from beyond the jump."""
        t0 = chunk.t0_ns
        if t0 <= self._max_seen_t0:
            return t0
        if self.end_ns is None or t0 - self.end_ns < self.clock_step_min_ns:
            self._max_seen_t0 = t0  # no forward step of clock_step_min_ns: the usual case
            return t0
        jump = self._classify(chunk, self.counters.rate_hz or self.fs)
        if jump is not None and jump > 0 and self._max_seen_t0 > -(1 << 62):
            rate = float(chunk.rate_hz) if chunk.rate_hz is not None else \
                (self.counters.rate_hz or self.fs)
            t0 = min(t0, self._max_seen_t0 + int(chunk.n * 1e9 / rate))
        self._max_seen_t0 = t0
        return t0

    def _epoch_of(self, chunk: Chunk) -> int:
        """1 when chunk belongs to a later clock that stepped back (module docstring):
        its seq says chunks not seen yet come before it, its t0 leaves them no room."""
        if self._epoch_seq is not None and chunk.seq >= self._epoch_seq:
            return 1
        ref = self._ref
        if ref is None or self.end_ns is None or chunk.seq <= ref.seq or \
                self._consecutive(chunk.seq):
            return 0
        # The nearest earlier seq known: the clock's reference, or a chunk still
        # waiting (after lost chunks the reference can be seconds behind).
        for entry in self._pending:
            if not entry.epoch and ref.seq < entry.seq < chunk.seq:
                ref = _Ref(entry.seq, entry.t0_ns, entry.chunk.n)  # the highest such seq
        expected = self._expected(chunk, self.counters.rate_hz or self.fs, ref)
        if expected is None:
            return 0
        t_exp, missing = expected
        if t_exp - chunk.t0_ns < self._step_threshold(missing):
            return 0
        if self._epoch_seq is None:
            self._epoch_behind_ns = 0
        self._epoch_seq = chunk.seq
        self._epoch_expected_ns = int(t_exp)
        # Chunks already waiting from seq on belong to the later epoch too.
        for entry in self._pending:
            if entry.seq >= chunk.seq:
                entry.epoch = 1
        heapq.heapify(self._pending)
        return 1

    def _enter_epoch(self) -> None:
        """The later epoch's first chunk is being taken: it is the current clock now."""
        self._epoch_seq = None
        self._epoch_behind_ns = 0
        for entry in self._pending:
            entry.epoch = 0
        heapq.heapify(self._pending)

    def _drain(self, final: bool) -> None:
        while self._pending:
            entry = self._pending[0]
            head = entry.chunk
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
            if not (final or self._ready(entry, rate)):
                if len(self._pending) <= self.max_pending:
                    return
                self.counters.reorder_overflow += 1
            heapq.heappop(self._pending)
            if entry.epoch:
                self._enter_epoch()
            rate = self._placement_rate(head, rate)
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

    def _ready(self, entry: _Pending, rate: float) -> bool:
        """In order (contiguous, consecutive seq, or behind) or waited long enough.

        The very first chunk of a stream also waits out the horizon: an earlier
        one may still be on its way, and once a stream has started, data
        before its start can only be dropped as late. A chunk of a later clock
        epoch waits until it is the next seq, or the current clock's chunks are
        done: data a horizon past the time the current clock reaches the epoch's
        first seq has been seen (log-time order: those chunks came first), or a
        horizon of the later epoch's data well behind the stream's data (arrival
        order: the current clock's missing chunks were lost).
        """
        chunk = entry.chunk
        if self.end_ns is None:
            return self._max_seen_t0 - entry.seen_ns >= self.horizon_ns
        if entry.epoch:
            return self._consecutive(chunk.seq) or \
                self._max_seen_t0 - self._epoch_expected_ns >= self.horizon_ns or \
                self._epoch_behind_ns >= self.horizon_ns
        # Contiguous means within half a period: a short chunk that skipped
        # ahead of its predecessor must not pass for a bridgeable seam.
        if chunk.t0_ns - self.end_ns <= 0.5e9 / rate:
            return True
        if self._consecutive(chunk.seq):
            return True
        return self._max_seen_t0 - entry.seen_ns >= self.horizon_ns

    # -- the clock model ----------------------------------------------------
    def _consecutive(self, seq: int, ref: _Ref | None = None) -> bool:
        """seq directly follows the reference chunk's: +1 for a chunk counter (the
        default), +n for a sample counter, the fixed step for another (what it counts
        is learned from time-contiguous pairs)."""
        ref = ref or self._ref
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

    def _expected(self, chunk: Chunk, rate: float,
                  ref: _Ref | None = None) -> tuple[float, float] | None:
        """(t0 the stream's clock expects chunk at, the time of the data its seq says
        is missing before it, ns), from ref (default: the clock's reference); None
        when the seq cannot tell (an older seq, or what it counts not learned yet)."""
        ref = ref or self._ref
        if ref is None:
            return None
        inc = chunk.seq - ref.seq
        if inc <= 0:
            return None
        clock = self._clock_rate(rate)
        period = ref.n * 1e9 / clock
        if self._consecutive(chunk.seq, ref):
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

    def _step_threshold(self, missing_ns: float) -> float:
        """The least jump that is a step, beyond what the missing seqs explain: their
        time is exact for chunks of one size (5 % slack), a guess for varying sizes."""
        return max(self.clock_step_min_ns,
                   (0.05 if self._n_same >= 3 else 0.5) * missing_ns)

    def _classify(self, chunk: Chunk, rate: float) -> int | None:
        """The clock step (ns) chunk shows against the stream's own extrapolated time;
        None when there is none: within clock_step_min_ns of it, or of what its missing
        seqs explain (a gap: lost chunks)."""
        if self.end_ns is None:
            return None
        expected = self._expected(chunk, rate)
        if expected is None:
            return None
        t_exp, missing = expected
        jump = chunk.t0_ns - t_exp
        if abs(jump) < self._step_threshold(missing):
            return None
        return int(round(jump))

    def _note_step(self, chunk: Chunk, jump_ns: int) -> None:
        """A new clock segment: counted, warned, its seam kept for the window flags."""
        assert self.end_ns is not None
        c = self.counters
        c.clock_steps += 1
        self.step_total_ns += jump_ns
        seam = max(chunk.t0_ns, self.end_ns)  # the new clock's first sample on the timeline
        self.steps.append(seam)
        self._after_back_step = jump_ns < 0
        self._history.clear()   # rate estimates from one clock only
        self._warn((self.node, self.spec.name, "clock_step"),
                   "%s/%s: clock step of %+.3f s at seq %d (t0_ns %d): its labels jumped "
                   "against its own clock (previous t0 + n/rate); placed at the new labels%s, "
                   "windows spanning t=%d ns flag it clock_step", self.node, self.spec.name,
                   jump_ns / 1e9, chunk.seq, chunk.t0_ns,
                   "" if jump_ns > 0 else " after the data it already has", seam)

    def _advance_clock(self, chunk: Chunk, rate: float, stepped: bool) -> None:
        """chunk was taken in order: it becomes the clock's reference; a consecutive
        pair adds to the measured rate, a contiguous one teaches the seq's step."""
        ref = self._ref
        if ref is not None and chunk.seq > ref.seq and not stepped:
            inc = chunk.seq - ref.seq
            dt = chunk.t0_ns - ref.t0_ns
            if self._primed_upto is not None and chunk.seq <= self._primed_upto:
                pass  # this pair was measured from the reorder buffer already
            elif self._consecutive(chunk.seq):
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
        self._ref = _Ref(chunk.seq, chunk.t0_ns, chunk.n)

    def _prime_meter(self, first: Chunk) -> None:
        """At the first chunk, measure the rate from the chunks waiting behind it, so a
        wrong declared rate is caught before the first sample is placed."""
        chunks = [first] + [e.chunk for e in sorted(self._pending)]
        for a, b in zip(chunks, chunks[1:]):
            if b.seq - a.seq != 1 or b.t0_ns <= a.t0_ns:  # a chunk counter's next chunk
                break
            self._meter.add(a.n, b.t0_ns - a.t0_ns)
            self._primed_upto = b.seq

    def _placement_rate(self, chunk: Chunk, rate: float) -> float:
        """The rate chunk is placed at: a declared (actual) rate unless the progress
        of t0 shows another beyond rate_tolerance (rate_mismatch; the measured rate is
        used unless trust_declared_rate); estimated rates as _rate_for found them."""
        if self._ref is None and not len(self._meter):
            self._prime_meter(chunk)
        if chunk.rate_hz is None or chunk.rate_is_nominal:
            return rate
        measured = self._meter.rate()
        span = self._meter.dt_ns
        if measured is None or span < RATE_SPAN_EARLY_NS or \
                not self.rate_lo <= measured < self.rate_hi:
            return rate
        off = abs(measured / rate - 1.0)
        if off <= (self.rate_tolerance if span >= RATE_SPAN_NS else
                   max(self.rate_tolerance, _PAIR_OUTLIER)):
            return rate
        self.counters.rate_mismatch += 1
        use = rate if self.trust_declared_rate else measured
        self._warn((self.node, self.spec.name, "rate_mismatch"),
                   "%s/%s seq %d: declared rate_hz %g disagrees with the progress of t0, "
                   "which shows %.6g Hz (%+.1f %%, over %.1f s); placing at %g Hz%s",
                   self.node, self.spec.name, chunk.seq, rate, measured,
                   (measured / rate - 1.0) * 100, self._meter.dt_ns / 1e9, use,
                   " (aligner.trust_declared_rate)" if self.trust_declared_rate else
                   " (the measured rate; fix the sender's rate_hz)")
        return use

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
        jump = self._classify(chunk, rate)
        self._design_filter(rate)
        step = self.fs / rate
        # Placement position of x[0]; earlier by the filter's delay when decimating.
        p0 = self._pos(chunk.t0_ns) - self._shift
        x = chunk.samples
        if jump is not None:
            self._note_step(chunk, jump)
        newer = self._ref is None or chunk.seq > self._ref.seq
        if self._has_prev:
            if p0 <= self._prev_pos + 1e-9:
                skip = int(math.floor((self._prev_pos - p0) / step + 1e-9)) + 1
                if skip >= chunk.n:
                    if newer and self._after_back_step:
                        # The new clock after a backward step, on time already covered.
                        c.step_overlap_chunks += 1
                        self._recent_seqs.append(chunk.seq)
                        self._advance_clock(chunk, rate, jump is not None)
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
        self._advance_clock(chunk, rate, jump is not None)
        if estimated:
            if self._history:
                last_t0, last_n = self._history[-1]
                expected_ns = (last_n + self.gap_tolerance) * 1e9 / rate
                if chunk.t0_ns - last_t0 > 1.5 * expected_ns:
                    self._history.clear()  # a gap: estimate from the new segment only
            self._history.append((chunk.t0_ns, chunk.n))
        self._note_rate(chunk, rate, estimated)
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
        if chunk.t0_ns > self._max_seen_t0:
            # A forward step taken: the horizon's clock jumps with it, and so do the
            # chunks counted from the old clock while the step was not taken yet.
            delta = chunk.t0_ns - self._max_seen_t0
            self._max_seen_t0 = chunk.t0_ns
            for entry in self._pending:
                if entry.seen_ns < entry.t0_ns:
                    entry.seen_ns = min(entry.t0_ns, entry.seen_ns + delta)

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
