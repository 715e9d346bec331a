"""The reorder buffer of one stream: chunks wait here until they can be taken in order.

Bounded twice: by time (a chunk that is not next in order waits at most the
reorder horizon, measured on the newest t0 the stream has seen) and by count
(``max_pending``; past it the oldest is forced out, ``reorder_overflow``).
``stream.StreamState`` drives it: ``add()`` on push, then while the head is
``ready()``, ``take_head()`` and place it.

Arrival order and log-time order (a replay sorts chunks by t0) must give the
same timeline. After a backward clock step a t0-sorted log interleaves the old
clock's last chunks with the new clock's first ones; a chunk whose seq says it
comes after chunks not seen yet, but whose t0 leaves no room for them, is held
in a later clock epoch (sorted after every chunk of the current one) until the
old clock's chunks are done, so both orders consume the stream's chunks alike.
What is a step is the stream's ``clock.StreamClock``'s call.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.clock import ClockRef, StreamClock

if TYPE_CHECKING:  # the stream's counters: the buffer counts out_of_order chunks
    from edgefuse.runtime.core.stream import StreamCounters


@dataclass(order=True)
class Pending:
    """One chunk waiting, ordered by (epoch, t0, seq)."""
    # 0: the current clock; 1: a later clock that stepped back (module docstring),
    # sorted after every chunk of the current one
    epoch: int
    t0_ns: int
    seq: int
    chunk: Chunk = field(compare=False)
    # where the reorder horizon counts it from: its t0, or less for a forward step
    # (see _note_seen)
    seen_ns: int = field(default=0, compare=False)


class ReorderBuffer:
    """A heap of Pending chunks, the newest t0 seen and the clock epochs."""

    def __init__(self, horizon_ns: int, max_pending: int, clock: StreamClock,
                 counters: StreamCounters):
        self.horizon_ns = horizon_ns
        self.max_pending = max_pending
        self.clock = clock
        self.counters = counters
        self._heap: list[Pending] = []
        self.max_seen_t0 = -(1 << 62)
        self._epoch_seq: int | None = None    # first seq of a later clock epoch (held back)
        self._epoch_expected_ns = 0           # when the current clock reaches that seq
        self._epoch_behind_ns = 0             # later-epoch data seen well behind the data

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def overfull(self) -> bool:
        """More chunks waiting than max_pending: the head must go, ready or not."""
        return len(self._heap) > self.max_pending

    @property
    def head(self) -> Pending:
        """The entry taken next (the buffer must not be empty)."""
        return self._heap[0]

    def waiting(self) -> list[Chunk]:
        """The chunks waiting, in the order they will be taken."""
        return [entry.chunk for entry in sorted(self._heap)]

    def after_head(self) -> Chunk | None:
        """The chunk waiting right after the head; None when there is none."""
        return heapq.nsmallest(2, self._heap)[1].chunk if len(self._heap) >= 2 else None

    def add(self, chunk: Chunk, end_ns: int | None) -> None:
        """chunk arrived; end_ns: where the stream's data ends on the timeline (None
        before its first chunk is taken)."""
        if chunk.t0_ns < self.max_seen_t0:
            self.counters.out_of_order += 1
        seen = self._note_seen(chunk, end_ns)
        epoch = self._epoch_of(chunk, end_ns)
        if epoch and end_ns is not None:
            duration = int(chunk.n * 1e9 / self.clock.rate_of(chunk))
            if chunk.t0_ns + duration <= end_ns - self.horizon_ns:
                self._epoch_behind_ns += duration
        heapq.heappush(self._heap, Pending(epoch, chunk.t0_ns, chunk.seq, chunk, seen))

    def drop_head(self) -> Chunk:
        """Remove the head without taking it (its rate is unknown)."""
        return heapq.heappop(self._heap).chunk

    def take_head(self) -> Chunk:
        """Remove the head to be placed; a later epoch's first chunk makes that epoch
        the current clock."""
        entry = heapq.heappop(self._heap)
        if entry.epoch:
            self._enter_epoch()
        return entry.chunk

    def taken(self, t0_ns: int) -> None:
        """A chunk from t0_ns was placed. A forward step taken: the horizon's clock
        jumps with it, and so do the chunks counted from the old clock while the step
        was not taken yet."""
        if t0_ns > self.max_seen_t0:
            delta = t0_ns - self.max_seen_t0
            self.max_seen_t0 = t0_ns
            for entry in self._heap:
                if entry.seen_ns < entry.t0_ns:
                    entry.seen_ns = min(entry.t0_ns, entry.seen_ns + delta)

    def ready(self, entry: Pending, rate: float, end_ns: int | None) -> bool:
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
        if end_ns is None:
            return self.max_seen_t0 - entry.seen_ns >= self.horizon_ns
        if entry.epoch:
            return self.clock.consecutive(chunk.seq) or \
                self.max_seen_t0 - self._epoch_expected_ns >= self.horizon_ns or \
                self._epoch_behind_ns >= self.horizon_ns
        # Contiguous means within half a period: a short chunk that skipped
        # ahead of its predecessor must not pass for a bridgeable seam.
        if chunk.t0_ns - end_ns <= 0.5e9 / rate:
            return True
        if self.clock.consecutive(chunk.seq):
            return True
        return self.max_seen_t0 - entry.seen_ns >= self.horizon_ns

    def _note_seen(self, chunk: Chunk, end_ns: int | None) -> int:
        """Advance the newest t0 seen, which the reorder horizon is measured on, and
        return where the horizon counts chunk from. A chunk whose t0 jumps ahead of the
        stream's own clock (a forward step) counts as if it followed the newest seen,
        and advances it by no more than its own duration until it is taken (then by all
        of it): a step is no elapsed time, and must neither release chunks reordered
        around it nor make itself wait for data from beyond the jump."""
        t0 = chunk.t0_ns
        if t0 <= self.max_seen_t0:
            return t0
        if end_ns is None or t0 - end_ns < self.clock.step_min_ns:
            self.max_seen_t0 = t0  # no forward step of clock_step_min_ns: the usual case
            return t0
        jump = self.clock.classify(chunk, self.clock.rate_in_use())
        if jump is not None and jump > 0 and self.max_seen_t0 > -(1 << 62):
            t0 = min(t0, self.max_seen_t0 + int(chunk.n * 1e9 / self.clock.rate_of(chunk)))
        self.max_seen_t0 = t0
        return t0

    def _epoch_of(self, chunk: Chunk, end_ns: int | None) -> int:
        """1 when chunk belongs to a later clock that stepped back (module docstring):
        its seq says chunks not seen yet come before it, its t0 leaves them no room."""
        if self._epoch_seq is not None and chunk.seq >= self._epoch_seq:
            return 1
        clock = self.clock
        ref = clock.ref
        if ref is None or end_ns is None or chunk.seq <= ref.seq or \
                clock.consecutive(chunk.seq):
            return 0
        # The nearest earlier seq known: the clock's reference, or a chunk still
        # waiting (after lost chunks the reference can be seconds behind).
        for entry in self._heap:
            if not entry.epoch and ref.seq < entry.seq < chunk.seq:
                ref = ClockRef(entry.seq, entry.t0_ns, entry.chunk.n)  # the highest such seq
        expected = clock.expected(chunk, clock.rate_in_use(), ref)
        if expected is None:
            return 0
        t_exp, missing = expected
        if t_exp - chunk.t0_ns < clock.step_threshold(missing):
            return 0
        if self._epoch_seq is None:
            self._epoch_behind_ns = 0
        self._epoch_seq = chunk.seq
        self._epoch_expected_ns = int(t_exp)
        # Chunks already waiting from seq on belong to the later epoch too.
        for entry in self._heap:
            if entry.seq >= chunk.seq:
                entry.epoch = 1
        heapq.heapify(self._heap)
        return 1

    def _enter_epoch(self) -> None:
        """The later epoch's first chunk is being taken: it is the current clock now."""
        self._epoch_seq = None
        self._epoch_behind_ns = 0
        for entry in self._heap:
            entry.epoch = 0
        heapq.heapify(self._heap)
