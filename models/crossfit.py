"""Cross-fitted calibration: every training group is trained on, and every one is
calibrated on, but never by the same model (torch via models/train.py).

    table = crossfit_calibrate(cfg, prep, "run/model.onnx", "run/crossfit")

Holding validation groups out ([calibration] method = "holdout") costs the model
their windows: the calibrated har_imu scored 1.5 points below the bundled one.
Cross-fitting instead splits the training groups (whole split keys, or event
groups with ``val_by = "event"``) into ``folds`` folds and trains one extra model
per fold without it, with the same recipe and seed. Each fold model's exported
bundle scores its own held-out fold through the runtime's ``Fuser`` once per
subset of the window's modalities (route_calibration.route_logits), so every
training window contributes out-of-fold logits to the route it would take in the
field. The pooled logits fit each route's temperature and threshold
(calibration.fit_route_calibration), which are written into the final model: the
one trained on every group. The temperature and threshold are properties of the
recipe's confidence on unseen groups, which the fold models share with the final
model (measured in models/README.md, Calibration: the bundled har_imu, trained
before this existed, calibrated this way keeps its accuracy and meets the ECE of
a model calibrated on held-out subjects).

Costs ``folds`` extra trainings; the fold models stay in ``work_dir`` (fold<k>/,
each with its summary.json naming the groups it did not see).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from edgefuse.models.config import RunConfig
from edgefuse.models.prepare import Prepared
from edgefuse.models.route_calibration import route_logits, write_calibration
from edgefuse.models.splits import Split, day_site_keys
from edgefuse.runtime.core.errors import ConfigError
from edgefuse.runtime.core.inference import OnnxModel

log = logging.getLogger(__name__)


def group_keys(prep: Prepared, by: str) -> np.ndarray:
    """Per window, the group a fold holds out whole: its split key (node, subject,
    day-site, labels column) or, by "event", its event group."""
    ws = prep.ws
    if by == "event":
        return np.asarray(ws.meta["group"]).astype(str)
    if prep.split_column == "day_site":
        return np.asarray(day_site_keys(ws)).astype(str)
    return np.asarray(ws.meta[prep.split_column]).astype(str)


def fold_groups(groups: list[str], folds: int, seed: int) -> list[tuple[str, ...]]:
    """The training groups dealt into min(folds, len(groups)) folds in an order drawn by
    ``seed`` from the sorted groups: the same config gives the same folds."""
    uniq = sorted(set(groups))
    if len(uniq) < 2:
        raise ConfigError(f"cross-fit calibration needs at least 2 training groups; found "
                          f"{uniq}: give more recordings, or set [calibration] method = "
                          "\"holdout\" with [data] val, or enabled = false")
    k = min(folds, len(uniq))
    order = np.random.default_rng(seed).permutation(len(uniq))
    return [tuple(sorted(uniq[i] for i in order[f::k])) for f in range(k)]


def planned_folds(cfg: RunConfig, prep: Prepared) -> list[tuple[str, ...]]:
    """The folds cross-fit will hold out, checked before any training: at least 2
    training groups, and every fold leaves 2 or more training windows."""
    keys = group_keys(prep, cfg.calibration.val_by)
    train_keys = keys[prep.split.train]
    folds = fold_groups(train_keys.tolist(), cfg.calibration.folds, cfg.train.seed)
    for k, held in enumerate(folds):
        if int(np.sum(~np.isin(train_keys, held))) < 2:
            raise ConfigError(f"cross-fit fold {k + 1} holds out {list(held)} and leaves fewer "
                              "than 2 training windows; give more recordings or use fewer "
                              "[calibration] folds")
    return folds


def fold_logits(cfg: RunConfig, prep: Prepared, work_dir: str,
                max_seconds: float | None = None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], list]:
    """(route -> pooled out-of-fold (logits, labels, ws rows), the folds' groups)."""
    from edgefuse.models.train import train     # torch: imported when a run needs it
    keys = group_keys(prep, cfg.calibration.val_by)
    train_rows = prep.split.train
    folds = planned_folds(cfg, prep)
    stale = sorted(set(os.listdir(work_dir)) - {f"fold{k}" for k in range(len(folds))}
                   ) if os.path.isdir(work_dir) else []
    if stale:
        log.warning("%s holds %s from an earlier run; they are not part of this "
                    "calibration", work_dir, stale)
    fold_cfg = dataclasses.replace(cfg, calibration=dataclasses.replace(
        cfg.calibration, enabled=False))
    pooled: dict[str, list[list[np.ndarray]]] = {}
    for k, held in enumerate(folds):
        out = np.isin(keys[train_rows], held)
        split = Split(train_rows[~out], train_rows[out], prep.split.test,
                      prep.split.test_keys, held)
        log.info("cross-fit fold %d/%d: training without %s (%d of %d training windows "
                 "held out)", k + 1, len(folds), list(held), int(out.sum()), train_rows.size)
        result = train(fold_cfg, out_dir=os.path.join(work_dir, f"fold{k}"),
                       max_seconds=max_seconds, prepared=dataclasses.replace(prep, split=split))
        for route, parts in route_logits(OnnxModel.load(result.model), prep.ws,
                                         split.val).items():
            for store, part in zip(pooled.setdefault(route, [[], [], []]), parts):
                store.append(part)
    data = {route: tuple(np.concatenate(p) for p in parts)  # type: ignore[misc]
            for route, parts in sorted(pooled.items())}
    return data, folds   # type: ignore[return-value]


def crossfit_calibrate(cfg: RunConfig, prep: Prepared, model_path: str, work_dir: str,
                       max_seconds: float | None = None) -> dict:
    """Fit the routes of model_path on out-of-fold windows and write them into it (and
    its fallbacks); returns what summary.json keeps. ``max_seconds``: per fold model."""
    c = cfg.calibration
    data, folds = fold_logits(cfg, prep, work_dir, max_seconds)
    if not data:
        raise ConfigError("cross-fit calibration: the fold models scored no window; every "
                          "training window lacks every modality?")
    out = write_calibration(model_path, data, group_keys(prep, c.val_by), c.target_risk,
                            c.delta)
    return {"method": "cross-fit", "folds": [list(f) for f in folds],
            "val": sorted(g for f in folds for g in f),
            "val_windows": int(prep.split.train.size), **out}
