"""The stand-in fusion model (torch): small, fast, mask-aware.

NOT the trained model of issue 3: it exists so that the runtime, the demo and
the benchmark have a real model with the real contract to run. Inputs are
raw sensor counts (the WAV values), as the aligner delivers them.

Architecture (per modality, then fused):

    window -> front end (in-graph STFT, frontends.py) -> per-band affine
           -> Conv1d(k=3) -> ReLU -> Conv1d(k=3) -> ReLU -> mean+max over time
           -> Linear -> embedding e_m (EMB values)
    fused = sum_m mask_m * e_m / max(1, sum_m mask_m)        (masked mean)
    logits = MLP([fused, mask])

The mask is also given to the classifier, so it can learn how much to trust
a single modality. IMU windows (6 channels at 100 Hz) skip the spectral front
end and go straight into the convolutions.
"""
from __future__ import annotations

import torch
from torch import nn

from edgefuse.models.frontends import LogFilterbank, log_bands, log_mel
from edgefuse.runtime.core.contract import ModalitySpec, ModelContract

WINDOW_NS = 1_000_000_000
HOP_NS = 500_000_000
LABELS = ("background", "vehicle")
ACOUSTIC = ModalitySpec("acoustic", 1, 4934.0, "acoustic")
SEISMIC = ModalitySpec("seismic", 1, 800.0, "seismic")
IMU = ModalitySpec("imu", 6, 100.0, "imu")
EMB = 32
WIDTH = 32

AV_DESCRIPTION = ("stand-in, not the trained model of issue 3: a small acoustic+seismic "
                  "vehicle detector trained for a few minutes on goodvibes passes (vehicle) "
                  "and noise windows (background), so demo decisions are meaningful; inputs are "
                  "raw sensor counts")
BENCH_DESCRIPTION = ("benchmark model with three modalities (acoustic, seismic, imu); "
                     "UNTRAINED (random weights): its decisions mean nothing, only its cost "
                     "and contract are real")


def samples(spec: ModalitySpec) -> int:
    return spec.samples(WINDOW_NS)


def acoustic_front() -> LogFilterbank:
    # 4934 Hz, n_fft 256 (19 Hz bins), hop 256, 32 mel bands 20-2000 Hz: see frontends.py.
    return log_mel(ACOUSTIC.rate_hz, samples(ACOUSTIC), n_fft=256, hop=256, n_mels=32,
                   fmin=20.0, fmax=2000.0)


def seismic_front() -> LogFilterbank:
    # 800 Hz, n_fft 128 (6.25 Hz bins), hop 64, 16 linear bands 0-400 Hz.
    return log_bands(SEISMIC.rate_hz, samples(SEISMIC), n_fft=128, hop=64, n_bands=16,
                     fmin=0.0, fmax=400.0)


class ConvBody(nn.Module):
    """[batch, features, frames] -> embedding [batch, EMB]."""

    def __init__(self, features: int, stride: int = 1):
        super().__init__()
        self.norm = nn.BatchNorm1d(features)
        self.conv1 = nn.Conv1d(features, WIDTH, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv1d(WIDTH, WIDTH, 3, padding=1)
        self.proj = nn.Linear(2 * WIDTH, EMB)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(self.norm(f)))
        h = torch.relu(self.conv2(h))
        return self.proj(torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1))


class ModalityEncoder(nn.Module):
    """Raw window [batch, channels, samples] -> embedding [batch, EMB]."""

    def __init__(self, front: LogFilterbank | None, channels: int, stride: int = 1):
        super().__init__()
        self.front = front
        features = channels * front.n_filters if front is not None else channels
        self.body = ConvBody(features, stride)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.front is None:
            return x
        f = self.front(x)                                   # [b, ch, filters, frames]
        return f.reshape(-1, f.shape[1] * f.shape[2], f.shape[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.features(x))


class FusionNet(nn.Module):
    """forward(x_1, ..., x_M, mask) -> logits [batch, n_labels]; modalities in contract order."""

    def __init__(self, encoders: list[ModalityEncoder], n_labels: int):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        m = len(encoders)
        self.head = nn.Sequential(nn.Linear(EMB + m, WIDTH), nn.ReLU(), nn.Linear(WIDTH, n_labels))

    def fuse(self, embeddings: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        e = torch.stack(embeddings, dim=1)                   # [b, M, EMB]
        weight = mask.unsqueeze(2)
        fused = (e * weight).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return self.head(torch.cat([fused, mask], dim=1))

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        xs, mask = args[:-1], args[-1]
        return self.fuse([enc(x) for enc, x in zip(self.encoders, xs)], mask)

    def forward_features(self, feats: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Same as forward() from precomputed front-end features (training is faster)."""
        return self.fuse([enc.body(f) for enc, f in zip(self.encoders, feats)], mask)


class SubsetFusion(nn.Module):
    """A fallback for a subset of modalities made from a FusionNet: only the present
    encoders run (cheaper than the masked main model); the others contribute nothing,
    as their mask is 0. forward(x_subset..., mask_subset) -> logits."""

    def __init__(self, net: FusionNet, positions: list[int], n_modalities: int):
        super().__init__()
        self.net = net
        self.positions = list(positions)
        self.n_modalities = n_modalities

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        xs, sub_mask = args[:-1], args[-1]
        zero_emb = torch.zeros_like(sub_mask[:, :1]).expand(-1, EMB)
        embeddings = [zero_emb] * self.n_modalities
        columns = [torch.zeros_like(sub_mask[:, :1])] * self.n_modalities
        for k, pos in enumerate(self.positions):
            embeddings[pos] = self.net.encoders[pos](xs[k])
            columns[pos] = sub_mask[:, k:k + 1]
        return self.net.fuse(embeddings, torch.cat(columns, dim=1))


def subset_of(net: FusionNet, contract: ModelContract, subset: tuple[str, ...]) -> SubsetFusion:
    names = contract.modality_names
    return SubsetFusion(net, [names.index(m) for m in names if m in subset], len(names))


def av_contract(description: str = AV_DESCRIPTION, version: str = "0.1.0") -> ModelContract:
    return ModelContract(
        name="standin-av", version=version, modalities=(ACOUSTIC, SEISMIC),
        window_ns=WINDOW_NS, hop_ns=HOP_NS, labels=LABELS, mask_input="modality_mask",
        output="logits", output_kind="logits", description=description)


def bench_contract(description: str = BENCH_DESCRIPTION, version: str = "0.1.0") -> ModelContract:
    return ModelContract(
        name="bench-3m", version=version, modalities=(ACOUSTIC, SEISMIC, IMU),
        window_ns=WINDOW_NS, hop_ns=HOP_NS, labels=LABELS, mask_input="modality_mask",
        output="logits", output_kind="logits", description=description)


def build_av(seed: int = 0) -> FusionNet:
    torch.manual_seed(seed)
    return FusionNet([ModalityEncoder(acoustic_front(), 1),
                      ModalityEncoder(seismic_front(), 1)], len(LABELS))


def build_bench_3m(seed: int = 0) -> FusionNet:
    """Acoustic + seismic + IMU (6 ch, 100 Hz); untrained unless you train it."""
    torch.manual_seed(seed)
    return FusionNet([ModalityEncoder(acoustic_front(), 1),
                      ModalityEncoder(seismic_front(), 1),
                      ModalityEncoder(None, IMU.channels, stride=2)], len(LABELS))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
