"""Export a training checkpoint to an edgefuse ONNX model with fallbacks (torch).

    export_checkpoint(checkpoint, out_path) -> ExportReport

Writes the main model and one fallback per modality (its subset head, see
``nets.SubsetNet``; for a user's own module the masked main model,
``SubsetView``) beside it, checks ORT-vs-PyTorch parity on random
windows with random masks (main and fallbacks), and stores the held-out
split in a second metadata entry ``edgefuse.eval`` (JSON: task, dataset,
split column, test keys) so that ``edgefuse evaluate`` scores the windows
the model never saw by default. The runtime reads only the ``edgefuse`` key.
A checkpoint that training calibrated (``calibration`` in its config, see
models/route_calibration.py) is exported with that calibration in the contract
(routes of fallbacks not written left out).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
import torch

from edgefuse.exporters.onnx_export import (SubsetView, example_inputs, export,
                                            export_with_fallbacks, fallback_file, parity,
                                            subset_contract)
from edgefuse.models.checkpoint import checkpoint_contract, load_checkpoint
from edgefuse.models.nets import FusionNet, SubsetNet, count_params, estimate_flops
from edgefuse.runtime.core.contract import ModelContract
from edgefuse.runtime.core.errors import EdgefuseError
from edgefuse.runtime.core.inference import OnnxModel

log = logging.getLogger(__name__)

EVAL_METADATA_KEY = "edgefuse.eval"
OPSET = 17
PARITY_TOLERANCE = 1e-4


class ParityError(EdgefuseError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


@dataclass
class ExportReport:
    path: str
    files: dict[str, int] = field(default_factory=dict)     # file -> bytes
    parity: dict[str, float] = field(default_factory=dict)  # file -> max abs diff
    params: int = 0
    flops: int = 0         # 0: not estimated (a user's own network)
    opset: int = OPSET


def _input_scale(contract: ModelContract) -> float:
    # sensor counts for acoustic/seismic, SI units (m/s^2, rad/s) for IMU
    return 5.0 if all(m.name.startswith("imu") for m in contract.modalities) else 100.0


def parity_inputs(contract: ModelContract, scales: dict[str, float] | None = None,
                  n: int = 16) -> tuple[torch.Tensor, ...]:
    """Random windows at each modality's training scale (its std; older checkpoints:
    _input_scale) with random masks, in forward() order."""
    inputs = example_inputs(contract, batch=n, seed=0, scale=1.0 if scales else
                            _input_scale(contract), random_mask=True)
    if not scales:
        return inputs
    xs = [x * float(scales.get(m.name, 1.0)) for x, m in zip(inputs[:-1], contract.modalities)]
    return (*xs, inputs[-1])


def eval_metadata(cfg: dict) -> dict:
    """What ``edgefuse evaluate`` needs to score the windows the model never saw."""
    doc = {"task": cfg.get("task", "detection"), "dataset": cfg.get("dataset", "goodvibes"),
           "split_column": cfg.get("split_column", "day_site"),
           "test": cfg.get("test", cfg["run"]["data"]["test"])}
    for key in ("label_rule", "chunk_s"):
        if key in cfg:
            doc[key] = cfg[key]
    return doc


def export_checkpoint(checkpoint: str, out_path: str, fallbacks: bool = True,
                      name: str | None = None, version: str | None = None,
                      tolerance: float = PARITY_TOLERANCE) -> ExportReport:
    """Export a checkpoint of either kind (built-in net or a user's module)."""
    net, cfg = load_checkpoint(checkpoint)
    contract = checkpoint_contract(cfg)
    contract = replace(contract, name=name or contract.name,
                       version=version or contract.version)
    path = Path(out_path)
    subs = {}
    if fallbacks and len(contract.modalities) > 1:
        subs = {(m.name,): (SubsetNet(net, m.name) if isinstance(net, FusionNet) else
                            SubsetView(net, contract, (m.name,))).eval()
                for m in contract.modalities}
        export_with_fallbacks(net, contract, path, subs, opset=OPSET)
    else:
        export(net, contract, path, opset=OPSET)
    _add_eval_metadata(path, eval_metadata(cfg))
    if cfg.get("calibration"):
        _apply_calibration(path, cfg["calibration"], bool(subs))
    OnnxModel.load(path)
    report = ExportReport(str(path), params=count_params(net),
                          flops=estimate_flops(net) if isinstance(net, FusionNet) else 0)
    scales = cfg.get("input_scale")
    checks = [(net, path, contract)]
    for subset, module in subs.items():
        sub = subset_contract(contract, subset)
        checks.append((module, path.parent / fallback_file(path, subset), sub))
    for module, p, c in checks:
        diff = parity(module, p, inputs=parity_inputs(c, scales))
        report.parity[p.name] = diff
        report.files[p.name] = p.stat().st_size
        if diff > tolerance:
            raise ParityError(f"{p}: ONNX Runtime differs from PyTorch by {diff:.3g} "
                              f"(max abs, logits), above the tolerance {tolerance:g}; the "
                              "exported graph does not compute what the checkpoint does")
    log.info("exported %s: %s", path, report)
    return report


def _apply_calibration(path: Path, table: dict, with_fallbacks: bool) -> None:
    from edgefuse.exporters.calibrate import set_calibration
    keep = {r: e for r, e in table.items() if with_fallbacks or not r.startswith("subset:")}
    if len(keep) < len(table):
        log.warning("%s: exported without fallbacks, so the calibration of %s is left out "
                    "(those windows run the masked main model, uncalibrated unless a "
                    "'masked' entry exists)", path, sorted(set(table) - set(keep)))
    set_calibration(path, keep)


def _add_eval_metadata(path: Path, doc: dict) -> None:
    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if p.key != EVAL_METADATA_KEY]
    del model.metadata_props[:]
    for p in keep:
        model.metadata_props.add(key=p.key, value=p.value)
    model.metadata_props.add(key=EVAL_METADATA_KEY, value=json.dumps(doc, sort_keys=True))
    path.write_bytes(model.SerializeToString())


def torch_parity_inputs(contract: ModelContract, n: int = 16,
                        scales: dict[str, float] | None = None) -> tuple[torch.Tensor, ...]:
    """The random windows parity is checked on (for tests)."""
    return parity_inputs(contract, scales, n)
