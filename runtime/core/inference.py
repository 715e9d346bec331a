"""Load an edgefuse ONNX model, check it against its contract, run it.

The contract (see ``contract.py``) is read from the model's metadata through
onnxruntime, never through the onnx package, and checked against the graph's
real inputs and outputs before the first window arrives: a model that says
one thing and computes another is refused at load time, with a message that
says what was expected and what was found.

Execution providers are named "cpu", "cuda", "tensorrt" (or by their ORT
names). An explicit provider list is always passed to ORT. A requested
provider that this onnxruntime build lacks is an error with
``require_provider=True`` and a logged warning otherwise; the CPU provider is
always appended last, as ORT advises, so ops a GPU provider cannot run still
run.

Session threading: ``intra_op_threads`` (default 1: edge boxes run several
pipelines side by side, and a second thread did not speed up the stand-in:
batch 64 took 3.3 ms on 1 thread, 3.8 ms on 2), inter-op 1, full graph
optimisation, no spin-waiting. Measured on the 2-core build VM (stand-in,
100 calls): with 1 thread spinning changes nothing (no worker to spin);
with 2 threads and 2 ms between calls of batch 8, spinning burnt 1.00 core
instead of 0.33 (2.7 ms instead of 1.05 ms CPU per call) to cut latency from
0.97 to 0.55 ms, and back-to-back batches of 64 got slower (7.0 vs 3.8 ms).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnxruntime as ort

from edgefuse.runtime.core.contract import METADATA_KEY, ModelContract
from edgefuse.runtime.core.errors import (InputError, ModalityMismatchError, ModelContractError,
                                     ProviderError)

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_FLOAT = "tensor(float)"
_OUTPUT_TYPES = ("tensor(float)", "tensor(double)")


def session_options(intra_op_threads: int = 1, spinning: bool = False) -> ort.SessionOptions:
    """The SessionOptions every edgefuse session uses."""
    if not isinstance(intra_op_threads, int) or intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be an integer >= 1, found {intra_op_threads!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    flag = "1" if spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", flag)
    so.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return so


def resolve_providers(requested: str | Iterable[str], require: bool = False) -> list[str]:
    """Map short names to ORT provider names, keep the available ones, CPU last."""
    if isinstance(requested, str):
        requested = (requested,)
    wanted = []
    for name in requested:
        full = PROVIDER_NAMES.get(str(name).lower(), str(name))
        if full not in ort.get_all_providers():
            raise ProviderError(
                f"unknown execution provider {name!r}; expected one of "
                f"{sorted(PROVIDER_NAMES)} or an onnxruntime provider name")
        if full not in wanted:
            wanted.append(full)
    if not wanted:
        raise ProviderError("no execution provider requested; pass e.g. providers=('cpu',)")
    available = ort.get_available_providers()
    chosen = []
    for full in wanted:
        if full in available:
            chosen.append(full)
        elif require:
            raise ProviderError(
                f"execution provider {full} was required but this onnxruntime build offers "
                f"only {available}; install a build with it (e.g. onnxruntime-gpu for CUDA "
                "and TensorRT) or run without requiring it")
        else:
            log.warning("execution provider %s is not available (available: %s); "
                        "using the next one", full, available)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``, stable for any finite logits (max
    subtracted). Temperature 1 gives exactly the plain softmax (no division made)."""
    z = logits.astype(np.float64)
    if temperature != 1.0:
        z = z / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# log(0) would be -inf; float32's smallest normal keeps log-probabilities finite.
_LOG_FLOOR = float(np.finfo(np.float32).tiny)


class OnnxModel:
    """A loaded model: ``contract``, ``provider``, ``fallbacks``, ``run()``."""

    def __init__(self, session: ort.InferenceSession, contract: ModelContract, path: Path,
                 fallbacks: Mapping[tuple[str, ...], "OnnxModel"], fixed_batch: int | None):
        self.session = session
        self.contract = contract
        self.path = path
        self.provider = session.get_providers()[0]
        self.fallbacks = dict(fallbacks)
        self.fixed_batch = fixed_batch
        self._inputs = [m.input for m in contract.modalities]

    def __repr__(self) -> str:
        return (f"OnnxModel({self.contract.ident}, {str(self.path)!r}, provider={self.provider}, "
                f"fallbacks={sorted(self.fallbacks)})")

    @classmethod
    def load(cls, path: str | os.PathLike, providers: str | Iterable[str] = ("cpu",),
             require_provider: bool = False, intra_op_threads: int = 1) -> "OnnxModel":
        """Load ``path`` and its fallbacks; refuse models that contradict their contract."""
        model = cls._load_one(Path(path), providers, require_provider, intra_op_threads)
        fallbacks = {}
        for spec in model.contract.fallbacks:
            fpath = Path(path).parent / spec.file
            if not fpath.is_file():
                raise ModelContractError(
                    f"{path}: the contract lists a fallback for {'+'.join(spec.modalities)} "
                    f"in {spec.file!r}, but {fpath} does not exist; keep fallback files beside "
                    "the main model (paths are relative to it) or remove them from the contract")
            fb = cls._load_one(fpath, providers, require_provider, intra_op_threads)
            _check_fallback(model.contract, fb.contract, spec.modalities, fpath)
            fallbacks[spec.modalities] = fb
        model.fallbacks = fallbacks
        log.info("model %s (%s) runs on %s%s", model.contract.ident, path, model.provider,
                 f"; fallbacks for {['+'.join(s) for s in fallbacks]}" if fallbacks else "")
        return model

    @classmethod
    def _load_one(cls, path: Path, providers, require_provider: bool,
                  intra_op_threads: int) -> "OnnxModel":
        if not path.is_file():
            raise InputError(f"model file {str(path)!r} does not exist; give the path of an "
                             ".onnx file written by edgefuse export", path=str(path))
        chosen = resolve_providers(providers, require_provider)
        try:
            session = ort.InferenceSession(str(path), session_options(intra_op_threads),
                                           providers=chosen)
        except Exception as exc:  # ORT raises its own untyped errors (InvalidProtobuf, Fail...)
            raise ModelContractError(
                f"{path}: onnxruntime cannot load this file ({type(exc).__name__}: {exc}); "
                "expected an ONNX model written by edgefuse export") from exc
        running = session.get_providers()
        if require_provider and chosen[0] not in running:
            raise ProviderError(
                f"{path}: execution provider {chosen[0]} was required but onnxruntime could "
                f"not start it (session runs on {running}); check the GPU driver/CUDA "
                "libraries, or run without requiring it")
        meta = session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ModelContractError(
                f"{path}: no '{METADATA_KEY}' entry in the model's metadata_props (found keys "
                f"{sorted(meta)}); expected the model contract JSON there. Export the model "
                "with edgefuse.exporters.onnx_export.export, or add the contract with "
                "onnx (model.metadata_props)")
        contract = ModelContract.from_json(meta[METADATA_KEY], source=str(path))
        fixed_batch = _check_graph(session, contract, str(path))
        model = cls(session, contract, path, {}, fixed_batch)
        model._smoke_test()
        return model

    def _smoke_test(self) -> None:
        """Run one all-zero window: catches outputs whose real shape differs from the
        declared one (symbolic dims can hide that) before live data arrives."""
        c = self.contract
        inputs = {m.name: np.zeros((1, m.channels, m.samples(c.window_ns)), np.float32)
                  for m in c.modalities}
        try:
            raw = self._run_raw(inputs, np.ones((1, len(c.modalities)), np.float32))
        except ModelContractError:
            raise
        except Exception as exc:
            raise ModelContractError(
                f"{self.path}: a test run on one all-zero window failed ({exc}); the graph "
                "does not accept the inputs its contract declares") from exc
        if raw.shape != (1, len(c.labels)):
            raise ModelContractError(
                f"{self.path}: output {c.output!r} of one window has shape {raw.shape}; "
                f"expected (1, {len(c.labels)}) (one score per label {list(c.labels)})")

    def run(self, inputs: Mapping[str, np.ndarray], mask: np.ndarray,
            temperature: float = 1.0) -> np.ndarray:
        """Class probabilities float32 [batch, n_labels] for a batch of windows.

        inputs[modality]: float32 [batch, channels, samples] for every modality of the
        contract; mask: float32 [batch, n_modalities] (1 = present, contract order).
        temperature: the logits are divided by it before the softmax (calibration);
        at 1 a probabilities model's output is returned untouched.
        """
        raw = self._run_raw(inputs, mask)
        if self.contract.output_kind == "probabilities" and temperature == 1.0:
            return raw.astype(np.float32, copy=False)
        return softmax(self._as_logits(raw), temperature)

    def logits(self, inputs: Mapping[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
        """Uncalibrated logits float32 [batch, n_labels] (a probabilities model's log
        probabilities): what calibration is fitted on (models.calibration)."""
        return self._as_logits(self._run_raw(inputs, mask))

    def _as_logits(self, raw: np.ndarray) -> np.ndarray:
        if self.contract.output_kind == "logits":
            return raw
        return np.log(np.maximum(raw, _LOG_FLOOR)).astype(np.float32)

    def _run_raw(self, inputs: Mapping[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
        c = self.contract
        if set(inputs) != set(c.modality_names):
            raise ModalityMismatchError(
                f"model {c.ident} expects modalities {list(c.modality_names)}, "
                f"found {sorted(inputs)}; pass one array per modality of the contract")
        mask = np.ascontiguousarray(mask, dtype=np.float32)
        if mask.ndim != 2 or mask.shape[1] != len(c.modalities) or mask.shape[0] < 1:
            raise ModalityMismatchError(
                f"model {c.ident}: mask must be [batch >= 1, {len(c.modalities)}], "
                f"found {mask.shape}")
        batch = mask.shape[0]
        feed = {c.mask_input: mask}
        for m in c.modalities:
            x = np.ascontiguousarray(inputs[m.name], dtype=np.float32)
            want = (batch, m.channels, m.samples(c.window_ns))
            if x.shape != want:
                raise ModalityMismatchError(
                    f"model {c.ident}: {m.name} must be float32 {list(want)} "
                    f"[batch, channels, samples], found {list(x.shape)}")
            feed[m.input] = x
        if self.fixed_batch is None or self.fixed_batch == batch:
            out = self.session.run([c.output], feed)[0]
        else:
            out = self._run_fixed(feed, batch)
        return np.asarray(out, dtype=np.float32)

    def _run_fixed(self, feed: dict[str, np.ndarray], batch: int) -> np.ndarray:
        """Models exported with a fixed batch size: run in slices, zero-pad the last."""
        fb = self.fixed_batch
        assert fb is not None
        parts = []
        for lo in range(0, batch, fb):
            piece = {}
            for name, x in feed.items():
                s = x[lo:lo + fb]
                if s.shape[0] < fb:
                    s = np.concatenate([s, np.zeros((fb - s.shape[0],) + s.shape[1:], s.dtype)])
                piece[name] = s
            parts.append(self.session.run([self.contract.output], piece)[0])
        return np.concatenate(parts)[:batch]


def _dims(meta) -> list:
    return list(meta.shape) if meta.shape is not None else []


def _fixed(dim) -> int | None:
    """A graph dimension as an int, or None when symbolic/unknown."""
    return dim if isinstance(dim, int) and dim > 0 else None


def _check_graph(session: ort.InferenceSession, c: ModelContract, source: str) -> int | None:
    """Compare the graph's inputs/outputs with the contract; return the fixed batch
    size (None when the batch axis is symbolic, as edgefuse export writes it)."""
    def fail(what: str, expected: str, found: object) -> ModelContractError:
        return ModelContractError(
            f"{source}: {what}: expected {expected}, found {found}; the graph contradicts its "
            "'edgefuse' metadata. Re-export the model with edgefuse export, or fix the "
            "contract JSON so that it describes the graph")

    graph_inputs = {i.name: i for i in session.get_inputs()}
    declared = [m.input for m in c.modalities] + [c.mask_input]
    if set(graph_inputs) != set(declared):
        raise fail("graph inputs", f"exactly {declared}", sorted(graph_inputs))
    batches = set()
    for m in c.modalities:
        gi = graph_inputs[m.input]
        if gi.type != _FLOAT:
            raise fail(f"input {m.input!r} type", _FLOAT, gi.type)
        dims = _dims(gi)
        want = [m.channels, m.samples(c.window_ns)]
        if len(dims) != 3 or any(_fixed(d) not in (None, w) for d, w in zip(dims[1:], want)):
            raise fail(f"input {m.input!r} shape", f"[batch, {want[0]}, {want[1]}] "
                       f"(channels, window_ns x rate_hz samples)", dims)
        batches.add(_fixed(dims[0]))
    mi = graph_inputs[c.mask_input]
    dims = _dims(mi)
    if mi.type != _FLOAT:
        raise fail(f"mask input {c.mask_input!r} type", _FLOAT, mi.type)
    if len(dims) != 2 or _fixed(dims[1]) not in (None, len(c.modalities)):
        raise fail(f"mask input {c.mask_input!r} shape", f"[batch, {len(c.modalities)}]", dims)
    batches.add(_fixed(dims[0]))
    outputs = {o.name: o for o in session.get_outputs()}
    if c.output not in outputs:
        raise fail("output name", repr(c.output), sorted(outputs))
    out = outputs[c.output]
    dims = _dims(out)
    if out.type not in _OUTPUT_TYPES:
        raise fail(f"output {c.output!r} type", " or ".join(_OUTPUT_TYPES), out.type)
    if len(dims) != 2 or _fixed(dims[1]) not in (None, len(c.labels)):
        raise fail(f"output {c.output!r} shape", f"[batch, {len(c.labels)}] (labels "
                   f"{list(c.labels)})", dims)
    batches.add(_fixed(dims[0]))
    fixed = {b for b in batches if b is not None}
    if len(fixed) > 1:
        raise fail("batch axis", "one batch size (or a symbolic one) for all inputs/outputs",
                   sorted(fixed))
    return fixed.pop() if fixed else None


def _check_fallback(main: ModelContract, fb: ModelContract, subset: tuple[str, ...],
                    path: Path) -> None:
    """A fallback must describe exactly its subset, with the main model's labels and timing."""
    problems = []
    if fb.modality_names != subset:
        problems.append(f"modalities {list(fb.modality_names)} (expected {list(subset)})")
    for m in fb.modalities:
        if m.name in main.modality_names and m != main.modality(m.name):
            problems.append(f"modality {m.name!r} = {m} (main model: {main.modality(m.name)})")
    if fb.labels != main.labels:
        problems.append(f"labels {list(fb.labels)} (main model: {list(main.labels)})")
    if (fb.window_ns, fb.hop_ns) != (main.window_ns, main.hop_ns):
        problems.append(f"window/hop {fb.window_ns}/{fb.hop_ns} ns "
                        f"(main model: {main.window_ns}/{main.hop_ns} ns)")
    if problems:
        raise ModelContractError(
            f"{path}: fallback for {'+'.join(subset)} of {main.ident} differs from the main "
            f"model: {'; '.join(problems)}. Export fallbacks together with the main model "
            "(edgefuse.exporters.onnx_export.export_with_fallbacks)")
