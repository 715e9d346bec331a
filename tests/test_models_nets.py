"""Built-in front ends are chosen by rate and channels, never by modality name."""
from __future__ import annotations

import pytest

from edgefuse.runtime.core.contract import ModalitySpec

torch = pytest.importorskip("torch")

from edgefuse.models.dataset import GridConfig  # noqa: E402
from edgefuse.models.har import HarGrid  # noqa: E402
from edgefuse.models.nets import (FrontEndConfig, FusionNet, NetConfig,  # noqa: E402
                                  default_frontends)


def test_the_bundled_grids_get_the_front_ends_they_always_had():
    g = GridConfig()
    assert default_frontends(g.contract().modalities, g.window_ns) == (
        FrontEndConfig("mel", 4934.0, 4934, 256, 128, 32, 20.0, 2000.0),
        FrontEndConfig("bands", 800.0, 800, 128, 32, 16, 0.0, 200.0))
    h = HarGrid()
    assert [(f.kind, f.samples, f.n_filters) for f in
            default_frontends(h.contract().modalities, h.window_ns)] == [("raw", 50, 6)] * 2


def test_rates_not_names_pick_the_encoder():
    mods = [ModalitySpec("mic", 1, 16000.0, "mic"), ModalitySpec("imu_geo", 1, 500.0, "g"),
            ModalitySpec("acoustic", 6, 100.0, "a")]
    kinds = [(f.kind, f.n_filters, f.channels) for f in default_frontends(mods, 10**9)]
    assert kinds == [("mel", 32, 1), ("bands", 16, 1), ("raw", 6, 6)]
    short = default_frontends([ModalitySpec("x", 1, 16000.0, "x")], 50_000_000)[0]
    assert short.n_fft <= short.samples == 800     # n_fft fits a 50 ms window


def test_a_multichannel_spectral_modality_runs_one_spectrogram_per_channel():
    mods = [ModalitySpec("stereo", 2, 8000.0, "stereo"), ModalitySpec("geo3", 3, 400.0, "g")]
    fes = default_frontends(mods, 500_000_000)
    net = FusionNet(NetConfig(("stereo", "geo3"), fes, 4, 8, 4, 8, "sum")).eval()
    out = net(torch.randn(5, 2, 4000), torch.randn(5, 3, 200), torch.ones(5, 2))
    assert out.shape == (5, 4)
    assert net.encoders[0].conv[0].in_channels == 2 and net.encoders[1].conv[0].in_channels == 3
