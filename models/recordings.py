"""Labelled windows of a user's own recordings (numpy only, no torch).

    ws = load_or_build_recordings(RecordingSet(("data/recordings",), "labels.csv"),
                                  contract, IntervalRule())

The recordings are anything ``edgefuse replay`` reads (``open_inputs``:
recording.toml manifests, folders of them, MCAP logs, the dataset layouts).
Each node is one unit of the one windows-and-labels path
(``dataset.build_windows``): its chunks, in replay's order, go through a fresh
``Aligner`` on the model's contract - the windows ``edgefuse replay`` cuts from
the same files with the same ``--chunk-s`` (tests/test_training_equals_serving.py)
- and its windows are labelled from the intervals file (models/intervals.py).

Window columns: ``node``, ``group`` (the split key: the node, or the value of a
labels-file column taken from the interval that overlaps the window most, else
the nearest interval of that node), that column under its own name, and
``target`` (the label's name). ``info`` holds the label report
(models/interval_labeller.py): intervals that label no window of their node
(outside every recording of it, inside one where no window was cut, or outvoted
in every window they touch), windows per outcome. Built sets are cached like the
dataset ones, keyed by every file's path, size and mtime and the settings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np

from edgefuse.models.dataset import (CACHE_FORMAT, WINDOWS_VERSION, Unit, WindowSet,
                                     align_chunks, build_windows, cache_dir)
from edgefuse.models.interval_labeller import IntervalLabeller, warn_about
from edgefuse.models.intervals import IntervalRule, read_intervals
from edgefuse.runtime.core.aligner import AlignerConfig
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.contract import ModelContract
from edgefuse.runtime.core.errors import ConfigError, EdgefuseError, ModalityMismatchError
from edgefuse.sensors.readers.inputs import InputSet, StreamInfo, open_inputs

log = logging.getLogger(__name__)

_REPORT_VERSION = 2  # keys of the label report kept in the cache (2: no_window, its cases)


@dataclass(frozen=True)
class RecordingSet:
    """Which recordings, which labels, which split key, which chunking."""

    paths: tuple[str, ...]
    labels: str
    group: str = "node"
    chunk_s: float = 1.0    # replay's default --chunk-s: training cuts replay's windows


def check_streams(streams: list[StreamInfo], contract: ModelContract, what: str,
                  error: type[EdgefuseError] = ConfigError) -> None:
    """Every modality of the contract is recorded with its channel count; modalities the
    contract lacks are left out with a warning."""
    have = sorted({s.modality for s in streams})
    want = list(contract.modality_names)
    absent = [m for m in want if m not in have]
    if absent:
        raise error(f"{what} modalities {want} do not match the recordings' {have}: "
                    f"{absent} not recorded; name the recorded modalities in {what} "
                    "or add recordings of them")
    for s in streams:
        if s.modality in want and s.channels != contract.modality(s.modality).channels:
            raise error(f"{s.source}: stream {s.node}/{s.modality} has {s.channels} "
                        f"channel(s), {what} says {contract.modality(s.modality).channels}; "
                        "make them agree")
    extra = [m for m in have if m not in want]
    if extra:
        log.warning("the recordings also hold %s, which %s does not take: left out", extra,
                    what)


def node_chunks(inputs: InputSet, node: str, modalities: tuple[str, ...]
                ) -> Callable[[], Iterator[Chunk]]:
    """The chunks of one node, as replay's InputSet merges them, of the given modalities
    (others would only be refused by the aligner, which keeps no state for them)."""
    sources = [s for s in inputs.sources if any(x.node == node for x in s.streams)]

    def chunks() -> Iterator[Chunk]:
        return (c for c in InputSet(sources).chunks()
                if c.node == node and c.modality in modalities)
    return chunks


def open_recordings(rec: RecordingSet, contract: ModelContract, what: str,
                    error: type[EdgefuseError] = ConfigError) -> InputSet:
    inputs = open_inputs(list(rec.paths), rec.chunk_s)
    check_streams(inputs.streams, contract, what, error)
    return inputs


def build_recordings_windowset(rec: RecordingSet, contract: ModelContract, rule: IntervalRule,
                               aligner_config: AlignerConfig | None = None,
                               what: str = "[contract]",
                               error: type[EdgefuseError] = ConfigError,
                               inputs: InputSet | None = None) -> WindowSet:
    """Cut every node of the recordings on the contract's grid and label its windows."""
    inputs = inputs or open_recordings(rec, contract, what, error)
    labeller = IntervalLabeller(read_intervals(rec.labels), contract.labels, rule, rec.group)
    nodes = sorted({s.node for s in inputs.streams})
    units = (Unit({"node": n}, node_chunks(inputs, n, contract.modality_names),
                  labeller.for_node(n)) for n in nodes)
    ws = build_windows(units, contract, aligner_config, ", ".join(rec.paths))
    ws.info = labeller.report(nodes, _spans(inputs))
    log.info("built %d windows of %d nodes from %s: %s", len(ws), len(nodes),
             list(rec.paths), ws.info["windows"])
    return ws


def _spans(inputs: InputSet) -> dict[str, tuple[int, int]]:
    """node -> (first sample, end of the last) over its streams whose headers say both."""
    out: dict[str, tuple[int, int]] = {}
    for s in inputs.streams:
        end = s.end_ns()
        if s.t0_ns is None or end is None:
            continue
        lo, hi = out.get(s.node, (s.t0_ns, end))
        out[s.node] = (min(lo, s.t0_ns), max(hi, end))
    return out


def _fingerprint(rec: RecordingSet, inputs: InputSet) -> list:
    """Path, size and mtime of every file the recordings read, and what they describe."""
    files = set()
    for p in rec.paths:
        files.add(os.path.abspath(p))
        if os.path.isdir(p):
            files.update(os.path.join(os.path.abspath(p), n) for n in os.listdir(p)
                         if n.endswith(".toml"))
    files.update(os.path.abspath(s.label) for s in inputs.sources)
    out = []
    for f in sorted(files):
        st = os.stat(f) if os.path.exists(f) else None
        out.append([f, st.st_size if st else -1, st.st_mtime_ns if st else -1])
    out.append([[list(asdict(x).values()) for x in s.streams] for s in inputs.sources])
    return out


def load_or_build_recordings(rec: RecordingSet, contract: ModelContract, rule: IntervalRule,
                             aligner_config: AlignerConfig | None = None,
                             cache: str | None = None, what: str = "[contract]",
                             error: type[EdgefuseError] = ConfigError,
                             other_nodes_level: int = logging.WARNING) -> WindowSet:
    """The cached labelled windows for these recordings, labels and settings."""
    inputs = open_recordings(rec, contract, what, error)
    st = os.stat(rec.labels) if os.path.exists(rec.labels) else None
    key = {"format": CACHE_FORMAT, "windows": WINDOWS_VERSION, "report": _REPORT_VERSION,
           "files": _fingerprint(rec, inputs),
           "labels": [os.path.abspath(rec.labels), st.st_size if st else -1,
                      st.st_mtime_ns if st else -1],
           "rule": rule.to_dict(), "group": rec.group, "chunk_s": rec.chunk_s,
           "grid": [contract.window_ns, contract.hop_ns, list(contract.labels),
                    [[m.name, m.channels, m.rate_hz] for m in contract.modalities]],
           "aligner": asdict(aligner_config or AlignerConfig())}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    path = os.path.join(cache or cache_dir(), f"recordings-{digest[:16]}.npz")
    if os.path.exists(path):
        ws = WindowSet.load(path)
    else:
        ws = build_recordings_windowset(rec, contract, rule, aligner_config, what, error,
                                        inputs)
        ws.save(path)
    warn_about(ws.info, other_nodes_level)
    return ws


def complete_windows(paths: list[str], contract: ModelContract, n: int, seed: int = 0,
                     chunk_s: float = 1.0) -> dict[str, np.ndarray]:
    """Up to n random windows with every modality present (no labels needed): the
    calibration set of int8-static from a user's recordings."""
    inputs = open_inputs(paths, chunk_s)
    check_streams(inputs.streams, contract, "the model", ModalityMismatchError)
    rng = np.random.default_rng(seed)
    kept: list[dict[str, np.ndarray]] = []
    seen = 0
    for node in sorted({s.node for s in inputs.streams}):
        for w in align_chunks(node_chunks(inputs, node, contract.modality_names)(), contract):
            if not all(w.present.values()):
                continue
            seen += 1      # reservoir sampling: memory stays at n windows
            if len(kept) < n:
                kept.append(w.data)
            else:
                j = int(rng.integers(0, seen))
                if j < n:
                    kept[j] = w.data
    if not kept:
        raise ConfigError(f"no window of {paths} has every modality of the model "
                          f"{list(contract.modality_names)} present; nothing to calibrate on")
    return {m: np.stack([d[m] for d in kept]).astype(np.float32)
            for m in contract.modality_names}
