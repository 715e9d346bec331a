"""Window datasets cut by the runtime's own aligner (numpy only, no torch).

Every labelled segment (models/segments.py) is replayed as chunks through
``edgefuse.runtime.core.aligner.Aligner`` - the path serving uses - so training
windows have exactly the grid, resampling, anti-aliasing and missing-modality
decisions (gap, flatline, stuck, clipped) of the field. The chunks come from
the readers replay uses (``WavSpan.chunks``) in replay's order
(``merge_chunks``): a pass cut here at ``GridConfig.chunk_s`` gives the windows
``edgefuse replay --chunk-s`` gives, bit for bit
(tests/test_training_equals_serving.py). Each window then gets its detection
label from the GPS distance (models/labels.py).

The result is a ``WindowSet``: one float32 array per modality [N, channels,
samples], the modality mask [N, M], labels and group columns (site, date,
node, group = event id). It is cached as a compressed .npz (no pickle) under
``~/.cache/edgefuse/datasets`` keyed by the data pack manifest and the config.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from edgefuse.models.labels import (DETECTION_LABELS, IGNORE, LabelRule, detection_labels,
                                    window_distance)
from edgefuse.models.segments import Segment, load_segments
from edgefuse.runtime.core.aligner import Aligner, AlignerConfig
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.contract import ModalitySpec, ModelContract
from edgefuse.runtime.core.errors import InputError
from edgefuse.runtime.core.window import Window
from edgefuse.sensors.readers.inputs import merge_chunks

log = logging.getLogger(__name__)

CACHE_FORMAT = 1     # layout of the cached .npz (WindowSet.save / load)
# What the windows are cut from, part of every cache key: bump it when the same
# data and settings give other windows, so an old cache is never reused.
# 2: samples and times from the serving readers (exact t0, no float seconds).
WINDOWS_VERSION = 2


@dataclass(frozen=True)
class GridConfig:
    """The model's sample grid: what the contract will say (rates even, 1 s / 0.5 s)."""

    window_ns: int = 1_000_000_000
    hop_ns: int = 500_000_000
    rates_hz: tuple[tuple[str, float], ...] = (("acoustic", 4934.0), ("seismic", 800.0))
    # Replay chunk length. The aligner gives the same windows for any chunking up
    # to float32 rounding (~1e-6 relative); bit for bit only for the same chunk_s.
    chunk_s: float = 0.25

    def contract(self, labels: tuple[str, ...] = DETECTION_LABELS) -> ModelContract:
        mods = tuple(ModalitySpec(name, 1, rate, name) for name, rate in self.rates_hz)
        return ModelContract("dataset-grid", "0", mods, self.window_ns, self.hop_ns, labels,
                             "modality_mask", "scores", "logits")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.rates_hz)


@dataclass
class WindowSet:
    """Labelled windows. x[m]: float32 [N, 1, samples]; mask: float32 [N, M] in the order
    of ``modalities``; label: int64 [N]; string columns in ``meta``; numbers in ``num``."""

    modalities: tuple[str, ...]
    x: dict[str, np.ndarray]
    mask: np.ndarray
    label: np.ndarray
    meta: dict[str, np.ndarray]          # site, date, node, group, kind, target (unicode)
    num: dict[str, np.ndarray] = field(default_factory=dict)  # start_ns, dmin_m
    reasons: dict[str, np.ndarray] = field(default_factory=dict)  # per modality, "" = present
    info: dict = field(default_factory=dict)   # JSON-able facts of the build (label report)

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def subset(self, idx: np.ndarray) -> "WindowSet":
        return WindowSet(self.modalities, {m: v[idx] for m, v in self.x.items()},
                         self.mask[idx], self.label[idx],
                         {k: v[idx] for k, v in self.meta.items()},
                         {k: v[idx] for k, v in self.num.items()},
                         {k: v[idx] for k, v in self.reasons.items()}, dict(self.info))

    def save(self, path: str) -> None:
        arrays = {"format": np.array(CACHE_FORMAT), "modalities": np.array(self.modalities),
                  "mask": self.mask, "label": self.label}
        arrays.update({f"x_{m}": v for m, v in self.x.items()})
        arrays.update({f"meta_{k}": v for k, v in self.meta.items()})
        arrays.update({f"num_{k}": v for k, v in self.num.items()})
        arrays.update({f"reason_{k}": v for k, v in self.reasons.items()})
        if self.info:
            arrays["info_json"] = np.array(json.dumps(self.info, sort_keys=True))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "WindowSet":
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != CACHE_FORMAT:
                raise InputError(f"{path}: dataset cache format {int(z['format'])}, expected "
                                 f"{CACHE_FORMAT}; delete the file to rebuild it", path=path)
            mods = tuple(str(m) for m in z["modalities"])
            pick = lambda prefix: {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}
            info = json.loads(str(z["info_json"])) if "info_json" in z.files else {}
            return cls(mods, pick("x_"), z["mask"], z["label"], pick("meta_"), pick("num_"),
                       pick("reason_"), info)


SEQ_HOLE = 1000  # seq numbers skipped between the pieces of a segment


def segment_chunks(seg: Segment, chunk_s: float) -> Iterator[Chunk]:
    """The chunks of a segment's pieces (the readers' WavSpan.chunks) in replay's order.

    A hole in seq between the pieces of one modality: the time between them is a
    silence (lost data), not a clock step, which is what consecutive seqs would
    claim. A pass has one piece per modality, so its chunks are replay's.
    """
    pieces: list[list[Chunk]] = []
    next_seq: dict[str, int] = {}
    for piece in seg.pieces:
        seq0 = next_seq.get(piece.modality, -SEQ_HOLE) + SEQ_HOLE
        pieces.append(list(piece.chunks(chunk_s, seq0)))
        next_seq[piece.modality] = seq0 + len(pieces[-1])
    return merge_chunks(pieces)


def align_chunks(chunks: Iterable[Chunk], contract: ModelContract,
                 aligner_config: AlignerConfig | None = None) -> list[Window]:
    """Every window a fresh Aligner cuts from `chunks` (then flushed)."""
    aligner = Aligner(contract, aligner_config)
    windows = []
    for c in chunks:
        windows.extend(aligner.push(c))
    windows.extend(aligner.flush())
    return windows


def cut_segment(seg: Segment, grid: GridConfig, contract: ModelContract,
                aligner_config: AlignerConfig | None = None) -> list[Window]:
    """Replay one segment through a fresh Aligner; returns its windows."""
    return align_chunks(segment_chunks(seg, grid.chunk_s), contract, aligner_config)


@dataclass
class Labelled:
    """What a labeller says about a unit's windows (one entry per window)."""

    codes: np.ndarray                                          # int64, IGNORE = left out
    num: dict[str, np.ndarray] = field(default_factory=dict)   # numeric columns
    meta: dict[str, np.ndarray] = field(default_factory=dict)  # string columns


@dataclass
class Unit:
    """One stretch of recording that one fresh Aligner cuts: a goodvibes segment, an
    sp-sw-har execution, one node of a user's recordings.

    meta: the string columns every window of the unit gets (node, group, ...);
    chunks: a callable giving its chunks in replay's order; label: (start_ns[],
    end_ns[]) of every window cut -> Labelled."""

    meta: dict[str, str]
    chunks: Callable[[], Iterable[Chunk]]
    label: Callable[[np.ndarray, np.ndarray], Labelled]


def build_windows(units: Iterable[Unit], contract: ModelContract,
                  aligner_config: AlignerConfig | None = None, source: str = "") -> WindowSet:
    """The one windows-and-labels path: cut every unit with a fresh Aligner (as replay
    does), label its windows, keep those not IGNOREd. Columns: the units' meta, the
    labellers' meta and num, and start_ns."""
    mods = contract.modality_names
    xs: dict[str, list] = {m: [] for m in mods}
    reasons: dict[str, list] = {m: [] for m in mods}
    masks: list[list[float]] = []
    labels: list[int] = []
    meta: dict[str, list] = {}
    num: dict[str, list] = {"start_ns": []}
    for unit in units:
        wins = align_chunks(unit.chunks(), contract, aligner_config)
        if not wins:
            continue
        start = np.array([w.start_ns for w in wins], np.int64)
        end = np.array([w.end_ns for w in wins], np.int64)
        lab = unit.label(start, end)
        keep = np.flatnonzero(lab.codes != IGNORE)
        for i in keep:
            w = wins[i]
            for m in mods:
                xs[m].append(w.data[m])
                reasons[m].append("" if w.present[m] else w.missing_reason.get(m, ""))
            masks.append([1.0 if w.present[m] else 0.0 for m in mods])
        labels.extend(int(y) for y in lab.codes[keep])
        num["start_ns"].extend(int(t) for t in start[keep])
        for k, v in lab.num.items():
            num.setdefault(k, []).extend(v[keep].tolist())
        for k, v in unit.meta.items():
            meta.setdefault(k, []).extend([v] * keep.size)
        for k, v in lab.meta.items():
            meta.setdefault(k, []).extend(v[keep].tolist())
    if not labels:
        raise InputError(f"no labelled window could be cut from {source!r}", path=source)
    return WindowSet(
        mods, {m: np.stack(xs[m]).astype(np.float32) for m in mods},
        np.array(masks, np.float32), np.array(labels, np.int64),
        {k: np.array(v) for k, v in meta.items()},
        {k: np.array(v, np.int64 if k == "start_ns" else np.float64) for k, v in num.items()},
        {m: np.array(reasons[m]) for m in mods})


def segment_units(segments: Iterable[Segment], grid: GridConfig, rule: LabelRule
                  ) -> Iterator[Unit]:
    """goodvibes: one unit per segment, labelled by the GPS distance (labels.py)."""
    for seg in segments:
        def label(start: np.ndarray, end: np.ndarray, seg: Segment = seg) -> Labelled:
            dmin, _ = window_distance(seg.track, start, end, rule)
            return Labelled(detection_labels(dmin, None, rule, seg.background_without_gps),
                            {"dmin_m": dmin})
        yield Unit({"site": seg.site, "date": seg.date, "node": seg.node, "group": seg.group,
                    "kind": seg.kind, "target": seg.target},
                   lambda seg=seg: segment_chunks(seg, grid.chunk_s), label)


def build_windowset(data_dir: str, grid: GridConfig = GridConfig(),
                    rule: LabelRule = LabelRule(),
                    aligner_config: AlignerConfig | None = None) -> WindowSet:
    """Cut and label every goodvibes segment under data_dir; IGNORE windows are dropped."""
    segments, _ = load_segments(data_dir)
    ws = build_windows(segment_units(segments, grid, rule), grid.contract(), aligner_config,
                       data_dir)
    log.info("built %d windows (%d vehicle) from %s", len(ws), int((ws.label == 1).sum()),
             data_dir)
    return ws


def cache_dir() -> str:
    return os.environ.get("EDGEFUSE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "edgefuse", "datasets")


def cache_key(data_dir: str, grid: GridConfig, rule: LabelRule,
              aligner_config: AlignerConfig | None) -> str:
    h = hashlib.sha256()
    manifest = os.path.join(data_dir, "MANIFEST.sha256")
    if os.path.exists(manifest):
        with open(manifest, "rb") as f:
            h.update(f.read())
    else:
        h.update(os.path.abspath(data_dir).encode())
    cfg = {"format": CACHE_FORMAT, "windows": WINDOWS_VERSION, "grid": asdict(grid),
           "rule": asdict(rule), "aligner": asdict(aligner_config or AlignerConfig())}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    return h.hexdigest()[:16]


def load_or_build(data_dir: str, grid: GridConfig = GridConfig(), rule: LabelRule = LabelRule(),
                  aligner_config: AlignerConfig | None = None,
                  cache: str | None = None) -> WindowSet:
    """The cached WindowSet for these settings, built on first use."""
    path = os.path.join(cache or cache_dir(),
                        f"goodvibes-{cache_key(data_dir, grid, rule, aligner_config)}.npz")
    if os.path.exists(path):
        return WindowSet.load(path)
    ws = build_windowset(data_dir, grid, rule, aligner_config)
    ws.save(path)
    return ws
