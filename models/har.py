"""Activity windows of the sp-sw-har phone + watch IMU recordings (numpy only, no torch).

Each execution (one subject walking through a fixed sequence of activities
with a phone and a watch) is one node with two 6-channel streams,
``imu_phone`` and ``imu_watch``. The CSVs are read by the reader replay uses
(``edgefuse.sensors.readers.sphar``: ``Execution.sources`` gives replay's
sources, chunks with ``rate_hz=None`` because the timestamps are irregular;
``Execution.activity_rows`` the labels), merged by replay's ``InputSet`` and
cut by the runtime's ``Aligner`` (rate estimated from the chunk times,
anti-aliased, resampled onto the model grid): training windows are what
``edgefuse replay`` cuts, bit for bit (tests/test_training_equals_serving.py).

Grid (``HarGrid``): 50 Hz, 1 s windows, 0.5 s hop. 50 Hz keeps every
body-motion component (human activity is below ~20 Hz; 50 Hz is the usual
HAR rate, e.g. UCI-HAR) at half the samples of the ~100 Hz sensors. The
window is short because the activities are: per file, SEATED, STANDING_UP
and SITTING_DOWN last ~1.3-1.5 s and TURNING ~2.4 s on average (row counts
of the data README / 350 files / 100 Hz). Measured on the whole pack: 2 s
windows have a mean majority share (purity) of 0.71 (30 % of windows >= 0.8
pure, SEATED almost gone: 73 windows); 1 s windows 0.85 (63 % >= 0.8, 220
SEATED windows). 1 s still holds about one stride of walking.

Window label = the activity of the majority of the CSV rows (both devices,
device clocks) whose timestamp falls in the window; ties go to the
activity that comes first in ``ACTIVITIES``. ``purity`` (share of the
majority) is stored per window for the report. Windows with no row are
dropped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from edgefuse.models.dataset import (CACHE_FORMAT, WINDOWS_VERSION, Labelled, Unit,
                                     WindowSet, align_chunks, build_windows, cache_dir)
from edgefuse.runtime.core.aligner import AlignerConfig
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.contract import ModalitySpec, ModelContract
from edgefuse.runtime.core.errors import InputError
from edgefuse.runtime.core.window import Window
from edgefuse.sensors.readers import sphar
from edgefuse.sensors.readers.inputs import InputSet

log = logging.getLogger(__name__)

ACTIVITIES = ("SEATED", "STANDING_UP", "WALKING", "TURNING", "SITTING_DOWN")
MODALITIES = ("imu_phone", "imu_watch")


@dataclass(frozen=True)
class HarGrid:
    rate_hz: float = 50.0
    window_ns: int = 1_000_000_000
    hop_ns: int = 500_000_000
    chunk_s: float = 1.0

    def contract(self, labels: tuple[str, ...] = ACTIVITIES) -> ModelContract:
        mods = tuple(ModalitySpec(m, sphar.CHANNELS, self.rate_hz, m) for m in MODALITIES)
        return ModelContract("har-grid", "0", mods, self.window_ns, self.hop_ns, labels,
                             "modality_mask", "scores", "logits")

    @property
    def rates_hz(self) -> tuple[tuple[str, float], ...]:
        return tuple((m, self.rate_hz) for m in MODALITIES)


def find_root(data_dir: str) -> str:
    """The sp-sw-har folder: data_dir itself or data_dir/sp-sw-har."""
    for cand in (os.path.join(data_dir, "sp-sw-har"), data_dir):
        if os.path.isdir(cand) and sphar.is_sphar(cand):
            return cand
    raise InputError(f"expected sp-sw-har data (s<NN>/ folders and executions_info.csv) in "
                     f"{data_dir!r} or its sp-sw-har/ subfolder; pass the data pack root",
                     path=data_dir)


def majority_labels(times_ns: np.ndarray, codes: np.ndarray, start_ns: np.ndarray,
                    end_ns: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(label, purity) per window [start, end): the most frequent code among the rows
    whose time falls inside (ties: lowest code); label -1 where no row falls inside."""
    order = np.argsort(times_ns, kind="stable")
    t, c = times_ns[order], codes[order]
    lo = np.searchsorted(t, start_ns, side="left")
    hi = np.searchsorted(t, end_ns, side="left")
    label = np.full(start_ns.shape, -1, np.int64)
    purity = np.zeros(start_ns.shape)
    for i, (a, b) in enumerate(zip(lo, hi)):
        if b > a:
            counts = np.bincount(c[a:b], minlength=n_classes)
            label[i] = int(np.argmax(counts))
            purity[i] = counts[label[i]] / (b - a)
    return label, purity


def cut_execution(execution: sphar.Execution, grid: HarGrid, contract: ModelContract,
                  aligner_config: AlignerConfig | None = None) -> list[Window]:
    """Replay one execution's CSVs through a fresh Aligner: replay's sources, merged by
    replay's InputSet."""
    return align_chunks(execution_chunks(execution, grid), contract, aligner_config)


def execution_chunks(execution: sphar.Execution, grid: HarGrid) -> Iterator[Chunk]:
    """One execution's chunks: replay's sources, merged by replay's InputSet."""
    return InputSet(execution.sources(grid.chunk_s)).chunks()


def execution_units(root: str, grid: HarGrid, unknown: list[int]) -> Iterator[Unit]:
    """sp-sw-har: one unit per execution, labelled by the majority of its CSV rows
    (``unknown`` counts the rows whose label is not an activity)."""
    code = {a: i for i, a in enumerate(ACTIVITIES)}
    for execution in sphar.find_executions(root):
        times, labs = execution.activity_rows()
        codes = np.array([code.get(x, -1) for x in labs], np.int64)
        unknown[0] += int((codes < 0).sum())

        def label(start: np.ndarray, end: np.ndarray, t=times[codes >= 0],
                  c=codes[codes >= 0]) -> Labelled:
            lab, pur = majority_labels(t, c, start, end, len(ACTIVITIES))
            target = np.array([ACTIVITIES[y] if y >= 0 else "" for y in lab])
            return Labelled(lab, {"purity": pur}, {"target": target})
        yield Unit({"subject": execution.subject, "group": execution.name,
                    "node": execution.name},
                   lambda ex=execution: execution_chunks(ex, grid), label)


def build_har_windowset(data_dir: str, grid: HarGrid = HarGrid(),
                        aligner_config: AlignerConfig | None = None) -> WindowSet:
    root = find_root(data_dir)
    unknown = [0]
    ws = build_windows(execution_units(root, grid, unknown), grid.contract(), aligner_config,
                       root)
    if unknown[0]:
        log.warning("%d CSV rows had a label outside %s and were not used", unknown[0],
                    ACTIVITIES)
    log.info("built %d HAR windows from %d executions in %s", len(ws),
             len(set(ws.meta["group"].tolist())), root)
    return ws


def load_or_build_har(data_dir: str, grid: HarGrid = HarGrid(),
                      aligner_config: AlignerConfig | None = None,
                      cache: str | None = None) -> WindowSet:
    """The cached HAR WindowSet for these settings (keyed by the CSV list and sizes)."""
    root = find_root(data_dir)
    h = hashlib.sha256()
    for p in sphar.find_csvs(root):
        h.update(f"{os.path.relpath(p, root)}:{os.path.getsize(p)}".encode())
    cfg = {"format": CACHE_FORMAT, "windows": WINDOWS_VERSION, "grid": asdict(grid),
           "aligner": asdict(aligner_config or AlignerConfig())}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    path = os.path.join(cache or cache_dir(), f"sphar-{h.hexdigest()[:16]}.npz")
    if os.path.exists(path):
        return WindowSet.load(path)
    ws = build_har_windowset(data_dir, grid, aligner_config)
    ws.save(path)
    return ws
