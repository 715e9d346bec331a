"""Export a training checkpoint to an edgefuse ONNX model with fallbacks (torch).

    export_checkpoint(checkpoint, out_path) -> ExportReport

Writes the main model and one fallback per modality (its subset head, see
``nets.SubsetNet``) beside it, checks ORT-vs-PyTorch parity on random
windows with random masks (main and fallbacks), and stores the held-out
split in a second metadata entry ``edgefuse.eval`` (JSON: task, dataset,
split column, test keys) so that ``edgefuse evaluate`` scores the windows
the model never saw by default. The runtime reads only the ``edgefuse`` key.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from edgefuse.exporters.onnx_export import (example_inputs, export, export_with_fallbacks,
                                            fallback_file, parity, subset_contract)
from edgefuse.models.nets import SubsetNet, count_params, estimate_flops
from edgefuse.models.train import load_checkpoint
from edgefuse.runtime.core.contract import ModalitySpec, ModelContract
from edgefuse.runtime.core.errors import EdgefuseError
from edgefuse.runtime.core.inference import OnnxModel

log = logging.getLogger(__name__)

EVAL_METADATA_KEY = "edgefuse.eval"
OPSET = 17
PARITY_TOLERANCE = 1e-4
_NAMES = {"detection": "gv-detect", "activity": "har-imu"}
_DESCRIPTIONS = {
    "detection": "goodvibes vehicle detection (background vs vehicle within 25 m) from "
                 "acoustic + seismic, trained by edgefuse.models.train",
    "activity": "sp-sw-har activity recognition from phone + watch IMU (acc + gyro), "
                "trained by edgefuse.models.train",
}


class ParityError(EdgefuseError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


@dataclass
class ExportReport:
    path: str
    files: dict[str, int] = field(default_factory=dict)     # file -> bytes
    parity: dict[str, float] = field(default_factory=dict)  # file -> max abs diff
    params: int = 0
    flops: int = 0
    opset: int = OPSET


def _input_scale(contract: ModelContract) -> float:
    # sensor counts for acoustic/seismic, SI units (m/s^2, rad/s) for IMU
    return 5.0 if all(m.name.startswith("imu") for m in contract.modalities) else 100.0


def export_checkpoint(checkpoint: str, out_path: str, fallbacks: bool = True,
                      name: str | None = None, version: str = "0.1.0",
                      tolerance: float = PARITY_TOLERANCE) -> ExportReport:
    net, cfg = load_checkpoint(checkpoint)
    task = cfg.get("task", "detection")
    grid = cfg["grid"]
    mods = tuple(ModalitySpec(m, f["n_filters"] if f["kind"] == "raw" else 1, float(r), m)
                 for (m, r), f in zip(grid["rates_hz"], cfg["net"]["frontends"]))
    contract = ModelContract(name or _NAMES.get(task, "edgefuse-model"), version, mods,
                             int(grid["window_ns"]), int(grid["hop_ns"]), tuple(cfg["labels"]),
                             "modality_mask", "scores", "logits",
                             description=_DESCRIPTIONS.get(task, ""))
    path = Path(out_path)
    subs = {}
    if fallbacks:
        subs = {(m.name,): SubsetNet(net, m.name).eval() for m in mods}
        export_with_fallbacks(net, contract, path, subs, opset=OPSET)
    else:
        export(net, contract, path, opset=OPSET)
    _add_eval_metadata(path, {"task": task, "dataset": cfg.get("dataset", "goodvibes"),
                              "split_column": cfg.get("split_column", "day_site"),
                              "test": cfg.get("test", cfg["run"]["data"]["test"])})
    OnnxModel.load(path)
    report = ExportReport(str(path), params=count_params(net), flops=estimate_flops(net))
    scale = _input_scale(contract)
    checks = [(net, path, contract)]
    for subset, module in subs.items():
        sub = subset_contract(contract, subset)
        checks.append((module, path.parent / fallback_file(path, subset), sub))
    for module, p, c in checks:
        inputs = example_inputs(c, batch=16, seed=0, scale=scale, random_mask=True)
        diff = parity(module, p, inputs=inputs)
        report.parity[p.name] = diff
        report.files[p.name] = p.stat().st_size
        if diff > tolerance:
            raise ParityError(f"{p}: ONNX Runtime differs from PyTorch by {diff:.3g} "
                              f"(max abs, logits), above the tolerance {tolerance:g}; the "
                              "exported graph does not compute what the checkpoint does")
    log.info("exported %s: %s", path, report)
    return report


def _add_eval_metadata(path: Path, doc: dict) -> None:
    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if p.key != EVAL_METADATA_KEY]
    del model.metadata_props[:]
    for p in keep:
        model.metadata_props.add(key=p.key, value=p.value)
    model.metadata_props.add(key=EVAL_METADATA_KEY, value=json.dumps(doc, sort_keys=True))
    path.write_bytes(model.SerializeToString())


def torch_parity_inputs(contract: ModelContract, n: int = 16) -> tuple[torch.Tensor, ...]:
    """The random windows parity is checked on (for tests)."""
    return example_inputs(contract, batch=n, seed=0, scale=_input_scale(contract),
                          random_mask=True)
