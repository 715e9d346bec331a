"""The train config (TOML): its tables, defaults and checks (no torch).

Two kinds of run, told apart by the [contract] table:

- a user's own recordings ([contract] present): [data] recordings, labels,
  group, test, val, chunk_s; [contract] name, version, window_s, hop_s, labels,
  description and one [contract.modalities.NAME] (channels, rate_hz) per
  modality; [labels] the interval rule (models/intervals.py);
- a bundled dataset ([data] dataset = "goodvibes" or "sphar"): [data] path,
  test, val; [labels] the goodvibes distance rule (models/labels.py).

Both take [model] (the built-in net's embed/width/hidden/fusion, or network =
"pkg.mod:Class" / "file.py:Class" with [model.args]), [train] and [calibration]
(per-route calibration on the validation groups: models/route_calibration.py;
with [data] val empty, ``val_fraction`` of the training groups, chosen by the
seed, are held out for it: models/splits.py ``default_val_keys``; groups are
split keys, or with ``val_by = "event"`` event groups: a goodvibes pass or noise
recording with every node that saw it, an sp-sw-har execution; ``method =
"cross-fit"`` instead trains on every training group and fits on out-of-fold
windows: models/crossfit.py). Unknown
tables and keys are refused, naming them. Relative paths ([data] recordings,
labels, [train] out, a network file) are relative to the config file.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from edgefuse.models.intervals import IntervalRule
from edgefuse.models.labels import LabelRule
from edgefuse.runtime.core.contract import ModelContract
from edgefuse.runtime.core.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DATASETS = ("goodvibes", "sphar")
FUSIONS = ("mlp", "late", "sum")
VAL_BY = ("split", "event")
CALIBRATION_METHODS = ("holdout", "cross-fit")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "goodvibes"   # "goodvibes", "sphar"; "" with [contract] (recordings)
    path: str = ""
    test: tuple[str, ...] = ("bprf/2023-04-11",)   # held-out split keys
    val: tuple[str, ...] = ()
    recordings: tuple[str, ...] = ()   # anything `edgefuse replay` reads
    labels: str = ""                   # the intervals CSV
    group: str = "node"                # split key: "node" or a column of the labels file
    chunk_s: float = 1.0               # replay's --chunk-s (training cuts replay's windows)


@dataclass(frozen=True)
class ModelConfig:
    embed: int = 32
    width: int = 16
    hidden: int = 32
    fusion: str = "mlp"    # "mlp", "late" or "sum" (see models/nets.py)
    network: str = ""      # "pkg.mod:Class" or "file.py:Class": the user's nn.Module
    args: dict = field(default_factory=dict)   # [model.args]: its keyword arguments

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ConfigError(f"[model] fusion must be one of {FUSIONS}, found {self.fusion!r}")
        if self.network and ":" not in self.network:
            raise ConfigError(f"[model] network must look like 'mypkg.mynet:MyNet' or "
                              f"'mynet.py:MyNet', found {self.network!r}")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    epochs: int = 20
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    modality_dropout: float = 0.3
    gain_db: float = 6.0
    subset_loss: float = 0.5
    class_weight: str = "balanced"   # "balanced" (1/frequency), "sqrt" (1/sqrt) or "none"
    threads: int = 1
    out: str = "~/.cache/edgefuse/runs/detection"


@dataclass(frozen=True)
class CalibrationConfig:
    """[calibration]: fitted after training on the validation windows, written into the
    exported model's contract (temperature and abstention threshold per route)."""
    enabled: bool = True
    target_risk: float = 0.02    # error allowed among the windows a route decides
    delta: float = 0.1           # the threshold's risk bound holds with confidence 1 - delta
    val_fraction: float = 0.2    # [data] val empty: this share of the training groups ...
    val_by: str = "split"        # ... whole split keys, or "event": event groups
    # "holdout": fit on the validation groups above (they are not trained on);
    # "cross-fit": train on every training group, fit on out-of-fold windows of `folds`
    # extra models, each trained without one fold of the groups (models/crossfit.py).
    method: str = "holdout"
    folds: int = 5

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(f"[calibration] method must be one of {CALIBRATION_METHODS}, "
                              f"found {self.method!r}")
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or \
                not 2 <= self.folds <= 20:
            raise ConfigError(f"[calibration] folds must be an integer in [2, 20], found "
                              f"{self.folds!r}")
        if self.val_by not in VAL_BY:
            raise ConfigError(f"[calibration] val_by must be one of {VAL_BY}, found "
                              f"{self.val_by!r}")
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"[calibration] enabled must be true or false, found "
                              f"{self.enabled!r}")
        for key, lo, hi in (("target_risk", 0.0, 1.0), ("delta", 0.0, 1.0),
                            ("val_fraction", 0.0, 0.9)):
            v = getattr(self, key)
            closed = key == "val_fraction"     # 0 = no default validation groups
            if isinstance(v, bool) or not isinstance(v, (int, float)) or \
                    not (lo <= v if closed else lo < v) or not v < hi:
                raise ConfigError(f"[calibration] {key} must be a number in "
                                  f"{'[' if closed else '('}{lo:g}, {hi:g}), found {v!r}")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    labels: LabelRule | IntervalRule = field(default_factory=LabelRule)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    contract: ModelContract | None = None     # a user's own contract ([contract])
    base_dir: str = ""                        # the config file's folder

    @property
    def on_recordings(self) -> bool:
        return self.contract is not None

    def to_dict(self) -> dict:
        out = {k: {f: (list(v) if isinstance(v, tuple) else v)
                   for f, v in dataclasses.asdict(getattr(self, k)).items()}
               for k in ("data", "labels", "model", "train", "calibration")}
        if self.contract is not None:
            out["contract"] = self.contract.to_json()
        return out


def _section(cls, raw: dict, name: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table, found {raw!r}")
    allowed = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"[{name}] has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    vals = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return cls(**vals)
    except TypeError as exc:
        raise ConfigError(f"[{name}]: {exc}") from exc


def _seconds_to_ns(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"[contract] {key} must be a positive number of seconds, "
                          f"found {value!r}")
    return int(round(float(value) * 1e9))


def contract_from_toml(raw: dict, source: str) -> ModelContract:
    """The ModelContract of a [contract] table (checked by the runtime's own parser)."""
    allowed = ("name", "version", "window_s", "hop_s", "labels", "modalities", "description")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"[contract] has unknown key(s) {unknown}; allowed: {list(allowed)}")
    for key in ("name", "window_s", "hop_s", "labels", "modalities"):
        if key not in raw:
            raise ConfigError(f"[contract] needs {key!r} (name, window_s, hop_s, labels and "
                              "one [contract.modalities.NAME] table per modality)")
    mods = raw["modalities"]
    if not isinstance(mods, dict) or not mods:
        raise ConfigError("[contract] needs one [contract.modalities.NAME] table (channels, "
                          "rate_hz) per modality")
    specs = []
    for name, m in mods.items():
        if not isinstance(m, dict) or sorted(m) != ["channels", "rate_hz"]:
            raise ConfigError(f"[contract.modalities.{name}] must hold exactly channels and "
                              f"rate_hz, found {m!r}")
        specs.append({"name": name, "channels": m["channels"], "rate_hz": m["rate_hz"],
                      "input": name})
    doc = {"contract": 1, "name": raw["name"], "version": str(raw.get("version", "0.1.0")),
           "modalities": specs, "window_ns": _seconds_to_ns(raw["window_s"], "window_s"),
           "hop_ns": _seconds_to_ns(raw["hop_s"], "hop_s"), "labels": raw["labels"],
           "mask_input": "modality_mask", "output": "scores", "output_kind": "logits",
           "fallbacks": [], "description": str(raw.get("description", ""))}
    return ModelContract.from_dict(doc, f"{source} [contract]")


def _resolve(base: str, path: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _data(raw: dict, contract: ModelContract | None, base: str) -> DataConfig:
    if contract is None:
        for key in ("recordings", "labels", "group", "chunk_s"):
            if key in raw:
                raise ConfigError(f"[data] {key} needs a [contract] table (your own "
                                  "recordings); without one, [data] dataset names goodvibes "
                                  "or sphar")
        data = _section(DataConfig, raw, "data")
        if data.dataset not in DATASETS:
            raise ConfigError(f"[data] dataset must be one of {DATASETS} (or give a [contract] "
                              f"table to train on your own recordings), found {data.dataset!r}")
        return data
    for key in ("dataset", "path"):
        if key in raw:
            raise ConfigError(f"[data] {key} and [contract] exclude each other: {key} names a "
                              "bundled dataset with its own contract; for your recordings "
                              "give [data] recordings and labels")
    raw = {"test": [], **raw}
    if isinstance(raw.get("recordings"), str):
        raw["recordings"] = [raw["recordings"]]
    data = _section(DataConfig, {"dataset": "", **raw}, "data")
    if not data.recordings or not all(isinstance(p, str) and p for p in data.recordings):
        raise ConfigError("[data] recordings must list your recordings (manifests, folders of "
                          f"them, MCAP logs), found {list(data.recordings)!r}")
    if not isinstance(data.labels, str) or not data.labels:
        raise ConfigError("[data] labels must name the intervals CSV (node,start,end,label)")
    if isinstance(data.chunk_s, bool) or not isinstance(data.chunk_s, (int, float)) \
            or not data.chunk_s > 0:
        raise ConfigError(f"[data] chunk_s must be > 0 seconds, found {data.chunk_s!r}")
    return dataclasses.replace(data, recordings=tuple(_resolve(base, p) for p in data.recordings),
                               labels=_resolve(base, data.labels))


def load_config(path: str) -> RunConfig:
    """Parse and check a train config; relative paths are made absolute."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    sections = ("data", "labels", "model", "train", "calibration", "contract")
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {unknown}; allowed: {sorted(sections)}")
    base = os.path.dirname(os.path.abspath(path))
    contract = contract_from_toml(raw["contract"], path) if "contract" in raw else None
    data = _data(raw.get("data", {}), contract, base)
    if contract is not None:
        labels = _section(IntervalRule, raw.get("labels", {}), "labels")
        labels.check(contract.labels)
    else:
        labels = _section(LabelRule, raw.get("labels", {}), "labels")
    model_raw = dict(raw.get("model", {}))
    if model_raw.get("network"):
        clash = sorted(set(model_raw) & {"embed", "width", "hidden", "fusion"})
        if clash:
            raise ConfigError(f"[model] {clash} set the built-in network; with network = "
                              f"{model_raw['network']!r} pass your module's settings in "
                              "[model.args]")
    elif "args" in model_raw:
        raise ConfigError("[model.args] are the keyword arguments of [model] network; "
                          "set network = \"pkg.mod:Class\" or remove them")
    model = _section(ModelConfig, model_raw, "model")
    train_raw = dict(raw.get("train", {}))
    if contract is not None:
        train_raw.setdefault("out", os.path.join("runs", contract.name))
    train = _section(TrainConfig, train_raw, "train")
    train = dataclasses.replace(train, out=_resolve(base, train.out))
    calibration = _section(CalibrationConfig, raw.get("calibration", {}), "calibration")
    if calibration.method == "cross-fit" and data.val:
        raise ConfigError(f"{path}: [data] val = {list(data.val)} holds groups out for "
                          "[calibration] method = \"holdout\"; cross-fit trains on every "
                          "training group and fits on out-of-fold windows: remove [data] val "
                          "or set method = \"holdout\"")
    return RunConfig(data, labels, model, train, calibration, contract, base)
