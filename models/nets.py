"""Trainable fusion networks (torch): per-modality encoders, mask-aware fusion, subset heads.

Graph of the exported model (what runs in the field):

    raw window [B,C,S_m] --front end (log-mel / log-bands, fixed)--> [B,C,F,T]
      --per-band normalisation (fixed, from the training set)--> small 2-D CNN
      --> embedding e_m [B,E]
    (IMU rates: raw [B,C,S] --per-channel normalisation--> small 1-D CNN --> e_m)
    The front end of a modality follows from its rate (``default_frontends``).
    z_m = mask_m * e_m + (1 - mask_m) * missing_m       (learned "absent" vector)
    fusion "mlp":  logits = MLP([z_1 .. z_M, mask])
    fusion "late": logits = sum_m mask_m * exp(w_m) * head_m(e_m)   (product of experts)
    fusion "sum":  the two added

Each modality also has a subset head (Linear on e_m alone), trained jointly;
it is what a per-subset fallback model runs (``SubsetNet``). The front end is
split from the rest (``features`` / ``from_features``) so training can compute
features once per dataset; the exported graph runs both.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from edgefuse.models.frontends import log_bands, log_mel
from edgefuse.runtime.core.contract import ModalitySpec

FUSIONS = ("mlp", "late", "sum")


@dataclass(frozen=True)
class FrontEndConfig:
    kind: str            # "mel" (audio rates), "bands" (vibration rates) or "raw" (IMU rates)
    rate_hz: float
    samples: int
    n_fft: int
    hop: int
    n_filters: int       # "raw": the channel count
    fmin: float
    fmax: float
    channels: int = 1    # spectral kinds: one spectrogram per channel, stacked as planes


@dataclass(frozen=True)
class NetConfig:
    modalities: tuple[str, ...]
    frontends: tuple[FrontEndConfig, ...]
    n_classes: int
    embed: int = 32
    width: int = 16
    hidden: int = 32
    fusion: str = "mlp"   # "mlp", "late" (weighted sum of subset heads) or "sum" (both)

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, found {self.fusion!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modalities"] = list(self.modalities)
        d["frontends"] = [asdict(f) for f in self.frontends]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        fes = tuple(FrontEndConfig(**f) for f in d["frontends"])
        return cls(tuple(d["modalities"]), fes, int(d["n_classes"]), int(d["embed"]),
                   int(d["width"]), int(d["hidden"]), str(d.get("fusion", "mlp")))


AUDIO_HZ = 4000.0       # at and above: a log-mel spectrogram (audio rates)
VIBRATION_HZ = 200.0    # at and above (below AUDIO_HZ): linear log bands; below: raw


def _pow2_near(x: float, most: int) -> int:
    """The power of two nearest x (in log scale), at most ``most`` (a window's samples)."""
    n = 2 ** max(2, int(round(math.log2(max(x, 4.0)))))
    while n > most and n > 4:
        n //= 2
    return n


def default_frontends(modalities: Sequence[ModalitySpec], window_ns: int
                      ) -> tuple[FrontEndConfig, ...]:
    """The built-in front end of each modality, chosen by its rate (never its name):

    - >= 4 kHz (audio): log-mel, n_fft ~52 ms, hop n_fft/2, 32 bands from 20 Hz to
      0.4 x rate (at least 2 kHz, at most 8 kHz);
    - 200 Hz .. 4 kHz (vibration): linear log bands, n_fft ~160 ms, hop n_fft/4, 16
      bands from 0 to max(200 Hz, rate/4);
    - < 200 Hz (IMU, slow sensors): the raw channels (a 1-D CNN).
    At 4934 Hz and 800 Hz these are the bundled goodvibes front ends exactly
    (n_fft 256 / hop 128 / 20-2000 Hz; n_fft 128 / hop 32 / 0-200 Hz)."""
    out = []
    for m in modalities:
        rate, samples = float(m.rate_hz), m.samples(window_ns)
        if rate >= AUDIO_HZ:
            n_fft = _pow2_near(rate * 0.052, samples)
            fmax = min(max(0.4 * rate, 2000.0), 8000.0, rate / 2)
            out.append(FrontEndConfig("mel", rate, samples, n_fft, n_fft // 2, 32, 20.0, fmax,
                                      m.channels))
        elif rate >= VIBRATION_HZ:
            n_fft = _pow2_near(rate * 0.16, samples)
            fmax = min(max(200.0, rate / 4), rate / 2)
            out.append(FrontEndConfig("bands", rate, samples, n_fft, max(1, n_fft // 4), 16,
                                      0.0, fmax, m.channels))
        else:
            out.append(raw_frontend(rate, samples, m.channels))
    return tuple(out)


def raw_frontend(rate_hz: float, samples: int, channels: int) -> FrontEndConfig:
    """No spectral front end: the encoder sees the raw channels (n_filters = channels)."""
    return FrontEndConfig("raw", rate_hz, samples, 0, 0, channels, 0.0, rate_hz / 2, channels)


def make_frontend(cfg: FrontEndConfig) -> nn.Module:
    if cfg.kind == "raw":
        return nn.Identity()
    if cfg.kind == "mel":
        return log_mel(cfg.rate_hz, cfg.samples, cfg.n_fft, cfg.hop, cfg.n_filters, cfg.fmin,
                       cfg.fmax)
    if cfg.kind == "bands":
        return log_bands(cfg.rate_hz, cfg.samples, cfg.n_fft, cfg.hop, cfg.n_filters, cfg.fmin,
                         cfg.fmax)
    raise ValueError(f"front end kind must be 'mel', 'bands' or 'raw', found {cfg.kind!r}")


class Encoder(nn.Module):
    """Log-spectrogram [B,C,F,T] (C = the modality's channels) -> embedding [B,E]."""

    def __init__(self, n_filters: int, width: int, embed: int, channels: int = 1):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, n_filters, 1))
        self.register_buffer("std", torch.ones(1, channels, n_filters, 1))
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        )
        self.proj = nn.Linear(4 * w, embed)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        h = self.conv((feats - self.mean) / self.std)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return torch.relu(self.proj(pooled))


class Encoder1D(nn.Module):
    """Raw multichannel window [B,C,S] (IMU) -> embedding [B,E]: per-channel
    normalisation (fixed, from the training set), three 1-D convs, mean+max pooling."""

    def __init__(self, channels: int, width: int, embed: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1))
        self.register_buffer("std", torch.ones(1, channels, 1))
        w = width
        self.conv = nn.Sequential(
            nn.Conv1d(channels, w, 5, padding=2), nn.BatchNorm1d(w), nn.ReLU(),
            nn.MaxPool1d(2, ceil_mode=True),
            nn.Conv1d(w, 2 * w, 5, padding=2), nn.BatchNorm1d(2 * w), nn.ReLU(),
            nn.MaxPool1d(2, ceil_mode=True),
            nn.Conv1d(2 * w, 2 * w, 5, padding=2), nn.BatchNorm1d(2 * w), nn.ReLU(),
        )
        self.proj = nn.Linear(4 * w, embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv((x - self.mean) / self.std)
        pooled = torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1)
        return torch.relu(self.proj(pooled))


def make_encoder(cfg: FrontEndConfig, width: int, embed: int) -> nn.Module:
    if cfg.kind == "raw":
        return Encoder1D(cfg.n_filters, width, embed)
    return Encoder(cfg.n_filters, width, embed, cfg.channels)


class FusionNet(nn.Module):
    """forward(x_1, ..., x_M, mask) -> logits [B, n_classes] (the exported signature)."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        self.frontends = nn.ModuleList(make_frontend(f) for f in cfg.frontends)
        self.encoders = nn.ModuleList(make_encoder(f, cfg.width, cfg.embed)
                                      for f in cfg.frontends)
        self.missing = nn.Parameter(torch.zeros(len(cfg.modalities), cfg.embed))
        m = len(cfg.modalities)
        self.fusion = nn.Sequential(nn.Linear(m * cfg.embed + m, cfg.hidden), nn.ReLU(),
                                    nn.Linear(cfg.hidden, cfg.n_classes))
        self.subset_heads = nn.ModuleList(nn.Linear(cfg.embed, cfg.n_classes)
                                          for _ in cfg.modalities)
        # Late fusion: log-weights of each modality's subset-head logits (start equal).
        self.late_weight = nn.Parameter(torch.zeros(m))

    def features(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [fe(x) for fe, x in zip(self.frontends, xs)]

    def embed(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [enc(f) for enc, f in zip(self.encoders, feats)]

    def fuse(self, embs: list[torch.Tensor], mask: torch.Tensor,
             heads: list[torch.Tensor] | None = None) -> torch.Tensor:
        if heads is None:
            heads = [h(e) for h, e in zip(self.subset_heads, embs)]
        out = None
        if self.cfg.fusion in ("mlp", "sum"):
            zs = []
            for i, e in enumerate(embs):
                m = mask[:, i:i + 1]
                zs.append(m * e + (1.0 - m) * self.missing[i])
            out = self.fusion(torch.cat(zs + [mask], dim=1))
        if self.cfg.fusion in ("late", "sum"):
            # Product of experts over the present modalities: a missing one adds nothing.
            w = torch.exp(self.late_weight)
            late = sum(mask[:, i:i + 1] * w[i] * h for i, h in enumerate(heads))
            out = late if out is None else out + late
        return out

    def from_features(self, feats: list[torch.Tensor], mask: torch.Tensor
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Fused logits and the per-modality subset-head logits."""
        embs = self.embed(feats)
        heads = [h(e) for h, e in zip(self.subset_heads, embs)]
        return self.fuse(embs, mask, heads), heads

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *xs, mask = inputs
        return self.fuse(self.embed(self.features(list(xs))), mask)


class SubsetNet(nn.Module):
    """Fallback model for one modality: forward(x_m, mask_m) -> logits of its subset head.

    The mask input is part of the contract (fallbacks take their subset's mask); a
    single-modality model only runs when that modality is present, so it is unused."""

    def __init__(self, net: FusionNet, modality: str):
        super().__init__()
        i = net.cfg.modalities.index(modality)
        self.frontend = net.frontends[i]
        self.encoder = net.encoders[i]
        self.head = net.subset_heads[i]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.encoder(self.frontend(x)))
        return logits + 0.0 * mask.sum(dim=1, keepdim=True)  # keep the input in the graph


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def estimate_flops(net: FusionNet) -> int:
    """Multiply-accumulates x 2 of one window through the exported graph (convs, matmuls)."""
    total = 0
    for fe, cfg, enc in zip(net.frontends, net.cfg.frontends, net.encoders):
        if cfg.kind == "raw":
            t = cfg.samples
            for layer in enc.conv:
                if isinstance(layer, nn.Conv1d):
                    total += 2 * layer.in_channels * layer.out_channels * layer.kernel_size[0] * t
                elif isinstance(layer, nn.MaxPool1d):
                    t = -(-t // 2)
            total += 2 * enc.proj.in_features * enc.proj.out_features
            continue
        frames = 1 + (cfg.samples - cfg.n_fft) // cfg.hop
        total += 2 * fe.kernels.shape[0] * cfg.n_fft * frames * cfg.channels     # conv-STFT
        total += 2 * fe.fbank_t.shape[0] * fe.fbank_t.shape[1] * frames * cfg.channels
        f, t = cfg.n_filters, frames
        for layer in enc.conv:
            if isinstance(layer, nn.Conv2d):
                k = layer.kernel_size[0] * layer.kernel_size[1]
                total += 2 * layer.in_channels * layer.out_channels * k * f * t
            elif isinstance(layer, nn.MaxPool2d):
                f, t = -(-f // 2), -(-t // 2)
        total += 2 * enc.proj.in_features * enc.proj.out_features
    total += sum(2 * h.in_features * h.out_features for h in net.subset_heads)
    if net.cfg.fusion in ("mlp", "sum"):
        for layer in net.fusion:
            if isinstance(layer, nn.Linear):
                total += 2 * layer.in_features * layer.out_features
    return int(total)
