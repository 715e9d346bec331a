"""INT8 and FP16 variants of an edgefuse model (onnx + onnxruntime; no torch).

    quantize_model(src, dst, mode="int8"|"fp16") -> [written files]

Every variant keeps the contract: float32 inputs and outputs, the same
input/output names, the ``edgefuse`` metadata (fallback file names rewritten
to the variant's own fallbacks, which are converted too) and the
``edgefuse.eval`` metadata, so ``edgefuse evaluate`` and the runtime load it
like the original.

- int8: ``onnxruntime.quantization.quantize_dynamic`` (weights int8 per
  tensor, activations quantised per call) of Conv/MatMul/Gemm. The spectral
  front end (the fixed DFT and filterbank MatMuls, whose inputs span a
  huge dynamic range before the log) is left in float32 by default
  (``keep_frontend=True``); quantising it too is possible and measured in
  the report.
- int8-static: ``quantize_static`` (QDQ, int8 weights per channel, uint8
  activations with ranges from calibration windows: real windows of the
  model's training side, never its held-out ones). Front end kept float32.
- fp16: ``onnxruntime.transformers.float16.convert_float_to_float16`` with
  ``keep_io_types=True`` (casts at the edges). ORT's CPU provider runs few
  ops in fp16, so this variant is for GPUs / fp16-capable NPUs; on a CPU it
  mostly halves the file size.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edgefuse.runtime.core.contract import METADATA_KEY, FallbackSpec, ModelContract
from edgefuse.runtime.core.errors import ConfigError, ModelContractError
from edgefuse.runtime.core import info
from edgefuse.runtime.core.inference import OnnxModel

log = logging.getLogger(__name__)

MODES = ("int8", "int8-static", "fp16")
_FRONTEND_BUFFERS = ("block_kernels", "kernels", "fbank_t")


def variant_path(path: str | os.PathLike, mode: str) -> Path:
    """model.onnx -> model.int8.onnx"""
    p = Path(path)
    return p.with_name(f"{p.stem}.{mode}{p.suffix}")


def _frontend_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul/Conv nodes that read a front-end buffer (DFT, filterbank)."""
    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Conv", "Gemm"):
            continue
        if any(any(b in i for b in _FRONTEND_BUFFERS) and (i in inits or i in consts)
               for i in n.input):
            out.append(n.name)
    return out


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder graph.node so every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ModelContractError("graph has a cycle or an input no node produces: "
                                     f"{[n.name for n in rest][:5]}")
        pending = rest
    copies = [onnx.NodeProto() for _ in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


class _Calibration:
    """CalibrationDataReader over windows [n, ch, samples] per modality (all present)."""

    def __init__(self, contract: ModelContract, windows: dict[str, np.ndarray], batch: int = 32):
        n = min(len(v) for v in windows.values())
        self._feeds = []
        for lo in range(0, n, batch):
            feed = {m.input: np.ascontiguousarray(windows[m.name][lo:lo + batch], np.float32)
                    for m in contract.modalities}
            rows = next(iter(feed.values())).shape[0]
            feed[contract.mask_input] = np.ones((rows, len(contract.modalities)), np.float32)
            self._feeds.append(feed)
        self._it = iter(self._feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._feeds)


def _convert_one(src: Path, dst: Path, mode: str, keep_frontend: bool,
                 calibration: dict[str, np.ndarray] | None = None) -> None:
    model = onnx.load(str(src))
    meta = [(p.key, p.value) for p in model.metadata_props]
    if mode == "int8-static":
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        if not calibration:
            raise ConfigError("int8-static needs calibration windows (real windows of the "
                              "model's training data); use int8 (dynamic) without them")
        contract = ModelContract.from_json(dict(meta)[METADATA_KEY], str(src))
        with tempfile.TemporaryDirectory() as tmp:
            named, exclude = _named_copy(model, Path(tmp), keep_frontend)
            quantize_static(str(named), str(dst), _Calibration(contract, calibration),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                            nodes_to_exclude=exclude)
        out = onnx.load(str(dst))
    elif mode == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        with tempfile.TemporaryDirectory() as tmp:
            named, exclude = _named_copy(model, Path(tmp), keep_frontend)
            quantize_dynamic(str(named), str(dst), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                             nodes_to_exclude=exclude)
        out = onnx.load(str(dst))
    elif mode == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        out = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
        _toposort(out.graph)   # the converter appends its input casts at the end
    else:
        raise ConfigError(f"mode must be one of {MODES}, found {mode!r}")
    del out.metadata_props[:]
    for k, v in meta:
        out.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(out)
    dst.write_bytes(out.SerializeToString())


def quantize_model(src: str | os.PathLike, dst: str | os.PathLike | None = None,
                   mode: str = "int8", keep_frontend: bool = True,
                   calibration: dict[str, np.ndarray] | None = None) -> list[str]:
    """Write the ``mode`` variant of src (and of each fallback) and return the paths;
    the main file's contract lists the variant fallbacks. The result is loaded with
    the runtime's loader before returning."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, found {mode!r}")
    src = Path(src)
    dst = Path(dst) if dst else variant_path(src, mode)
    if dst.resolve() == src.resolve():
        raise ConfigError(f"output {dst} would overwrite the input; choose another name")
    dst.parent.mkdir(parents=True, exist_ok=True)
    contract = OnnxModel.load(src).contract
    written, specs = [], []
    for fb in contract.fallbacks:
        fb_dst = dst.with_name(f"{dst.stem}.{'-'.join(fb.modalities)}{dst.suffix}")
        sub_cal = {m: calibration[m] for m in fb.modalities} if calibration else None
        _convert_one(src.parent / fb.file, fb_dst, mode, keep_frontend, sub_cal)
        specs.append(FallbackSpec(fb.modalities, fb_dst.name))
        written.append(str(fb_dst))
    _convert_one(src, dst, mode, keep_frontend, calibration)
    if specs:
        model = onnx.load(str(dst))
        for p in model.metadata_props:
            if p.key == METADATA_KEY:
                doc = json.loads(p.value)
                doc["fallbacks"] = [{"modalities": list(s.modalities), "file": s.file}
                                    for s in specs]
                doc["description"] = f"{mode} variant. " + doc.get("description", "")
                ModelContract.from_dict(doc, str(dst))   # still a valid contract
                p.value = json.dumps(doc, sort_keys=True)
        dst.write_bytes(model.SerializeToString())
    try:
        OnnxModel.load(dst)
    except ModelContractError:
        raise
    except Exception as exc:
        raise ModelContractError(f"{dst}: the {mode} variant does not load in onnxruntime "
                                 f"({exc})") from exc
    written.insert(0, str(dst))
    log.info("wrote %s variant of %s: %s", mode, src, written)
    return written


def _named_copy(model: "onnx.ModelProto", tmp: Path, keep_frontend: bool
                ) -> tuple[Path, list[str]]:
    """Save model under tmp for the ORT quantizers (they want a path), naming any
    unnamed node so the front end can be excluded by name; returns the path and
    the names of the nodes to keep in float."""
    named = tmp / "in.onnx"
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    exclude = _frontend_nodes(model) if keep_frontend else []
    onnx.save(model, str(named))
    return named, exclude


def time_per_window_us(path: str | os.PathLike, batch: int = 1, repeats: int = 200,
                       modalities: str = "all") -> float:
    """Median ORT time (1 intra-op thread) of one call on random windows, per window.
    modalities "all" runs the main model; a modality name runs that fallback."""
    model = OnnxModel.load(path)
    if modalities != "all":
        model = model.fallbacks[(modalities,)]
    return info.time_per_window_us(model, batch, repeats)


def max_output_diff(a: str | os.PathLike, b: str | os.PathLike, n: int = 64,
                    scale: float = 100.0) -> float:
    """Max |probability difference| of two models (same contract) on random windows."""
    ma, mb = OnnxModel.load(a), OnnxModel.load(b)
    c = ma.contract
    rng = np.random.default_rng(1)
    inputs = {m.name: rng.normal(0, scale, (n, m.channels, m.samples(c.window_ns)))
              .astype(np.float32) for m in c.modalities}
    mask = np.ones((n, len(c.modalities)), np.float32)
    return float(np.max(np.abs(ma.run(inputs, mask) - mb.run(inputs, mask))))
