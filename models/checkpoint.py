"""Training checkpoints: plain dicts of tensors and JSON-able values (torch).

``{"state_dict", "config"}`` saved with torch.save and read back with
``torch.load(weights_only=True)`` (no pickle of code). ``config`` holds either
``net`` (the built-in FusionNet's NetConfig) or ``network`` (a user's module:
its spec, keyword arguments and input statistics), plus ``contract`` (the
contract the export writes, JSON), ``grid``, ``labels``, the split and the run.
Checkpoints written before ``contract`` existed still load and export.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgefuse.models.nets import FusionNet, NetConfig
from edgefuse.models.prepare import dataset_contract
from edgefuse.runtime.core.contract import ModalitySpec, ModelContract
from edgefuse.runtime.core.errors import InputError


def checkpoint_contract(cfg: dict) -> ModelContract:
    """The contract a checkpoint's model is exported with."""
    if "contract" in cfg:
        return ModelContract.from_json(cfg["contract"], "checkpoint")
    grid, task = cfg["grid"], cfg.get("task", "detection")   # older checkpoints
    mods = tuple(ModalitySpec(m, f["n_filters"] if f["kind"] == "raw" else 1, float(r), m)
                 for (m, r), f in zip(grid["rates_hz"], cfg["net"]["frontends"]))
    return dataset_contract(task, ModelContract(
        "grid", "0", mods, int(grid["window_ns"]), int(grid["hop_ns"]), tuple(cfg["labels"]),
        "modality_mask", "scores", "logits"))


def input_stats(cfg: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {m: (np.array(v[0], np.float32), np.array(v[1], np.float32))
            for m, v in cfg.get("input_stats", {}).items()}


def build_net(cfg: dict) -> nn.Module:
    """The untrained network a checkpoint config describes."""
    if "network" in cfg:
        from edgefuse.models.custom import build_network
        net = cfg["network"]
        return build_network(net["spec"], net.get("args", {}), checkpoint_contract(cfg),
                             input_stats(cfg), net.get("base_dir", ""))
    return FusionNet(NetConfig.from_dict(cfg["net"]))


def save_checkpoint(path: str, net: nn.Module, config: dict) -> None:
    torch.save({"state_dict": net.state_dict(), "config": config}, path)


def load_checkpoint(path: str) -> tuple[nn.Module, dict]:
    """(net in eval mode, config dict) of a checkpoint written by ``train``."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise InputError(f"checkpoint {path!r} does not exist; give the checkpoint.pt that "
                         "edgefuse train wrote", path=path) from exc
    except Exception as exc:  # torch raises many types for foreign or damaged files
        raise InputError(f"{path}: cannot read as a checkpoint ({type(exc).__name__}: {exc}); "
                         "expected a file written by edgefuse train", path=path) from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise InputError(f"{path}: not an edgefuse checkpoint (expected a dict with "
                         "'state_dict' and 'config')", path=path)
    cfg = ckpt["config"]
    net = build_net(cfg)
    try:
        net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise InputError(f"{path}: the weights do not fit the network the checkpoint names "
                         f"({' '.join(str(exc).split())[:300]}); was the module changed since "
                         "training?", path=path) from exc
    return net.eval(), cfg
