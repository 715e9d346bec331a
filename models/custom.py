"""A user's own network in place of the built-in one (torch).

    [model]
    network = "mypkg.mynet:MyNet"     # or "nets/mynet.py:MyNet" (relative to the config)
    [model.args]
    hidden = 64                        # keyword arguments of MyNet(...)

What the module must be (README, "Your own network"):

- ``MyNet(**args)``; if ``__init__`` has a ``contract`` parameter it also gets the
  ``ModelContract`` (modalities, channels, rates, window, labels), and if it has
  ``input_stats`` it gets {modality: (mean [C], std [C])} float32 arrays over
  the training windows where that modality is present (to normalise inside the
  graph; register them as buffers so they are saved).
- ``forward(x_1, ..., x_M, mask) -> logits [B, n_labels]``: one float32 tensor
  [B, channels, samples] per modality in contract order, then the mask float32
  [B, M] (1 = present). Values are the recorded ones (WAV int16 as counts,
  float WAV in [-1, 1], CSV as written) resampled to the contract's rate; a
  modality that is missing arrives as zeros with mask 0. Every input must reach
  the output (the ONNX exporter drops unused inputs): multiply by the mask.
- it must export to ONNX with ``torch.onnx.export`` (checked before training).

A module named by import path is imported as usual; if Python cannot find it,
the config's folder and the working directory are searched too.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import tempfile

import numpy as np
import torch
from torch import nn

from edgefuse.runtime.core.contract import ModelContract
from edgefuse.runtime.core.errors import ConfigError


def resolve_spec(spec: str, base_dir: str) -> str:
    """A file-based spec with its path made absolute; import specs unchanged."""
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        path = os.path.expanduser(where)
        path = path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))
        return f"{path}:{name}"
    return spec


def _import_file(path: str, spec: str):
    if not os.path.isfile(path):
        raise ConfigError(f"[model] network {spec!r}: {path} does not exist")
    name = f"_edgefuse_net_{hashlib.sha1(path.encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    loader = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module
    try:
        loader.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"[model] network {spec!r}: importing {path} raised "
                          f"{type(exc).__name__}: {exc}") from exc
    return module


def _import_module(modname: str, spec: str, base_dir: str):
    top = modname.split(".")[0]
    for attempt in range(3):
        try:
            return importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name is None or not modname.startswith(exc.name):
                raise ConfigError(f"[model] network {spec!r}: importing {modname} failed: "
                                  f"{exc}") from exc
            dirs = [d for d in (base_dir, os.getcwd()) if d not in sys.path and
                    (os.path.isdir(os.path.join(d, top)) or
                     os.path.isfile(os.path.join(d, top + ".py")))]
            if attempt == 2 or not dirs:
                raise ConfigError(f"[model] network {spec!r}: no module {modname!r} on the "
                                  f"Python path, in the config's folder {base_dir} or in the "
                                  f"working directory; install it, or give 'file.py:Class'"
                                  ) from exc
            sys.path.insert(0, dirs[0])
        except Exception as exc:
            raise ConfigError(f"[model] network {spec!r}: importing {modname} raised "
                              f"{type(exc).__name__}: {exc}") from exc
    raise AssertionError("unreachable")


def import_class(spec: str, base_dir: str = "") -> type:
    """The nn.Module class a spec names."""
    where, _, name = resolve_spec(spec, base_dir or os.getcwd()).rpartition(":")
    module = _import_file(where, spec) if where.endswith(".py") else \
        _import_module(where, spec, base_dir or os.getcwd())
    cls = getattr(module, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise ConfigError(f"[model] network {spec!r}: {where} has no nn.Module subclass "
                          f"{name!r}")
    return cls


def build_network(spec: str, args: dict, contract: ModelContract,
                  input_stats: dict[str, tuple[np.ndarray, np.ndarray]],
                  base_dir: str = "") -> nn.Module:
    cls = import_class(spec, base_dir)
    params = inspect.signature(cls).parameters
    kwargs = dict(args)
    if "contract" in params:
        kwargs["contract"] = contract
    if "input_stats" in params:
        kwargs["input_stats"] = input_stats
    try:
        return cls(**kwargs)
    except Exception as exc:
        raise ConfigError(f"[model] network {spec!r}: {cls.__name__}(**{args!r}) raised "
                          f"{type(exc).__name__}: {exc}; fix [model.args]") from exc


def _expected(contract: ModelContract) -> str:
    parts = [f"{m.name} [B,{m.channels},{m.samples(contract.window_ns)}]"
             for m in contract.modalities]
    return (f"forward({', '.join(parts)}, mask [B,{len(contract.modalities)}]) -> logits "
            f"[B,{len(contract.labels)}] (labels {list(contract.labels)})")


def check_network(net: nn.Module, contract: ModelContract, inputs: tuple[torch.Tensor, ...],
                  spec: str) -> None:
    """Refuse a module whose forward signature or output shape does not fit the
    contract, by a dry forward on the given batch; then a dry ONNX export."""
    n_in = len(contract.modalities) + 1
    try:
        sig = inspect.signature(net.forward)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        ps = list(sig.parameters.values())
        pos = [p for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = [p for p in pos if p.default is p.empty]
        star = any(p.kind is p.VAR_POSITIONAL for p in ps)
        kw_required = [p.name for p in ps if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
        if kw_required or len(required) > n_in or (not star and len(pos) < n_in):
            found = ", ".join(("*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is
                               p.VAR_KEYWORD else "") + p.name for p in ps)
            raise ConfigError(f"[model] network {spec!r}: forward({found}) does not fit the "
                              f"contract; expected {_expected(contract)}")
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(*inputs)
    except Exception as exc:
        raise ConfigError(f"[model] network {spec!r}: a dry forward on 2 windows raised "
                          f"{type(exc).__name__}: {exc}; expected {_expected(contract)}") from exc
    finally:
        net.train(was_training)
    want = (inputs[0].shape[0], len(contract.labels))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want \
            or not out.is_floating_point():
        found = (f"a tensor of shape {list(out.shape)} ({out.dtype})"
                 if isinstance(out, torch.Tensor) else type(out).__name__)
        raise ConfigError(f"[model] network {spec!r}: forward returned {found}; expected a "
                          f"float tensor of shape {list(want)}: {_expected(contract)}")
    from edgefuse.exporters.onnx_export import export
    with tempfile.TemporaryDirectory() as tmp:
        try:
            export(net, contract, os.path.join(tmp, "dry.onnx"))
        except Exception as exc:
            raise ConfigError(f"[model] network {spec!r} does not export to ONNX "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:400]}); "
                              "use ops torch.onnx.export supports, and let every input "
                              "reach the output") from exc
        finally:
            net.train(was_training)
