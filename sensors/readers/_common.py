"""Pieces shared by the offline readers: stream descriptions, sources, exact times.

A *source* is one file (or one folder item) that yields the chunks of one or
more streams in (t0_ns, node, modality, seq) order; `inputs.open_inputs`
merges sources. Times are int64 ns computed with integer/decimal arithmetic:
a float number of seconds since 1970 has only ~0.2 us resolution.
"""
from __future__ import annotations

import calendar
import functools
import heapq
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from typing import Callable, Iterable, Iterator

import numpy as np

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import InputError

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class StreamInfo:
    """One (node, modality) of one input, known from headers/metadata alone.

    rate_hz None: unknown (irregular timestamps; the aligner estimates it).
    t0_ns / samples: None when not known without reading the data.
    """

    node: str
    modality: str
    channels: int
    rate_hz: float | None
    source: str
    rate_is_nominal: bool = False
    t0_ns: int | None = None
    samples: int | None = None

    def end_ns(self) -> int | None:
        """Time just after the last sample, when t0, samples and rate are all known."""
        if self.t0_ns is None or self.samples is None or not self.rate_hz:
            return None
        return self.t0_ns + offset_ns(self.samples, self.rate_hz)


@dataclass(frozen=True)
class OfflineSource:
    """Something `open_inputs` can merge: its streams and a way to read them.

    start_ns is a lower bound of the first chunk's t0 (None: unknown); the
    merger opens a source only when the merged output reaches start_ns, so
    that a folder of many files does not hold them all open at once.
    """

    label: str
    streams: tuple[StreamInfo, ...]
    start_ns: int | None
    open: Callable[[], Iterator[Chunk]]


def chunk_order(chunk: Chunk) -> tuple[int, str, str, int]:
    """The order in which recorded chunks reach the aligner: (t0_ns, node, modality, seq).

    Replay (InputSet) and the training datasets both merge by this key, so they
    feed the aligner the same chunks in the same order.
    """
    return (chunk.t0_ns, chunk.node, chunk.modality, chunk.seq)


def merge_chunks(streams: Iterable[Iterable[Chunk]]) -> Iterator[Chunk]:
    """Merge chunk iterators, each in its own time order, by chunk_order (ties: the
    earlier iterator first); all are opened at once (InputSet opens them lazily)."""
    return heapq.merge(*streams, key=chunk_order)


def seconds_to_ns(value: Decimal | float | int | str) -> int:
    """Exact ns from seconds. Floats go through their shortest repr (the text
    they were parsed from), so 1681140928.4378273 gives ...437827300 ns."""
    if isinstance(value, float):
        value = repr(value)
    try:
        d = Decimal(value)
    except ArithmeticError as exc:  # decimal.InvalidOperation
        raise InputError(f"expected a number of seconds, found {value!r}") from exc
    if not d.is_finite():
        raise InputError(f"expected a finite number of seconds, found {value!r}")
    return int((d * NS_PER_S).to_integral_value(rounding=ROUND_HALF_EVEN))


_UTC = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|\+00:?00)?$")


def utc_to_ns(text: str) -> int:
    """'2023-04-11T18:19:59.788' (UTC, optional fraction up to ns) -> exact ns."""
    m = _UTC.match(text.strip())
    if not m:
        raise InputError(f"expected a UTC time 'YYYY-MM-DDTHH:MM:SS[.fff]', found {text!r}")
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    frac = (m.group(7) or "").ljust(9, "0")
    try:
        whole = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0))
    except (ValueError, OverflowError) as exc:
        raise InputError(f"invalid UTC time {text!r}: {exc}") from exc
    return whole * NS_PER_S + int(frac)


def offset_ns(index: int, rate_hz: float) -> int:
    """round(index * 1e9 / rate) exactly (rate taken as the decimal it prints as).

    Each chunk's t0 is computed from the stream's t0 and the sample index, so
    no error accumulates over a 5-minute file.
    """
    num, den = _rate_ratio(rate_hz)
    if num <= 0:  # not a rate; what Fraction does with it (ZeroDivisionError for 0)
        return round(Fraction(index * NS_PER_S) / Fraction(num, den))
    # round(Fraction(index * NS_PER_S * den, num)) in integers: half to even, as round()
    q, r = divmod(index * NS_PER_S * den, num)
    twice = 2 * r
    return q + 1 if twice > num or (twice == num and q & 1) else q


@functools.lru_cache(maxsize=256)
def _rate_ratio(rate_hz: float) -> tuple[int, int]:
    """The rate as the decimal it prints as, numerator and denominator (cached:
    offset_ns runs once per chunk, and a Fraction per call was a third of reading)."""
    f = Fraction(repr(float(rate_hz)))
    return f.numerator, f.denominator


def samples_per_chunk(chunk_s: float, rate_hz: float) -> int:
    if not chunk_s > 0:
        raise InputError(f"chunk_s must be > 0 seconds, found {chunk_s!r}")
    return max(1, int(round(chunk_s * rate_hz)))


def seq_step_over(prev: Chunk, next_t0_ns: int) -> int:
    """How far seq must advance from `prev` to a chunk starting at `next_t0_ns` in
    another file (or after a CSV gap) of the same stream, so that the aligner's clock
    reads the time between them as lost data (a gap), not a clock step: it checks a
    jump against (missing seqs) x (prev's duration). 1 when the data is contiguous,
    overlaps, or prev has no rate to size the hole with."""
    if prev.rate_hz is None or prev.n == 0:
        return 1
    period = prev.n * 1e9 / prev.rate_hz
    gap = next_t0_ns - (prev.t0_ns + period)
    if gap <= 0:
        return 1
    return 1 + int(round(gap / period))


def chunk_frames(node: str, modality: str, read: Callable[[int, int], np.ndarray], frames: int,
                 t0_ns: int, rate_hz: float, chunk_s: float, *, full_scale: float | None,
                 rate_is_nominal: bool = False, seq0: int = 0) -> Iterator[Chunk]:
    """Cut frames [0, frames) of one stream into chunks of ~chunk_s seconds."""
    step = samples_per_chunk(chunk_s, rate_hz)
    for i, start in enumerate(range(0, frames, step)):
        block = read(start, min(step, frames - start))
        if block.shape[0] == 0:
            return
        yield Chunk(node, modality, t0_ns + offset_ns(start, rate_hz), float(rate_hz),
                    block.astype(np.float32), seq0 + i, full_scale=full_scale,
                    rate_is_nominal=rate_is_nominal)
