"""The aligner: chunks in, aligned windows out. Pure: no threads, no I/O.

``push(chunk)`` returns the windows that chunk completed; ``flush()`` ends
the input and returns the rest. Windows of a node are emitted in time order,
each exactly once. Window k of a node spans [k*hop_ns, k*hop_ns + window_ns)
on the absolute timeline, so windows line up across nodes and across runs
(live and replay cut the same windows from the same data).

A window is emitted once every modality of the model has data past its end,
or once the node's other streams are ``max_wait_ns`` past its end (the
lagging modality is then missing: unplugged sensor, lost packets, silent
node). Memory is bounded by the per-stream ring; a stream that runs too far
ahead forces older windows out (counted in ``forced_windows``).

Hostile input (issue 8) costs bounded work and never other nodes' windows:
a chunk with a rate outside its modality's range or a time outside
[0, 2**62) ns is refused and counted (``bad_rate_chunks``, ``bad_time_chunks``);
a jump in time is skipped in one step, so work per chunk follows its samples,
never its timestamps; node slots are reclaimed (silent nodes are evicted,
probationary names make room for new ones, established nodes never do) and
``allowed_nodes`` can limit the names at all. All of it depends on the order
of pushes only: a replay of the same chunks cuts the same windows.
"""
from __future__ import annotations

import fnmatch
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from edgefuse.runtime import kernels
from edgefuse.runtime.chunk import Chunk
from edgefuse.runtime.contract import ModelContract
from edgefuse.runtime.errors import ConfigError
from edgefuse.runtime.ratelimit import WarnLimiter
from edgefuse.runtime.stream import BAD_RATE, BAD_TIME, StreamState, refusal
from edgefuse.runtime.window import (REASON_CLIPPED, REASON_FLATLINE, REASON_GAP, REASON_NAN,
                                     REASON_NO_STREAM, REASON_STUCK, Window)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignerConfig:
    """Tuning of the aligner; every field is bounded and checked."""

    reorder_horizon_ns: int = 500_000_000   # how long a chunk after a gap waits for earlier ones
    max_wait_ns: int = 2_000_000_000        # how long a lagging modality may hold a window back
    min_coverage: float = 0.9               # below this fraction of valid samples: missing
    gap_tolerance: float = 3.0              # seams up to this many input periods are bridged
    flatline_range: float = 1e-6            # max-min at or below this (all channels): flatline
    stuck_fraction: float = 0.9             # one repeated value over this share: stuck
    # (0.9, not lower: quiet geophones idle at 0/+-1 counts with long runs of 0,
    # and a quiet ground is a signal, not a fault)
    clip_fraction: float = 0.01             # share of samples at full scale above this: clipped
    max_pending_chunks: int = 64            # reorder buffer per stream
    rate_history: int = 32                  # chunks used to estimate an unknown rate
    antialias: bool = True                  # low-pass before decimating
    ring_extra_s: float = 1.0               # ring slack beyond window + waits
    max_nodes: int = 1000                   # nodes tracked at once (each holds its rings)
    # Slots are reclaimed (see Aligner._admit and _advance_frontier): a node silent
    # for evict_after_s of data time is evicted, its windows emitted first; a node
    # is probationary until it has sent probation_chunks chunks, and only
    # probationary nodes make room for a new name when max_nodes are tracked.
    evict_after_s: float = 600.0
    probation_chunks: int = 8
    allowed_nodes: tuple[str, ...] = ()     # fnmatch patterns of node names; empty: any

    def __post_init__(self) -> None:
        if isinstance(self.allowed_nodes, list):  # built in code rather than from TOML
            object.__setattr__(self, "allowed_nodes", tuple(self.allowed_nodes))
        checks = [
            ("reorder_horizon_ns", 0 <= self.reorder_horizon_ns <= 60_000_000_000, "0..60 s"),
            ("max_wait_ns", 0 <= self.max_wait_ns <= 600_000_000_000, "0..600 s"),
            ("min_coverage", 0.0 < self.min_coverage <= 1.0, "(0, 1]"),
            ("gap_tolerance", 1.0 <= self.gap_tolerance <= 1000.0, "1..1000 periods"),
            ("stuck_fraction", 0.0 < self.stuck_fraction <= 1.0, "(0, 1]"),
            ("clip_fraction", 0.0 <= self.clip_fraction <= 1.0, "[0, 1]"),
            ("max_pending_chunks", 1 <= self.max_pending_chunks <= 100_000, "1..100000"),
            ("rate_history", 2 <= self.rate_history <= 10_000, "2..10000"),
            ("ring_extra_s", 0.0 <= self.ring_extra_s <= 600.0, "0..600 s"),
            ("max_nodes", 1 <= self.max_nodes <= 1_000_000, "1..1000000"),
            # Evicting a node still inside its waits would cut its windows early.
            ("evict_after_s", (self.max_wait_ns + self.reorder_horizon_ns) / 1e9
             < self.evict_after_s <= 30 * 86_400,
             "more than (max_wait_ns + reorder_horizon_ns) / 1e9 s, at most 30 days"),
            ("probation_chunks", 1 <= self.probation_chunks <= 10_000, "1..10000"),
            ("allowed_nodes", isinstance(self.allowed_nodes, tuple)
             and len(self.allowed_nodes) <= 1000
             and all(isinstance(p, str) and 0 < len(p) <= 256 for p in self.allowed_nodes),
             "a list of at most 1000 non-empty fnmatch patterns (e.g. ['gw1-*']); "
             "empty: any node"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"aligner.{name} = {getattr(self, name)!r} is out of range; "
                                  f"allowed: {allowed}")


class _Node:
    def __init__(self, name: str, min_k: int | None = None):
        self.name = name
        self.streams: dict[str, StreamState] = {}
        self.next_k: int | None = None
        # Windows below min_k were emitted before this node was evicted: never again,
        # so (node, window index) stays unique for the aligner's lifetime.
        self.min_k = min_k
        self.chunks = 0                 # chunks accepted, up to probation_chunks
        self.seen_at: int | None = None  # the frontier when it last pushed

    def progress_ns(self) -> int:
        return max((s.end_ns for s in self.streams.values() if s.end_ns is not None),
                   default=NO_PROGRESS)


NO_PROGRESS = -(1 << 62)


class Aligner:
    def __init__(self, contract: ModelContract, config: AlignerConfig | None = None):
        self.contract = contract
        self.config = config or AlignerConfig()
        self._specs = {m.name: m for m in contract.modalities}
        self._win = {m.name: m.samples(contract.window_ns) for m in contract.modalities}
        # Every tracked node, least recently pushed first (silence eviction walks it).
        self._nodes: OrderedDict[str, _Node] = OrderedDict()
        # Probationary nodes by their chunk count (1 .. probation_chunks-1), each
        # least recently pushed first: the victims when a new name needs a slot.
        self._probation: dict[int, OrderedDict[str, None]] = {}
        # Evicted node -> its next window index (bounded; see _forget).
        self._retired: OrderedDict[str, int] = OrderedDict()
        self._frontier: int | None = None
        self._frontier_start: int | None = None
        self._out: list[Window] = []
        self._stats = np.zeros(6)  # scratch for the window-stats kernel
        self._warner = WarnLimiter(log)
        self._notes = WarnLimiter(log, level=logging.INFO)
        self.counters = {"windows": 0, "empty_windows_skipped": 0, "forced_windows": 0,
                         "unknown_modality_chunks": 0, "wrong_channel_chunks": 0,
                         "too_many_nodes_chunks": 0, "not_allowed_chunks": 0,
                         BAD_RATE: 0, BAD_TIME: 0, "evicted_nodes": 0, "displaced_nodes": 0}

    # -- public -----------------------------------------------------------
    def push(self, chunk: Chunk) -> list[Window]:
        spec = self._specs.get(chunk.modality)
        if spec is None:
            return self._refuse("unknown_modality_chunks", chunk,
                                f"the model has no modality {chunk.modality!r} (it has "
                                f"{sorted(self._specs)})")
        if chunk.channels != spec.channels:
            return self._refuse("wrong_channel_chunks", chunk,
                                f"expected {spec.channels} channel(s), found {chunk.channels}")
        node = self._nodes.get(chunk.node)
        if node is None and not self._allowed(chunk.node):
            return self._refuse("not_allowed_chunks", chunk,
                                "the node name matches no pattern of aligner.allowed_nodes")
        bad = refusal(chunk, spec.rate_hz)
        if bad is not None:
            return self._refuse(bad[0], chunk, bad[1])
        if node is None:
            node = self._admit(chunk.node)
            if node is None:
                return self._refuse(
                    "too_many_nodes_chunks", chunk,
                    f"already tracking max_nodes={self.config.max_nodes} established nodes; "
                    "raise aligner.max_nodes if this many are real (or set allowed_nodes)")
        self._note_push(node)
        stream = node.streams.get(chunk.modality)
        if stream is None:
            stream = node.streams[chunk.modality] = self._new_stream(node, spec)
        stream.push(chunk)
        self._emit_ready(node, final=False)
        self._advance_frontier(node)
        self._evict_silent(node)
        out, self._out = self._out, []
        return out

    def flush(self) -> list[Window]:
        for node in self._nodes.values():
            for stream in node.streams.values():
                stream.flush()
            self._emit_ready(node, final=True)
        out, self._out = self._out, []
        return out

    def stats(self) -> dict:
        streams = {f"{n.name}/{m}": s.counters.as_dict()
                   for n in self._nodes.values() for m, s in n.streams.items()}
        return {"aligner": dict(self.counters), "streams": streams}

    # -- nodes: admission, probation, eviction ------------------------------
    # A node is probationary until it has pushed probation_chunks chunks, then
    # established. When max_nodes nodes are tracked, a new name takes the slot
    # of a probationary node (the one with the fewest chunks, least recently
    # pushed among those: deterministic, so replay == live); established nodes
    # never make room for a newcomer, so with none probationary the new name is
    # refused. A flood of one-chunk names thus only ever displaces its own
    # kind: a real node that has sent two chunks outlasts any number of them,
    # and a real node arriving after a flood takes a flooder's slot.
    def _allowed(self, name: str) -> bool:
        patterns = self.config.allowed_nodes
        return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)

    def _admit(self, name: str) -> _Node | None:
        if len(self._nodes) >= self.config.max_nodes:
            if not self._probation:
                return None
            victim = next(iter(self._probation[min(self._probation)]))
            # Its buffered data is dropped, not flushed into windows: it is the
            # least proven name, and deciding windows of a flood of names would
            # spend the inference a real node needs.
            self.counters["displaced_nodes"] += 1
            self._warner.warn(("displaced",), "node %r displaced to admit node %r: max_nodes=%d "
                             "reached; it had sent %d chunk(s)", victim, name,
                             self.config.max_nodes, self._nodes[victim].chunks)
            self._forget(self._nodes[victim])
        node = self._nodes[name] = _Node(name, self._retired.pop(name, None))
        return node

    def _note_push(self, node: _Node) -> None:
        """Count an accepted chunk of node: recency, probation, the frontier seen."""
        self._nodes.move_to_end(node.name)
        k = self.config.probation_chunks
        if node.chunks < k:
            self._leave_probation_bucket(node)
            node.chunks += 1
            if node.chunks < k:
                self._probation.setdefault(node.chunks, OrderedDict())[node.name] = None
        node.seen_at = self._frontier

    # The frontier is the data time of the newest data, the clock silence is
    # measured on. A hostile sender with a far-future t0 must not be able to
    # move it and so evict every live node. Hence: only established nodes move
    # it, by at most one window per chunk they push (a sender needs as many
    # messages as the data time it wants to skip: 600 s takes 600 chunks of a
    # node that has sent probation_chunks before); and a node is silent when
    # the frontier has moved evict_after_s since its own last push, so a node
    # that keeps sending is never evicted, whatever its own clock says.
    def _advance_frontier(self, node: _Node) -> None:
        if node.chunks < self.config.probation_chunks:
            return
        progress = node.progress_ns()
        if progress == NO_PROGRESS:
            return
        if self._frontier is None:
            self._frontier = self._frontier_start = progress
        elif progress > self._frontier:
            self._frontier += min(progress - self._frontier, self.contract.window_ns)
        node.seen_at = self._frontier

    def _evict_silent(self, pushing: _Node) -> None:
        """Evict the nodes (least recently pushed first) silent for evict_after_s:
        their remaining windows are emitted first, then their state is freed."""
        if self._frontier is None:
            return
        limit = self._frontier - int(self.config.evict_after_s * 1e9)
        while self._nodes:
            node = next(iter(self._nodes.values()))
            seen = node.seen_at if node.seen_at is not None else self._frontier_start
            if node is pushing or seen >= limit:
                return
            for stream in node.streams.values():
                stream.flush()
            self._emit_ready(node, final=True)
            self.counters["evicted_nodes"] += 1
            self._notes.warn(("evicted",), "node %r evicted: silent for more than %g s of data "
                             "time (aligner.evict_after_s); its windows were emitted",
                             node.name, self.config.evict_after_s)
            self._forget(node)

    def _forget(self, node: _Node) -> None:
        del self._nodes[node.name]
        self._leave_probation_bucket(node)
        if node.next_k is not None:
            # Bounded: a name back after max_nodes others were evicted starts afresh.
            self._retired[node.name] = node.next_k
            self._retired.move_to_end(node.name)
            if len(self._retired) > self.config.max_nodes:
                self._retired.popitem(last=False)

    def _leave_probation_bucket(self, node: _Node) -> None:
        bucket = self._probation.get(node.chunks)
        if bucket is not None and node.name in bucket:
            del bucket[node.name]
            if not bucket:
                del self._probation[node.chunks]  # so the victim search sees full ones only

    def _refuse(self, counter: str, chunk: Chunk, why: str) -> list[Window]:
        """Count and warn about a chunk refused before it reaches a stream."""
        self.counters[counter] += 1
        node = self._nodes.get(chunk.node)
        stream = node.streams.get(chunk.modality) if node is not None else None
        if stream is not None and counter in (BAD_RATE, BAD_TIME):
            setattr(stream.counters, counter, getattr(stream.counters, counter) + 1)
        modality = chunk.modality if counter != "unknown_modality_chunks" else None
        self._warn(node, (chunk.node, modality, counter), "%s/%s seq %d refused (%s): %s",
                   chunk.node, chunk.modality, chunk.seq, counter, why)
        return []

    def _warn(self, node: _Node | None, key: tuple, msg: str, *args: object) -> None:
        """Rate-limited warning. An established node has keys of its own, so a flood
        cannot hide its warnings; names not tracked or still probationary share one
        key per reason, so a flood of names cannot become a flood of log lines."""
        if node is None or node.chunks < self.config.probation_chunks:
            key = (None, *key[1:])
        self._warner.warn(key, msg, *args)

    # -- internals --------------------------------------------------------
    def _new_stream(self, node: _Node, spec) -> StreamState:
        cfg = self.config
        c = self.contract
        win = self._win[spec.name]
        slack_s = (cfg.max_wait_ns + cfg.reorder_horizon_ns + c.hop_ns) / 1e9 + cfg.ring_extra_s
        ring = win + int(math.ceil(slack_s * spec.rate_hz))

        def make_room(stream: StreamState, g_hi: int, node=node) -> None:
            self._make_room(node, stream, g_hi)

        def warn(key: tuple, msg: str, *args: object, node=node) -> None:
            self._warn(node, key, msg, *args)

        return StreamState(node.name, spec, c.hop_ns, win, ring, cfg.reorder_horizon_ns,
                           cfg.gap_tolerance, cfg.max_pending_chunks, cfg.rate_history,
                           cfg.antialias, make_room, warn=warn)

    def _first_k(self, node: _Node) -> int | None:
        starts = [s.segment_start_ns for s in node.streams.values()
                  if s.segment_start_ns is not None]
        if not starts:
            return None
        hop = self.contract.hop_ns
        first = -((-min(starts)) // hop)  # first window starting at or after the first sample
        return first if node.min_k is None else max(first, node.min_k)

    # Work per chunk is bounded by its samples, never by its timestamps: a
    # window without valid data is never stepped over one by one. After one,
    # the loops below jump to the first window that can hold data (one scan of
    # at most a ring per stream), capped where the loop's own checks end.
    def _make_room(self, node: _Node, stream: StreamState, g_hi: int) -> None:
        """Emit (forced) every window of node whose start would be overwritten."""
        if node.next_k is None:
            node.next_k = self._first_k(node)
            if node.next_k is None:
                return
        hop = self.contract.hop_ns
        while stream.anchor_ns is not None and \
                stream.grid_index(node.next_k * hop) < g_hi - stream.cap:
            k = node.next_k
            skip_to = self._skip_silence(node, k * hop, k * hop + self.contract.window_ns)
            if skip_to is not None and skip_to > k:
                node.next_k = skip_to
                continue
            self.counters["forced_windows"] += 1
            if self._emit(node, k):
                node.next_k = k + 1
                continue
            # Later data of any stream comes too late for these windows: only what
            # is written counts. Cap: a lower bound of the first window not forced.
            t = stream.anchor_ns + int((g_hi - stream.cap - 1) * 1e9 / stream.fs)
            node.next_k = max(k + 1, min(self._next_data_k(node, k + 1), t // hop - 1))

    def _emit_ready(self, node: _Node, final: bool) -> None:
        if node.next_k is None:
            node.next_k = self._first_k(node)
            if node.next_k is None:
                return
        hop, win_ns = self.contract.hop_ns, self.contract.window_ns
        wait = self.config.max_wait_ns
        streams = [node.streams.get(name) for name in self._specs]
        progress = node.progress_ns()
        while True:
            k = node.next_k
            start = k * hop
            end = start + win_ns
            if end > progress:
                return
            if not final and progress < end + wait:
                # Every modality must be written through the window or have waited enough.
                for s in streams:
                    if s is None or s.written_g is None or \
                            s.written_g < round((end - s.anchor_ns) * s.fs / 1e9):
                        return
            skip_to = self._skip_silence(node, start, end)
            if skip_to is not None and skip_to > k:
                node.next_k = skip_to
                continue
            if self._emit(node, k):
                node.next_k = k + 1
                continue
            # Windows that pass the checks above get no more data (written through or
            # waited out), so only written data can stop the jump. Cap: a lower bound
            # of the last window ending by the time those checks pass.
            ready_by = progress
            if not final:
                written = min((s.anchor_ns + int((s.written_g - 1) * 1e9 / s.fs)
                               if s is not None and s.written_g is not None else NO_PROGRESS)
                              for s in streams)
                ready_by = min(progress, max(progress - wait, written))
            last_ready = (ready_by - win_ns) // hop
            node.next_k = max(k + 1, min(self._next_data_k(node, k + 1), last_ready + 1))

    def _next_data_k(self, node: _Node, k: int) -> int:
        """A lower bound (within a window) of the first window from k holding valid data
        written by any stream of node; a huge number when there is none."""
        hop, win_ns = self.contract.hop_ns, self.contract.window_ns
        best = 1 << 80
        for s in node.streams.values():
            if s.anchor_ns is None or s.written_g is None:
                continue
            g = s.first_valid_from(s.grid_index(k * hop))
            if g is not None:
                t = s.anchor_ns + int((g - 1) * 1e9 / s.fs)  # a grid period early
                best = min(best, (t - win_ns) // hop)  # the window before the first ending after t
        return best

    def _skip_silence(self, node: _Node, start: int, end: int) -> int | None:
        """Index of the first window that can hold data when window [start, end) lies
        in a silence of every stream of the node (between two segments, or past
        the stream's data so far); None otherwise."""
        resume = []
        for s in node.streams.values():
            if s.segment_start_ns is None or s.end_ns is None:
                continue
            if start >= s.end_ns:
                continue  # nothing from this stream here (yet): it does not hold the skip
            prev_end = s.previous_segment_end_ns
            if end <= s.segment_start_ns and prev_end is not None and start >= prev_end:
                resume.append(s.segment_start_ns)
                continue
            return None
        if not resume:
            return None
        first_data = min(resume)
        return -((-(first_data - self.contract.window_ns + 1)) // self.contract.hop_ns)

    def _emit(self, node: _Node, k: int) -> bool:
        """Emit window k of node; False when it holds no valid data (skipped)."""
        c = self.contract
        start = k * c.hop_ns
        data, present, reasons, coverage = {}, {}, {}, {}
        stats = self._stats
        any_data = False
        for name, spec in self._specs.items():
            n = self._win[name]
            s = node.streams.get(name)
            if s is None or s.anchor_ns is None or s.written_g is None:
                data[name] = np.zeros((spec.channels, n), np.float32)
                present[name], reasons[name], coverage[name] = False, REASON_NO_STREAM, 0.0
                continue
            g_lo = round((start - s.anchor_ns) * s.fs / 1e9)
            # Only the part the stream has written is data; past it the ring is stale.
            n_avail = max(0, min(n, s.written_g - g_lo))
            if n_avail == n:
                out = np.empty((spec.channels, n), np.float32)
                kernels._window_stats(s.ring, s.status, g_lo, n, s.full_scale, out, stats)
            else:
                out = np.zeros((spec.channels, n), np.float32)
                if n_avail > 0:
                    part = np.empty((spec.channels, n_avail), np.float32)
                    kernels._window_stats(s.ring, s.status, g_lo, n_avail, s.full_scale, part,
                                          stats)
                    out[:, :n_avail] = part
                else:
                    stats[:] = 0.0
                stats[2] += n - n_avail
            data[name] = out
            valid = int(stats[0])
            cov = valid / n
            coverage[name] = cov
            any_data = any_data or valid > 0
            reason = self._reason(cov, stats)
            present[name] = reason is None
            if reason is not None:
                reasons[name] = reason
        if not any_data:
            self.counters["empty_windows_skipped"] += 1
            return False
        self.counters["windows"] += 1
        self._out.append(Window(node.name, k, start, start + c.window_ns, data, present,
                                reasons, coverage))

    def _reason(self, coverage: float, stats: np.ndarray) -> str | None:
        cfg = self.config
        if coverage < cfg.min_coverage:
            return REASON_NAN if stats[1] > stats[2] else REASON_GAP
        if stats[3] <= cfg.flatline_range:
            return REASON_FLATLINE
        if stats[5] > cfg.clip_fraction:
            return REASON_CLIPPED
        if stats[4] >= cfg.stuck_fraction:
            return REASON_STUCK
        return None
