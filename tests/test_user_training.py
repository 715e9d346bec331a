"""Train, evaluate, quantize and replay on a user's own recordings and contract.

Four synthetic 3-sensor nodes (tests/own_data.py: acoustic 8 kHz WAV, seismic
500 Hz WAV, 6-axis IMU CSV at 100 Hz, each with a recording.toml) labelled by an
intervals file; n3 (session day2) is held out for test, and one of the three
training nodes, chosen by the seed, for calibration. Training is capped at a few
epochs: the signals are easy, the point is the path, not the accuracy.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgefuse.runtime.cli import main
from edgefuse.runtime.core.errors import ConfigError, InputError
from tests.own_data import LABELS, T0_NS, contract_toml, own_recordings, write_node

torch = pytest.importorskip("torch")

HERE = Path(__file__).resolve().parent
NODES = {"n1": "day1", "n2": "day1", "n3": "day2", "n5": "day1"}
OUTSIDE_ROWS = (f"n1,{T0_NS + 3600 * 10**9},{T0_NS + 3601 * 10**9},walk,day1",
                f"n9,{T0_NS},{T0_NS + 10**9},walk,day3")


def config(root: Path, out: str, model: str = "", modalities=("acoustic", "seismic", "imu"),
           data_extra: str = "", epochs: int = 10) -> Path:
    path = root / f"{out}.toml"
    path.write_text(f"""[data]
recordings = ["rec/n1", "rec/n2", "rec/n3", "rec/n5"]
labels = "labels.csv"
group = "node"
test = ["n3"]
{data_extra}
{contract_toml(modalities)}
[labels]
rule = "majority"
min_share = 0.6

{model}
[train]
seed = 0
epochs = {epochs}
batch = 32
modality_dropout = 0.3
out = "runs/{out}"
""")
    return path


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """The recordings, the labels (with two intervals that label nothing) and a cache."""
    with own_recordings(tmp_path_factory.mktemp("own"), NODES, OUTSIDE_ROWS) as root:
        yield root


@pytest.fixture(scope="module")
def trained(own):
    """`edgefuse train` on the built-in network; (model path, summary)."""
    assert main(["train", str(config(own, "builtin"))]) == 0
    run = own / "runs" / "builtin"
    return run / "model.onnx", json.loads((run / "summary.json").read_text())


def replay_labels(capsys, model: Path, *inputs: Path) -> list[dict]:
    capsys.readouterr()
    assert main(["replay", *map(str, inputs), "--model", str(model), "-q"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def truth(window_start_ns: int) -> str:
    """The plan's label of the window [start, start + 1 s) (majority, no boundary case)."""
    t = T0_NS
    for label, seconds in (("idle", 6), ("walk", 6), ("vehicle", 6), ("idle", 4), ("walk", 4),
                           ("vehicle", 4)):
        t += seconds * 10**9
        if window_start_ns + 5 * 10**8 < t:
            return label
    return ""


def test_train_writes_a_bundle_that_replay_runs_on_the_recordings(own, trained, capsys):
    from edgefuse.runtime.core.inference import OnnxModel
    model_path, summary = trained
    model = OnnxModel.load(model_path)
    c = model.contract
    assert (c.name, c.version, c.labels) == ("own-3s", "1.2.0", LABELS)
    assert [(m.name, m.channels, m.rate_hz) for m in c.modalities] == \
        [("acoustic", 1, 8000.0), ("seismic", 1, 500.0), ("imu", 6, 100.0)]
    assert sorted(model.fallbacks) == [("acoustic",), ("imu",), ("seismic",)]
    assert (model_path.parent / "checkpoint.pt").is_file()
    assert summary["test"] == ["n3"] and summary["train_windows"] > 50
    assert max(summary["parity"].values()) <= 1e-4
    decisions = replay_labels(capsys, model_path, own / "rec" / "n3")
    assert len(decisions) >= 40 and {d["model"] for d in decisions} == {"own-3s@1.2.0"}
    right = [d["label"] == truth(d["window_start_ns"]) for d in decisions]
    assert np.mean(right) >= 0.8, np.mean(right)   # n3 was never seen in training


def test_intervals_that_label_nothing_are_counted(trained):
    report = trained[1]["label_report"]
    line = 2 + 6 * len(NODES)   # after the header and every node's six intervals
    assert report["outside"] == 1 and report["outside_lines"] == [line]
    assert report["no_window"] == 1 and report["uncut"] == report["outvoted"] == 0
    assert report["other_nodes"] == ["n9"] and report["other_node_intervals"] == 1
    assert report["rule"] == {"rule": "majority", "min_share": 0.6, "any_labels": [],
                              "background": ""}


def test_evaluate_json_has_a_confusion_matrix_per_condition(own, trained, capsys):
    model_path, _ = trained
    rec = [str(own / "rec" / n) for n in NODES]
    capsys.readouterr()
    assert main(["evaluate", str(model_path), "--recordings", *rec, "--labels",
                 str(own / "labels.csv"), "--test", "n3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    mods = ("acoustic", "seismic", "imu")
    assert set(doc["conditions"]) == {"all", *(f"{k}:{m}" for m in mods
                                               for k in ("without", "degraded"))}
    assert doc["split_keys"] == ["n3"] and doc["label_rule"]["min_share"] == 0.6
    for row in doc["conditions"].values():
        cm = np.array(row["confusion"])
        assert cm.shape == (3, 3) and cm.sum() == row["n"] - row["abstained"]
        assert np.trace(cm) == round(row["accuracy"] * row["n"])
    assert doc["class_counts"] == np.array(doc["conditions"]["all"]["confusion"]).sum(1).tolist()
    # without --test: every labelled window of the recordings given (only n3 here)
    assert main(["evaluate", str(model_path), "--recordings", rec[2], "--labels",
                 str(own / "labels.csv"), "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["split_keys"] == "all"
    assert alone["conditions"]["all"] == doc["conditions"]["all"]


def test_training_calibrates_every_route_on_a_held_out_training_node(trained, tmp_path,
                                                                     capsys):
    from edgefuse.runtime.core.inference import OnnxModel
    model_path, summary = trained
    cal = summary["calibration"]
    assert len(cal["val"]) == 1 and cal["val"][0] in {"n1", "n2", "n5"}   # never n3
    assert summary["val"] == cal["val"] and cal["val_windows"] == summary["val_windows"] > 30
    mods = ("acoustic", "seismic", "imu")
    pairs = [f"masked:{a}+{b}" for i, a in enumerate(mods) for b in mods[i + 1:]]
    assert sorted(cal["routes"]) == sorted(["all", "masked", *pairs,
                                            *(f"subset:{m}" for m in mods)])
    model = OnnxModel.load(model_path)
    table = {r: e.to_dict() for r, e in model.contract.calibration}
    assert table == cal["routes"]
    for m in mods:   # each fallback file carries its route as its own "all"
        own = model.fallbacks[(m,)].contract.route_calibration("all").to_dict()
        assert own == cal["routes"][f"subset:{m}"]
    for route, e in cal["routes"].items():   # every window has all three modalities
        pooled = len(pairs) if route == "masked" else 1
        assert e["n"] == pooled * summary["val_windows"] and e["target_risk"] == 0.02
        # ~60 validation windows cannot show a 2 % risk at 90 % confidence (114 needed)
        assert e["threshold"] == 1.0 or e["risk_bound"] <= 0.02
    # `edgefuse export` of the checkpoint writes the same calibration
    capsys.readouterr()
    again = tmp_path / "again.onnx"
    assert main(["export", str(model_path.parent / "checkpoint.pt"), "-o", str(again)]) == 0
    assert {r: e.to_dict() for r, e in OnnxModel.load(again).contract.calibration} == table


def test_evaluate_reports_calibration_per_condition(own, trained, capsys):
    model_path, _ = trained
    args = ["evaluate", str(model_path), "--recordings", *(str(own / "rec" / n) for n in NODES),
            "--labels", str(own / "labels.csv"), "--test", "n3", "--json"]
    capsys.readouterr()
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["target_risk"] == 0.02 and sorted(doc["calibration"]) == \
        sorted(trained[1]["calibration"]["routes"])
    for name, row in doc["conditions"].items():
        for key in ("ece", "ece_uncalibrated", "ece_floor", "aurc", "coverage_at_risk"):
            assert 0.0 <= row[key] <= 1.0, (name, key)
        assert len(row["reliability"]) == 15 and row["risk_coverage"]["coverage"][-1] == 1.0
        assert sum(r["n"] for r in row["reliability"]) == row["n_scored"] == row["n"]
        assert [r["risk"] for r in row["coverage_by_risk"]] == [0.01, 0.02, 0.05, 0.1]
        assert 0.0 <= row["decided"] <= 1.0
    assert doc["conditions"]["all"]["decided"] == 1.0     # the all route decides ...
    assert main(args + ["--abstain-all", "--target-risk", "0.5"]) == 0
    strict = json.loads(capsys.readouterr().out)
    for name, row in strict["conditions"].items():       # ... unless --abstain-all
        assert row["decided"] <= doc["conditions"][name]["decided"]
        assert row["coverage_at_risk"] >= doc["conditions"][name]["coverage_at_risk"]
        assert row["ece"] == doc["conditions"][name]["ece"]
    if trained[1]["calibration"]["routes"]["all"]["threshold"] == 1.0:
        assert strict["conditions"]["all"]["decided"] < 1.0
    assert main(args[:-1]) == 0                           # the text table has the columns
    text = capsys.readouterr().out
    assert "ECE  floor  ECEraw" in text and "risk-coverage" in text


def test_quantize_int8_static_calibrates_on_recordings(own, trained, tmp_path, capsys):
    from edgefuse.runtime.core.inference import OnnxModel
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(trained[0]), "-o", str(out), "--mode", "int8-static",
                 "--recordings", str(own / "rec" / "n1")]) == 0
    model = OnnxModel.load(out)
    assert len(model.fallbacks) == 3
    assert len(replay_labels(capsys, out, own / "rec" / "n3")) >= 40


def test_own_network_from_a_file_trains_exports_and_replays(own, tmp_path, capsys):
    """[model] network = "nets/own_nets.py:TinyNet" (relative to the config)."""
    (own / "nets").mkdir(exist_ok=True)
    shutil.copy(HERE / "own_nets.py", own / "nets" / "own_nets.py")
    cfg = config(own, "tiny", '[model]\nnetwork = "nets/own_nets.py:TinyNet"\n'
                 '[model.args]\nhidden = 6\n', epochs=6)
    assert main(["train", str(cfg)]) == 0
    run = own / "runs" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["network"].endswith("nets/own_nets.py:TinyNet")
    assert len(replay_labels(capsys, run / "model.onnx", own / "rec" / "n3")) >= 40
    # `edgefuse export` takes a checkpoint of a user's network as well
    capsys.readouterr()
    assert main(["export", str(run / "checkpoint.pt"), "-o", str(tmp_path / "again.onnx")]) == 0
    assert "again.imu.onnx" in capsys.readouterr().out


@pytest.mark.parametrize("network,message", [
    ("tests.own_nets:WrongArity", r"forward\(x, mask\).*does not fit the contract; expected "
     r"forward\(acoustic \[B,1,8000\], seismic \[B,1,500\], imu \[B,6,100\], mask \[B,3\]\)"),
    ("tests.own_nets:WrongOutput", r"returned a tensor of shape \[2, 2\].*expected a float "
     r"tensor of shape \[2, 3\]"),
    ("tests.own_nets:Missing", "has no nn.Module subclass 'Missing'"),
    ("tests.no_such_module:Net", "no module 'tests.no_such_module'"),
])
def test_a_network_that_does_not_fit_is_refused_before_training(own, network, message):
    from edgefuse.models.train import load_config, train
    cfg = config(own, "misfit", f'[model]\nnetwork = "{network}"\n')
    with pytest.raises(ConfigError, match=message):
        train(load_config(str(cfg)))
    assert not (own / "runs" / "misfit" / "checkpoint.pt").exists()


def test_config_modalities_that_are_not_recorded_are_refused(own):
    from edgefuse.models.config import load_config
    from edgefuse.models.train import train
    cfg = config(own, "lidar", modalities=("acoustic", "seismic"))
    text = cfg.read_text().replace("[contract.modalities.seismic]", "[contract.modalities.lidar]")
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=r"\['acoustic', 'lidar'\] do not match the "
                                          r"recordings' \['acoustic', 'imu', 'seismic'\]"):
        train(load_config(str(cfg)))
    cfg.write_text(config(own, "lidar").read_text().replace("channels = 6", "channels = 3"))
    with pytest.raises(ConfigError, match="stream n1/imu has 6 channel.*says 3"):
        train(load_config(str(cfg)))


def test_bad_data_settings_are_refused(own, tmp_path):
    from edgefuse.models.config import load_config
    from edgefuse.models.train import train
    with pytest.raises(ConfigError, match="dataset and \\[contract\\] exclude each other"):
        load_config(str(config(own, "both", data_extra='dataset = "sphar"')))
    cfg = config(own, "grp").read_text().replace('group = "node"', 'group = "site"')
    (own / "grp.toml").write_text(cfg)
    with pytest.raises(ConfigError, match="'site' is neither 'node' nor a column of .*session"):
        train(load_config(str(own / "grp.toml")))
    with pytest.raises(ConfigError,
                       match=r"split key 'n7' is not a node.*\['n1', 'n2', 'n3', 'n5'\]"):
        cfg = config(own, "n7").read_text().replace('test = ["n3"]', 'test = ["n7"]')
        (own / "n7.toml").write_text(cfg)
        train(load_config(str(own / "n7.toml")))
    bad = tmp_path / "labels.csv"
    bad.write_text("node,start,end,label\nn1,2026-05-01T12:00:00Z,soon,idle\n")
    cfg = config(own, "badlabels").read_text().replace('"labels.csv"', json.dumps(str(bad)))
    (own / "badlabels.toml").write_text(cfg)
    with pytest.raises(InputError, match=r"labels.csv line 2: expected ISO-8601"):
        train(load_config(str(own / "badlabels.toml")))


def test_a_labels_column_as_split_key_and_background_windows(own, tmp_path):
    """group = "session": each window takes the session of the interval overlapping it
    most; n4 has no interval, so its (background) windows have no session: left out."""
    from edgefuse.models.config import contract_from_toml, tomllib
    from edgefuse.models.intervals import IntervalRule
    from edgefuse.models.recordings import RecordingSet, load_or_build_recordings
    from edgefuse.models.splits import split_by_column
    n4 = write_node(tmp_path, "n4", seed=4, plan=(("idle", 3),))
    contract = contract_from_toml(tomllib.loads(contract_toml())["contract"], "test")
    rec = RecordingSet((str(own / "rec" / "n1"), str(own / "rec" / "n3"), str(n4)),
                       str(own / "labels.csv"), group="session")
    ws = load_or_build_recordings(rec, contract, IntervalRule(background="idle"))
    assert set(ws.meta["node"].tolist()) == {"n1", "n3"}
    assert (ws.meta["session"] == np.where(ws.meta["node"] == "n3", "day2", "day1")).all()
    assert ws.info["windows"]["no_group"] == 5 and ws.info["group"] == "session"
    split = split_by_column(ws, "session", ("day2",))
    assert set(ws.meta["node"][split.test].tolist()) == {"n3"}
