"""Seeded training of a fusion model with modality dropout (torch, CPU).

    train(load_config(path)) -> checkpoint path

Two datasets: ``goodvibes`` (vehicle detection, acoustic + seismic, split by
day-site) and ``sphar`` (activity recognition, phone + watch IMU, split by
subject). The TOML config (models/configs/*.toml) has tables [data],
[labels] (goodvibes only), [model] and [train]; unknown keys are refused. Checkpoints are plain dicts saved with
torch.save: {"state_dict", "config"} with config holding only JSON-able values,
so ``torch.load(path, weights_only=True)`` reads them back (no pickle of code).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
import tomllib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from edgefuse.models.dataset import GridConfig, WindowSet, load_or_build
from edgefuse.models.labels import DETECTION_LABELS, LabelRule
from edgefuse.models.nets import FusionNet, NetConfig, default_frontends
from edgefuse.models.segments import default_data_dir
from edgefuse.models.splits import Split, split_by_column, split_by_day_site
from edgefuse.runtime.core.errors import ConfigError, InputError

log = logging.getLogger(__name__)


DATASETS = ("goodvibes", "sphar")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "goodvibes"   # or "sphar"
    path: str = ""
    test: tuple[str, ...] = ("bprf/2023-04-11",)   # day-sites (goodvibes) or subjects (sphar)
    val: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"[data] dataset must be one of {DATASETS}, found {self.dataset!r}")


@dataclass(frozen=True)
class ModelConfig:
    embed: int = 32
    width: int = 16
    hidden: int = 32
    fusion: str = "mlp"    # "mlp", "late" or "sum" (see models/nets.py)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    epochs: int = 20
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    modality_dropout: float = 0.3
    gain_db: float = 6.0
    subset_loss: float = 0.5
    class_weight: str = "balanced"   # "balanced" (1/frequency), "sqrt" (1/sqrt) or "none"
    threads: int = 1
    out: str = "~/.cache/edgefuse/runs/detection"


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    labels: LabelRule = field(default_factory=LabelRule)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {k: {f: (list(v) if isinstance(v, tuple) else v)
                    for f, v in dataclasses.asdict(getattr(self, k)).items()}
                for k in ("data", "labels", "model", "train")}


def _section(cls, raw: dict, name: str):
    allowed = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"[{name}] has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    vals = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return cls(**vals)


def load_config(path: str) -> RunConfig:
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    sections = {"data": DataConfig, "labels": LabelRule, "model": ModelConfig,
                "train": TrainConfig}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {unknown}; allowed: {sorted(sections)}")
    return RunConfig(**{k: _section(cls, raw.get(k, {}), k) for k, cls in sections.items()})


def resolve_data_dir(cfg: DataConfig) -> str:
    path = cfg.path or default_data_dir()
    if not path or not os.path.isdir(path):
        raise ConfigError(f"data.path {cfg.path!r} is not a folder and ../shared/data was not "
                          "found; set [data] path to the data pack root")
    return path


@dataclass(frozen=True)
class Prepared:
    ws: WindowSet
    split: Split
    rates_hz: tuple[tuple[str, float], ...]
    window_ns: int
    hop_ns: int
    labels: tuple[str, ...]
    split_column: str          # "day_site" or "subject"
    task: str                  # "detection" or "activity"


def prepare(cfg: RunConfig) -> Prepared:
    path = resolve_data_dir(cfg.data)
    if cfg.data.dataset == "sphar":
        from edgefuse.models.har import ACTIVITIES, HarGrid, load_or_build_har
        hgrid = HarGrid()
        ws = load_or_build_har(path, hgrid)
        usable = ws.mask.sum(axis=1) > 0
        split = split_by_column(ws, "subject", cfg.data.test, cfg.data.val, usable)
        return Prepared(ws, split, hgrid.rates_hz, hgrid.window_ns, hgrid.hop_ns, ACTIVITIES,
                        "subject", "activity")
    grid = GridConfig()
    ws = load_or_build(path, grid, cfg.labels)
    usable = ws.mask.sum(axis=1) > 0    # the runtime abstains on windows with no modality
    split = split_by_day_site(ws, cfg.data.test, cfg.data.val, usable)
    return Prepared(ws, split, grid.rates_hz, grid.window_ns, grid.hop_ns, DETECTION_LABELS,
                    "day_site", "detection")


def _features(net: FusionNet, ws: WindowSet, idx: np.ndarray, batch: int = 512) -> list[torch.Tensor]:
    out: list[list[torch.Tensor]] = [[] for _ in ws.modalities]
    with torch.no_grad():
        for lo in range(0, idx.size, batch):
            part = idx[lo:lo + batch]
            feats = net.features([torch.from_numpy(ws.x[m][part]) for m in ws.modalities])
            for i, f in enumerate(feats):
                out[i].append(f)
    return [torch.cat(o) for o in out]


def _set_norm(net: FusionNet, feats: list[torch.Tensor], mask: torch.Tensor) -> None:
    """Per-band (spectral [N,1,F,T]) or per-channel (raw [N,C,T]) mean/std of the
    training windows where the modality is present."""
    for i, (enc, f) in enumerate(zip(net.encoders, feats)):
        present = f[mask[:, i] > 0]
        if present.shape[0] < 2:
            continue
        dims = (0, present.ndim - 1)
        enc.mean.copy_(present.mean(dim=dims, keepdim=True).reshape(enc.mean.shape))
        enc.std.copy_(present.std(dim=dims, keepdim=True).clamp_min(1e-3)
                      .reshape(enc.std.shape))


def _class_weights(counts: torch.Tensor, kind: str) -> torch.Tensor:
    """Loss weight per class: "balanced" = 1/frequency (every class counts equally),
    "sqrt" = 1/sqrt(frequency) (halfway: fewer false alarms on background-heavy data),
    "none" = 1. Normalised to a mean of 1 over the training windows."""
    if kind == "balanced":
        w = 1.0 / counts
    elif kind == "sqrt":
        w = 1.0 / counts.sqrt()
    elif kind == "none":
        w = torch.ones_like(counts)
    else:
        raise ConfigError(f"[train] class_weight must be 'balanced', 'sqrt' or 'none', "
                          f"found {kind!r}")
    return w * counts.sum() / (w * counts).sum()


def _dropout_mask(mask: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Drop each present modality with probability p, keeping at least one present."""
    keep = (torch.rand(mask.shape, generator=gen) >= p).float()
    dropped = mask * keep
    empty = (dropped.sum(dim=1) == 0) & (mask.sum(dim=1) > 0)
    if empty.any():
        # restore one present modality at random for rows that lost all of them
        scores = torch.rand(mask.shape, generator=gen) * mask
        pick = torch.nn.functional.one_hot(scores.argmax(dim=1), mask.shape[1]).float()
        dropped[empty] = pick[empty]
    return dropped


def _augment(feats: list[torch.Tensor], kinds: list[str], b: torch.Tensor, gain_db: float,
             gen: torch.Generator) -> list[torch.Tensor]:
    """Random gain of +-gain_db per window: on log power (spectral front ends) a gain of
    g dB adds g/10*ln(10) (exact where energy >> eps); on raw signals it multiplies."""
    out = []
    for f, kind in zip(feats, kinds):
        x = f[b]
        u = 2 * torch.rand((b.numel(),) + (1,) * (x.ndim - 1), generator=gen) - 1
        if kind == "raw":
            out.append(x * torch.pow(10.0, gain_db * u / 20.0))
        else:
            out.append(x + gain_db / 10.0 * float(np.log(10.0)) * u)
    return out


def train(cfg: RunConfig, out_dir: str | None = None, max_seconds: float | None = None) -> str:
    """Train on the config's split; returns the checkpoint path. ``max_seconds`` stops
    after the epoch that crosses it (for smoke tests)."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    torch.set_num_threads(max(1, tc.threads))
    prep = prepare(cfg)
    ws, split = prep.ws, prep.split
    ncfg = NetConfig(ws.modalities, default_frontends(dict(prep.rates_hz), prep.window_ns / 1e9),
                     len(prep.labels), cfg.model.embed, cfg.model.width, cfg.model.hidden,
                     cfg.model.fusion)
    net = FusionNet(ncfg)
    tr = split.train
    if tr.size < 2:
        raise ConfigError(f"only {tr.size} training windows after holding out {split.test_keys}; "
                          "hold out fewer keys or point [data] path at more data")
    feats = _features(net, ws, tr)
    mask = torch.from_numpy(ws.mask[tr])
    y = torch.from_numpy(ws.label[tr])
    _set_norm(net, feats, mask)
    kinds = [f.kind for f in ncfg.frontends]
    counts = torch.bincount(y, minlength=ncfg.n_classes).float().clamp_min(1)
    weight = _class_weights(counts, tc.class_weight)
    ce = nn.CrossEntropyLoss(weight=weight, reduction="none")
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.lr, epochs=tc.epochs,
                                                steps_per_epoch=-(-tr.size // tc.batch))
    gen = torch.Generator().manual_seed(tc.seed)
    t_start = time.monotonic()
    epochs_run = 0
    for epoch in range(tc.epochs):
        net.train()
        order = torch.randperm(tr.size, generator=gen)
        total, n = 0.0, 0
        for lo in range(0, tr.size, tc.batch):
            b = order[lo:lo + tc.batch]
            if b.numel() < 2:
                continue
            m = mask[b]
            xb = _augment(feats, kinds, b, tc.gain_db, gen)
            m_drop = _dropout_mask(m, tc.modality_dropout, gen)
            fused, heads = net.from_features(xb, m_drop)
            loss = ce(fused, y[b]).mean()
            for i, h in enumerate(heads):
                present = m[:, i] > 0
                if present.any():
                    loss = loss + tc.subset_loss * ce(h[present], y[b][present]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * b.numel()
            n += b.numel()
        epochs_run = epoch + 1
        log.info("epoch %d/%d loss %.4f (%.0f s)", epoch + 1, tc.epochs, total / max(n, 1),
                 time.monotonic() - t_start)
        if max_seconds is not None and time.monotonic() - t_start > max_seconds:
            break
    net.eval()
    out_dir = os.path.expanduser(out_dir or tc.out)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "checkpoint.pt")
    torch.save({"state_dict": net.state_dict(),
                "config": {"net": ncfg.to_dict(), "run": cfg.to_dict(),
                           "grid": {"window_ns": prep.window_ns, "hop_ns": prep.hop_ns,
                                    "rates_hz": [[k, v] for k, v in prep.rates_hz]},
                           "labels": list(prep.labels),
                           "task": prep.task, "dataset": cfg.data.dataset,
                           "split_column": prep.split_column,
                           "test": list(split.test_keys),
                           "train_windows": int(tr.size), "epochs_run": epochs_run,
                           "train_seconds": round(time.monotonic() - t_start, 1)}}, path)
    log.info("checkpoint %s (%d training windows)", path, tr.size)
    return path


def load_checkpoint(path: str) -> tuple[FusionNet, dict]:
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
    net = FusionNet(NetConfig.from_dict(cfg["net"]))
    net.load_state_dict(ckpt["state_dict"])
    return net.eval(), cfg
