"""Write per-route calibration into an existing edgefuse model (needs onnx: train extra).

``set_calibration(path, calibration)`` rewrites the ``edgefuse`` contract in the
metadata of ``path`` with ``calibration`` (route -> entry, as
models.calibration.fit_route_calibration returns it; see runtime/core/contract.py)
and gives each fallback file its own route's entry as its "all" route, so a
fallback loaded on its own is calibrated too (the runtime, routing to a fallback,
reads the main contract's "subset:..." entry). The graph and every other metadata
entry are kept. Each file is written beside itself and renamed over it, after the
runtime's loader accepted the new main model (a refused one leaves every file as
it was). ``calibration=None`` (or {}) removes calibration.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Mapping

import onnx

from edgefuse.runtime.core.contract import METADATA_KEY, ROUTE_ALL, ModelContract
from edgefuse.runtime.core.errors import ModelContractError
from edgefuse.runtime.core.inference import OnnxModel

log = logging.getLogger(__name__)


def _with_contract(model: onnx.ModelProto, doc: dict, source: str) -> ModelContract:
    """Check ``doc`` as a contract and store it in ``model``'s metadata."""
    contract = ModelContract.from_dict(doc, source)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = contract.to_json()
            break
    return contract


def _contract_doc(model: onnx.ModelProto, path: Path) -> dict:
    found = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in found:
        raise ModelContractError(f"{path}: no '{METADATA_KEY}' metadata; only edgefuse models "
                                 "can be calibrated (export with edgefuse export)")
    return json.loads(ModelContract.from_json(found[METADATA_KEY], str(path)).to_json())


def set_calibration(model_path: str | os.PathLike,
                    calibration: Mapping[str, Mapping] | None) -> ModelContract:
    """Store ``calibration`` in ``model_path`` and its fallbacks; returns the new contract."""
    path = Path(model_path)
    table = {str(route): {k: getattr(v, "item", lambda: v)() for k, v in entry.items()}
             for route, entry in (calibration or {}).items()}  # numpy scalars -> Python
    main = onnx.load(str(path))
    doc = _contract_doc(main, path)
    doc.pop("calibration", None)
    if table:
        doc["calibration"] = table
    contract = _with_contract(main, doc, str(path))
    writes = [(path.name, main)]
    for spec in contract.fallbacks:
        fpath = path.parent / spec.file
        fb = onnx.load(str(fpath))
        fdoc = _contract_doc(fb, fpath)
        fdoc.pop("calibration", None)
        entry = dict(contract.calibration).get(spec.tag)
        if entry is not None:
            fdoc["calibration"] = {ROUTE_ALL: entry.to_dict()}
        _with_contract(fb, fdoc, str(fpath))
        writes.append((spec.file, fb))
    data = [(rel, m.SerializeToString()) for rel, m in writes]
    # The runtime must accept what we wrote before anything is replaced: the new files
    # are written and loaded in a folder beside the model (same file system, so each
    # rename below is atomic), then moved over the old ones.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".calibrating-") as tmp:
        for rel, blob in data:
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_bytes(blob)
        OnnxModel.load(Path(tmp) / path.name)
        for rel, _ in data:
            os.replace(Path(tmp) / rel, path.parent / rel)
    log.info("%s: calibration for routes %s", path,
             [r for r, _ in contract.calibration] or "none (removed)")
    return contract
