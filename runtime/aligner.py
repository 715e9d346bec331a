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
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from edgefuse.runtime import kernels
from edgefuse.runtime.chunk import Chunk
from edgefuse.runtime.contract import ModelContract
from edgefuse.runtime.errors import ConfigError
from edgefuse.runtime.stream import StreamState
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

    def __post_init__(self) -> None:
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
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"aligner.{name} = {getattr(self, name)!r} is out of range; "
                                  f"allowed: {allowed}")


class _Node:
    def __init__(self, name: str):
        self.name = name
        self.streams: dict[str, StreamState] = {}
        self.next_k: int | None = None

    def progress_ns(self) -> int:
        return max((s.end_ns for s in self.streams.values() if s.end_ns is not None),
                   default=-(1 << 62))


class Aligner:
    def __init__(self, contract: ModelContract, config: AlignerConfig | None = None):
        self.contract = contract
        self.config = config or AlignerConfig()
        self._specs = {m.name: m for m in contract.modalities}
        self._win = {m.name: m.samples(contract.window_ns) for m in contract.modalities}
        self._nodes: dict[str, _Node] = {}
        self._out: list[Window] = []
        self._stats = np.zeros(6)  # scratch for the window-stats kernel
        self.counters = {"windows": 0, "empty_windows_skipped": 0, "forced_windows": 0,
                         "unknown_modality_chunks": 0, "wrong_channel_chunks": 0,
                         "too_many_nodes_chunks": 0}

    # -- public -----------------------------------------------------------
    def push(self, chunk: Chunk) -> list[Window]:
        spec = self._specs.get(chunk.modality)
        if spec is None:
            self.counters["unknown_modality_chunks"] += 1
            return []
        if chunk.channels != spec.channels:
            self.counters["wrong_channel_chunks"] += 1
            log.warning("%s/%s seq %d: expected %d channels, found %d; chunk skipped",
                        chunk.node, chunk.modality, chunk.seq, spec.channels, chunk.channels)
            return []
        node = self._nodes.get(chunk.node)
        if node is None:
            if len(self._nodes) >= self.config.max_nodes:
                # A flood of node names (a misconfigured or hostile sender) must not
                # grow memory without bound: refuse new nodes, count them.
                self.counters["too_many_nodes_chunks"] += 1
                if self.counters["too_many_nodes_chunks"] == 1:
                    log.warning("node %r refused: already tracking max_nodes=%d nodes; raise "
                                "aligner.max_nodes if this many are real", chunk.node,
                                self.config.max_nodes)
                return []
            node = self._nodes[chunk.node] = _Node(chunk.node)
        stream = node.streams.get(chunk.modality)
        if stream is None:
            stream = node.streams[chunk.modality] = self._new_stream(node, spec)
        stream.push(chunk)
        self._emit_ready(node, final=False)
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

    # -- internals --------------------------------------------------------
    def _new_stream(self, node: _Node, spec) -> StreamState:
        cfg = self.config
        c = self.contract
        win = self._win[spec.name]
        slack_s = (cfg.max_wait_ns + cfg.reorder_horizon_ns + c.hop_ns) / 1e9 + cfg.ring_extra_s
        ring = win + int(math.ceil(slack_s * spec.rate_hz))

        def make_room(stream: StreamState, g_hi: int, node=node) -> None:
            self._make_room(node, stream, g_hi)

        return StreamState(node.name, spec, c.hop_ns, win, ring, cfg.reorder_horizon_ns,
                           cfg.gap_tolerance, cfg.max_pending_chunks, cfg.rate_history,
                           cfg.antialias, make_room)

    def _first_k(self, node: _Node) -> int | None:
        starts = [s.segment_start_ns for s in node.streams.values()
                  if s.segment_start_ns is not None]
        if not starts:
            return None
        hop = self.contract.hop_ns
        return -((-min(starts)) // hop)  # first window starting at or after the first sample

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
            self._emit(node, k)
            node.next_k = k + 1

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
            self._emit(node, k)
            node.next_k = k + 1

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

    def _emit(self, node: _Node, k: int) -> None:
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
            return
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
