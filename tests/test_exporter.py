"""Exporter, front ends and stand-in architecture (torch + onnx), import hygiene."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="SKIPPED LOUDLY: torch (train extra) is missing, so the exporter tests "
    "cannot run; install with pip install -e '.[train]'")
onnx = pytest.importorskip("onnx", reason="SKIPPED LOUDLY: onnx (train extra) is missing")

from edgefuse.exporters.onnx_export import (SubsetView, example_inputs, export,  # noqa: E402
                                            export_with_fallbacks, parity)
from edgefuse.models import standin  # noqa: E402
from edgefuse.models.frontends import (band_filterbank, dft_kernels, kept_bins,  # noqa: E402
                                       log_bands, log_mel, mel_filterbank)
from edgefuse.runtime.core.contract import METADATA_KEY, ModelContract  # noqa: E402
from edgefuse.runtime.core.inference import OnnxModel  # noqa: E402

pytestmark = pytest.mark.needs_torch
PARITY_LIMIT = 1e-4


@pytest.fixture(scope="module")
def av(tmp_path_factory):
    net = standin.build_av(seed=3).eval()
    contract = standin.av_contract(description="test export")
    path = tmp_path_factory.mktemp("export") / "av.onnx"
    seismic = standin.subset_of(net, contract, ("seismic",))
    export_with_fallbacks(net, contract, path, {("seismic",): seismic})
    return net, seismic, contract, path


def test_export_writes_contract_metadata_and_passes_the_checker(av):
    net, _, contract, path = av
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    written = ModelContract.from_json(meta[METADATA_KEY])
    assert written.fallbacks[0].file == "av.seismic.onnx"
    assert written.fallbacks[0].modalities == ("seismic",)
    assert written == ModelContract(**{**contract.__dict__, "fallbacks": written.fallbacks})
    assert model.producer_name == "edgefuse" and model.opset_import[0].version == 17
    assert [i.name for i in model.graph.input] == ["acoustic", "seismic", "modality_mask"]
    batch_dims = [i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input]
    assert all(batch_dims)  # symbolic batch axis everywhere
    assert path.stat().st_size < 1_000_000
    loaded = OnnxModel.load(path)
    assert list(loaded.fallbacks) == [("seismic",)]
    assert loaded.fallbacks[("seismic",)].contract.modality_names == ("seismic",)


def test_parity_of_main_and_fallback_models(av):
    net, seismic, contract, path = av
    assert parity(net, path, n=16, seed=0) <= PARITY_LIMIT
    assert parity(net, path, n=5, seed=1) <= PARITY_LIMIT
    assert parity(seismic, path.parent / "av.seismic.onnx", n=16, seed=2) <= PARITY_LIMIT
    # Quiet and loud windows (sensor counts span ~0..30000) stay within the limit too.
    for scale in (0.01, 3000.0):
        inputs = example_inputs(contract, batch=8, seed=4, scale=scale, random_mask=True)
        assert parity(net, path, inputs=inputs) <= PARITY_LIMIT


def test_parity_of_the_three_modality_benchmark_model(tmp_path):
    net = standin.build_bench_3m(seed=5).eval()
    path = export(net, standin.bench_contract(), tmp_path / "b3.onnx")
    assert parity(net, path, n=16) <= PARITY_LIMIT
    assert standin.n_params(net) < 200_000


def test_runtime_probabilities_match_torch_softmax(av):
    net, _, contract, path = av
    model = OnnxModel.load(path)
    args = example_inputs(contract, batch=6, seed=9, random_mask=True)
    with torch.no_grad():
        ref = torch.softmax(net(*args), dim=1).numpy()
    got = model.run({m: a.numpy() for m, a in zip(contract.modality_names, args)},
                    args[-1].numpy())
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_generic_subset_view_equals_masked_main_model(tmp_path):
    net = standin.build_av(seed=4).eval()
    contract = standin.av_contract()
    view = SubsetView(net, contract, ("acoustic",))
    path = export_with_fallbacks(net, contract, tmp_path / "g.onnx", {("acoustic",): view})
    model = OnnxModel.load(path)
    args = example_inputs(contract, batch=4, seed=1)
    fb = model.fallbacks[("acoustic",)].run({"acoustic": args[0].numpy()},
                                            np.ones((4, 1), np.float32))
    masked = model.run({"acoustic": args[0].numpy(), "seismic": np.zeros((4, 1, 800), np.float32)},
                       np.array([[1, 0]] * 4, np.float32))
    np.testing.assert_allclose(fb, masked, atol=1e-5)


@pytest.mark.slow
def test_dynamo_exporter_also_works(tmp_path):
    net = standin.build_av(seed=6).eval()
    path = export(net, standin.av_contract(), tmp_path / "d.onnx", dynamo=True)
    assert parity(net, path, n=8) <= PARITY_LIMIT
    assert OnnxModel.load(path).run(
        {"acoustic": np.zeros((3, 1, 4934), np.float32), "seismic": np.zeros((3, 1, 800),
                                                                              np.float32)},
        np.ones((3, 2), np.float32)).shape == (3, 2)


class IgnoresMask(torch.nn.Module):
    def forward(self, a, s, mask):
        return torch.stack([a.mean((1, 2)), s.mean((1, 2))], dim=1)


def test_export_refuses_a_module_that_ignores_an_input(tmp_path):
    with pytest.raises(ValueError, match="drops inputs that forward\\(\\) does not use"):
        export(IgnoresMask(), standin.av_contract(), tmp_path / "x.onnx")


# ---- front ends ---------------------------------------------------------------------

def _numpy_log_filterbank(x: np.ndarray, fe) -> np.ndarray:
    """Reference: strided frames, Hann window, np.fft.rfft, power/n_fft, filterbank, log."""
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(fe.n_fft) / fe.n_fft)
    frames = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), fe.n_fft,
                                                      axis=-1)[..., ::fe.hop, :]
    spec = np.fft.rfft(frames * window, axis=-1)[..., :fe.n_bins]
    power = spec.real ** 2 + spec.imag ** 2
    energy = power @ fe.fbank_t.numpy().astype(np.float64)  # fbank_t holds the 1/n_fft
    return np.log(energy + fe.eps).swapaxes(-1, -2)


FRONT_ENDS = {  # id: (factory, samples per window)
    "mel-4934-256-256": (lambda f: log_mel(4934.0, 4934, 256, 256, 32, framing=f), 4934),
    "mel-4934-256-128": (lambda f: log_mel(4934.0, 4934, 256, 128, 32, framing=f), 4934),
    "bands-800-128-64": (lambda f: log_bands(800.0, 800, 128, 64, 16, framing=f), 800),
    "bands-100-32-8": (lambda f: log_bands(100.0, 100, 32, 8, 4, framing=f), 100),
}


@pytest.mark.parametrize("name", sorted(FRONT_ENDS))
def test_front_end_matches_numpy_fft_reference_in_both_framings(name):
    make, samples = FRONT_ENDS[name]
    x = (np.random.default_rng(0).standard_normal((3, 2, samples)) * 100).astype(np.float32)
    ref = _numpy_log_filterbank(x, make("blocks"))
    for framing in ("conv", "blocks"):
        fe = make(framing)
        got = fe(torch.from_numpy(x)).numpy()
        assert got.shape == (3, 2, fe.n_filters, fe.frames)
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)


def test_filterbanks_are_normalised_and_ordered():
    n_bins = kept_bins(4934.0, 256, 2000.0)
    assert n_bins == 104  # bins 0..103 are <= 2000 Hz at 19.27 Hz spacing
    fb = mel_filterbank(4934.0, 256, n_bins, 32, 20.0, 2000.0)
    assert fb.shape == (32, n_bins) and (fb >= 0).all()
    np.testing.assert_allclose(fb.sum(axis=1), 1.0, atol=1e-6)
    centres = (fb * np.arange(n_bins)).sum(axis=1)
    assert (np.diff(centres) > 0).all()
    bands = band_filterbank(800.0, 128, 65, 16, 0.0, 400.0)
    np.testing.assert_allclose(bands.sum(axis=1), 1.0, atol=1e-6)
    assert (bands > 0).sum(axis=0).max() == 1  # each bin in exactly one band
    k = dft_kernels(8, 5)[:, 0, :]
    tone = np.cos(2 * np.pi * 2 * np.arange(8) / 8)
    re = k[:5] @ tone
    assert np.argmax(np.abs(re)) == 2


def test_frontend_refuses_windows_shorter_than_the_fft():
    with pytest.raises(ValueError, match="shorter than n_fft"):
        log_mel(100.0, 100, 128, 64, 8, fmax=50.0)
    with pytest.raises(ValueError, match="hop dividing n_fft"):
        log_mel(1000.0, 1000, 128, 48, 8, fmax=400.0)


# ---- import hygiene -----------------------------------------------------------------

@pytest.mark.parametrize("module", ["edgefuse.models", "edgefuse.runtime.core.inference",
                                    "edgefuse.runtime.core.fusion", "edgefuse.runtime.core.info"])
def test_torch_free_imports(module):
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'onnx') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{module} imported {out.stdout.strip()}"


def test_bundled_training_summary_is_consistent():
    from edgefuse.models import BUNDLED_DIR
    summary = json.loads((BUNDLED_DIR / "standin_av.train.json").read_text())
    assert summary["params"] == standin.n_params(standin.build_av())
    assert summary["params"] < 200_000
    assert max(summary["parity_max_abs"].values()) <= PARITY_LIMIT
