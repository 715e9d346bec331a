"""Export a PyTorch fusion model to an edgefuse ONNX file (needs the train extra).

The module's ``forward`` takes one tensor per modality, in contract order,
each float32 [batch, channels, samples], then the mask float32
[batch, n_modalities], and returns [batch, n_labels] scores (logits or
probabilities, as the contract's ``output_kind`` says).

``export`` writes the graph with the contract's input/output names and a
symbolic batch axis, stores the contract JSON in ``metadata_props["edgefuse"]``,
runs ``onnx.checker`` and finally loads the file with the runtime's own loader,
so a file that the runtime would refuse is never left behind silently.

Exporter choice (torch 2.13): the TorchScript exporter (``dynamo=False``,
the default here) exports these models at opset 17 in ~0.2 s. The
torch.export-based exporter (``dynamo=True``) also works but needs opset >= 18
(it cannot down-convert our graphs to 17), takes ~4 s, and prints progress;
it is kept as an option because the TorchScript exporter is deprecated.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import torch

from edgefuse.runtime.core.contract import METADATA_KEY, FallbackSpec, ModelContract
from edgefuse.runtime.core.inference import OnnxModel

log = logging.getLogger(__name__)

MAX_MODEL_BYTES = 64 * 1024 * 1024  # edge models are small; a bigger file is a mistake


def example_inputs(contract: ModelContract, batch: int = 2, seed: int = 0,
                   scale: float = 100.0, random_mask: bool = False) -> tuple[torch.Tensor, ...]:
    """Random windows (sensor-count scale) and a mask, in forward() argument order."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, m.channels, m.samples(contract.window_ns), generator=g) * scale
          for m in contract.modalities]
    if random_mask:
        mask = (torch.rand(batch, len(contract.modalities), generator=g) > 0.3).float()
        mask[:, 0] = torch.where(mask.sum(1) == 0, 1.0, mask[:, 0])  # at least one present
    else:
        mask = torch.ones(batch, len(contract.modalities))
    return (*xs, mask)


def export(module: torch.nn.Module, contract: ModelContract, path: str | os.PathLike, *,
           opset: int = 17, dynamo: bool = False) -> Path:
    """Write ``module`` as an edgefuse model at ``path``; returns the path.

    Fallback files named in ``contract.fallbacks`` must already exist beside
    ``path`` (use ``export_with_fallbacks`` to write them together).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    args = example_inputs(contract)
    input_names = [m.input for m in contract.modalities] + [contract.mask_input]
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation on every call.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        if dynamo:
            torch.onnx.export(module, args, str(path), input_names=input_names,
                              output_names=[contract.output], opset_version=max(opset, 18),
                              dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=_batch_dynamic_shapes(module, len(args)))
        else:
            torch.onnx.export(module, args, str(path), input_names=input_names,
                              output_names=[contract.output], opset_version=opset,
                              dynamo=False, do_constant_folding=True,
                              dynamic_axes={n: {0: "batch"}
                                            for n in input_names + [contract.output]})
    model = onnx.load(str(path))
    found = [i.name for i in model.graph.input]
    if found != input_names:
        raise ValueError(
            f"exported graph has inputs {found}, expected {input_names}: the exporter drops "
            "inputs that forward() does not use; every modality and the mask must reach the "
            "output (a single-modality model can multiply by the mask)")
    del model.metadata_props[:]
    model.metadata_props.add(key=METADATA_KEY, value=contract.to_json())
    model.doc_string = contract.description
    model.producer_name = "edgefuse"
    model.model_version = 1
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString()
    if len(data) > MAX_MODEL_BYTES:
        raise ValueError(f"exported model is {len(data)} bytes, above the {MAX_MODEL_BYTES} "
                         "byte limit for edge models; make the model smaller")
    path.write_bytes(data)
    OnnxModel.load(path)  # the runtime must accept what we wrote
    log.info("exported %s to %s (%d bytes, opset %d)", contract.ident, path, len(data),
             max(opset, 18) if dynamo else opset)
    return path


def _batch_dynamic_shapes(module: torch.nn.Module, n_args: int) -> tuple:
    """torch.export wants dynamic_shapes shaped like forward()'s signature: one entry per
    named argument, or one tuple for a ``*args`` forward."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    specs = tuple({0: batch} for _ in range(n_args))
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return (specs,)
    return specs


def subset_contract(contract: ModelContract, subset: tuple[str, ...]) -> ModelContract:
    """The contract of a fallback model for ``subset`` (contract order kept)."""
    ordered = tuple(m for m in contract.modalities if m.name in subset)
    if len(ordered) != len(set(subset)) or not ordered:
        raise ValueError(f"subset {subset} is not a subset of {contract.modality_names}")
    return ModelContract(
        name=contract.name, version=contract.version, modalities=ordered,
        window_ns=contract.window_ns, hop_ns=contract.hop_ns, labels=contract.labels,
        mask_input=contract.mask_input, output=contract.output,
        output_kind=contract.output_kind, fallbacks=(),
        description=f"fallback of {contract.ident} for {'+'.join(m.name for m in ordered)}. "
                    + contract.description)


def fallback_file(path: Path, subset: tuple[str, ...]) -> str:
    return f"{path.stem}.{'-'.join(subset)}{path.suffix}"


def export_with_fallbacks(module: torch.nn.Module, contract: ModelContract,
                          path: str | os.PathLike,
                          fallbacks: Mapping[tuple[str, ...], torch.nn.Module], *,
                          opset: int = 17, dynamo: bool = False) -> Path:
    """Export each fallback module (forward takes its subset's inputs + subset mask)
    beside ``path``, then the main module with the fallbacks listed in its contract."""
    path = Path(path)
    specs = []
    for subset, fb_module in fallbacks.items():
        sub = subset_contract(contract, tuple(subset))
        file = fallback_file(path, sub.modality_names)
        export(fb_module, sub, path.parent / file, opset=opset, dynamo=dynamo)
        specs.append(FallbackSpec(sub.modality_names, file))
    full = dataclasses.replace(contract, fallbacks=tuple(specs))
    return export(module, full, path, opset=opset, dynamo=dynamo)


class SubsetView(torch.nn.Module):
    """A fallback made from any main module: missing modalities fed as zeros, mask 0.

    Its outputs equal the masked main model's. The missing branches still run (on
    zeros; the batch axis is symbolic, so they cannot be constant-folded), so it
    saves no time; a module that skips them (models.standin.SubsetFusion) does."""

    def __init__(self, module: torch.nn.Module, contract: ModelContract,
                 subset: tuple[str, ...]):
        super().__init__()
        self.module = module
        self.shapes = [(m.channels, m.samples(contract.window_ns)) for m in contract.modalities]
        self.where = [subset.index(m.name) if m.name in subset else -1
                      for m in contract.modalities]

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        xs, sub_mask = args[:-1], args[-1]
        batch = sub_mask.shape[0]
        full, cols = [], []
        for shape, k in zip(self.shapes, self.where):
            if k >= 0:
                full.append(xs[k])
                cols.append(sub_mask[:, k:k + 1])
            else:
                full.append(torch.zeros((batch,) + shape))
                cols.append(torch.zeros(batch, 1))
        return self.module(*full, torch.cat(cols, dim=1))


def parity(module: torch.nn.Module, path: str | os.PathLike, n: int = 16, seed: int = 0,
           inputs: tuple[torch.Tensor, ...] | None = None) -> float:
    """Max |ONNX Runtime - torch| of the raw output over ``n`` random windows with
    random masks (or over ``inputs`` given in forward() order)."""
    import onnxruntime as ort

    from edgefuse.runtime.core.inference import session_options

    session = ort.InferenceSession(str(path), session_options(1),
                                   providers=["CPUExecutionProvider"])
    contract = ModelContract.from_json(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    if inputs is None:
        inputs = example_inputs(contract, batch=n, seed=seed, random_mask=True)
    with torch.no_grad():
        ref = module.eval()(*inputs).numpy()
    names = [m.input for m in contract.modalities] + [contract.mask_input]
    got = session.run([contract.output], {k: v.numpy() for k, v in zip(names, inputs)})[0]
    return float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
