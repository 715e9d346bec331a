"""The model contract: valid documents parse, each kind of invalid one is refused
with a ModelContractError that names what was expected and what was found."""
from __future__ import annotations

import copy
import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edgefuse.runtime.core.contract import UNCALIBRATED, ModelContract, RouteCalibration
from edgefuse.runtime.core.errors import ModelContractError


def valid_doc() -> dict:
    return {
        "contract": 1, "name": "gv-fusion", "version": "1.0.0",
        "modalities": [
            {"name": "acoustic", "channels": 1, "rate_hz": 4934.0, "input": "acoustic"},
            {"name": "seismic", "channels": 1, "rate_hz": 800, "input": "seismic"},
            {"name": "imu", "channels": 6, "rate_hz": 100.0, "input": "imu_in"},
        ],
        "window_ns": 1_000_000_000, "hop_ns": 500_000_000,
        "labels": ["background", "vehicle"],
        "mask_input": "modality_mask", "output": "scores", "output_kind": "logits",
        "fallbacks": [{"modalities": ["seismic", "acoustic"], "file": "gv.as.onnx"},
                      {"modalities": ["imu"], "file": "gv.imu.onnx"}],
        "calibration": {"all": {"temperature": 1.5},
                        "subset:imu": {"temperature": 0.8, "threshold": 0.9, "coverage": 0.7,
                                       "target_risk": 0.02, "val_risk": 0.011,
                                       "risk_bound": 0.019, "n": 1200},
                        "masked:seismic": {"temperature": 2, "threshold": 0.0}},
        "description": "test",
    }


def test_valid_contract_parses_and_round_trips():
    c = ModelContract.from_dict(valid_doc(), "m.onnx")
    assert c.ident == "gv-fusion@1.0.0"
    assert c.modality_names == ("acoustic", "seismic", "imu")
    assert c.modality("imu").samples(c.window_ns) == 100
    assert c.modality("acoustic").samples(c.hop_ns) == 2467
    # Fallback subsets are put in contract order whatever order the file gives.
    assert c.fallbacks[0].modalities == ("acoustic", "seismic")
    assert c.fallbacks[0].tag == "subset:acoustic+seismic"
    again = ModelContract.from_json(c.to_json(), "again")
    assert again == c


def test_alignment_is_what_cuts_the_windows_and_nothing_else():
    """The daemon refuses a reload, and `edgefuse calibrate` a config, on other alignment."""
    c = ModelContract.from_dict(valid_doc())
    other = valid_doc()
    other.update(name="renamed", labels=["a", "b", "c"], calibration={})
    assert ModelContract.from_dict(other).alignment == c.alignment
    for path, value in ((["window_ns"], 2_000_000_000), (["modalities", 2, "rate_hz"], 50.0),
                        (["modalities", 2, "channels"], 3)):
        assert ModelContract.from_dict(_mutated(path, value)).alignment != c.alignment, path


def test_output_kind_defaults_to_logits_and_fallbacks_to_none():
    doc = valid_doc()
    del doc["output_kind"], doc["fallbacks"], doc["calibration"]
    c = ModelContract.from_dict(doc)
    assert c.output_kind == "logits" and c.fallbacks == ()


def test_calibration_per_route_round_trips_and_old_models_are_uncalibrated():
    c = ModelContract.from_dict(valid_doc())
    assert [route for route, _ in c.calibration] == ["all", "masked:seismic", "subset:imu"]
    imu = c.route_calibration("subset:imu")
    assert (imu.temperature, imu.threshold, imu.coverage, imu.n) == (0.8, 0.9, 0.7, 1200)
    # the most specific key first, then the generic one, else uncalibrated
    assert c.route_calibration("masked:seismic", "masked").temperature == 2.0
    assert c.route_calibration("masked:acoustic", "masked") is UNCALIBRATED
    assert UNCALIBRATED == RouteCalibration(1.0, None)
    again = ModelContract.from_json(c.to_json())
    assert again == c
    assert json.loads(c.to_json())["calibration"]["all"] == {"temperature": 1.5}

    old = valid_doc()
    del old["calibration"]
    plain = ModelContract.from_dict(old)
    assert plain.calibration == () and plain.route_calibration("all") is UNCALIBRATED
    assert "calibration" not in json.loads(plain.to_json())  # old files stay as they were
    assert ModelContract.from_dict({**old, "calibration": None}) == plain


def _mutated(path: list, value) -> dict:
    doc = copy.deepcopy(valid_doc())
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


_DELETE = object()

INVALID = [
    # (id, path into the document, new value, words the message must contain)
    ("wrong-version", ["contract"], 2, ["'contract' must be 1", "2"]),
    ("no-version-field", ["contract"], _DELETE, ["'contract' must be 1", "None"]),
    ("empty-name", ["name"], "", ["'name' must be a non-empty string"]),
    ("name-not-string", ["name"], 7, ["'name'", "7"]),
    ("no-modalities", ["modalities"], [], ["'modalities' must be a non-empty list"]),
    ("modality-not-object", ["modalities", 0], "acoustic", ["modalities[0] must be an object"]),
    ("zero-channels", ["modalities", 0, "channels"], 0, ["'channels' must be a positive integer"]),
    ("float-channels", ["modalities", 0, "channels"], 1.5, ["'channels'", "1.5"]),
    ("bool-channels", ["modalities", 0, "channels"], True, ["'channels'", "True"]),
    ("negative-rate", ["modalities", 1, "rate_hz"], -800.0, ["'rate_hz' must be a positive"]),
    ("rate-string", ["modalities", 1, "rate_hz"], "800", ["'rate_hz'", "'800'"]),
    # 2467 Hz x 0.5 s = 1233.5 samples: windows could not share one sample grid.
    ("odd-rate-vs-hop", ["modalities", 0, "rate_hz"], 2467.0,
     ["hop_ns x rate_hz", "whole number", "1233.5"]),
    ("fractional-window", ["modalities", 0, "rate_hz"], 4934.5, ["window_ns x rate_hz", "4934.5"]),
    ("hop-longer-than-window", ["hop_ns"], 2_000_000_000, ["'hop_ns' must not exceed"]),
    ("window-float", ["window_ns"], 1e9, ["'window_ns' must be a positive integer"]),
    ("duplicate-modality", ["modalities", 1, "name"], "acoustic",
     ["modality names must be unique"]),
    ("one-label", ["labels"], ["vehicle"], ["'labels' must be a list of >= 2"]),
    ("duplicate-labels", ["labels"], ["a", "a"], ["distinct"]),
    ("empty-label", ["labels"], ["a", ""], ["non-empty"]),
    ("labels-not-list", ["labels"], "a,b", ["'labels'", "'a,b'"]),
    ("mask-missing", ["mask_input"], _DELETE, ["'mask_input' must be a non-empty string"]),
    ("output-missing", ["output"], _DELETE, ["'output' must be a non-empty string"]),
    ("input-names-clash", ["mask_input"], "seismic", ["input names must be unique"]),
    ("bad-output-kind", ["output_kind"], "softmax", ["'output_kind' must be one of", "softmax"]),
    ("fallback-unknown-modality", ["fallbacks", 1, "modalities"], ["radar"],
     ["proper subset", "radar"]),
    ("fallback-all-modalities", ["fallbacks", 1, "modalities"], ["acoustic", "seismic", "imu"],
     ["proper subset"]),
    ("fallback-empty", ["fallbacks", 1, "modalities"], [], ["proper subset"]),
    ("fallback-repeats-modality", ["fallbacks", 1, "modalities"], ["imu", "imu"],
     ["proper subset"]),
    ("fallback-not-object", ["fallbacks", 1], "gv.imu.onnx", ["fallbacks[1] must be an object"]),
    ("fallback-no-file", ["fallbacks", 1, "file"], _DELETE, ["'file' must be a non-empty string"]),
    ("fallback-same-subset-twice", ["fallbacks", 1, "modalities"], ["seismic", "acoustic"],
     ["each fallback subset may appear once"]),
    ("calibration-not-object", ["calibration"], [1.5], ["'calibration' must be an object"]),
    ("temperature-zero", ["calibration", "all", "temperature"], 0,
     ["calibration['all'].temperature must be a finite number in (0, 1000]", "0"]),
    ("temperature-negative", ["calibration", "all", "temperature"], -1.5,
     ["calibration['all'].temperature", "-1.5"]),
    ("temperature-infinite", ["calibration", "all", "temperature"], float("inf"),
     ["calibration['all'].temperature", "inf"]),
    ("temperature-nan", ["calibration", "all", "temperature"], float("nan"),
     ["calibration['all'].temperature", "nan"]),
    ("temperature-string", ["calibration", "all", "temperature"], "1.5",
     ["calibration['all'].temperature", "'1.5'"]),
    ("temperature-missing", ["calibration", "subset:imu", "temperature"], _DELETE,
     ["calibration['subset:imu']: 'temperature' is required"]),
    ("threshold-above-one", ["calibration", "subset:imu", "threshold"], 1.5,
     ["calibration['subset:imu'].threshold must be a number in [0, 1]", "1.5"]),
    ("threshold-negative", ["calibration", "subset:imu", "threshold"], -0.1,
     ["calibration['subset:imu'].threshold", "-0.1"]),
    ("threshold-bool", ["calibration", "subset:imu", "threshold"], True,
     ["calibration['subset:imu'].threshold", "True"]),
    ("coverage-above-one", ["calibration", "subset:imu", "coverage"], 2,
     ["calibration['subset:imu'].coverage"]),
    ("n-negative", ["calibration", "subset:imu", "n"], -1, ["calibration['subset:imu'].n"]),
    ("n-float", ["calibration", "subset:imu", "n"], 1.5, ["calibration['subset:imu'].n"]),
    ("entry-typo", ["calibration", "subset:imu", "treshold"], 0.5,
     ["calibration['subset:imu']: allowed keys are", "treshold"]),
    ("entry-not-object", ["calibration", "all"], 1.5, ["calibration['all'] must be an object"]),
    ("route-unknown-fallback", ["calibration", "subset:seismic"], {"temperature": 1.0},
     ["calibration['subset:seismic']: routes are", "subset:imu"]),
    ("route-unknown-name", ["calibration", "none"], {"temperature": 1.0},
     ["calibration['none']: routes are"]),
    ("masked-route-out-of-order", ["calibration", "masked:seismic+acoustic"],
     {"temperature": 1.0}, ["a masked route names the present modalities", "in that order"]),
    ("masked-route-every-modality", ["calibration", "masked:acoustic+seismic+imu"],
     {"temperature": 1.0}, ["proper subset"]),
    ("masked-route-unknown-modality", ["calibration", "masked:radar"], {"temperature": 1.0},
     ["calibration['masked:radar']"]),
]


@pytest.mark.parametrize("path,value,words", [i[1:] for i in INVALID], ids=[i[0] for i in INVALID])
def test_invalid_contract_is_refused_with_a_helpful_message(path, value, words):
    with pytest.raises(ModelContractError) as err:
        ModelContract.from_dict(_mutated(path, value), "bad.onnx")
    msg = str(err.value)
    assert msg.startswith("bad.onnx: ")
    for word in words:
        assert word in msg, (word, msg)
    assert "found" in msg and "re-export the model" in msg  # expected / found / what next


def test_not_json_and_not_an_object_are_refused():
    with pytest.raises(ModelContractError, match="not valid JSON.*re-export"):
        ModelContract.from_json("{'contract': 1", "x.onnx")
    with pytest.raises(ModelContractError, match="must be a JSON object"):
        ModelContract.from_json("[1, 2]", "x.onnx")


# Values that once escaped as Python errors (OverflowError, TypeError); now refused cleanly.
KNOWN_CRASHERS = [
    ("infinite-rate", ["modalities", 0, "rate_hz"], float("inf")),   # round(inf): OverflowError
    ("huge-window", ["window_ns"], 10 ** 400),                       # int -> float OverflowError
    ("fallbacks-an-int", ["fallbacks"], 5),                          # enumerate(5): TypeError
    ("fallbacks-true", ["fallbacks"], True),                         # enumerate(True): TypeError
    ("temperature-huge-int", ["calibration", "all", "temperature"], 10 ** 400),  # float(): overflow
]


@pytest.mark.parametrize("path,value", [i[1:] for i in KNOWN_CRASHERS],
                         ids=[i[0] for i in KNOWN_CRASHERS])
def test_adversarial_values_give_a_contract_error(path, value):
    with pytest.raises(ModelContractError):
        ModelContract.from_dict(_mutated(path, value))


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**12) | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(sorted(valid_doc())), value=_json_values)
def test_any_value_in_any_field_parses_or_is_refused_cleanly(key, value):
    doc = valid_doc()
    doc[key] = value
    try:
        c = ModelContract.from_json(json.dumps(doc), "fuzz")
    except ModelContractError as exc:
        assert "fuzz: " in str(exc)
    else:
        assert isinstance(c, ModelContract)


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, 2), key=st.sampled_from(["name", "channels", "rate_hz", "input"]),
       value=_json_values)
def test_any_value_in_a_modality_parses_or_is_refused_cleanly(index, key, value):
    # Known crasher (see KNOWN_CRASHERS): an infinite rate.
    assume(not (key == "rate_hz" and isinstance(value, float) and abs(value) == float("inf")))
    doc = valid_doc()
    doc["modalities"][index][key] = value
    try:
        ModelContract.from_json(json.dumps(doc), "fuzz")
    except ModelContractError as exc:
        assert "fuzz: " in str(exc)


@settings(max_examples=200, deadline=None)
@given(route=st.sampled_from(["all", "subset:imu", "masked:seismic", "masked", "other"]),
       key=st.sampled_from(["temperature", "threshold", "coverage", "n", "x"]),
       value=_json_values)
def test_any_value_in_a_calibration_entry_parses_or_is_refused_cleanly(route, key, value):
    doc = valid_doc()
    doc["calibration"].setdefault(route, {"temperature": 1.0})[key] = value
    try:
        c = ModelContract.from_json(json.dumps(doc), "fuzz")
    except ModelContractError as exc:
        assert "fuzz: " in str(exc) and route in str(exc)  # the message names the route
    else:
        cal = c.route_calibration(route)
        assert 0 < cal.temperature <= 1e3
        assert cal.threshold is None or 0 <= cal.threshold <= 1
