"""What a stream accepts of a chunk's time and rate, and the meter of its real rate.

- ``refusal()``: the bounds a chunk must meet before it reaches a stream (t0 in
  ns since the epoch, the unit named when it is not; the rate within the
  modality's range, ``rate_range()``). The aligner counts what it refuses under
  ``BAD_TIME`` / ``BAD_RATE``.
- ``RateMeter``: the rate t0 progresses at, measured from pairs of consecutive
  chunks; the stream's clock model (``clock.StreamClock``) uses it to check a
  declared rate and to extrapolate its own clock.
"""
from __future__ import annotations

from collections import deque

from edgefuse.runtime.core.chunk import RATE_MAX_HZ, RATE_MIN_HZ, Chunk, t0_ok
from edgefuse.runtime.core.wire import t0_unit_hint

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
# A gross mismatch (beyond PAIR_OUTLIER, e.g. 50 Hz declared, 100 Hz sent) is
# decided from RATE_SPAN_EARLY_NS already: at a stream's first chunk, from the
# chunks waiting behind it, so its first windows are not stretched either.
RATE_SPAN_NS = 4_000_000_000
RATE_SPAN_EARLY_NS = 200_000_000
# Pairs of chunks whose rate is this far off the measured one are outliers (a
# step, a stall), left out of the measurement; three in a row mean a new rate.
PAIR_OUTLIER = 0.25


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


class RateMeter:
    """The rate t0 progresses at: samples over time of pairs of consecutive chunks,
    O(1) per pair. Pairs are summed into blocks of >= 0.25 s (so short chunks still
    span seconds: 32 blocks >= 8 s) and the last ``maxlen`` blocks kept; jitter of
    the t0 inside a run of pairs cancels out. Robust to the odd pair that spans a
    hiccup, a silence or a step: the first pairs are only taken once two agree
    (within PAIR_OUTLIER of their median, the others dropped); then a pair that far
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
        if abs(n * 1e9 / dt_ns / rate - 1.0) > PAIR_OUTLIER:
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
        good = [(n, dt) for n, dt in cand if abs(n / dt / mid - 1.0) <= PAIR_OUTLIER]
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
