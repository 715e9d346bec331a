"""Cross-fitted calibration (models/crossfit.py): `train` with [calibration] method =
"cross-fit" trains on every training node and calibrates on out-of-fold windows of
one extra model per fold; `edgefuse calibrate MODEL --config` does the same for a
model trained earlier (how the bundled models were calibrated) and refuses a model
the config did not train. Recordings: tests/own_data.py (n3 held out for test)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgefuse.models.config import load_config
from edgefuse.models.crossfit import fold_groups
from edgefuse.runtime.cli import main
from edgefuse.runtime.core.errors import ConfigError
from tests.own_data import own_recordings

torch = pytest.importorskip("torch")

NODES = {"n1": "day1", "n2": "day1", "n3": "day2", "n5": "day1"}
CROSS_FIT = '[calibration]\nmethod = "cross-fit"\nfolds = 3\n'


def write_config(root: Path, out: str, calibration: str = CROSS_FIT, test: str = "n3") -> Path:
    from tests.own_data import contract_toml
    path = root / f"{out}.toml"
    path.write_text(f"""[data]
recordings = ["rec/n1", "rec/n2", "rec/n3", "rec/n5"]
labels = "labels.csv"
group = "node"
test = ["{test}"]
{contract_toml(("acoustic", "seismic", "imu"))}
[labels]
rule = "majority"
min_share = 0.6
[train]
seed = 0
epochs = 4
batch = 32
out = "runs/{out}"
{calibration}""")
    return path


@pytest.fixture(scope="module")
def crossfitted(tmp_path_factory):
    with own_recordings(tmp_path_factory.mktemp("crossfit"), NODES) as root:
        assert main(["train", str(write_config(root, "cf"))]) == 0
        run = root / "runs" / "cf"
        yield root, run, json.loads((run / "summary.json").read_text())


def test_folds_are_whole_groups_dealt_by_the_seed():
    groups = [f"g{i}" for i in range(7) for _ in range(3)]
    folds = fold_groups(groups, 3, seed=0)
    assert len(folds) == 3 and sorted(g for f in folds for g in f) == sorted(set(groups))
    assert sorted(len(f) for f in folds) == [2, 2, 3]
    assert fold_groups(groups, 3, seed=0) == folds
    assert len({tuple(fold_groups(groups, 3, seed=s)) for s in range(6)}) > 1
    assert len(fold_groups(["a", "b"], 5, seed=0)) == 2        # never an empty fold
    with pytest.raises(ConfigError, match="at least 2 training groups"):
        fold_groups(["a", "a"], 5, seed=0)


def test_cross_fit_trains_on_every_training_node_and_fits_out_of_fold(crossfitted):
    from edgefuse.runtime.core.inference import OnnxModel
    root, run, summary = crossfitted
    cal = summary["calibration"]
    assert cal["method"] == "cross-fit" and summary["val"] == [] and summary["val_windows"] == 0
    assert sorted(map(tuple, cal["folds"])) == [("n1",), ("n2",), ("n5",)]   # never n3
    assert cal["val_windows"] == summary["train_windows"]      # every one trained on, too
    fold_train = []
    for k, held in enumerate(cal["folds"]):
        fold = json.loads((run / "crossfit" / f"fold{k}" / "summary.json").read_text())
        assert fold["val"] == held and fold["test"] == ["n3"] and fold["calibration"] is None
        fold_train.append(fold["train_windows"])
    # each fold model saw the training windows of the other folds only
    assert sum(summary["train_windows"] - n for n in fold_train) == summary["train_windows"]
    model = OnnxModel.load(run / "model.onnx")
    table = {r: e.to_dict() for r, e in model.contract.calibration}
    assert table == cal["routes"] and {"all", "subset:imu", "masked"} <= set(table)
    assert table["all"]["n"] == summary["train_windows"]        # every window, all present
    pairs = [r for r in table if r.startswith("masked:")]
    assert pairs and table["masked"]["n"] == sum(table[r]["n"] for r in pairs)  # pooled once
    for e in table.values():
        assert e["temperature"] > 0 and (e["threshold"] == 1.0 or e["risk_bound"] <= 0.02)


def test_calibrate_command_gives_a_trained_model_the_same_table(crossfitted, tmp_path, capsys):
    from edgefuse.runtime.core.inference import OnnxModel
    root, run, summary = crossfitted
    for f in run.glob("model*.onnx"):
        shutil.copy(f, tmp_path / f.name)
    copy = tmp_path / "model.onnx"
    assert main(["calibrate", str(copy), "--remove"]) == 0
    assert OnnxModel.load(copy).contract.calibration == ()
    capsys.readouterr()
    assert main(["calibrate", str(copy), "--config", str(write_config(root, "cf")),
                 "--summary", str(tmp_path / "s.json")]) == 0
    err = capsys.readouterr().err
    assert "out-of-fold windows of 3 groups in 3 folds" in err and "calibrated all:" in err
    got = {r: e.to_dict() for r, e in OnnxModel.load(copy).contract.calibration}
    # the same recipe, seed and folds: the table train wrote
    assert got.keys() == summary["calibration"]["routes"].keys()
    for route, entry in got.items():
        assert entry == pytest.approx(summary["calibration"]["routes"][route], rel=1e-6)
    assert json.loads((tmp_path / "s.json").read_text())["folds"] == \
        summary["calibration"]["folds"]
    before = copy.read_bytes()
    assert main(["calibrate", str(copy), "--config",
                 str(write_config(root, "t1", test="n1"))]) == 1
    assert "holds out ['n3'] but the config holds out ['n1']" in capsys.readouterr().err
    assert copy.read_bytes() == before                      # refused: nothing written


@pytest.mark.parametrize("text, words", [
    ('[calibration]\nmethod = "bootstrap"\n', "method must be one of"),
    ('[calibration]\nmethod = "cross-fit"\nfolds = 1\n', "folds must be an integer in [2, 20]"),
    ('[calibration]\nfolds = 2.5\n', "folds must be an integer"),
])
def test_bad_cross_fit_settings_are_refused(tmp_path, text, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        load_config(str(write_config(tmp_path, "bad", calibration=text)))


def test_cross_fit_with_validation_groups_is_refused(tmp_path):
    path = write_config(tmp_path, "both")
    path.write_text(path.read_text().replace('test = ["n3"]', 'test = ["n3"]\nval = ["n1"]'))
    with pytest.raises(ConfigError, match="remove \\[data\\] val or set method"):
        load_config(str(path))
    path.write_text(path.read_text().replace('method = "cross-fit"', 'method = "holdout"'))
    assert load_config(str(path)).data.val == ("n1",)      # hold-out keeps [data] val


def test_cross_fit_with_one_training_group_is_refused_before_training(crossfitted, capsys):
    root = crossfitted[0]
    path = write_config(root, "one")
    path.write_text(path.read_text().replace('test = ["n3"]', 'test = ["n1", "n2", "n3"]'))
    capsys.readouterr()
    assert main(["train", str(path)]) == 1
    assert "cross-fit calibration needs at least 2 training groups; found ['n5']" in \
        capsys.readouterr().err
    assert not (root / "runs" / "one").exists()               # nothing trained or written
