"""What a model file says about itself, for ``edgefuse info MODEL``."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgefuse.runtime.core.inference import OnnxModel

DEFAULT_MODEL = "gv_detect.onnx"


def bundled_model_path(name: str = DEFAULT_MODEL) -> Path:
    """A model shipped in edgefuse.models/bundled (found without importing torch)."""
    from importlib.resources import files
    return Path(str(files("edgefuse.models").joinpath("bundled", name)))


def describe_dict(model: OnnxModel) -> dict:
    """The contract, the graph's real inputs/outputs, fallbacks and providers, as plain data."""
    c = model.contract
    meta = model.session.get_modelmeta()

    def tensors(items) -> list[dict]:
        return [{"name": t.name, "type": t.type,
                 "shape": [d if isinstance(d, int) else str(d) for d in (t.shape or [])]}
                for t in items]

    return {
        "path": str(model.path),
        "model": c.ident,
        "description": c.description,
        "producer": meta.producer_name,
        "modalities": [
            {"name": m.name, "input": m.input, "channels": m.channels, "rate_hz": m.rate_hz,
             "samples_per_window": m.samples(c.window_ns)}
            for m in c.modalities
        ],
        "window_s": c.window_ns / 1e9,
        "hop_s": c.hop_ns / 1e9,
        "window_ns": c.window_ns,
        "hop_ns": c.hop_ns,
        "labels": list(c.labels),
        "mask_input": c.mask_input,
        "output": c.output,
        "output_kind": c.output_kind,
        "graph_inputs": tensors(model.session.get_inputs()),
        "graph_outputs": tensors(model.session.get_outputs()),
        "fixed_batch": model.fixed_batch,
        "fallbacks": [
            {"modalities": list(f.modalities), "file": f.file, "tag": f.tag,
             "loaded": f.modalities in model.fallbacks}
            for f in c.fallbacks
        ],
        "calibration": {route: cal.to_dict() for route, cal in c.calibration},
        "provider": model.provider,
        "session_providers": model.session.get_providers(),
        "providers_available": ort.get_available_providers(),
        "onnxruntime": ort.__version__,
    }


def describe_json(model: OnnxModel) -> str:
    return json.dumps(describe_dict(model), indent=2, sort_keys=True)


def describe(model: OnnxModel) -> str:
    """Human-readable summary of the model and its contract."""
    d = describe_dict(model)
    lines = [
        f"model       {d['model']}  ({d['path']})",
        f"description {d['description'] or '-'}",
        f"window      {d['window_s']:g} s, hop {d['hop_s']:g} s",
        f"labels      {', '.join(d['labels'])}",
        f"output      {d['output']} ({d['output_kind']}; the runtime reports probabilities)",
        f"mask input  {d['mask_input']} (1 = present, in modality order)",
        "modalities",
    ]
    for m in d["modalities"]:
        lines.append(f"  {m['name']:<12} input {m['input']!r}, {m['channels']} ch at "
                     f"{m['rate_hz']:g} Hz = {m['samples_per_window']} samples per window")
    lines.append("graph")
    for kind, items in (("in ", d["graph_inputs"]), ("out", d["graph_outputs"])):
        for t in items:
            lines.append(f"  {kind} {t['name']:<16} {t['type']:<14} {t['shape']}")
    if d["fallbacks"]:
        lines.append("fallbacks")
        for f in d["fallbacks"]:
            state = "loaded" if f["loaded"] else "NOT loaded"
            lines.append(f"  {f['tag']:<24} {f['file']} ({state})")
    else:
        lines.append("fallbacks   none (missing modalities are masked)")
    if d["calibration"]:
        lines.append("calibration (per route: temperature, abstain threshold, validation coverage)")
        for route, cal in d["calibration"].items():
            thr = cal.get("threshold")
            cov = cal.get("coverage")
            lines.append(f"  {route:<24} T {cal.get('temperature', 1.0):.3f}  "
                         f"threshold {'-' if thr is None else f'{thr:.3f}'}  "
                         f"coverage {'-' if cov is None else f'{cov:.3f}'}  "
                         f"target risk {cal.get('target_risk', '-')}")
    else:
        lines.append("calibration none (the model's own scores; no per-route thresholds)")
    lines.append(f"provider    {d['provider']} (available: {', '.join(d['providers_available'])};"
                 f" onnxruntime {d['onnxruntime']})")
    return "\n".join(lines)


def time_per_window_us(model: OnnxModel, batch: int = 64, repeats: int = 30,
                       warmup: int = 5) -> float:
    """Median wall time of one ONNX Runtime call on random windows (sensor-count
    scale), divided by the batch size, in microseconds."""
    c = model.contract
    rng = np.random.default_rng(0)
    inputs = {m.name: rng.normal(0, 100, (batch, m.channels, m.samples(c.window_ns)))
              .astype(np.float32) for m in c.modalities}
    mask = np.ones((batch, len(c.modalities)), np.float32)
    for _ in range(warmup):
        model.run(inputs, mask)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.run(inputs, mask)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / batch * 1e6
