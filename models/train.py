"""Seeded training of a fusion model with modality dropout (torch, CPU).

    result = train(load_config(path))   # result.checkpoint, result.model, result.summary

The data (models/prepare.py): a user's own recordings labelled from an
intervals file, or one of the bundled datasets (goodvibes, sphar); all three
cut by the one windows-and-labels path (``dataset.build_windows``). The network: the
built-in ``FusionNet`` (front end per modality chosen by its rate, mask-aware
fusion, per-modality subset heads) or the user's module ([model] network,
models/custom.py). The run folder gets checkpoint.pt, model.onnx with one
fallback per modality (``export.export_checkpoint``) and summary.json. The
exported bundle is then calibrated per route on the validation groups
(models/route_calibration.py, [calibration] in the config), or cross-fitted on
out-of-fold training windows (models/crossfit.py, method = "cross-fit"): the
table is in the model's contract and in summary.json.
Config tables and checks: models/config.py.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from edgefuse.models.checkpoint import load_checkpoint, save_checkpoint  # noqa: F401
from edgefuse.models.config import RunConfig, load_config  # noqa: F401 (the API)
from edgefuse.models.dataset import WindowSet
from edgefuse.models.nets import FusionNet, NetConfig, default_frontends
from edgefuse.models.prepare import Prepared, prepare
from edgefuse.runtime.core.errors import ConfigError

log = logging.getLogger(__name__)


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


def _gain(x: torch.Tensor, kind: str, gain_db: float, gen: torch.Generator) -> torch.Tensor:
    """Random gain of +-gain_db per window: on log power (spectral front ends) a gain of
    g dB adds g/10*ln(10) (exact where energy >> eps); on raw signals it multiplies."""
    u = 2 * torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), generator=gen) - 1
    if kind == "raw":
        return x * torch.pow(10.0, gain_db * u / 20.0)
    return x + gain_db / 10.0 * float(np.log(10.0)) * u


class _Learner:
    """One training step's forward for the built-in net (front ends computed once,
    subset heads trained too) or a user's module (raw windows, zeros where masked)."""

    def __init__(self, net: nn.Module, ws: WindowSet, idx: np.ndarray):
        self.net, self.builtin = net, isinstance(net, FusionNet)
        xs = [torch.from_numpy(ws.x[m][idx]) for m in ws.modalities]
        if self.builtin:
            with torch.no_grad():
                self.feats = [torch.cat([fe(x[lo:lo + 512]) for lo in range(0, len(x), 512)])
                              for fe, x in zip(net.frontends, xs)]
            self.kinds = [f.kind for f in net.cfg.frontends]
        else:
            self.feats, self.kinds = xs, ["raw"] * len(xs)

    def set_norm(self, mask: torch.Tensor) -> None:
        """Per-band (spectral [N,C,F,T]) or per-channel (raw [N,C,T]) mean/std of the
        training windows where the modality is present."""
        if not self.builtin:
            return
        for i, (enc, f) in enumerate(zip(self.net.encoders, self.feats)):
            present = f[mask[:, i] > 0]
            if present.shape[0] < 2:
                continue
            dims = (0, present.ndim - 1)
            enc.mean.copy_(present.mean(dim=dims, keepdim=True).reshape(enc.mean.shape))
            enc.std.copy_(present.std(dim=dims, keepdim=True).clamp_min(1e-3)
                          .reshape(enc.std.shape))

    def inputs(self, b: torch.Tensor, gain_db: float | None = None,
               gen: torch.Generator | None = None) -> list[torch.Tensor]:
        """The rows b of each modality, with a random gain when gain_db is given."""
        return [f[b] if gain_db is None else _gain(f[b], k, gain_db, gen)
                for f, k in zip(self.feats, self.kinds)]

    def forward(self, xb: list[torch.Tensor], mask: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Fused logits and the subset heads' (built-in net only)."""
        if self.builtin:
            return self.net.from_features(xb, mask)
        shaped = [x * mask[:, i].reshape((-1,) + (1,) * (x.ndim - 1)) for i, x in enumerate(xb)]
        return self.net(*shaped, mask), []


def _input_stats(ws: WindowSet, idx: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and std of each modality over the windows where it is present
    (accumulated in blocks: no copy of the whole training set)."""
    out = {}
    for j, m in enumerate(ws.modalities):
        rows = idx[ws.mask[idx, j] > 0]
        c = ws.x[m].shape[1]
        s1, s2, n = np.zeros(c), np.zeros(c), 0
        for lo in range(0, rows.size, 1024):
            x = ws.x[m][rows[lo:lo + 1024]].astype(np.float64)
            s1 += x.sum(axis=(0, 2))
            s2 += (x * x).sum(axis=(0, 2))
            n += x.shape[0] * x.shape[2]
        mean = s1 / max(n, 1)
        std = np.sqrt(np.maximum(s2 / max(n, 1) - mean * mean, 0.0)) if n else np.ones(c)
        out[m] = (mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32))
    return out


def _make_net(cfg: RunConfig, prep: Prepared, tr: np.ndarray, stats: dict) -> tuple[nn.Module,
                                                                                    dict]:
    """The network and its entry in the checkpoint config (net or network)."""
    c = prep.contract
    if not cfg.model.network:
        m = cfg.model
        ncfg = NetConfig(c.modality_names, default_frontends(c.modalities, c.window_ns),
                         len(c.labels), m.embed, m.width, m.hidden, m.fusion)
        return FusionNet(ncfg), {"net": ncfg.to_dict()}
    from edgefuse.models.custom import build_network, check_network, resolve_spec
    spec = resolve_spec(cfg.model.network, cfg.base_dir)
    net = build_network(spec, cfg.model.args, c, stats, cfg.base_dir)
    two = tr[:2]
    xs = tuple(torch.from_numpy(prep.ws.x[m][two] * prep.ws.mask[two, j, None, None])
               for j, m in enumerate(c.modality_names))
    check_network(net, c, (*xs, torch.from_numpy(prep.ws.mask[two])), cfg.model.network)
    return net, {"network": {"spec": spec, "args": dict(cfg.model.args),
                             "base_dir": cfg.base_dir}}


def _accuracy(learner: _Learner, y: torch.Tensor, mask: torch.Tensor) -> float:
    learner.net.eval()
    hits = 0
    with torch.no_grad():
        for lo in range(0, y.numel(), 512):
            b = torch.arange(lo, min(lo + 512, y.numel()))
            logits, _ = learner.forward(learner.inputs(b), mask[b])
            hits += int((logits.argmax(1) == y[b]).sum())
    learner.net.train()
    return hits / max(1, y.numel())


def _calibrate(cfg: RunConfig, prep: Prepared, model: str,
               max_seconds: float | None = None) -> dict | None:
    """Calibrate the exported bundle on the validation windows, or cross-fitted on
    out-of-fold training windows (None: not calibrated)."""
    if not cfg.calibration.enabled:
        log.info("[calibration] enabled = false: the model is exported uncalibrated")
        return None
    if cfg.calibration.method == "cross-fit":
        from edgefuse.models.crossfit import crossfit_calibrate
        return crossfit_calibrate(cfg, prep, model,
                                  os.path.join(os.path.dirname(model), "crossfit"),
                                  max_seconds)
    if prep.split.val.size == 0:
        log.warning("no validation windows ([data] val and the default share are empty): "
                    "the model is exported uncalibrated, so its routes never abstain on "
                    "their own; name validation groups in [data] val")
        return None
    from edgefuse.models.route_calibration import calibrate_model
    return {"method": "holdout", "val": list(prep.split.val_keys),
            "val_windows": int(prep.split.val.size),
            **calibrate_model(model, prep.ws, prep.split.val, prep.ws.meta["group"],
                              cfg.calibration.target_risk, cfg.calibration.delta)}


@dataclass(frozen=True)
class TrainResult:
    checkpoint: str
    model: str          # the exported ONNX bundle (model.onnx + fallbacks)
    summary: dict


def train(cfg: RunConfig, out_dir: str | None = None, max_seconds: float | None = None,
          prepared: Prepared | None = None) -> TrainResult:
    """Train on the config's split, save the checkpoint, export the ONNX bundle.
    ``max_seconds`` stops after the epoch that crosses it (smoke runs); ``prepared``:
    the windows and split to use instead of the config's (cross-fit folds)."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    torch.set_num_threads(max(1, tc.threads))
    prep = prepared if prepared is not None else prepare(cfg)
    ws, split, c = prep.ws, prep.split, prep.contract
    tr = split.train
    if cfg.calibration.enabled and cfg.calibration.method == "cross-fit":
        from edgefuse.models.crossfit import planned_folds
        planned_folds(cfg, prep)   # refused before training, not after
    if tr.size < 2:
        raise ConfigError(f"only {tr.size} training windows after holding out {split.test_keys}; "
                          "hold out fewer keys or give more labelled recordings")
    stats = _input_stats(ws, tr)
    net, net_entry = _make_net(cfg, prep, tr, stats)
    learner = _Learner(net, ws, tr)
    mask = torch.from_numpy(ws.mask[tr])
    y = torch.from_numpy(ws.label[tr])
    learner.set_norm(mask)
    counts = torch.bincount(y, minlength=len(c.labels)).float().clamp_min(1)
    ce = nn.CrossEntropyLoss(weight=_class_weights(counts, tc.class_weight), reduction="none")
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.lr, epochs=tc.epochs,
                                                steps_per_epoch=-(-tr.size // tc.batch))
    val = _Learner(net, ws, split.val) if split.val.size else None
    gen = torch.Generator().manual_seed(tc.seed)
    t_start = time.monotonic()
    epochs_run, loss_avg, val_acc = 0, float("nan"), None
    net.train()
    bar = tqdm(range(tc.epochs), desc="train", unit="epoch", disable=None, leave=False)
    for epoch in bar:
        order = torch.randperm(tr.size, generator=gen)
        total, n = 0.0, 0
        for lo in range(0, tr.size, tc.batch):
            b = order[lo:lo + tc.batch]
            if b.numel() < 2:
                continue
            m = mask[b]
            xb = learner.inputs(b, tc.gain_db, gen)       # gain first, then dropout: the
            m_drop = _dropout_mask(m, tc.modality_dropout, gen)   # generator's fixed order
            fused, heads = learner.forward(xb, m_drop)
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
        epochs_run, loss_avg = epoch + 1, total / max(n, 1)
        if val is not None:
            val_acc = _accuracy(val, torch.from_numpy(ws.label[split.val]),
                                torch.from_numpy(ws.mask[split.val]))
        bar.set_postfix(loss=f"{loss_avg:.3f}", **({"val_acc": f"{val_acc:.3f}"}
                                                   if val_acc is not None else {}))
        log.info("epoch %d/%d loss %.4f%s (%.0f s)", epoch + 1, tc.epochs, loss_avg,
                 "" if val_acc is None else f" val accuracy {val_acc:.3f}",
                 time.monotonic() - t_start)
        if max_seconds is not None and time.monotonic() - t_start > max_seconds:
            break
    bar.close()
    net.eval()
    out_dir = os.path.abspath(os.path.expanduser(out_dir or tc.out))
    os.makedirs(out_dir, exist_ok=True)
    summary = {"dataset": prep.dataset, "task": prep.task, "contract": c.ident,
               "labels": list(c.labels), "windows": len(ws),
               "train_windows": int(tr.size), "val_windows": int(split.val.size),
               "test_windows": int(split.test.size),
               "train_class_counts": np.bincount(ws.label[tr], minlength=len(c.labels)).tolist(),
               "split_column": prep.split_column, "test": list(split.test_keys),
               "val": list(split.val_keys), "epochs_run": epochs_run, "final_loss": loss_avg,
               "val_accuracy": val_acc, "train_seconds": round(time.monotonic() - t_start, 1),
               "network": net_entry.get("network", {}).get("spec", "built-in FusionNet")}
    if ws.info:
        summary["label_report"] = ws.info
    config = {**net_entry, "run": cfg.to_dict(), "contract": c.to_json(),
              "grid": {"window_ns": c.window_ns, "hop_ns": c.hop_ns,
                       "rates_hz": [[m.name, m.rate_hz] for m in c.modalities],
                       "channels": [[m.name, m.channels] for m in c.modalities]},
              "labels": list(c.labels), "task": prep.task, "dataset": prep.dataset,
              "split_column": prep.split_column, "test": list(split.test_keys),
              "input_stats": {m: [v[0].tolist(), v[1].tolist()] for m, v in stats.items()},
              "input_scale": {m: float(np.sqrt(np.mean(v[1] ** 2 + v[0] ** 2)))
                              for m, v in stats.items()},
              "train_windows": int(tr.size), "epochs_run": epochs_run,
              "train_seconds": summary["train_seconds"]}
    if cfg.on_recordings:
        config.update({"label_rule": cfg.labels.to_dict(), "chunk_s": cfg.data.chunk_s})
    ckpt = os.path.join(out_dir, "checkpoint.pt")
    save_checkpoint(ckpt, net, config)
    from edgefuse.models.export import export_checkpoint
    model = os.path.join(out_dir, "model.onnx")
    report = export_checkpoint(ckpt, model)
    calibration = _calibrate(cfg, prep, model, max_seconds)
    if calibration:   # `edgefuse export` of the checkpoint writes it again
        save_checkpoint(ckpt, net, {**config, "calibration": calibration["routes"]})
    summary.update({"checkpoint": ckpt, "model": model, "model_files": sorted(report.files),
                    "parity": report.parity, "calibration": calibration})
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    log.info("checkpoint %s, model %s (%d training windows)", ckpt, model, tr.size)
    return TrainResult(ckpt, model, summary)
