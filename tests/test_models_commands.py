"""edgefuse train / export / evaluate / quantize on the tests/data fixture (real data)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefuse.models.commands import build_parser
from edgefuse.runtime.core.errors import ConfigError, InputError

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_importing_commands_does_not_import_torch():
    code = ("import sys, edgefuse.models.commands as c; c.build_parser(); "
            "import edgefuse.models.evaluate, edgefuse.models.har; "
            "print('torch' in sys.modules, 'onnx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("argv", [
    ["export", "ckpt.pt"],                       # -o is required
    ["evaluate"],                                # MODEL is required
    ["evaluate", "m.onnx", "--task", "bogus"],
    ["evaluate", "m.onnx", "--split", "train"],
    ["train"],
    ["quantize", "m.onnx", "-o", "x.onnx", "--mode", "int4"],
])
def test_bad_usage_is_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2


def test_bad_inputs_raise_edgefuse_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        run_cli(["train", str(tmp_path / "missing.toml")])
    with pytest.raises(InputError, match="does not exist"):
        run_cli(["export", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "m.onnx")])
    with pytest.raises(InputError, match="does not exist"):
        run_cli(["evaluate", str(tmp_path / "missing.onnx"), str(DATA)])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = 1\nlearning_rate = 3\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        run_cli(["train", str(bad)])
    bad.write_text("[data]\ndataset = 'mnist'\n")
    with pytest.raises(ConfigError, match="dataset"):
        run_cli(["train", str(bad)])
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=".onnx"):
        run_cli(["export", str(ckpt), "-o", str(tmp_path / "m.txt")])
    with pytest.raises(InputError, match="cannot read"):
        run_cli(["export", str(ckpt), "-o", str(tmp_path / "m.onnx")])


SMOKE_CONFIG = """
[data]
dataset = "goodvibes"
path = "{data}"
test = ["cochise/2023-04-11"]
[model]
embed = 8
width = 4
hidden = 8
fusion = "{fusion}"
[train]
epochs = 2
batch = 32
threads = 1
out = "{out}"
"""


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    """Train (a few seconds), export and return the model path."""
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("smoke")
    os.environ["EDGEFUSE_CACHE"] = str(tmp / "cache")
    try:
        cfg = tmp / "smoke.toml"
        cfg.write_text(SMOKE_CONFIG.format(data=DATA, out=tmp / "run", fusion="sum"))
        assert run_cli(["train", str(cfg), "--max-seconds", "5"]) == 0
        ckpt = tmp / "run" / "checkpoint.pt"
        assert ckpt.is_file()
        model = tmp / "smoke.onnx"
        assert run_cli(["export", str(ckpt), "-o", str(model)]) == 0
        yield model
    finally:
        os.environ.pop("EDGEFUSE_CACHE", None)


def test_export_writes_fallbacks_and_parity_holds(smoke_model):
    from edgefuse.exporters.onnx_export import parity
    from edgefuse.models.export import torch_parity_inputs
    from edgefuse.models.nets import SubsetNet
    from edgefuse.models.train import load_checkpoint
    from edgefuse.runtime.core.inference import OnnxModel
    model = OnnxModel.load(smoke_model)
    assert sorted(model.fallbacks) == [("acoustic",), ("seismic",)]
    net, _ = load_checkpoint(str(smoke_model.parent / "run" / "checkpoint.pt"))
    assert parity(net, smoke_model, inputs=torch_parity_inputs(model.contract)) <= 1e-4
    fb = model.fallbacks[("seismic",)]
    assert parity(SubsetNet(net, "seismic"), fb.path,
                  inputs=torch_parity_inputs(fb.contract)) <= 1e-4


def test_evaluate_json_shape(smoke_model, capsys):
    os.environ["EDGEFUSE_CACHE"] = str(smoke_model.parent / "cache")
    try:
        assert run_cli(["evaluate", str(smoke_model), str(DATA), "--json"]) == 0
    finally:
        os.environ.pop("EDGEFUSE_CACHE", None)
    doc = json.loads(capsys.readouterr().out)
    assert doc["task"] == "detection"
    assert doc["n_windows"] > 0
    assert set(doc["conditions"]) == {"all", "without:acoustic", "degraded:acoustic",
                                      "without:seismic", "degraded:seismic"}
    for row in doc["conditions"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["macro_f1"] <= 1.0
        cm = np.array(row["confusion"])        # [true][predicted], abstentions left out
        assert cm.shape == (2, 2) and cm.sum() == row["n"] - row["abstained"]
        assert np.trace(cm) == round(row["accuracy"] * row["n"])
    assert doc["conditions"]["all"]["rel_drop_accuracy"] == 0.0


def test_identification_is_refused_with_a_reason(smoke_model):
    with pytest.raises(ConfigError, match="leakage"):
        run_cli(["evaluate", str(smoke_model), str(DATA), "--task", "identification"])


@pytest.mark.parametrize("mode", ["int8", "int8-static", "fp16"])
def test_quantized_variants_load_and_run(smoke_model, mode, tmp_path):
    from edgefuse.exporters.quantize import max_output_diff, quantize_model
    from edgefuse.models.evaluate import calibration_windows
    from edgefuse.runtime.core.inference import OnnxModel
    calibration = None
    if mode == "int8-static":
        os.environ["EDGEFUSE_CACHE"] = str(smoke_model.parent / "cache")
        try:
            calibration = calibration_windows(smoke_model, str(DATA), n=64)
        finally:
            os.environ.pop("EDGEFUSE_CACHE", None)
        assert calibration["acoustic"].shape[1:] == (1, 4934)
    files = quantize_model(smoke_model, tmp_path / f"q.{mode}.onnx", mode,
                           calibration=calibration)
    model = OnnxModel.load(files[0])
    assert len(model.fallbacks) == 2 and all(os.path.exists(f) for f in files)
    c = model.contract
    x = {m.name: np.random.default_rng(0).normal(0, 100, (3, 1, m.samples(c.window_ns)))
         .astype(np.float32) for m in c.modalities}
    probs = model.run(x, np.ones((3, 2), np.float32))
    assert probs.shape == (3, 2) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    assert max_output_diff(smoke_model, files[0]) < 0.5   # same model, coarser numbers


def test_har_fixture_windows_are_labelled_by_majority():
    from edgefuse.models.har import ACTIVITIES, HarGrid, build_har_windowset
    ws = build_har_windowset(str(DATA), HarGrid())
    assert ws.modalities == ("imu_phone", "imu_watch")
    assert ws.x["imu_phone"].shape[1:] == (6, 50)
    assert set(ws.meta["subject"].tolist()) == {"s15"}
    assert set(ws.meta["group"].tolist()) == {"s15_04", "s15_07"}
    assert np.all((ws.label >= 0) & (ws.label < len(ACTIVITIES)))
    assert np.all(ws.num["purity"] > 1.0 / len(ACTIVITIES) - 1e-9)
    assert np.all(ws.num["purity"] <= 1.0)


def test_bundled_har_model_evaluates_on_its_held_out_fixture_subject(tmp_path, capsys):
    from edgefuse.models import BUNDLED_DIR
    model = BUNDLED_DIR / "har_imu.onnx"
    if not model.exists():
        pytest.skip("har_imu.onnx not bundled")
    os.environ["EDGEFUSE_CACHE"] = str(tmp_path)
    try:
        assert run_cli(["evaluate", str(model), str(DATA), "--json"]) == 0
    finally:
        os.environ.pop("EDGEFUSE_CACHE", None)
    doc = json.loads(capsys.readouterr().out)
    assert doc["task"] == "activity" and doc["split_keys"] == ["s03", "s08", "s13", "s15"]
    assert "without:imu_watch" in doc["conditions"]


def test_training_twice_with_one_seed_gives_the_same_weights(tmp_path):
    """Fixed seeds: two runs of the same config produce identical checkpoints."""
    torch = pytest.importorskip("torch")
    os.environ["EDGEFUSE_CACHE"] = str(tmp_path / "cache")
    try:
        weights = []
        for run in ("a", "b"):
            cfg = tmp_path / f"{run}.toml"
            cfg.write_text(SMOKE_CONFIG.format(data=DATA, out=tmp_path / run, fusion="late")
                           .replace("epochs = 2", "epochs = 1"))
            assert run_cli(["train", str(cfg)]) == 0
            ckpt = torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)
            weights.append(ckpt["state_dict"])
    finally:
        os.environ.pop("EDGEFUSE_CACHE", None)
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
