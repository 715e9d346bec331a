"""Evaluate a model on a user's own recordings, labelled from an intervals file.

    edgefuse evaluate MODEL --recordings P [P ...] --labels FILE [--group G] [--test K ...]

The windows are cut on the model's own contract by the path training uses
(models/recordings.py) and labelled by the rule the model was trained with (its
``edgefuse.eval`` metadata: ``label_rule``, ``chunk_s``), each setting
overridable. Without ``test`` every labelled window is scored (recordings the
model never saw); with it, the windows whose split key (``group``: node or a
labels-file column) is one of ``test``. The conditions, metrics and JSON shape
are those of models/evaluate.py (``evaluate``), confusion matrices and the
calibration report (ECE before and after, risk-coverage, decided) included.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from edgefuse.models.calibration import TARGET_RISK
from edgefuse.models.evaluate import Evaluation, eval_metadata, evaluate, infer_task
from edgefuse.models.intervals import IntervalRule
from edgefuse.models.recordings import RecordingSet, load_or_build_recordings
from edgefuse.runtime.core.errors import ConfigError, InputError, ModalityMismatchError
from edgefuse.runtime.core.inference import OnnxModel


def label_rule(meta: dict, overrides: dict | None = None) -> IntervalRule:
    """The model's training rule (defaults for models without one), with overrides."""
    doc = dict(meta.get("label_rule") or {})
    doc.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if isinstance(doc.get("any_labels"), list):
        doc["any_labels"] = tuple(doc["any_labels"])
    return IntervalRule(**doc)


def evaluate_on_recordings(model_path: str, recordings: Sequence[str], labels: str,
                           group: str | None = None, test: Sequence[str] | None = None,
                           rule_overrides: dict | None = None, seed: int = 0,
                           use_fallbacks: bool = True, chunk_s: float | None = None,
                           target_risk: float = TARGET_RISK, abstain_all: bool = False) -> dict:
    """evaluation_on_recordings' result dict."""
    return evaluation_on_recordings(model_path, recordings, labels, group, test,
                                    rule_overrides, seed, use_fallbacks, chunk_s, target_risk,
                                    abstain_all).result


def evaluation_on_recordings(model_path: str, recordings: Sequence[str], labels: str,
                             group: str | None = None, test: Sequence[str] | None = None,
                             rule_overrides: dict | None = None, seed: int = 0,
                             use_fallbacks: bool = True, chunk_s: float | None = None,
                             target_risk: float = TARGET_RISK,
                             abstain_all: bool = False) -> Evaluation:
    model = OnnxModel.load(model_path)
    meta = eval_metadata(model)
    rule = label_rule(meta, rule_overrides)
    rule.check(model.contract.labels)
    trained_on_recordings = meta.get("dataset") == "recordings"
    if group is None:
        group = str(meta.get("split_column", "node")) if trained_on_recordings and test \
            else "node"
    chunk_s = chunk_s or float(meta.get("chunk_s", 1.0))
    rec = RecordingSet(tuple(recordings), labels, group, chunk_s)
    ws = load_or_build_recordings(rec, model.contract, rule, what="the model",
                                  error=ModalityMismatchError,
                                  other_nodes_level=logging.INFO)
    usable = ws.mask.sum(axis=1) > 0
    keys = ws.meta["group"].astype(str)
    if test:
        known = sorted(set(keys.tolist()))
        unknown = [k for k in test if k not in known]
        if unknown:
            raise ConfigError(f"--test {unknown} are not {group} values of these labelled "
                              f"windows; known: {known}")
        usable &= np.isin(keys, list(test))
    idx = np.flatnonzero(usable)
    if idx.size == 0:
        raise InputError(f"no labelled window with a modality present in {list(recordings)}"
                         f"{f' for {group} {list(test)}' if test else ''}")
    result = evaluate(model_path, ws, idx, seed=seed, use_fallbacks=use_fallbacks,
                      complete_only=True, target_risk=target_risk, abstain_all=abstain_all)
    result.update({"task": infer_task(model), "n_windows": result["windows"],
                   "split": "test" if test else "all", "split_column": group,
                   "split_keys": list(test) if test else "all",
                   "label_rule": rule.to_dict(), "chunk_s": chunk_s,
                   "label_report": ws.info})
    return Evaluation(result, ws, idx)
