"""Evaluate an exported edgefuse model on held-out windows with ONNX Runtime.

The model runs through the runtime's own loader and router (``OnnxModel`` +
``Fuser``): what is evaluated is what runs in the field, fallback models
included. Conditions:

- ``all``            every window as recorded (its own modality mask);
- ``without:<m>``    modality m removed from every window;
- ``degraded:<m>``   m removed from a seeded random half of the windows that have it.

Metrics per condition: accuracy, balanced accuracy (mean per-class recall; the
detection test sets are ~90 % background, so plain accuracy flatters), macro-F1,
the relative drop of each versus ``all`` and the confusion matrix ([true][predicted]
counts, label order). Windows with no modality left are abstentions; they count as
wrong, are reported (``abstained``) and are not in the matrix. These metrics take
the top label of every scored window (no threshold).

Calibration per condition (models/route_calibration.py): ``ece`` with the model's
calibration and ``ece_uncalibrated`` without it (15 bins), each beside its noise
floor (``ece_floor``: what a perfectly calibrated model with these scores would
measure on this many windows), ``aurc``, ``coverage_at_risk`` (empirical, at
``target_risk``), ``coverage_by_risk``, ``reliability``, ``risk_coverage`` and what
the runtime decides with the model's own thresholds: ``decided`` (share of the
windows) and ``risk_decided`` (error among them).
A user's own recordings are evaluated by models/evaluate_recordings.py.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgefuse.models.calibration import TARGET_RISK
from edgefuse.models.dataset import WindowSet
from edgefuse.models.route_calibration import condition_calibration, decide
from edgefuse.runtime.core.fusion import Fuser
from edgefuse.runtime.core.inference import OnnxModel

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """[true, pred] counts; predictions < 0 (abstentions) are left out of the matrix."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    ok = y_pred >= 0
    np.add.at(cm, (y_true[ok], y_pred[ok]), 1)
    return cm


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean F1 over the classes that occur in y_true or y_pred (as sklearn's default).
    Abstentions (y_pred < 0) count as misses of their true class."""
    cm = confusion(y_true, y_pred, n_classes)
    support = np.bincount(y_true, minlength=n_classes)
    predicted = cm.sum(axis=0)
    classes = [c for c in range(n_classes) if support[c] > 0 or predicted[c] > 0]
    f1s = []
    for c in classes:
        tp = cm[c, c]
        denom = support[c] + predicted[c]
        f1s.append(0.0 if denom == 0 else 2.0 * tp / denom)
    return float(np.mean(f1s)) if f1s else 0.0


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    support = np.bincount(y_true, minlength=n_classes)
    hits = np.bincount(y_true[y_pred == y_true], minlength=n_classes)
    present = support > 0
    return float(np.mean(hits[present] / support[present])) if present.any() else 0.0


def scores(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    return {"n": int(y_true.size),
            "accuracy": float(np.mean(y_pred == y_true)) if y_true.size else 0.0,
            "balanced_accuracy": balanced_accuracy(y_true, y_pred, n_classes),
            "macro_f1": macro_f1(y_true, y_pred, n_classes),
            "abstained": int(np.sum(y_pred < 0))}


def predict(model: OnnxModel, ws: WindowSet, idx: np.ndarray, present: np.ndarray,
            batch: int = 256) -> np.ndarray:
    """Predicted label index per window (-1 = no modality present), through the runtime's
    router, never abstaining on a threshold."""
    labels = list(model.contract.labels)
    return np.array([-1 if d.label is None else labels.index(d.label) for d in
                     decide(Fuser(model, abstain_below=0.0, max_batch=batch), ws, idx, present)],
                    np.int64)


def conditions(ws: WindowSet, idx: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Condition name -> presence matrix [len(idx), M] (bool)."""
    base = ws.mask[idx] > 0
    out = {"all": base}
    rng = np.random.default_rng(seed)
    for j, m in enumerate(ws.modalities):
        removed = base.copy()
        removed[:, j] = False
        out[f"without:{m}"] = removed
        has = np.flatnonzero(base[:, j])
        drop = rng.choice(has, size=has.size // 2, replace=False) if has.size else has
        degraded = base.copy()
        degraded[drop, j] = False
        out[f"degraded:{m}"] = degraded
    return out


def evaluate(model_path: str, ws: WindowSet, idx: np.ndarray, seed: int = 0,
             use_fallbacks: bool = True, complete_only: bool = True,
             target_risk: float = TARGET_RISK, abstain_all: bool = False) -> dict:
    """The evaluation table as a dict (see the module docstring).

    complete_only: evaluate on the windows that have every modality (so "without:m"
    measures the loss of m and not windows that never had anything else).
    target_risk: of coverage_at_risk; abstain_all: the all-present route applies its
    threshold too (as the runtime's --abstain-all)."""
    if complete_only:
        idx = idx[(ws.mask[idx] > 0).all(axis=1)]
    model = OnnxModel.load(model_path)
    if not use_fallbacks:
        model.fallbacks = {}
    labels = list(model.contract.labels)
    y = ws.label[idx]
    rows = {}
    for name, present in conditions(ws, idx, seed).items():
        pred, calibration = condition_calibration(model, ws, idx, present, abstain_all,
                                                  target_risk)
        rows[name] = scores(y, pred, len(labels))
        rows[name]["confusion"] = confusion(y, pred, len(labels)).tolist()
        rows[name].update(calibration)
    ref = rows["all"]
    for r in rows.values():
        for k in METRICS:
            r[f"rel_drop_{k}"] = (ref[k] - r[k]) / ref[k] if ref[k] > 0 else 0.0
    return {"model": model.contract.ident, "labels": labels, "windows": int(idx.size),
            "class_counts": np.bincount(y, minlength=len(labels)).tolist(),
            "fallbacks": ["+".join(s) for s in model.fallbacks], "seed": seed,
            "complete_only": complete_only, "target_risk": target_risk,
            "abstain_all": abstain_all,
            "calibration": {r: e.to_dict() for r, e in model.contract.calibration},
            "conditions": rows}


def to_json(result: dict) -> str:
    return json.dumps(result, indent=2, sort_keys=True)


def subset_names(modalities: Sequence[str]) -> list[str]:
    return [f"without:{m}" for m in modalities]


# -- choosing the windows a model is evaluated on ------------------------------------
EVAL_METADATA_KEY = "edgefuse.eval"
TASKS = ("detection", "identification", "activity", "classification")
_GOODVIBES = {"acoustic", "seismic"}


def eval_metadata(model: OnnxModel) -> dict:
    """The ``edgefuse.eval`` document export wrote (task, dataset, split column, test
    keys), or {} for models without one (e.g. the stand-in)."""
    raw = model.session.get_modelmeta().custom_metadata_map.get(EVAL_METADATA_KEY)
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def infer_task(model: OnnxModel) -> str:
    meta = eval_metadata(model)
    if meta.get("task") in TASKS:
        return str(meta["task"])
    names = set(model.contract.modality_names)
    return "detection" if names <= _GOODVIBES else "activity"


def model_windows(model: OnnxModel, data_dir: str) -> tuple[WindowSet, str]:
    """Labelled windows of data_dir cut on the model's own grid; (windows, split column)."""
    from edgefuse.runtime.core.errors import ModalityMismatchError
    c = model.contract
    names = c.modality_names
    if set(names) <= _GOODVIBES:
        from edgefuse.models.dataset import GridConfig, load_or_build
        if names != ("acoustic", "seismic"):
            raise ModalityMismatchError(
                f"model {c.ident} takes {list(names)}; goodvibes evaluation needs a model of "
                "['acoustic', 'seismic'] (fallbacks are evaluated through their main model)")
        grid = GridConfig(c.window_ns, c.hop_ns, tuple((m.name, m.rate_hz) for m in c.modalities))
        return load_or_build(data_dir, grid), "day_site"
    from edgefuse.models.har import MODALITIES, HarGrid, load_or_build_har
    rates = {m.rate_hz for m in c.modalities}
    if names != MODALITIES or len(rates) != 1:
        raise ModalityMismatchError(
            f"model {c.ident} takes {list(names)}; evaluation knows goodvibes "
            f"['acoustic', 'seismic'] and sp-sw-har {list(MODALITIES)} (one rate) models")
    return load_or_build_har(data_dir, HarGrid(rates.pop(), c.window_ns, c.hop_ns)), "subject"


def select_windows(ws: WindowSet, column: str, keys: Sequence[str] | None) -> np.ndarray:
    """Indices of the windows (with at least one modality) whose split key is in keys
    (all windows when keys is None)."""
    from edgefuse.models.splits import day_site_keys
    usable = ws.mask.sum(axis=1) > 0
    if keys is None:
        return np.flatnonzero(usable)
    col = day_site_keys(ws) if column == "day_site" else ws.meta[column].astype(str)
    return np.flatnonzero(usable & np.isin(col, list(keys)))


@dataclass(frozen=True)
class Evaluation:
    """An evaluate result with the windows it scored (ws rows idx), so that a report
    draws from the same windows without cutting or loading them again."""

    result: dict
    ws: WindowSet
    idx: np.ndarray


def evaluate_on_data(model_path: str, data_dir: str, task: str | None = None,
                     split: str = "test", seed: int = 0, use_fallbacks: bool = True,
                     keys: Sequence[str] | None = None, target_risk: float = TARGET_RISK,
                     abstain_all: bool = False) -> dict:
    """evaluation_on_data's result dict."""
    return evaluation_on_data(model_path, data_dir, task, split, seed, use_fallbacks, keys,
                              target_risk, abstain_all).result


def evaluation_on_data(model_path: str, data_dir: str, task: str | None = None,
                       split: str = "test", seed: int = 0, use_fallbacks: bool = True,
                       keys: Sequence[str] | None = None, target_risk: float = TARGET_RISK,
                       abstain_all: bool = False) -> Evaluation:
    """Evaluate a model file on the labelled windows of a data folder.

    split "test": the held-out keys the model's ``edgefuse.eval`` metadata names (the
    windows it never saw); "all": every labelled window (includes training windows).
    ``keys`` (day-sites or subjects) overrides both: e.g. to score a model without
    metadata (the stand-in) on another model's held-out day-site."""
    from edgefuse.runtime.core.errors import ConfigError, InputError
    model = OnnxModel.load(model_path)
    task = task or infer_task(model)
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {TASKS}, found {task!r}")
    if task == "identification":
        raise ConfigError(
            "identification cannot be evaluated without leakage on this data: every vehicle "
            "was driven at one site only, so holding out a day-site leaves its vehicles unseen "
            "(see models/README.md); no identification model is trained. Use --task "
            "detection")
    expected = infer_task(model)
    if task != expected:
        raise ConfigError(f"model {model.contract.ident} is a {expected} model (labels "
                          f"{list(model.contract.labels)}); --task {task} does not apply")
    if eval_metadata(model).get("dataset") == "recordings":
        raise ConfigError(f"model {model.contract.ident} was trained on your own recordings; "
                          "evaluate it with --recordings PATH... --labels FILE")
    ws, column = model_windows(model, data_dir)
    if split not in ("test", "all"):
        raise ConfigError(f"split must be 'test' or 'all', found {split!r}")
    if keys:
        keys = list(keys)
    elif split == "test":
        keys = eval_metadata(model).get("test")
        if not keys:
            raise ConfigError(f"{model_path} names no held-out split (no '{EVAL_METADATA_KEY}' "
                              "metadata); pass --keys or --split all")
    else:
        keys = None
    idx = select_windows(ws, column, keys)
    if idx.size == 0:
        raise InputError(f"{data_dir} holds no labelled window of the {column}s {keys}; "
                         "pass the data pack root, other --keys, or --split all",
                         path=data_dir)
    result = evaluate(model_path, ws, idx, seed=seed, use_fallbacks=use_fallbacks,
                      complete_only=True, target_risk=target_risk, abstain_all=abstain_all)
    result.update({"task": task, "n_windows": result["windows"], "split": split,
                   "split_column": column, "split_keys": list(keys) if keys else "all"})
    return Evaluation(result, ws, idx)


def calibration_windows(model_path: str | os.PathLike, data_dir: str, n: int = 256,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """n random windows with every modality present from the model's training side of
    data_dir (its held-out keys excluded), for int8-static."""
    from edgefuse.models.splits import day_site_keys
    from edgefuse.runtime.core.errors import ConfigError
    model = OnnxModel.load(model_path)
    ws, column = model_windows(model, data_dir)
    test = set(eval_metadata(model).get("test") or ())
    col = day_site_keys(ws) if column == "day_site" else ws.meta[column].astype(str)
    idx = select_windows(ws, column, None)
    idx = idx[~np.isin(col[idx], list(test)) & (ws.mask[idx] > 0).all(axis=1)]
    if idx.size == 0:
        raise ConfigError(f"no complete training-side window in {data_dir} to calibrate on")
    pick = np.random.default_rng(seed).choice(idx, size=min(n, idx.size), replace=False)
    return {m: ws.x[m][np.sort(pick)] for m in ws.modalities}
