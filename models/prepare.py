"""The labelled windows and split a train config asks for (numpy only, no torch).

- a user's own recordings ([contract] in the config): every node of the
  recordings labelled from the intervals file (models/recordings.py), split by
  the [data] group (node or a labels-file column);
- ``goodvibes``: vehicle detection, acoustic + seismic, split by day-site;
- ``sphar``: activity recognition, phone + watch IMU, split by subject.
All three are cut by the one windows-and-labels path (``dataset.build_windows``);
``Prepared.contract`` is the grid they were cut on and what the export writes.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgefuse.models.config import RunConfig
from edgefuse.models.dataset import GridConfig, WindowSet, load_or_build
from edgefuse.models.labels import DETECTION_LABELS
from edgefuse.models.segments import default_data_dir
from edgefuse.models.splits import (Split, check_no_leakage, day_site_keys, default_val_keys,
                                    hold_out_events, split_by_column, split_by_day_site)
from edgefuse.runtime.core.contract import ModelContract
from edgefuse.runtime.core.errors import ConfigError

log = logging.getLogger(__name__)

DATASET_NAMES = {"detection": "gv-detect", "activity": "har-imu"}
DATASET_DESCRIPTIONS = {
    "detection": "goodvibes vehicle detection (background vs vehicle within 25 m) from "
                 "acoustic + seismic, trained by edgefuse.models.train",
    "activity": "sp-sw-har activity recognition from phone + watch IMU (acc + gyro), "
                "trained by edgefuse.models.train",
}


def dataset_contract(task: str, grid_contract: ModelContract) -> ModelContract:
    """The exported contract of a bundled-dataset run (name and text by task)."""
    return ModelContract(DATASET_NAMES.get(task, "edgefuse-model"), "0.1.0", grid_contract.modalities,
                         grid_contract.window_ns, grid_contract.hop_ns, grid_contract.labels,
                         "modality_mask", "scores", "logits",
                         description=DATASET_DESCRIPTIONS.get(task, ""))


def resolve_data_dir(path: str) -> str:
    path = path or default_data_dir() or ""
    if not path or not os.path.isdir(path):
        raise ConfigError(f"data.path {path!r} is not a folder and ../shared/data was not "
                          "found; set [data] path to the data pack root")
    return path


def _split(cfg: RunConfig, ws: WindowSet, column: str, usable: np.ndarray,
           make: Callable[[tuple[str, ...]], Split]) -> Split:
    """make([data] val), or, with none named and calibration on, the default share of
    the training groups as validation: whole split keys, or whole event groups
    ([calibration] val_by = "event")."""
    cal = cfg.calibration
    if cfg.data.val or not cal.enabled or cal.val_fraction <= 0 or cal.method == "cross-fit":
        return make(tuple(cfg.data.val))
    if cal.val_by == "event":
        split = make(())
        events = default_val_keys(ws.meta["group"], split.train, cal.val_fraction,
                                  cfg.train.seed)
        split = hold_out_events(ws, split, events)
        check_no_leakage(ws, split, events_in_val=True, column=column)
        val = events
    else:
        keys = day_site_keys(ws) if column == "day_site" else ws.meta[column].astype(str)
        train = np.flatnonzero(usable & ~np.isin(keys, list(cfg.data.test)))
        val = default_val_keys(keys, train, cal.val_fraction, cfg.train.seed)
        split = make(val)
    if val:
        log.info("validation (for calibration; [data] val is empty, so %g of the training "
                 "%s, seed %d): %s", cal.val_fraction,
                 "event groups" if cal.val_by == "event" else "groups", cfg.train.seed,
                 list(val))
    else:
        log.warning("too few training groups to hold any out for calibration: the model "
                    "will be exported uncalibrated; name validation groups in [data] val")
    return split


@dataclass(frozen=True)
class Prepared:
    ws: WindowSet
    split: Split
    contract: ModelContract    # what the export writes (the aligner's grid)
    split_column: str          # "day_site", "subject", or the [data] group
    task: str                  # "detection", "activity" or "classification"
    dataset: str               # "goodvibes", "sphar" or "recordings"


def prepare(cfg: RunConfig) -> Prepared:
    if cfg.on_recordings:
        from edgefuse.models.recordings import RecordingSet, load_or_build_recordings
        d = cfg.data
        ws = load_or_build_recordings(RecordingSet(d.recordings, d.labels, d.group, d.chunk_s),
                                      cfg.contract, cfg.labels)
        usable = ws.mask.sum(axis=1) > 0
        split = _split(cfg, ws, d.group, usable,
                       lambda val: split_by_column(ws, d.group, d.test, val, usable))
        return Prepared(ws, split, cfg.contract, d.group, "classification", "recordings")
    path = resolve_data_dir(cfg.data.path)
    if cfg.data.dataset == "sphar":
        from edgefuse.models.har import ACTIVITIES, HarGrid, load_or_build_har
        hgrid = HarGrid()
        ws = load_or_build_har(path, hgrid)
        usable = ws.mask.sum(axis=1) > 0
        split = _split(cfg, ws, "subject", usable,
                       lambda val: split_by_column(ws, "subject", cfg.data.test, val, usable))
        return Prepared(ws, split, dataset_contract("activity", hgrid.contract(ACTIVITIES)),
                        "subject", "activity", "sphar")
    grid = GridConfig()
    ws = load_or_build(path, grid, cfg.labels)
    usable = ws.mask.sum(axis=1) > 0    # the runtime abstains on windows with no modality
    split = _split(cfg, ws, "day_site", usable,
                   lambda val: split_by_day_site(ws, cfg.data.test, val, usable))
    return Prepared(ws, split, dataset_contract("detection", grid.contract(DETECTION_LABELS)),
                    "day_site", "detection", "goodvibes")
