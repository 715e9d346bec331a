"""OnnxModel: loading, refusals, providers, run(); bundled models.

Test graphs are written with onnx.helper (exact control over names, types and
shapes, no torch needed); onnx comes with the train extra.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from edgefuse.models import BENCH_3M, STANDIN_AV, bundled_path
from edgefuse.runtime.core.contract import METADATA_KEY
from edgefuse.runtime.core.errors import (InputError, ModalityMismatchError, ModelContractError,
                                     ProviderError)
from edgefuse.runtime.core.inference import OnnxModel, resolve_providers, softmax
from edgefuse.runtime.core.info import describe, describe_json

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # pragma: no cover - CI installs the train extra
    onnx = None

needs_onnx = pytest.mark.skipif(
    onnx is None, reason="SKIPPED LOUDLY: the onnx package (train extra) is missing, so the "
    "model-building tests cannot run; install with pip install -e '.[train]'")

# The shared data pack beside the checkout (CI has it); the test says so when absent.
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "goodvibes"


def contract_doc(**changes) -> dict:
    doc = {
        "contract": 1, "name": "tiny", "version": "1",
        "modalities": [
            {"name": "acoustic", "channels": 1, "rate_hz": 40.0, "input": "acoustic"},
            {"name": "seismic", "channels": 2, "rate_hz": 20.0, "input": "seismic"},
        ],
        "window_ns": 1_000_000_000, "hop_ns": 500_000_000,
        "labels": ["background", "vehicle"], "mask_input": "mask",
        "output": "scores", "output_kind": "logits", "fallbacks": [],
    }
    doc.update(changes)
    return doc


def write_model(path: Path, contract: dict | None, *, inputs=None, mask=("mask", ["batch", 2]),
                output=("scores", ["batch", 2]), n_labels: int = 2, input_type=None,
                extra_input: bool = False, tile_output: bool = False) -> Path:
    """A graph computing scores = concat(mean(x_i)) * mask @ W + b.

    inputs: [(name, dims)] (default matches contract_doc()); the declared dims
    can be made to contradict the contract; the computation adapts to any shape.
    """
    elem = input_type or TensorProto.FLOAT
    inputs = inputs or [("acoustic", ["batch", 1, 40]), ("seismic", ["batch", 2, 20])]
    nodes, graph_inputs, means = [], [], []
    for name, dims in inputs:
        graph_inputs.append(helper.make_tensor_value_info(name, elem, dims))
        src = name
        if elem != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [name], [name + "_f"], to=TensorProto.FLOAT))
            src = name + "_f"
        if len(dims) == 3:
            nodes.append(helper.make_node("ReduceMean", [src], [name + "_t"], axes=[2],
                                          keepdims=0))
            src = name + "_t"
        nodes.append(helper.make_node("ReduceMean", [src], [name + "_m"], axes=[1], keepdims=1))
        means.append(name + "_m")
    mask_name, mask_dims = mask
    graph_inputs.append(helper.make_tensor_value_info(mask_name, TensorProto.FLOAT, mask_dims))
    if extra_input:
        graph_inputs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["batch", 1]))
        means.append("extra")
    n_feat = len(means)
    w = np.array([[(i + 1) * (j - 0.5) * 0.1 for j in range(n_labels)] for i in range(n_feat)],
                 np.float32)
    inits = [numpy_helper.from_array(w, "W"),
             numpy_helper.from_array(np.linspace(-0.2, 0.2, n_labels).astype(np.float32), "B")]
    nodes += [helper.make_node("Concat", means, ["feat"], axis=1)]
    mask_width = mask_dims[1] if len(mask_dims) > 1 and isinstance(mask_dims[1], int) else 2
    if n_feat == mask_width:
        nodes += [helper.make_node("Mul", ["feat", mask_name], ["masked"])]
    else:  # only for graphs that must be refused before they run
        nodes += [helper.make_node("ReduceMean", [mask_name], ["msum"], axes=[-1], keepdims=1),
                  helper.make_node("Mul", ["feat", "msum"], ["masked"])]
    out_name, out_dims = output
    nodes += [helper.make_node("MatMul", ["masked", "W"], ["mm"]),
              helper.make_node("Add", ["mm", "B"], ["sum" if tile_output else out_name])]
    if tile_output:  # width = n_labels * (1 + max(mask)): no static shape inference can see it
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
        nodes += [helper.make_node("ReduceMax", [mask_name], ["mmax"], keepdims=1, axes=[0, 1]),
                  helper.make_node("Reshape", ["mmax", "one"], ["mmax1"]),
                  helper.make_node("Cast", ["mmax1"], ["mmaxi"], to=TensorProto.INT64),
                  helper.make_node("Add", ["mmaxi", "one"], ["reps1"]),
                  helper.make_node("Concat", ["one", "reps1"], ["reps"], axis=0),
                  helper.make_node("Tile", ["sum", "reps"], [out_name])]
    graph = helper.make_graph(nodes, "tiny", graph_inputs,
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT,
                                                             out_dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if contract is not None:
        text = contract if isinstance(contract, str) else json.dumps(contract)
        model.metadata_props.add(key=METADATA_KEY, value=text)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def rand_inputs(batch: int, seed: int = 0) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = {"acoustic": rng.standard_normal((batch, 1, 40)).astype(np.float32),
         "seismic": rng.standard_normal((batch, 2, 20)).astype(np.float32)}
    return x, np.ones((batch, 2), np.float32)


@needs_onnx
def test_valid_model_loads_and_runs_any_batch(tmp_path, caplog):
    path = write_model(tmp_path / "m.onnx", contract_doc())
    with caplog.at_level(logging.INFO, logger="edgefuse.runtime.core.inference"):
        model = OnnxModel.load(path)
    assert "runs on CPUExecutionProvider" in caplog.text
    assert model.provider == "CPUExecutionProvider"
    assert model.contract.ident == "tiny@1" and model.fallbacks == {} and model.fixed_batch is None
    for batch in (1, 5, 64):
        x, mask = rand_inputs(batch, seed=batch)
        probs = model.run(x, mask)
        assert probs.shape == (batch, 2) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
        # Reference: the graph's formula in numpy, then softmax.
        feat = np.stack([x["acoustic"].mean(axis=(1, 2)), x["seismic"].mean(axis=(1, 2))], 1)
        w = np.array([[-0.05, 0.05], [-0.1, 0.1]], np.float32)
        logits = (feat * mask) @ w + np.array([-0.2, 0.2], np.float32)
        ref = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(probs, ref, atol=1e-6)


@needs_onnx
def test_probabilities_output_is_passed_through(tmp_path):
    path = write_model(tmp_path / "p.onnx", contract_doc(output_kind="probabilities"))
    model = OnnxModel.load(path)
    x, mask = rand_inputs(3)
    raw = model.session.run(["scores"], {"acoustic": x["acoustic"], "seismic": x["seismic"],
                                         "mask": mask})[0]
    np.testing.assert_array_equal(model.run(x, mask), raw)


def test_softmax_is_stable_for_extreme_logits():
    logits = np.array([[1e4, -1e4], [0.0, 0.0], [-3e38, 3e38], [1000.0, 1000.0]], np.float32)
    p = softmax(logits)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p, [[1, 0], [0.5, 0.5], [0, 1], [0.5, 0.5]], atol=1e-7)


@needs_onnx
def test_model_without_metadata_is_refused(tmp_path):
    path = write_model(tmp_path / "plain.onnx", None)
    with pytest.raises(ModelContractError) as err:
        OnnxModel.load(path)
    msg = str(err.value)
    assert "no 'edgefuse' entry" in msg and "found keys []" in msg and "export" in msg


@needs_onnx
def test_model_with_invalid_contract_json_is_refused(tmp_path):
    path = write_model(tmp_path / "bad.onnx", '{"contract": 1, "name": ')
    with pytest.raises(ModelContractError, match="not valid JSON"):
        OnnxModel.load(path)
    path = write_model(tmp_path / "bad2.onnx", contract_doc(labels=["only"]))
    with pytest.raises(ModelContractError, match="'labels' must be a list of >= 2"):
        OnnxModel.load(path)


CONTRADICTIONS = [
    # (id, write_model kwargs, contract changes, words in the message)
    ("samples-differ", {"inputs": [("acoustic", ["batch", 1, 44]), ("seismic", ["batch", 2, 20])]},
     {}, ["input 'acoustic' shape", "[batch, 1, 40]", "44"]),
    ("channels-differ", {"inputs": [("acoustic", ["batch", 1, 40]), ("seismic", ["batch", 3, 20])]},
     {}, ["input 'seismic' shape", "[batch, 2, 20]"]),
    ("rank-differs", {"inputs": [("acoustic", ["batch", 40]), ("seismic", ["batch", 2, 20])]},
     {}, ["input 'acoustic' shape"]),
    ("input-name-differs", {"inputs": [("mic", ["batch", 1, 40]), ("seismic", ["batch", 2, 20])]},
     {}, ["graph inputs", "mic"]),
    ("extra-graph-input", {"extra_input": True}, {}, ["graph inputs", "extra"]),
    ("double-input", {"input_type": "double"}, {}, ["type", "tensor(float)", "tensor(double)"]),
    ("mask-width", {"mask": ("mask", ["batch", 3])}, {}, ["mask input 'mask' shape", "[batch, 2]"]),
    ("mask-name", {"mask": ("present", ["batch", 2])}, {}, ["graph inputs", "present"]),
    ("output-name", {"output": ("logits", ["batch", 2])}, {},
     ["output name", "'scores'", "logits"]),
    ("output-width", {"output": ("scores", ["batch", 3]), "n_labels": 3}, {},
     ["output 'scores' shape", "[batch, 2]"]),
    ("labels-vs-output", {}, {"labels": ["a", "b", "c"]}, ["output 'scores' shape", "[batch, 3]"]),
    ("rate-vs-samples", {}, {"modalities": [
        {"name": "acoustic", "channels": 1, "rate_hz": 80.0, "input": "acoustic"},
        {"name": "seismic", "channels": 2, "rate_hz": 20.0, "input": "seismic"}]},
     ["input 'acoustic' shape", "[batch, 1, 80]"]),
    # Symbolic output dims hide the real width; the load-time test run finds it.
    ("hidden-output-width", {"output": ("scores", ["batch", "n"]), "tile_output": True}, {},
     ["shape (1, 4)", "expected (1, 2)"]),
]


@needs_onnx
@pytest.mark.parametrize("graph,changes,words", [c[1:] for c in CONTRADICTIONS],
                         ids=[c[0] for c in CONTRADICTIONS])
def test_graph_contradicting_its_contract_is_refused(tmp_path, graph, changes, words):
    if graph.get("input_type") == "double":
        graph = dict(graph, input_type=TensorProto.DOUBLE)
    path = write_model(tmp_path / "c.onnx", contract_doc(**changes), **graph)
    with pytest.raises(ModelContractError) as err:
        OnnxModel.load(path)
    msg = str(err.value)
    for word in words:
        assert word in msg, (word, msg)
    assert str(path) in msg


@needs_onnx
def test_fixed_batch_model_runs_any_batch_in_slices(tmp_path):
    path = write_model(tmp_path / "fixed.onnx", contract_doc(),
                       inputs=[("acoustic", [1, 1, 40]), ("seismic", [1, 2, 20])],
                       mask=("mask", [1, 2]), output=("scores", [1, 2]))
    model = OnnxModel.load(path)
    assert model.fixed_batch == 1
    x, mask = rand_inputs(5, seed=3)
    mask[2] = [1, 0]
    together = model.run(x, mask)
    one_by_one = np.concatenate([model.run({k: v[i:i + 1] for k, v in x.items()}, mask[i:i + 1])
                                 for i in range(5)])
    np.testing.assert_allclose(together, one_by_one, atol=1e-7)


@needs_onnx
def test_run_refuses_wrong_modalities_and_shapes(tmp_path):
    model = OnnxModel.load(write_model(tmp_path / "m.onnx", contract_doc()))
    x, mask = rand_inputs(2)
    with pytest.raises(ModalityMismatchError,
                       match=r"expects modalities \['acoustic', 'seismic'\]"):
        model.run({"acoustic": x["acoustic"]}, mask)
    with pytest.raises(ModalityMismatchError, match=r"seismic must be float32 \[2, 2, 20\]"):
        model.run({"acoustic": x["acoustic"], "seismic": x["seismic"][:, :, :10]}, mask)
    with pytest.raises(ModalityMismatchError, match=r"mask must be \[batch >= 1, 2\]"):
        model.run(x, mask[:, :1])


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        OnnxModel.load(tmp_path / "nope.onnx")


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x00\x01not a model" * 10)
    with pytest.raises(ModelContractError, match="onnxruntime cannot load this file"):
        OnnxModel.load(path)


def test_required_provider_that_is_absent_is_refused():
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA; the refusal cannot be provoked here")
    with pytest.raises(ProviderError) as err:
        resolve_providers(("cuda", "cpu"), require=True)
    msg = str(err.value)
    assert "CUDAExecutionProvider was required" in msg
    assert "CPUExecutionProvider" in msg  # names the available ones
    with pytest.raises(ProviderError, match="unknown execution provider 'tpu'"):
        resolve_providers(("tpu",))


@needs_onnx
def test_absent_provider_not_required_falls_back_with_a_warning(tmp_path, caplog):
    import onnxruntime as ort
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has TensorRT")
    path = write_model(tmp_path / "m.onnx", contract_doc())
    with caplog.at_level(logging.WARNING, logger="edgefuse.runtime.core.inference"):
        model = OnnxModel.load(path, providers=("tensorrt", "cpu"))
    assert model.provider == "CPUExecutionProvider"
    assert "TensorrtExecutionProvider is not available" in caplog.text
    with pytest.raises(ProviderError):
        OnnxModel.load(path, providers="tensorrt", require_provider=True)


@needs_onnx
def test_fallback_problems_are_refused(tmp_path):
    fb_doc = contract_doc(modalities=[contract_doc()["modalities"][1]], fallbacks=[])
    write_model(tmp_path / "m.seismic.onnx", fb_doc, inputs=[("seismic", ["batch", 2, 20])],
                mask=("mask", ["batch", 1]))
    main = contract_doc(fallbacks=[{"modalities": ["seismic"], "file": "m.seismic.onnx"}])
    model = OnnxModel.load(write_model(tmp_path / "m.onnx", main))
    assert list(model.fallbacks) == [("seismic",)]
    x, _ = rand_inputs(4)
    p = model.fallbacks[("seismic",)].run({"seismic": x["seismic"]}, np.ones((4, 1), np.float32))
    assert p.shape == (4, 2)

    write_model(tmp_path / "l.seismic.onnx", dict(fb_doc, labels=["quiet", "loud"]),
                inputs=[("seismic", ["batch", 2, 20])], mask=("mask", ["batch", 1]))
    bad = dict(main, fallbacks=[{"modalities": ["seismic"], "file": "l.seismic.onnx"}])
    with pytest.raises(ModelContractError, match=r"labels \['quiet', 'loud'\]"):
        OnnxModel.load(write_model(tmp_path / "l.onnx", bad))

    write_model(tmp_path / "w.seismic.onnx", dict(fb_doc, hop_ns=250_000_000),
                inputs=[("seismic", ["batch", 2, 20])], mask=("mask", ["batch", 1]))
    bad = dict(main, fallbacks=[{"modalities": ["seismic"], "file": "w.seismic.onnx"}])
    with pytest.raises(ModelContractError, match="window/hop"):
        OnnxModel.load(write_model(tmp_path / "w.onnx", bad))

    bad = dict(main, fallbacks=[{"modalities": ["seismic"], "file": "absent.onnx"}])
    with pytest.raises(ModelContractError, match="absent.onnx.*does not exist"):
        OnnxModel.load(write_model(tmp_path / "a.onnx", bad))


@needs_onnx
def test_describe_names_everything(tmp_path):
    model = OnnxModel.load(write_model(tmp_path / "m.onnx", contract_doc(description="hello")))
    text = describe(model)
    for word in ("tiny@1", "hello", "acoustic", "seismic", "2 ch at 20 Hz = 20 samples",
                 "background, vehicle", "window      1 s, hop 0.5 s", "CPUExecutionProvider",
                 "['batch', 1, 40]", "fallbacks   none"):
        assert word in text, (word, text)
    doc = json.loads(describe_json(model))
    assert doc["labels"] == ["background", "vehicle"] and doc["fixed_batch"] is None
    assert doc["graph_inputs"][1] == {"name": "seismic", "type": "tensor(float)",
                                      "shape": ["batch", 2, 20]}


# ---- bundled models (need only onnxruntime) -------------------------------------------

@pytest.mark.parametrize("name", [STANDIN_AV, BENCH_3M])
def test_bundled_models_load_and_are_small(name):
    path = bundled_path(name)
    assert path.stat().st_size < 1_000_000
    model = OnnxModel.load(path)
    assert model.contract.labels == ("background", "vehicle")
    if name == STANDIN_AV:
        assert "stand-in, not the trained model of issue 3" in model.contract.description
        assert model.contract.modality_names == ("acoustic", "seismic")
        assert list(model.fallbacks) == [("seismic",)]
    else:
        assert "UNTRAINED" in model.contract.description
        assert model.contract.modality_names == ("acoustic", "seismic", "imu")


def _window_on_grid(wav: Path, rate_in: float, rate_out: float, start_s: float) -> np.ndarray:
    from scipy.io import wavfile
    from scipy.signal import butter, sosfilt
    _, x = wavfile.read(wav)
    x = sosfilt(butter(4, 0.45 * rate_out, fs=rate_in, output="sos"), x.astype(np.float64))
    t = start_s + np.arange(int(rate_out)) / rate_out
    return np.interp(t, np.arange(len(x)) / rate_in, x).astype(np.float32)[None, None, :]


@pytest.mark.skipif(not DATA.is_dir(), reason=f"SKIPPED: the real data pack is not at {DATA}")
def test_bundled_standin_tells_a_vehicle_pass_from_background():
    """A pass (CPA, middle of the close cut) and a noise window, both modalities, and
    seismic alone through the fallback. Items here are NOT all in the validation split,
    so this checks the model file is the trained one, not generalisation."""
    model = OnnxModel.load(bundled_path(STANDIN_AV))
    item = DATA / "passes/close/2H.22.131"
    meta = json.loads((item / "meta.json").read_text())
    mid = meta["modalities"]["seismic"]["samples"] / meta["modalities"]["seismic"]["rate_hz"] / 2
    noise = DATA / "noise"
    cases = {
        "vehicle": {m: _window_on_grid(item / f"{m}.wav", meta["modalities"][m]["rate_hz"], r,
                                       mid - 0.5)
                    for m, r in (("acoustic", 4934), ("seismic", 800))},
        "background": {m: _window_on_grid(noise / m / "node-129_location-bprf_noise-0.wav", 9866
                                          if m == "acoustic" else 1609, r, 30.0)
                       for m, r in (("acoustic", 4934), ("seismic", 800))},
    }
    for label, x in cases.items():
        both = model.run(x, np.ones((1, 2), np.float32))[0]
        seismic = model.fallbacks[("seismic",)].run({"seismic": x["seismic"]},
                                                    np.ones((1, 1), np.float32))[0]
        for probs in (both, seismic):
            assert model.contract.labels[int(np.argmax(probs))] == label, (label, probs)
