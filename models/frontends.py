"""Spectral front ends that live inside the exported ONNX graph (torch).

The runtime feeds raw windows (sensor counts, float32 [batch, channels,
samples]) to the model; the spectrogram is computed in the graph, so a model
file is self-contained and the runtime needs no DSP code of its own.

The STFT is a strided convolution with fixed kernels: the Hann-windowed DFT
basis (real and imaginary rows, only the bins up to ``fmax``), followed by
power, a fixed filterbank matmul (mel for acoustic, linear bands for seismic)
and log(x + eps). No padding (``center=False``): frames = 1 + (samples -
n_fft) // hop. Two ways to put the convolution in the graph compute the same
sums: "conv" (one Conv1d) and "blocks" (Reshape the window into hop-sized
blocks, one MatMul per n_fft/hop block offset, summed).

Measured (``python -m edgefuse.models.measure_frontends --repeats 21``; ONNX
Runtime 1.32, 1 intra-op thread, 2-core AMD EPYC VM at load 0.15, batch 64,
median; microseconds per 1 s window; conv / blocks = this module exported
to ONNX, stft = ORT's STFT op (opset 17) + the same power/filterbank/log in
ORT, numpy = strided frames + np.fft.rfft + the same ops; 32 mel bands up to
2 kHz for acoustic rates, 16 linear bands up to 400 Hz for seismic rates):

    rate   n_fft hop  bins  frames |  conv  blocks   stft  numpy
    9868   512   256  104   37     | 138.9   93.8   427.3  204.6
    9868   256   256   52   38     |  53.5   39.6   273.4   70.6
    4934   256   128  104   37     |  81.4   61.7   228.4   67.0
    4934   256   256  104   19     |  48.0   29.4    90.5   22.6
    4934   128   128   52   38     |  23.7   17.1   108.2   20.3
    2466   128    64   65   37     |  28.2   21.5   109.1   26.8
    1600   128    64   33   24     |  11.2    9.0    52.3   13.0
     800   128    64   65   11     |  10.2    6.9    25.8    4.5
     800    64    32   33   24     |   6.3    6.7    41.1    7.2

(2467 Hz is not a candidate: 0.5 s hop x 2467 Hz is not a whole number of
samples, which the contract refuses; rates must be even for a 0.5 s hop.)
All four agree with the torch module within 4e-5 (log units). ORT's STFT op
is 2-7x slower than the in-graph convolutions (3-7x than "blocks"); "blocks" beats "conv"
everywhere but one tiny case; numpy's FFT is as fast or faster in a few
settings but would put DSP code outside the model file. Chosen for the
stand-in: "blocks"; acoustic 4934 Hz (half the sensors' nominal 9868 Hz, so
Nyquist 2467 Hz covers the < 2 kHz vehicle band; the aligner low-passes
before decimating), n_fft 256 (19.3 Hz bins), hop 256, 32 mel bands 20-2000
Hz: ~30 us; seismic 800 Hz, n_fft 128, hop 64, 16 bands 0-400 Hz (vehicle
seismic energy in the data is mostly below 250 Hz): ~7 us.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def kept_bins(rate_hz: float, n_fft: int, fmax: float) -> int:
    """Number of DFT bins 0..k with frequency <= fmax (at most n_fft//2 + 1)."""
    return min(n_fft // 2 + 1, int(math.floor(fmax * n_fft / rate_hz)) + 1)


def dft_kernels(n_fft: int, n_bins: int) -> np.ndarray:
    """Hann-windowed DFT basis, float32 [2*n_bins, 1, n_fft]: cos rows then -sin rows."""
    n = np.arange(n_fft, dtype=np.float64)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)  # periodic Hann, as torch.hann_window
    k = np.arange(n_bins, dtype=np.float64)[:, None]
    phase = 2.0 * np.pi * k * n[None, :] / n_fft
    kern = np.concatenate([np.cos(phase) * window, -np.sin(phase) * window], axis=0)
    return kern[:, None, :].astype(np.float32)


def mel_filterbank(rate_hz: float, n_fft: int, n_bins: int, n_mels: int,
                   fmin: float, fmax: float) -> np.ndarray:
    """Triangular HTK-mel filters, float32 [n_mels, n_bins] (area-normalised)."""
    freqs = np.arange(n_bins) * rate_hz / n_fft
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fb = np.zeros((n_mels, n_bins))
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        up = (freqs - lo) / max(mid - lo, 1e-9)
        down = (hi - freqs) / max(hi - mid, 1e-9)
        fb[i] = np.clip(np.minimum(up, down), 0.0, None)
        if fb[i].sum() == 0.0:  # filter narrower than a bin: take the nearest bin
            fb[i, int(np.argmin(np.abs(freqs - mid)))] = 1.0
    fb /= fb.sum(axis=1, keepdims=True)
    return fb.astype(np.float32)


def band_filterbank(rate_hz: float, n_fft: int, n_bins: int, n_bands: int,
                    fmin: float, fmax: float) -> np.ndarray:
    """Rectangular linear-frequency bands, float32 [n_bands, n_bins] (mean of the bins)."""
    freqs = np.arange(n_bins) * rate_hz / n_fft
    edges = np.linspace(fmin, fmax, n_bands + 1)
    fb = np.zeros((n_bands, n_bins))
    for i in range(n_bands):
        last = i == n_bands - 1  # the top band includes its upper edge
        sel = (freqs >= edges[i]) & ((freqs <= edges[i + 1]) if last else (freqs < edges[i + 1]))
        if not sel.any():
            sel = np.zeros(n_bins, dtype=bool)
            sel[int(np.argmin(np.abs(freqs - 0.5 * (edges[i] + edges[i + 1]))))] = True
        fb[i, sel] = 1.0
    fb /= fb.sum(axis=1, keepdims=True)
    return fb.astype(np.float32)


class LogFilterbank(nn.Module):
    """Raw window [batch, channels, samples] -> log filterbank energies
    [batch, channels, n_filters, frames].

    framing="blocks" (default, faster in ORT, see the table above) cuts the
    window into hop-sized blocks with one Reshape and computes each frame's DFT
    as the sum of n_fft/hop block MatMuls; framing="conv" is the same strided
    convolution as one Conv1d. Both compute exactly the same sums. Power is
    divided by n_fft so levels do not depend on the frame length.
    """

    def __init__(self, samples: int, n_fft: int, hop: int, filterbank: np.ndarray,
                 eps: float = 1e-2, framing: str = "blocks"):
        super().__init__()
        if samples < n_fft:
            raise ValueError(f"window of {samples} samples is shorter than n_fft={n_fft}")
        if framing not in ("blocks", "conv"):
            raise ValueError(f"framing must be 'blocks' or 'conv', found {framing!r}")
        if framing == "blocks" and n_fft % hop:
            raise ValueError(f"framing='blocks' needs hop dividing n_fft, found {hop}, {n_fft}")
        n_filters, n_bins = filterbank.shape
        self.n_fft, self.hop, self.n_bins, self.eps = n_fft, hop, n_bins, float(eps)
        self.n_filters, self.framing = n_filters, framing
        self.frames = 1 + (samples - n_fft) // hop
        kernels = dft_kernels(n_fft, n_bins)                                # [2*bins, 1, n_fft]
        self.register_buffer("kernels", torch.from_numpy(kernels))
        per_frame = n_fft // hop
        self.blocks = self.frames + per_frame - 1                           # blocks used
        k = kernels[:, 0, :]
        self.register_buffer("block_kernels", torch.from_numpy(np.stack(
            [k[:, j * hop:(j + 1) * hop].T for j in range(per_frame)]).copy()))  # [r, hop, 2*bins]
        # Stored transposed [n_bins, n_filters] and pre-scaled by 1/n_fft: one MatMul in the graph.
        self.register_buffer("fbank_t", torch.from_numpy(filterbank.T.copy() / n_fft))

    def _dft(self, x: torch.Tensor) -> torch.Tensor:
        """[b*ch, samples] -> [b*ch, frames, 2*bins] (real parts, then imaginary)."""
        if self.framing == "conv":
            y = nn.functional.conv1d(x.unsqueeze(1), self.kernels, stride=self.hop)
            return y.transpose(1, 2)
        blocks = x[:, : self.blocks * self.hop].reshape(-1, self.blocks, self.hop)
        y = torch.matmul(blocks[:, : self.frames], self.block_kernels[0])
        for j in range(1, self.block_kernels.shape[0]):
            y = y + torch.matmul(blocks[:, j: j + self.frames], self.block_kernels[j])
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ch, samples = x.shape[1], x.shape[2]
        y = self._dft(x.reshape(-1, samples))
        re, im = y[..., : self.n_bins], y[..., self.n_bins:]
        energy = torch.matmul(re * re + im * im, self.fbank_t)     # [b*ch, frames, filters]
        logs = torch.log(energy + self.eps).transpose(1, 2)         # [b*ch, filters, frames]
        return logs.reshape(-1, ch, self.n_filters, self.frames)


def log_mel(rate_hz: float, samples: int, n_fft: int, hop: int, n_mels: int,
            fmin: float = 20.0, fmax: float = 2000.0, eps: float = 1e-2,
            framing: str = "blocks") -> LogFilterbank:
    """Log-mel front end for acoustic windows; DFT bins above fmax are not computed."""
    fmax = min(fmax, rate_hz / 2)
    n_bins = kept_bins(rate_hz, n_fft, fmax)
    return LogFilterbank(samples, n_fft, hop,
                         mel_filterbank(rate_hz, n_fft, n_bins, n_mels, fmin, fmax), eps, framing)


def log_bands(rate_hz: float, samples: int, n_fft: int, hop: int, n_bands: int,
              fmin: float = 0.0, fmax: float | None = None, eps: float = 1e-2,
              framing: str = "blocks") -> LogFilterbank:
    """Linear-band log spectrum for seismic windows (low frequencies matter, mel would
    squeeze them into a few filters)."""
    fmax = rate_hz / 2 if fmax is None else min(fmax, rate_hz / 2)
    n_bins = kept_bins(rate_hz, n_fft, fmax)
    return LogFilterbank(samples, n_fft, hop,
                         band_filterbank(rate_hz, n_fft, n_bins, n_bands, fmin, fmax), eps, framing)
