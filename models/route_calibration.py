"""Per-route calibration of an exported model: fitted on validation windows after
training, measured per condition by evaluate (numpy, onnxruntime; no torch).

    table = calibrate_model("run/model.onnx", ws, split.val)   # writes it into the files
    row.update(condition_calibration(model, ws, idx, present))  # evaluate, one condition

Both score windows with the exported ONNX bundle through the runtime's own
``Fuser``, so a window takes the route (main model, fallback file, masked main
model) and the calibration key it takes in the field, and a threshold splits the
windows as the runtime's comparison does. Fitting: every validation window is
scored once per non-empty subset of its present modalities (the ways a missing
modality could leave it), ``Fuser.logits`` names the route, and
``calibration.fit_route_calibration`` fits each route's temperature and threshold
(the masked routes also pooled under "masked", for subsets no window showed).
The statistics are in models/calibration.py.
"""
from __future__ import annotations

import itertools
import logging
import os
from typing import Sequence

import numpy as np

from edgefuse.models import calibration as cal
from edgefuse.models.calibrators import compare_calibrators
from edgefuse.models.dataset import WindowSet
from edgefuse.runtime.core.contract import ROUTE_MASKED
from edgefuse.runtime.core.decision import Decision
from edgefuse.runtime.core.fusion import Fuser
from edgefuse.runtime.core.inference import OnnxModel
from edgefuse.runtime.core.window import Window

log = logging.getLogger(__name__)

BLOCK = 2048   # windows built and scored at a time (bounds memory on large sets)


def windows(ws: WindowSet, idx: np.ndarray, present: np.ndarray) -> list[Window]:
    """Runtime windows of ws rows idx with the presence matrix present [len(idx), M]
    (a window's ``index`` is its row in idx)."""
    out = []
    for row, i in enumerate(idx):
        pres = {m: bool(present[row, j]) for j, m in enumerate(ws.modalities)}
        out.append(Window(str(ws.meta["node"][i]), row, int(ws.num["start_ns"][i]),
                          int(ws.num["start_ns"][i]) + 1, {m: ws.x[m][i] for m in ws.modalities},
                          pres, {m: "evaluation" for m, p in pres.items() if not p},
                          {m: 1.0 if p else 0.0 for m, p in pres.items()}))
    return out


def decide(fuser: Fuser, ws: WindowSet, idx: np.ndarray, present: np.ndarray
           ) -> list[Decision]:
    """fuser's decisions on the windows, in idx order."""
    out: list[Decision] = []
    for lo in range(0, idx.size, BLOCK):
        out += fuser.decide(windows(ws, idx[lo:lo + BLOCK], present[lo:lo + BLOCK]))
    return out


def route_logits(model: OnnxModel, ws: WindowSet, idx: np.ndarray
                 ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """route key -> (uncalibrated logits [n, K], labels [n], ws rows [n]) of the windows
    idx scored with every non-empty subset of their present modalities."""
    fuser = Fuser(model, abstain_below=0.0, calibrate=False, max_batch=256)
    base = ws.mask[idx] > 0
    m = len(ws.modalities)
    got: dict[str, tuple[list, list]] = {}
    for bits in itertools.product((False, True), repeat=m):
        subset = np.array(bits)
        if not subset.any():
            continue
        rows = idx[(base | ~subset).all(axis=1)]      # windows holding every modality of it
        present = np.broadcast_to(subset, (rows.size, m))
        for lo in range(0, rows.size, BLOCK):
            part = rows[lo:lo + BLOCK]
            for (key, z), i in zip(fuser.logits(windows(ws, part, present[:part.size])), part):
                if key is not None:
                    got.setdefault(key, ([], []))[0].append(z)
                    got[key][1].append(i)
    out = {}
    for key, (zs, rows) in sorted(got.items()):
        r = np.array(rows, np.int64)
        out[key] = (np.stack(zs), ws.label[r], r)
    masked = [k for k in out if k.startswith(ROUTE_MASKED + ":")]
    if masked:   # the fallback of masked subsets without an entry of their own
        out[ROUTE_MASKED] = tuple(np.concatenate([out[k][j] for k in masked])  # type: ignore
                                  for j in range(3))
    return out


def calibrate_model(model_path: str | os.PathLike, ws: WindowSet, idx: np.ndarray,
                    group_keys: np.ndarray | None = None,
                    target_risk: float = cal.TARGET_RISK, delta: float = cal.DELTA) -> dict:
    """Fit every route on the windows idx as model_path scores them, write the table into
    model_path and its fallbacks and return what summary.json keeps (``write_calibration``)."""
    data = route_logits(OnnxModel.load(model_path), ws, idx)
    return write_calibration(model_path, data, group_keys, target_risk, delta)


def write_calibration(model_path: str | os.PathLike,
                      data: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                      group_keys: np.ndarray | None = None,
                      target_risk: float = cal.TARGET_RISK, delta: float = cal.DELTA) -> dict:
    """Fit every route of ``data`` (route_logits' form: logits, labels, ws rows), write the
    table into model_path and its fallbacks (exporters.calibrate.set_calibration) and
    return what summary.json keeps: routes (the contract entries), calibrators (ECE and
    NLL of none / temperature / vector scaling, each fitted on one half of the groups and
    measured on the other, where the route has windows of two groups or more)."""
    from edgefuse.exporters.calibrate import set_calibration   # onnx: the train extra
    table = cal.fit_route_calibration({k: (z, y) for k, (z, y, _) in data.items()},
                                      target_risk, delta)
    set_calibration(model_path, table)
    compared = {}
    for key, (z, y, rows) in data.items():
        groups = None if group_keys is None else np.asarray(group_keys)[rows]
        if groups is not None and np.unique(groups).size >= 2:
            compared[key] = compare_calibrators(z, y, groups=groups)
    for key, e in table.items():
        log.info("route %s: %d validation windows, temperature %.3f, threshold %.4f keeps "
                 "%.1f %% at risk %.4f (bound %.4f <= %g)", key, e["n"], e["temperature"],
                 e["threshold"], 100 * e["coverage"], e["val_risk"], e["risk_bound"],
                 e["target_risk"])
    return {"routes": table, "calibrators": compared, "target_risk": target_risk,
            "delta": delta}


def _scores(decisions: Sequence[Decision], labels: Sequence[str]) -> np.ndarray:
    return np.array([[d.scores[lab] for lab in labels] for d in decisions], np.float64
                    ).reshape(len(decisions), len(labels))


def condition_calibration(model: OnnxModel, ws: WindowSet, idx: np.ndarray,
                          present: np.ndarray, abstain_all: bool = False,
                          target_risk: float = cal.TARGET_RISK) -> tuple[np.ndarray, dict]:
    """(predicted label per window, -1 where no modality is present; the calibration
    report of the condition). The report is calibration.condition_report on the scored
    windows (ece with the contract's calibration, ece_uncalibrated without it, floors,
    aurc, coverage_at_risk, reliability, risk-coverage) plus what the runtime decides
    with the model's own thresholds: ``decided`` (share of all windows) and
    ``risk_decided`` (error among them), and per route key the windows abstained on
    (``abstained_by_route``) and the threshold applied (``thresholds``; None: never)."""
    labels = list(model.contract.labels)
    raw = decide(Fuser(model, abstain_below=0.0, calibrate=False, max_batch=256), ws, idx,
                 present)
    fuser = Fuser(model, abstain_all=abstain_all, max_batch=256)
    fitted = decide(fuser, ws, idx, present)
    pred = np.array([labels.index(d.label) if d.label is not None else -1 for d in raw],
                    np.int64)
    scored = np.array([d.route is not None for d in fitted], bool)
    y = ws.label[idx]
    if not scored.any():
        return pred, {"decided": 0.0, "risk_decided": None, "ece": None}
    report = cal.condition_report(y[scored], _scores([d for d, s in zip(fitted, scored) if s],
                                                     labels),
                                  _scores([d for d, s in zip(raw, scored) if s], labels),
                                  target_risk=target_risk)
    report["n_scored"] = report.pop("n")
    decided = np.array([d.label is not None for d in fitted], bool)
    right = np.array([d.label is not None and labels.index(d.label) == t
                      for d, t in zip(fitted, y)], bool)
    report["decided"] = float(decided.mean())
    report["risk_decided"] = float(1.0 - right[decided].mean()) if decided.any() else None
    by_route: dict[str, int] = {}
    thresholds: dict[str, float | None] = {}
    for d in fitted:
        if d.route is None:
            continue
        r = fuser.route(d.used)
        thresholds[r.key] = r.threshold
        if d.label is None:
            by_route[r.key] = by_route.get(r.key, 0) + 1
    report["abstained_by_route"], report["thresholds"] = by_route, thresholds
    return pred, report
