"""The model contract: what a model file must say about itself.

An edgefuse model is an ONNX file whose ``metadata_props`` hold, under the
key ``edgefuse``, one JSON document:

    {
      "contract": 1,
      "name": "gv-fusion", "version": "1.0.0",
      "modalities": [
        {"name": "acoustic", "channels": 1, "rate_hz": 4000.0, "input": "acoustic"},
        {"name": "seismic",  "channels": 1, "rate_hz": 800.0,  "input": "seismic"}
      ],
      "window_ns": 1000000000, "hop_ns": 500000000,
      "labels": ["background", "vehicle"],
      "mask_input": "modality_mask",
      "output": "scores", "output_kind": "logits",      # or "probabilities"
      "fallbacks": [{"modalities": ["seismic"], "file": "gv.seismic.onnx"}],
      "calibration": {                                  # optional, per route
        "all": {"temperature": 1.4, "threshold": 0.93, "coverage": 0.91,
                "target_risk": 0.02},
        "subset:seismic": {"temperature": 1.9, "threshold": 0.97, ...}
      },
      "description": "free text"
    }

Inputs: one per modality, float32 [batch, channels, samples] where
samples = window_ns * rate_hz / 1e9 exactly, plus ``mask_input`` float32
[batch, n_modalities] (1 = present, in the order of ``modalities``).
Output: [batch, n_labels] class scores. Fallback models (paths relative to
the main file) take only their subset's inputs, plus the mask of that subset,
and have the same labels, window and hop.

``calibration`` maps a route to how its scores are read (see fusion.py):
routes are "all" (the main model, every modality present), a fallback's tag
("subset:seismic"), "masked" (the main model with modalities masked) or, more
specific, "masked:<present modalities>" ("masked:acoustic"). Per route:
``temperature`` (logits are divided by it before the softmax; > 0) and,
optionally, ``threshold`` (a top calibrated probability below it abstains),
with what it was chosen for and cost on validation data: ``target_risk``,
``coverage``, ``val_risk``, ``risk_bound``, ``n``. A route without an entry,
and every route of a model without ``calibration``, has temperature 1 and no
threshold (the model's own scores, as before calibration existed).

This module parses and checks the document; it never imports onnx (the
runtime reads metadata through onnxruntime).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from edgefuse.runtime.core.errors import ModelContractError

METADATA_KEY = "edgefuse"
CONTRACT_VERSION = 1
OUTPUT_KINDS = ("logits", "probabilities")
ROUTE_ALL = "all"
ROUTE_MASKED = "masked"
MAX_TEMPERATURE = 1e3


@dataclass(frozen=True)
class RouteCalibration:
    """How one route's scores are read. The defaults are "uncalibrated"."""
    temperature: float = 1.0
    threshold: float | None = None       # abstain below this top probability
    target_risk: float | None = None     # what the threshold was chosen for ...
    coverage: float | None = None        # ... and what it kept on validation data
    val_risk: float | None = None        # error among the windows kept there
    risk_bound: float | None = None      # its upper confidence bound
    n: int | None = None                 # validation windows of the route

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


UNCALIBRATED = RouteCalibration()


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    channels: int
    rate_hz: float
    input: str

    def samples(self, window_ns: int) -> int:
        return int(round(window_ns * self.rate_hz / 1e9))


@dataclass(frozen=True)
class FallbackSpec:
    modalities: tuple[str, ...]
    file: str

    @property
    def tag(self) -> str:
        return "subset:" + "+".join(self.modalities)


@dataclass(frozen=True)
class ModelContract:
    name: str
    version: str
    modalities: tuple[ModalitySpec, ...]
    window_ns: int
    hop_ns: int
    labels: tuple[str, ...]
    mask_input: str
    output: str
    output_kind: str
    fallbacks: tuple[FallbackSpec, ...] = ()
    description: str = ""
    calibration: tuple[tuple[str, RouteCalibration], ...] = ()  # (route, entry), sorted

    @property
    def ident(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    @property
    def alignment(self) -> tuple:
        """What fixes the windows cut from the streams: window, hop and each modality's
        (name, channels, rate); two contracts with equal alignment cut the same windows."""
        return (self.window_ns, self.hop_ns,
                tuple((m.name, m.channels, m.rate_hz) for m in self.modalities))

    def modality(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(name)

    def route_calibration(self, *routes: str) -> RouteCalibration:
        """The entry of the first of ``routes`` that has one, else UNCALIBRATED."""
        table = dict(self.calibration)
        for route in routes:
            if route in table:
                return table[route]
        return UNCALIBRATED

    def to_json(self) -> str:
        doc = {
            "contract": CONTRACT_VERSION,
            "name": self.name,
            "version": self.version,
            "modalities": [
                {"name": m.name, "channels": m.channels, "rate_hz": m.rate_hz, "input": m.input}
                for m in self.modalities
            ],
            "window_ns": self.window_ns,
            "hop_ns": self.hop_ns,
            "labels": list(self.labels),
            "mask_input": self.mask_input,
            "output": self.output,
            "output_kind": self.output_kind,
            "fallbacks": [{"modalities": list(f.modalities), "file": f.file}
                          for f in self.fallbacks],
            "description": self.description,
        }
        if self.calibration:  # absent, not empty, in models without it: old files unchanged
            doc["calibration"] = {route: cal.to_dict() for route, cal in self.calibration}
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> "ModelContract":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelContractError(
                f"{source}: metadata '{METADATA_KEY}' is not valid JSON ({exc}); "
                "re-export the model with edgefuse export"
            ) from exc
        return cls.from_dict(doc, source)

    @classmethod
    def from_dict(cls, doc: object, source: str = "model") -> "ModelContract":
        c = _Checker(source)
        c.require(isinstance(doc, dict), "the contract must be a JSON object", doc)
        assert isinstance(doc, dict)
        c.require(doc.get("contract") == CONTRACT_VERSION,
                  f"'contract' must be {CONTRACT_VERSION}", doc.get("contract"))
        name = c.string(doc, "name")
        version = c.string(doc, "version")
        mods_raw = doc.get("modalities")
        c.require(isinstance(mods_raw, list) and len(mods_raw) > 0,
                  "'modalities' must be a non-empty list", mods_raw)
        window_ns = c.positive_int(doc, "window_ns")
        hop_ns = c.positive_int(doc, "hop_ns")
        c.require(hop_ns <= window_ns, "'hop_ns' must not exceed 'window_ns'",
                  f"hop_ns={hop_ns}, window_ns={window_ns}")
        mods = []
        for i, m in enumerate(mods_raw):
            c.require(isinstance(m, dict), f"modalities[{i}] must be an object", m)
            spec = ModalitySpec(
                name=c.string(m, "name"),
                channels=c.positive_int(m, "channels"),
                rate_hz=c.positive_float(m, "rate_hz"),
                input=c.string(m, "input"),
            )
            for span, what in ((window_ns, "window_ns"), (hop_ns, "hop_ns")):
                exact = span * spec.rate_hz / 1e9
                c.require(abs(exact - round(exact)) < 1e-6,
                          f"{what} x rate_hz of modality {spec.name!r} must be a whole number "
                          "of samples (windows share one sample grid)",
                          f"{span} ns x {spec.rate_hz} Hz = {exact} samples")
            mods.append(spec)
        names = [m.name for m in mods]
        c.require(len(set(names)) == len(names), "modality names must be unique", names)
        labels = doc.get("labels")
        c.require(isinstance(labels, list) and len(labels) >= 2
                  and all(isinstance(x, str) and x for x in labels)
                  and len(set(labels)) == len(labels),
                  "'labels' must be a list of >= 2 distinct non-empty strings", labels)
        mask_input = c.string(doc, "mask_input")
        output = c.string(doc, "output")
        inputs = [m.input for m in mods] + [mask_input]
        c.require(len(set(inputs)) == len(inputs), "input names must be unique", inputs)
        output_kind = doc.get("output_kind", "logits")
        c.require(output_kind in OUTPUT_KINDS, f"'output_kind' must be one of {OUTPUT_KINDS}",
                  output_kind)
        fallbacks = []
        fb_raw = doc.get("fallbacks") or []
        c.require(isinstance(fb_raw, list), "'fallbacks' must be a list", fb_raw)
        for i, f in enumerate(fb_raw):
            c.require(isinstance(f, dict), f"fallbacks[{i}] must be an object", f)
            subset = f.get("modalities")
            c.require(isinstance(subset, list) and subset and all(s in names for s in subset)
                      and len(set(subset)) == len(subset) and len(subset) < len(names),
                      f"fallbacks[{i}].modalities must be a proper subset of {names}", subset)
            ordered = tuple(n for n in names if n in subset)
            fallbacks.append(FallbackSpec(ordered, c.string(f, "file")))
        subsets = [f.modalities for f in fallbacks]
        c.require(len(set(subsets)) == len(subsets), "each fallback subset may appear once",
                  subsets)
        calibration = _calibration(c, doc.get("calibration"), names, fallbacks)
        return cls(name, version, tuple(mods), window_ns, hop_ns, tuple(labels), mask_input,
                   output, output_kind, tuple(fallbacks), str(doc.get("description", "")),
                   calibration)


def _calibration(c: "_Checker", raw: object, names: list[str],
                 fallbacks: list[FallbackSpec]) -> tuple[tuple[str, RouteCalibration], ...]:
    """Parse the optional ``calibration`` mapping; each route must be one this model takes."""
    if raw is None:
        return ()
    c.require(isinstance(raw, dict), "'calibration' must be an object mapping route -> entry",
              raw)
    assert isinstance(raw, dict)
    tags = {f.tag for f in fallbacks}
    out = []
    for route in sorted(raw, key=str):
        entry = raw[route]
        where = f"calibration[{route!r}]"
        c.require(isinstance(route, str), "calibration routes must be strings", route)
        if route.startswith(ROUTE_MASKED + ":"):
            subset = route[len(ROUTE_MASKED) + 1:].split("+")
            ordered = tuple(n for n in names if n in subset)
            c.require(len(ordered) == len(subset) and subset == list(ordered)
                      and 0 < len(ordered) < len(names),
                      f"{where}: a masked route names the present modalities, a proper subset "
                      f"of {names} in that order joined by '+'", route)
        else:
            c.require(route in {ROUTE_ALL, ROUTE_MASKED} | tags,
                      f"{where}: routes are {sorted({ROUTE_ALL, ROUTE_MASKED} | tags)} or "
                      "'masked:<present modalities>'", route)
        c.require(isinstance(entry, dict), f"{where} must be an object", entry)
        known = {f.name for f in dataclasses.fields(RouteCalibration)}
        c.require(set(entry) <= known, f"{where}: allowed keys are {sorted(known)}",
                  sorted(set(entry) - known))
        c.require("temperature" in entry, f"{where}: 'temperature' is required", entry)
        values = {}
        for key, v in entry.items():
            if key == "n":
                c.require(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                          f"{where}.n must be a whole number >= 0", v)
            elif key == "temperature":
                c.require(_number(v) and 0 < v <= MAX_TEMPERATURE,
                          f"{where}.temperature must be a finite number in "
                          f"(0, {MAX_TEMPERATURE:g}]", v)
            else:
                c.require(_number(v) and 0 <= v <= 1,
                          f"{where}.{key} must be a number in [0, 1]", v)
            values[key] = v if key == "n" else float(v)
        out.append((route, RouteCalibration(**values)))
    return tuple(out)


def _number(v: object) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int beyond float range
        return False


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def require(self, ok: bool, expected: str, found: object) -> None:
        if not ok:
            raise ModelContractError(
                f"{self.source}: {expected}; found {found!r}. The model contract is described "
                "in edgefuse.runtime.core.contract; re-export the model with edgefuse export"
            )

    def string(self, d: dict, key: str) -> str:
        v = d.get(key)
        self.require(isinstance(v, str) and v != "", f"{key!r} must be a non-empty string", v)
        return v

    def positive_int(self, d: dict, key: str) -> int:
        v = d.get(key)
        self.require(isinstance(v, int) and not isinstance(v, bool) and 0 < v < (1 << 62),
                     f"{key!r} must be a positive integer below 2**62", v)
        return v

    def positive_float(self, d: dict, key: str) -> float:
        v = d.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if ok:
            try:
                ok = math.isfinite(float(v)) and 0 < float(v) < 1e9
            except OverflowError:
                ok = False
        self.require(ok, f"{key!r} must be a positive, finite number below 1e9", v)
        return float(v)
