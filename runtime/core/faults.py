"""Fault injection: the field's clock and firmware faults, applied to a chunk stream.

Seeded and deterministic (the same input, specs and seed give the same output),
lazy and bounded in memory (at most ``horizon`` chunks per reordered stream are
held back; nothing else is buffered). ``edgefuse replay --inject SPEC`` uses it
on a recording on its way into the pipeline; tests use it directly::

    from edgefuse.runtime.core.faults import inject, parse_fault
    faults = [parse_fault("step:acoustic@300s=+2s"), parse_fault("dup:imu=5%")]
    for chunk in inject(chunks, faults, seed=1): ...

Spec syntax: ``KIND:TARGET[@WHEN][=VALUE][,horizon=N]``

TARGET is ``MODALITY`` (every node) or ``NODE/MODALITY``; ``*`` matches every
modality. Times (WHEN, durations) need a unit: ns, us, ms, s, min (``60s``,
``1.5min``, ``300ms``). WHEN is ``START`` or ``START+DURATION``, relative to the
recording's start (the t0 of the first chunk seen, or ``start_ns``), compared
with the chunk's original (uninjected) t0.

====================================  =========================================
``drop:acoustic@60s+10s``             chunks of the stream with t0 in [60 s, 70 s)
                                      are lost (``drop:imu@60s``: from 60 s on;
                                      ``drop:imu``: all of them)
``step:acoustic@300s=+2s``            the stream's clock steps by +2 s (or ``-2s``)
                                      at 300 s: every later chunk's t0 is shifted
``jitter:seismic=0.3ms``              each chunk's t0 moves by a uniform random
                                      offset in [-0.3 ms, +0.3 ms]
``skew:acoustic=+200ppm``             the sender's clock runs 200 ppm fast: t0 =
                                      start + (t0 - start) * (1 + 200e-6); the
                                      declared rate_hz is left as it was
``units:imu=s``                       the sender puts seconds (``ms``, ``us``) in
                                      t0_ns: t0 // 1e9 (1e6, 1e3)
``rate:imu=x0.5``                     the sender declares half its real rate_hz
                                      (``=800Hz``: declares 800 Hz; ``=0``: declares
                                      none, i.e. unknown)
``dup:imu=5%``                        5 % of the chunks arrive twice in a row
                                      (``0.05`` means the same)
``reorder:imu=5%``                    5 % of the chunks are held back and arrive
                                      after 1..horizon later chunks of the same
                                      stream (``reorder:imu=5%,horizon=8``;
                                      default 4, at most 64)
====================================  =========================================

Arrival order: the output keeps the input's order of chunks, as live arrival
would. A stepped, jittered or skewed chunk keeps its place; it is NOT re-sorted
by its new t0 (a node whose clock jumps still sends its chunks when they are
recorded). Only ``dup`` and ``reorder`` change the order of chunks.

Order of application, per chunk: ``drop`` first, then the t0 and rate faults
(``step``, ``skew``, ``jitter``, ``units``, ``rate``) in the order given (several
steps add up), then ``dup``, then ``reorder``. Negative t0 produced by a fault is
kept (the aligner refuses it as ``bad_time``, which is what a receiver would see).
"""
from __future__ import annotations

import dataclasses
import re
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import ConfigError

__all__ = ["Fault", "FaultSpecError", "Injector", "inject", "parse_fault", "parse_faults",
           "KINDS", "MAX_HORIZON"]

KINDS = ("drop", "step", "jitter", "skew", "units", "rate", "dup", "reorder")
MAX_HORIZON = 64
DEFAULT_HORIZON = 4
_TIME_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
               "min": 60_000_000_000}
_UNIT_DIVISORS = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000}
_EXAMPLES = {
    "drop": "drop:acoustic@60s+10s",
    "step": "step:acoustic@300s=+2s",
    "jitter": "jitter:seismic=0.3ms",
    "skew": "skew:acoustic=+200ppm",
    "units": "units:imu=s",
    "rate": "rate:imu=x0.5",
    "dup": "dup:imu=5%",
    "reorder": "reorder:imu=5%",
}
_SPEC = re.compile(r"^(?P<kind>[a-z]+):(?P<target>[^@=,]+)(?:@(?P<when>[^=,]+))?"
                   r"(?:=(?P<value>[^,]+))?(?:,(?P<opts>.*))?$")
_TIME = re.compile(r"^(?P<sign>[+-]?)(?P<num>\d+(?:\.\d*)?|\.\d+)(?P<unit>ns|us|µs|ms|s|min)$")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class FaultSpecError(ConfigError):
    """A fault spec does not parse; the message names it, the form expected and an example."""


@dataclass(frozen=True)
class Fault:
    """One parsed fault. ``value`` is ns (step, jitter), ppm (skew), the divisor of
    t0 (units), the declared rate (rate: Hz; 0 unknown; negative: minus a factor of
    the real rate) or a probability (dup, reorder); ``start_ns``/``span_ns`` are relative
    to the recording's start (span None: to the end)."""

    kind: str
    modality: str  # "*" = every modality
    node: str | None = None  # None = every node
    start_ns: int = 0
    span_ns: int | None = None
    value: float = 0.0
    horizon: int = DEFAULT_HORIZON
    spec: str = ""

    def matches(self, chunk: Chunk) -> bool:
        return ((self.modality == "*" or chunk.modality == self.modality)
                and (self.node is None or chunk.node == self.node))

    def active(self, rel_ns: int) -> bool:
        """Whether a chunk at ``rel_ns`` after the start is inside the fault's span."""
        if rel_ns < self.start_ns:
            return False
        return self.span_ns is None or rel_ns < self.start_ns + self.span_ns


def _fail(spec: str, expected: str, kind: str | None = None) -> FaultSpecError:
    example = _EXAMPLES.get(kind or "", None)
    examples = example if example else ", ".join(_EXAMPLES.values())
    return FaultSpecError(f"fault spec {spec!r}: expected {expected}; e.g. {examples} "
                          "(see `edgefuse replay --help`)")


def _time_ns(text: str, spec: str, kind: str, what: str, signed: bool = False) -> int:
    m = _TIME.match(text.strip())
    if m is None or (m.group("sign") and not signed):
        sign = "a signed " if signed else "a "
        raise _fail(spec, f"{what} as {sign}number with a unit (ns, us, ms, s, min), "
                    f"found {text!r}", kind)
    value = float(m.group("num")) * _TIME_UNITS[m.group("unit")]
    return int(round(-value if m.group("sign") == "-" else value))


def _probability(text: str, spec: str, kind: str) -> float:
    t = text.strip()
    try:
        p = float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
    except ValueError:
        p = float("nan")
    if not 0.0 <= p <= 1.0:
        raise _fail(spec, f"a share of chunks as a percentage (5%) or a fraction in [0, 1], "
                    f"found {text!r}", kind)
    return p


def _rate_value(text: str, spec: str, kind: str) -> float:
    """x0.5 -> -0.5 (a factor, stored negative), 800Hz -> 800.0, 0 -> 0.0 (unknown)."""
    t = text.strip()
    try:
        if t.startswith("x"):
            factor = float(t[1:])
            if 0 < factor <= 1000:
                return -factor
        elif t.endswith("Hz"):
            hz = float(t[:-2])
            if 1e-3 <= hz < 1e7:
                return hz
        elif float(t) == 0:
            return 0.0
    except ValueError:
        pass
    raise _fail(spec, f"the declared rate as a factor of the real one (x0.5), a rate in Hz "
                f"(800Hz) or 0 (unknown), found {text!r}", kind)


def parse_fault(spec: str) -> Fault:
    """Parse one spec (module docstring); raises FaultSpecError saying what is wrong."""
    if not isinstance(spec, str):
        raise _fail(repr(spec), "a text KIND:TARGET[@WHEN][=VALUE]")
    text = spec.strip()
    m = _SPEC.match(text)
    if m is None:
        raise _fail(spec, "KIND:TARGET[@WHEN][=VALUE] with KIND one of " + ", ".join(KINDS))
    kind = m.group("kind")
    if kind not in KINDS:
        raise _fail(spec, f"a kind in {', '.join(KINDS)}, found {kind!r}")
    target = m.group("target").strip()
    node, _, modality = target.rpartition("/")
    if not modality or (node and not _NAME.match(node)) or (
            modality != "*" and not _NAME.match(modality)):
        raise _fail(spec, f"a target MODALITY or NODE/MODALITY, found {target!r}", kind)
    when, value, opts = m.group("when"), m.group("value"), m.group("opts")

    start_ns, span_ns = 0, None
    if when is not None:
        if kind not in ("drop", "step"):
            raise _fail(spec, f"no @WHEN for {kind} (it acts on the whole stream)", kind)
        first, plus, dur = when.partition("+")
        start_ns = _time_ns(first, spec, kind, "a start time")
        if plus:
            if kind == "step":
                raise _fail(spec, "@START only for a step (it lasts to the end)", kind)
            span_ns = _time_ns(dur, spec, kind, "a duration")
            if span_ns <= 0:
                raise _fail(spec, f"a positive duration, found {dur!r}", kind)
    elif kind == "step":
        raise _fail(spec, "the step's time after @ (@300s)", kind)

    horizon = DEFAULT_HORIZON
    if opts is not None:
        key, eq, val = opts.partition("=")
        if kind != "reorder" or key.strip() != "horizon" or not eq:
            raise _fail(spec, "no options except ,horizon=N for reorder", kind)
        if not val.strip().isdigit() or not 1 <= int(val) <= MAX_HORIZON:
            raise _fail(spec, f"horizon=N with N in 1..{MAX_HORIZON}, found {val!r}", kind)
        horizon = int(val)

    if kind == "drop":
        if value is not None:
            raise _fail(spec, "no =VALUE for drop (the span is @START+DURATION)", kind)
        number = 0.0
    elif value is None:
        raise _fail(spec, "=VALUE", kind)
    elif kind == "step":
        number = float(_time_ns(value, spec, kind, "the step", signed=True))
        if number == 0:
            raise _fail(spec, "a non-zero step", kind)
    elif kind == "jitter":
        number = float(_time_ns(value, spec, kind, "the jitter amplitude"))
    elif kind == "skew":
        sm = re.match(r"^([+-]?\d+(?:\.\d*)?)ppm$", value.strip())
        if sm is None or abs(float(sm.group(1))) >= 1e5:
            raise _fail(spec, f"a signed rate error in ppm below 100000ppm, found {value!r}",
                        kind)
        number = float(sm.group(1))
    elif kind == "units":
        if value.strip() not in _UNIT_DIVISORS:
            raise _fail(spec, f"the unit the sender wrongly uses: s, ms or us, found {value!r}",
                        kind)
        number = float(_UNIT_DIVISORS[value.strip()])
    elif kind == "rate":
        number = _rate_value(value, spec, kind)
    else:  # dup, reorder
        number = _probability(value, spec, kind)
    return Fault(kind, modality, node or None, start_ns, span_ns, number, horizon, text)


def parse_faults(specs: Iterable[str]) -> list[Fault]:
    return [parse_fault(s) for s in specs]


_T0_KINDS = ("step", "skew", "jitter", "units", "rate")


class Injector:
    """Applies faults to a chunk stream; iterate it once. ``counts`` says what was done
    (dropped, stepped, skewed, jittered, units, duplicated, reordered chunks)."""

    def __init__(self, chunks: Iterable[Chunk], faults: Sequence[Fault], seed: int = 0,
                 start_ns: int | None = None):
        self._chunks = chunks
        self.faults = list(faults)
        for f in self.faults:
            if not isinstance(f, Fault):
                raise TypeError(f"faults must be Fault objects (parse_fault), found {f!r}")
        self.seed = int(seed)
        self.start_ns = start_ns
        # one generator per fault: a fault's draws do not depend on the other faults
        self._rngs = [np.random.default_rng([self.seed, i]) for i in range(len(self.faults))]
        self.counts = {"dropped": 0, "stepped": 0, "skewed": 0, "jittered": 0, "units": 0,
                       "rate": 0, "duplicated": 0, "reordered": 0}
        # reorder state per (fault index, stream): chunks seen, held [(release, chunk)]
        self._seen: dict[tuple, int] = {}
        self._held: dict[tuple, deque] = {}

    @property
    def held(self) -> int:
        """Chunks held back by reorder right now (bounded by horizon per stream)."""
        return sum(len(q) for q in self._held.values())

    def __iter__(self) -> Iterator[Chunk]:
        return self._run()

    def _run(self) -> Iterator[Chunk]:
        point = [(i, f) for i, f in enumerate(self.faults) if f.kind in ("drop",) + _T0_KINDS]
        dups = [(i, f) for i, f in enumerate(self.faults) if f.kind == "dup"]
        reorders = [(i, f) for i, f in enumerate(self.faults) if f.kind == "reorder"]
        start = self.start_ns
        for chunk in self._chunks:
            if start is None:
                start = chunk.t0_ns
            out = self._point(chunk, chunk.t0_ns - start, start, point)
            if out is None:
                continue
            batch = [out]
            for i, f in dups:
                if f.matches(out) and self._rngs[i].random() < f.value:
                    batch.append(out)
                    self.counts["duplicated"] += 1
            for c in batch:
                yield from self._reorder(c, reorders, 0)
        # end of input: release what reorder still holds, in release order per stage
        yield from self._flush(reorders, 0)

    def _point(self, chunk: Chunk, rel: int, start: int, point) -> Chunk | None:
        t0 = chunk.t0_ns
        rate = chunk.rate_hz
        changed = False
        for i, f in point:
            if not f.matches(chunk):
                continue
            if f.kind == "drop":
                if f.active(rel):
                    self.counts["dropped"] += 1
                    return None
            elif f.kind == "step":
                if f.active(rel):
                    t0 += int(f.value)
                    self.counts["stepped"] += 1
                    changed = True
            elif f.kind == "skew":
                t0 = start + int(round((t0 - start) * (1.0 + f.value * 1e-6)))
                self.counts["skewed"] += 1
                changed = True
            elif f.kind == "jitter":
                t0 += int(round(self._rngs[i].uniform(-f.value, f.value)))
                self.counts["jittered"] += 1
                changed = True
            elif f.kind == "units":
                t0 = t0 // int(f.value)
                self.counts["units"] += 1
                changed = True
            elif f.kind == "rate":
                if f.value > 0:
                    rate = f.value
                elif f.value == 0:
                    rate = None
                elif rate is not None:  # a factor of the real rate; unknown stays unknown
                    rate = rate * -f.value
                self.counts["rate"] += 1
                changed = True
        return dataclasses.replace(chunk, t0_ns=t0, rate_hz=rate) if changed else chunk

    def _reorder(self, chunk: Chunk, stages, k: int) -> Iterator[Chunk]:
        """Pass ``chunk`` through reorder stage ``k`` and the ones after it."""
        if k == len(stages):
            yield chunk
            return
        i, f = stages[k]
        if not f.matches(chunk):
            yield from self._reorder(chunk, stages, k + 1)
            return
        key = (i, chunk.node, chunk.modality)
        n = self._seen.get(key, 0) + 1
        self._seen[key] = n
        held = self._held.setdefault(key, deque())
        rng = self._rngs[i]
        if len(held) < f.horizon and rng.random() < f.value:
            release = n + int(rng.integers(1, f.horizon + 1))
            # keep the queue sorted by release (bounded: at most horizon entries)
            pos = len(held)
            while pos and held[pos - 1][0] > release:
                pos -= 1
            held.insert(pos, (release, chunk))
            self.counts["reordered"] += 1
        else:
            yield from self._reorder(chunk, stages, k + 1)
        while held and held[0][0] <= n:
            yield from self._reorder(held.popleft()[1], stages, k + 1)

    def _flush(self, stages, k: int) -> Iterator[Chunk]:
        if k == len(stages):
            return
        i = stages[k][0]
        for key in [key for key in self._held if key[0] == i]:
            held = self._held.pop(key)
            while held:
                yield from self._reorder(held.popleft()[1], stages, k + 1)
        yield from self._flush(stages, k + 1)


def inject(chunks: Iterable[Chunk], faults: Sequence[Fault], seed: int = 0,
           start_ns: int | None = None) -> Iterator[Chunk]:
    """Chunks with ``faults`` applied (module docstring); lazy and deterministic.

    ``start_ns``: the time the specs' @START are relative to (default: the t0 of
    the first chunk).
    """
    return iter(Injector(chunks, faults, seed=seed, start_ns=start_ns))
