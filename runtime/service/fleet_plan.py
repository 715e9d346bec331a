"""Split a fleet's recordings by node: what each fleet replay task reopens.

A node's task replays every input that holds one of its streams, merged in
time order as a single-process replay merges them, with the other nodes'
chunks left out. The aligner keeps no state across nodes but one: a node
silent for ``aligner.evict_after_s`` of data time while other nodes record
is evicted and starts afresh when it comes back, where a task that replays
the node alone keeps its state through the pause. So the decisions of a
fleet replay equal a single-process replay's (sorted by node and seq)
unless a node pauses that long between its inputs; the plan measures each
node's longest pause from the headers, and the fleet replay warns naming
the nodes where that holds.

Inputs are opened here for their headers only (open_inputs reads no
samples). An input that cannot be opened is reported and left out; a folder
that fails as a whole is retried one sub-folder (or MCAP file) at a time,
so one broken pass does not take its siblings down.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from edgefuse.runtime.core.errors import InputError
from edgefuse.sensors.readers.inputs import open_inputs
from edgefuse.sensors.readers.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

MAX_RETRY_DEPTH = 2   # a failed folder is retried child by child this deep


@dataclass(frozen=True)
class NodeJob:
    """One task: a node and the inputs that hold its streams."""

    node: str
    paths: tuple[str, ...]   # absolute, sorted; the task opens them and keeps this node
    data_s: float            # sensor seconds (per input its longest stream, summed)
    pause_s: float           # longest stretch between its inputs with no stream recording


@dataclass
class FleetPlan:
    jobs: list[NodeJob] = field(default_factory=list)   # largest first
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, why)

    def paused_nodes(self, evict_after_s: float) -> list[NodeJob]:
        return [j for j in self.jobs if j.pause_s > evict_after_s]


def _reopen_path(label: str, top: str) -> str:
    """The path that reopens one source on its own. A file given on the command
    line stands for itself; in a folder, a source's label is its file (MCAP, raw
    WAV, CSV) or '<pass folder>:<modality>'. A recording manifest's files cannot
    be read without it, so its sources reopen the manifest's folder."""
    if os.path.isfile(top) or os.path.isfile(os.path.join(top, MANIFEST_NAME)):
        return os.path.abspath(top)
    if os.path.exists(label):
        return os.path.abspath(label)
    head, sep, _ = label.rpartition(":")
    if sep and os.path.isdir(head):
        return os.path.abspath(head)
    return os.path.abspath(top)


def _children(path: str) -> list[str]:
    """What a failed folder is retried as: its sub-folders and MCAP files."""
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return []
    return [os.path.join(path, n) for n in names
            if os.path.isdir(os.path.join(path, n)) or n.lower().endswith(".mcap")]


def _open_isolated(path: str, chunk_s: float, plan: FleetPlan, depth: int = 0) -> list:
    """The sources of one input path, with the path each reopens by; a broken
    input is recorded in plan.failed instead of raising."""
    try:
        inputs = open_inputs([path], chunk_s=chunk_s)
    except InputError as exc:
        children = _children(path) if os.path.isdir(path) and depth < MAX_RETRY_DEPTH else []
        if not children or os.path.isfile(os.path.join(path, MANIFEST_NAME)):
            log.error("input %s cannot be opened and is left out: %s", path, exc)
            plan.failed.append((path, str(exc)))
            return []
        log.warning("input folder %s cannot be opened as a whole (%s); opening its %d "
                    "entries one by one", path, exc, len(children))
        return [item for child in children
                for item in _open_isolated(child, chunk_s, plan, depth + 1)]
    return [(src, _reopen_path(src.label, path)) for src in inputs.sources]


def _stream_span(s) -> tuple[int, int] | None:
    end = s.end_ns()
    return (s.t0_ns, end) if s.t0_ns is not None and end is not None else None


def _longest_pause_s(spans: list[tuple[int, int]]) -> float:
    """Longest gap between the union of [t0, end) spans."""
    longest, reach = 0, None
    for t0, end in sorted(spans):
        if reach is not None and t0 > reach:
            longest = max(longest, t0 - reach)
        reach = end if reach is None else max(reach, end)
    return longest / 1e9


def plan_nodes(paths: list[str], chunk_s: float = 1.0) -> FleetPlan:
    """One NodeJob per node found in the inputs' headers (no samples read)."""
    plan = FleetPlan()
    node_paths: dict[str, set[str]] = {}
    spans: dict[str, list[tuple[int, int]]] = {}
    data: dict[str, dict[str, float]] = {}  # node -> reopen path -> its longest stream (s)
    for path in map(os.fspath, paths):
        for src, reopen in _open_isolated(path, chunk_s, plan):
            for s in src.streams:
                node_paths.setdefault(s.node, set()).add(reopen)
                span = _stream_span(s)
                if span is not None:
                    spans.setdefault(s.node, []).append(span)
                    seconds = (span[1] - span[0]) / 1e9
                    per_path = data.setdefault(s.node, {})
                    per_path[reopen] = max(per_path.get(reopen, 0.0), seconds)
    jobs = [NodeJob(node, tuple(sorted(p)), sum(data.get(node, {}).values()),
                    _longest_pause_s(spans.get(node, [])))
            for node, p in node_paths.items()]
    # largest first: the long nodes start early and the tail of the run is short
    plan.jobs = sorted(jobs, key=lambda j: (-j.data_s, j.node))
    return plan
