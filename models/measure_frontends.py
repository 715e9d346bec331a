"""Measure the per-window cost of spectral front ends (torch + onnx needed).

    python -m edgefuse.models.measure_frontends [--batch 64] [--repeats 15]

Compares, for candidate (rate, n_fft, hop) settings of a 1 s window, the
in-graph STFT front end of ``frontends.py`` exported to ONNX (framing "conv":
one Conv1d; framing "blocks": Reshape + block MatMuls), ORT's own STFT
operator followed by the same power/filterbank/log, and numpy's rfft. ORT
runs with 1 intra-op thread, as the stand-in model does. Results are
microseconds per window (time of one batch / batch).
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from edgefuse.models.frontends import LogFilterbank, log_bands, log_mel

# (label, rate_hz, n_fft, hop, kind) with kind "mel" (acoustic) or "bands" (seismic)
CANDIDATES = [
    (9868, 512, 256, "mel"), (9868, 256, 256, "mel"),
    (4934, 256, 128, "mel"), (4934, 256, 256, "mel"), (4934, 128, 128, "mel"),
    (2466, 128, 64, "mel"),
    (1600, 128, 64, "bands"), (800, 128, 64, "bands"), (800, 64, 32, "bands"),
]


def _session(model_bytes: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _conv_onnx(fe: LogFilterbank, samples: int) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(fe.eval(), (torch.zeros(2, 1, samples),), buf, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
                      opset_version=17, dynamo=False)
    return buf.getvalue()


def _stft_onnx(fe: LogFilterbank, samples: int) -> bytes:
    n_fft, hop, n_bins = fe.n_fft, fe.hop, fe.n_bins
    window = np.asarray(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft), np.float32)
    inits = [
        numpy_helper.from_array(np.array([-1, samples, 1], np.int64), "shape_in"),
        numpy_helper.from_array(np.array(hop, np.int64), "step"),
        numpy_helper.from_array(window, "window"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"),
        numpy_helper.from_array(np.array([n_bins], np.int64), "s1"),
        numpy_helper.from_array(np.array([2], np.int64), "ax"),
        numpy_helper.from_array(fe.fbank_t.numpy(), "fbank"),
        numpy_helper.from_array(np.array(fe.eps, np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "shape_in"], ["sig"]),
        helper.make_node("STFT", ["sig", "step", "window"], ["spec"], onesided=1),
        helper.make_node("Slice", ["spec", "s0", "s1", "ax"], ["kept"]),
        helper.make_node("ReduceSumSquare", ["kept"], ["power"], axes=[-1], keepdims=0),
        helper.make_node("MatMul", ["power", "fbank"], ["energy"]),
        helper.make_node("Add", ["energy", "eps"], ["shifted"]),
        helper.make_node("Log", ["shifted"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "stft_frontend",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, samples])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", None, None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _numpy_frontend(fe: LogFilterbank):
    n_fft, hop, n_bins = fe.n_fft, fe.hop, fe.n_bins
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)
    fbank = fe.fbank_t.numpy()

    def run(x: np.ndarray) -> np.ndarray:
        frames = np.lib.stride_tricks.sliding_window_view(x[:, 0], n_fft, axis=-1)[:, ::hop]
        spec = np.fft.rfft(frames * window, axis=-1)[..., :n_bins]
        power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
        return np.log(power @ fbank + fe.eps)

    return run


def _time_us(fn, batch: int, repeats: int) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return float(np.median(runs)) / batch * 1e6


def _frontend(rate: int, n_fft: int, hop: int, kind: str, framing: str) -> LogFilterbank:
    if kind == "mel":
        return log_mel(rate, rate, n_fft, hop, n_mels=32, fmax=2000.0, framing=framing)
    return log_bands(rate, rate, n_fft, hop, n_bands=16, fmax=400.0, framing=framing)


def measure(batch: int = 64, repeats: int = 15, seed: int = 0) -> list[dict]:
    """One row per candidate: microseconds per window of each method, and the
    largest |difference| of each method's output from the torch module."""
    rng = np.random.default_rng(seed)
    rows = []
    for rate, n_fft, hop, kind in CANDIDATES:
        samples = rate  # 1 s window
        fe = _frontend(rate, n_fft, hop, kind, "blocks")
        x = (rng.standard_normal((batch, 1, samples)) * 100).astype(np.float32)
        ref = fe(torch.from_numpy(x)).numpy()[:, 0]                   # [b, filters, frames]
        methods = {
            "conv": _session(_conv_onnx(_frontend(rate, n_fft, hop, kind, "conv"), samples)),
            "blocks": _session(_conv_onnx(fe, samples)),
            "stft": _session(_stft_onnx(fe, samples)),
        }
        row = {"rate": rate, "n_fft": n_fft, "hop": hop, "bins": fe.n_bins, "frames": fe.frames}
        for name, sess in methods.items():
            out = sess.run(None, {"x": x})[0]
            out = out.transpose(0, 2, 1) if name == "stft" else out[:, 0]
            row[f"{name}_us"] = _time_us(lambda s=sess: s.run(None, {"x": x}), batch, repeats)
            row[f"{name}_diff"] = float(np.abs(out - ref).max())
        npfe = _numpy_frontend(fe)
        row["numpy_us"] = _time_us(lambda: npfe(x), batch, repeats)
        row["numpy_diff"] = float(np.abs(npfe(x).transpose(0, 2, 1) - ref).max())
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = ("conv", "blocks", "stft", "numpy")
    print("rate   n_fft hop  bins  frames | " + " ".join(f"{n:<7}" for n in names)
          + "| max |diff| vs torch")
    for r in measure(args.batch, args.repeats):
        print(f"{r['rate']:<6} {r['n_fft']:<5} {r['hop']:<4} {r['bins']:<5} {r['frames']:<6} | "
              + " ".join(f"{r[n + '_us']:<7.1f}" for n in names) + "| "
              + " ".join(f"{r[n + '_diff']:.0e}" for n in names))


if __name__ == "__main__":
    main()
