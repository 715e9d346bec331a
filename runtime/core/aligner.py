"""The aligner: chunks in, aligned windows out. Pure: no threads, no I/O.

``push(chunk)`` returns the windows that chunk completed; ``flush()`` ends
the input and returns the rest. Windows of a node are emitted in time order,
each exactly once. Window k of a node spans [k*hop_ns, k*hop_ns + window_ns)
on the absolute timeline, so windows line up across nodes and across runs
(live and replay cut the same windows from the same data).

A window is emitted once every modality of the model has data past its end,
or has been given up on for it: a modality silent (no chunk pushed) for
``max_wait_ns`` of its own time, or more than ``max_lead_ns`` behind the node's
newest data (it is then missing: unplugged sensor, lost packets, silent node,
a clock far off). "Its own time" is the end of its data plus the node's time
elapsed since it last pushed, where each push counts for at most the time its
chunk holds: a stream whose clock stepped ahead of the others does not make
them silent (issue 11), so live (arrival order) and replay (log-time order)
close the same windows with the same data. Memory is bounded by the
per-stream ring, sized for ``max_lead_ns``; a stream that runs further ahead
forces older windows out (counted in ``forced_windows``).

Clocks (issue 11, details in ``edgefuse.runtime.core.clock``): each stream detects
steps of its own clock (``clock_steps``; the windows spanning one carry reason
``clock_step``), measures its rate from the progress of t0 (``rate_mismatch``
when a declared rate disagrees; ``drift_ppm`` for every stream), and its offset
against the node's other streams is reported (``clock_offset_ms``, from receipt
times live, from the steps in the data in replay; ``clock_skew`` beyond
``skew_tolerance_s``). A t0 before ``min_t0_ns`` (2000) is refused as
``bad_time`` with the unit the sender likely used named.

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

from edgefuse.runtime.core import kernels
from edgefuse.runtime.core.chunk import T0_MAX_NS, Chunk
from edgefuse.runtime.core.contract import ModelContract
from edgefuse.runtime.core.errors import ConfigError
from edgefuse.runtime.core.ratelimit import WarnLimiter
from edgefuse.runtime.core.rates import BAD_RATE, BAD_TIME, Y2000_NS, refusal
from edgefuse.runtime.core.stream import StreamState
from edgefuse.runtime.core.window import (REASON_CLIPPED, REASON_CLOCK_STEP, REASON_FLATLINE,
                                     REASON_GAP, REASON_NAN, REASON_NO_STREAM, REASON_STUCK,
                                     Window)

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
    # Clocks and units (issue 11; runtime/core/clock.py's docstring has the model).
    max_lead_ns: int = 6_000_000_000        # how far a stream may lag the node's newest data
    # before its windows close without it (a clock stepped by up to ~5 s on one stream
    # then costs the others nothing); rings hold max(max_wait_ns, max_lead_ns)
    clock_step_min_ns: int = 100_000_000    # a jump against the stream's own clock this big
    # (beyond what lost chunks explain) is a clock step (NTP steps from 128 ms)
    skew_tolerance_s: float = 0.5           # a stream's clock this far off the node's: clock_skew
    min_t0_ns: int = Y2000_NS               # earlier t0 is refused (bad_time, unit named); 0: off
    rate_tolerance: float = 0.02            # declared rate vs the progress of t0: rate_mismatch
    trust_declared_rate: bool = False       # on a mismatch keep placing at the declared rate

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
            ("max_lead_ns", 0 <= self.max_lead_ns <= 600_000_000_000, "0..600 s"),
            ("clock_step_min_ns", 1_000_000 <= self.clock_step_min_ns <= 86_400_000_000_000,
             "1 ms .. 1 day"),
            ("skew_tolerance_s", 0.0 < self.skew_tolerance_s <= 86_400.0, "(0, 86400] s"),
            ("min_t0_ns", 0 <= self.min_t0_ns < T0_MAX_NS,
             f"0 (any t0, for relative times) .. 2**62 ns; default {Y2000_NS} (2000-01-01)"),
            ("rate_tolerance", 0.0 < self.rate_tolerance <= 1.0, "(0, 1] (0.02 = 2 %)"),
            ("trust_declared_rate", isinstance(self.trust_declared_rate, bool), "true or false"),
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
        self.elapsed_ns = 0             # data time elapsed, robust to clock jumps (push)
        self.seen_at: int | None = None  # the frontier when it last pushed

    def progress_ns(self) -> int:
        """The newest data end of any stream; NO_PROGRESS before any data."""
        # A plain loop: called several times per chunk, where max() over a
        # generator costs more than the comparison of two or three streams.
        best = NO_PROGRESS
        for s in self.streams.values():
            if s.end_ns is not None and s.end_ns > best:
                best = s.end_ns
        return best


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
        self._counters = {"windows": 0, "empty_windows_skipped": 0, "forced_windows": 0,
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
            # The one owner of this check, live and in replay alike: sources and
            # replay pass such chunks on, so both count them here, with one warning.
            return self._refuse("wrong_channel_chunks", chunk,
                                f"expected {spec.channels} channel(s) (the model's contract), "
                                f"found {chunk.channels}; fix the sender, or use the model "
                                "trained for this sensor layout")
        node = self._nodes.get(chunk.node)
        if node is None and not self._allowed(chunk.node):
            return self._refuse("not_allowed_chunks", chunk,
                                "the node name matches no pattern of aligner.allowed_nodes")
        bad = refusal(chunk, spec.rate_hz, self.config.min_t0_ns)
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
        steps = stream.counters.clock_steps
        before = node.progress_ns()
        stream.push(chunk)
        # The node's elapsed time: its progress, but each push counts for at most the
        # time its chunk holds, so a stream whose clock jumps ahead does not make the
        # node's other streams look silent (see _emit_ready).
        after = node.progress_ns()
        if before != NO_PROGRESS and after > before:
            rate = float(chunk.rate_hz) if chunk.rate_hz is not None else \
                (stream.counters.rate_hz or spec.rate_hz)
            node.elapsed_ns += min(after - before, int(chunk.n * 1e9 / rate))
        stream.pushed_at_ns = node.elapsed_ns
        if chunk.received_ns is not None or stream.counters.clock_steps != steps:
            self._check_clocks(node)
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
        return {"aligner": dict(self._counters), "streams": streams}

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
            self._counters["displaced_nodes"] += 1
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
            self._counters["evicted_nodes"] += 1
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
        self._counters[counter] += 1
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
        # The ring holds a window plus the longest a window may wait for its slowest
        # stream (silent: max_wait_ns; lagging: max_lead_ns) plus the reorder horizon,
        # a hop and ring_extra_s for chunk lengths: the newest data never overwrites a
        # window still open. At the defaults 1 + 6 + 0.5 + 0.5 + 1 = 9 s per stream:
        # acoustic 4934 Hz 222 KB, seismic 800 Hz 36 KB, IMU 6 ch 100 Hz 23 KB
        # (float32 samples + a status byte per grid point).
        slack_s = (max(cfg.max_wait_ns, cfg.max_lead_ns) + cfg.reorder_horizon_ns
                   + c.hop_ns) / 1e9 + cfg.ring_extra_s
        ring = win + int(math.ceil(slack_s * spec.rate_hz))

        def make_room(stream: StreamState, g_hi: int, node=node) -> None:
            self._make_room(node, stream, g_hi)

        def warn(key: tuple, msg: str, *args: object, node=node) -> None:
            self._warn(node, key, msg, *args)

        return StreamState(node.name, spec, c.hop_ns, win, ring, cfg.reorder_horizon_ns,
                           cfg.gap_tolerance, cfg.max_pending_chunks, cfg.rate_history,
                           cfg.antialias, make_room, warn=warn,
                           clock_step_min_ns=cfg.clock_step_min_ns,
                           rate_tolerance=cfg.rate_tolerance,
                           trust_declared_rate=cfg.trust_declared_rate)

    # -- clocks across a node's streams (reporting only) ---------------------
    def _check_clocks(self, node: _Node) -> None:
        """Each stream's clock offset against the node's other streams: from receipt
        times where at least two streams have them (live: label time of a chunk's end
        minus its arrival, median of the last 32), else from the clock steps the data
        shows (replay). Against the median of all streams when there are three or
        more, else against the other one (with two, neither can be blamed). Beyond
        skew_tolerance_s a stream is flagged clock_skew, counted and warned. Never
        changes a window: live and replay decide alike."""
        streams = node.streams
        values = {m: s.arrival_offset_ns for m, s in streams.items()
                  if s.arrival_offset_ns is not None}
        source = "arrival"
        if len(values) < 2:
            values = {m: s.step_total_ns for m, s in streams.items() if s.end_ns is not None}
            source = "steps"
        if len(values) < 2:
            return
        ordered = sorted(values.values())
        middle = ordered[len(ordered) // 2] if len(ordered) % 2 else \
            (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
        tolerance_ms = self.config.skew_tolerance_s * 1e3
        for m, value in values.items():
            if len(values) == 2:
                ref = next(v for other, v in values.items() if other != m)
            else:
                ref = middle
            c = streams[m].counters
            c.clock_offset_ms = (value - ref) / 1e6
            c.clock_offset_from = source
            off = abs(c.clock_offset_ms)
            if off > tolerance_ms and not c.clock_skew:
                c.clock_skew = True
                c.clock_skew_events += 1
                self._warn(node, (node.name, m, "clock_skew"),
                           "%s/%s: its clock is %+.3f s off the node's other streams (%s; "
                           "measured from %s%s); beyond aligner.skew_tolerance_s = %g s: "
                           "windows pair its data with theirs that far apart", node.name, m,
                           c.clock_offset_ms / 1e3, ", ".join(o for o in values if o != m),
                           "receipt times" if source == "arrival" else
                           "the clock steps in the data",
                           "; with two streams either may be the one off"
                           if len(values) == 2 else "", self.config.skew_tolerance_s)
            elif off <= tolerance_ms / 2 and c.clock_skew:
                c.clock_skew = False

    def _first_k(self, node: _Node, force: bool = False) -> int | None:
        """The node's first window: the first starting at or after its first sample.
        Fixed once every modality has started, or the node's elapsed time reached
        max_wait (or force: room is needed, the input ended), so a modality whose first
        chunk waits in its reorder buffer while another starts (arrival order) does not
        lose its first window that a t0-sorted replay keeps."""
        starts = [s.first_ns for s in node.streams.values() if s.first_ns is not None]
        if not starts:
            return None
        if not force and len(starts) < len(self._specs) and \
                node.elapsed_ns < self.config.max_wait_ns:
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
        hop = self.contract.hop_ns
        if node.next_k is None:
            first = self._first_k(node, force=True)
            if first is None or stream.anchor_ns is None or \
                    stream.grid_index(first * hop) >= g_hi - stream.cap:
                return  # nothing to force yet: the first window stays open to fix
            node.next_k = first
        while stream.anchor_ns is not None and \
                stream.grid_index(node.next_k * hop) < g_hi - stream.cap:
            k = node.next_k
            skip_to = self._skip_silence(node, k * hop, k * hop + self.contract.window_ns)
            if skip_to is not None and skip_to > k:
                node.next_k = skip_to
                continue
            self._counters["forced_windows"] += 1
            if self._emit(node, k):
                node.next_k = k + 1
                continue
            # Later data of any stream comes too late for these windows: only what
            # is written counts. Cap: a lower bound of the first window not forced.
            t = stream.anchor_ns + int((g_hi - stream.cap - 1) * 1e9 / stream.fs)
            node.next_k = max(k + 1, min(self._next_data_k(node, k + 1), t // hop - 1))

    def _emit_ready(self, node: _Node, final: bool) -> None:
        if node.next_k is None:
            node.next_k = self._first_k(node, force=final)
            if node.next_k is None:
                return
        hop, win_ns = self.contract.hop_ns, self.contract.window_ns
        wait, lead = self.config.max_wait_ns, self.config.max_lead_ns
        streams = [node.streams.get(name) for name in self._specs]
        progress = node.progress_ns()
        # Windows ending by give_up[i] no longer wait for stream i: it has been silent
        # for max_wait of its own time (its data's end plus the node's elapsed time
        # since it last pushed; a modality not seen yet: the node's progress), or it
        # lags the node's newest data by more than max_lead. A stream that keeps
        # pushing is waited for however far another stream's clock ran ahead of it.
        give_up = [max((progress if s is None or s.end_ns is None else
                        s.end_ns + node.elapsed_ns - s.pushed_at_ns) - wait, progress - lead)
                   for s in streams]
        while True:
            k = node.next_k
            start = k * hop
            end = start + win_ns
            if end > progress:
                return
            if not final:
                # Every modality must be written through the window or be given up on.
                for s, g in zip(streams, give_up):
                    if end <= g:
                        continue
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
                ready_by = min(progress, min(
                    max(g, s.anchor_ns + int((s.written_g - 1) * 1e9 / s.fs)
                        if s is not None and s.written_g is not None else NO_PROGRESS)
                    for s, g in zip(streams, give_up)))
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
            # Only grid indices [max(0, written_g - cap), written_g) are this stream's
            # data in the ring: past written_g it is stale, before it overwritten (or,
            # before the anchor, never written: a window of a node before the stream
            # started must not read the ring modulo its size).
            if max(0, s.written_g - s.cap) <= g_lo and g_lo + n <= s.written_g:
                # The usual case, tested first (it is most windows): all of the
                # window is in the ring.
                out = np.empty((spec.channels, n), np.float32)
                kernels._window_stats(s.ring, s.status, g_lo, n, s.full_scale, out, stats)
            else:
                gone = min(n, max(0, max(0, s.written_g - s.cap) - g_lo))
                n_avail = max(gone, min(n, s.written_g - g_lo))
                out = np.zeros((spec.channels, n), np.float32)
                if n_avail > gone:
                    part = np.empty((spec.channels, n_avail - gone), np.float32)
                    kernels._window_stats(s.ring, s.status, g_lo + gone, n_avail - gone,
                                          s.full_scale, part, stats)
                    out[:, gone:n_avail] = part
                else:
                    stats[:] = 0.0
                stats[2] += n - (n_avail - gone)
            data[name] = out
            valid = int(stats[0])
            cov = valid / n
            coverage[name] = cov
            any_data = any_data or valid > 0
            reason = self._reason(cov, stats)
            if s.steps and s.step_within(start, start + c.window_ns):
                reason = REASON_CLOCK_STEP  # its clock stepped inside: placement unsure
            present[name] = reason is None
            if reason is not None:
                reasons[name] = reason
        if not any_data:
            self._counters["empty_windows_skipped"] += 1
            return False
        self._counters["windows"] += 1
        self._out.append(Window(node.name, k, start, start + c.window_ns, data, present,
                                reasons, coverage))
        return True

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
