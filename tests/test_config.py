"""The daemon's TOML configuration: defaults, the shipped example, refusals that name the key."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgefuse.runtime.service.config import Config, from_dict, load_config
from edgefuse.runtime.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "edgefuse.toml"


def test_defaults_need_no_file(monkeypatch, tmp_path):
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    c = load_config(None, {"mqtt": {"host": "10.0.0.5", "port": 1884}})
    assert c.source.mqtt is not None and c.source.mqtt.mqtt.host == "10.0.0.5"
    assert c.source.mqtt.mqtt.port == 1884 and c.decision_mqtt().port == 1884
    assert c.sink.mqtt.enabled and c.sink.mqtt.topic == "edgefuse/{node}/decisions"
    assert c.source.serial == () and not c.metrics.enabled
    # broker down at start: decide from the sources that are there (issue 8)
    assert c.daemon.wait_for_sources == "any" and c.daemon.start_grace_s == 5.0
    assert c.daemon.stall_timeout_s == 10.0
    assert c.outbox_path() == tmp_path / "edgefuse" / "outbox.sqlite"
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/edgefuse")
    assert c.outbox_path() == Path("/var/lib/edgefuse/outbox.sqlite")


def test_the_shipped_example_loads():
    c = load_config(EXAMPLE)
    assert c.mqtt.port == 8883 and c.mqtt.password_secret == "credential:mqtt-password"
    assert c.source.mqtt.mqtt == c.mqtt  # the source connects with [mqtt]
    assert c.source.serial[0].protocol == "binary" and c.source.serial[0].baud == 921600
    assert c.pipeline.aligner.max_wait_ns == 2_000_000_000
    assert c.metrics.enabled and c.metrics.host == "127.0.0.1"
    assert c.outbox_path() == Path("/var/lib/edgefuse/outbox.sqlite")
    assert c.daemon.wait_for_sources == "any" and c.daemon.stall_timeout_s == 10.0


def test_command_line_overrides_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[mqtt]\nhost = 'a'\nport = 1\n[sink.jsonl]\npath = 'x.jsonl'\n")
    c = load_config(path, {"mqtt": {"port": 2}})
    assert (c.mqtt.host, c.mqtt.port, c.sink.jsonl.path) == ("a", 2, "x.jsonl")


def test_sections_of_their_own():
    c = from_dict({"mqtt": {"host": "main"},
                   "source": {"mqtt": {"enabled": False},
                              "serial": [{"device": "/dev/ttyACM0"},
                                         {"device": "/dev/ttyACM1", "protocol": "json"}]},
                   "sink": {"mqtt": {"mqtt": {"host": "cloud", "port": 8883}}}})
    assert c.source.mqtt is None
    assert [s.device for s in c.source.serial] == ["/dev/ttyACM0", "/dev/ttyACM1"]
    assert c.decision_mqtt().host == "cloud" and c.mqtt.host == "main"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.mqtt = None  # type: ignore[misc]


@pytest.mark.parametrize("doc,expect", [
    ({"modle": {}}, "top level: unknown key(s) ['modle']; allowed: ['model', 'mqtt'"),
    ({"model": {"file": "m.onnx"}}, "[model]: unknown key(s) ['file']"),
    ({"pipeline": {"aligner": {"max_wait": 1}}},
     "[pipeline.aligner]: unknown key(s) ['max_wait']"),
    ({"source": {"serial": [{"device": "/dev/x", "speed": 9600}]}},
     "[source.serial#1]: unknown key(s) ['speed']"),
    ({"sink": {"mqtt": {"mqtt": {"hots": "x"}}}}, "[sink.mqtt.mqtt]: unknown key(s) ['hots']"),
    ({"source": {"mqtt": {"topic": "x"}}}, "[source.mqtt]: unknown key(s) ['topic']"),
])
def test_unknown_keys_are_refused_by_name(doc, expect):
    with pytest.raises(ConfigError) as err:
        from_dict(doc, "edgefuse.toml")
    assert str(err.value).startswith("edgefuse.toml: ") and expect in str(err.value)


@pytest.mark.parametrize("doc,expect", [
    ({"sink": {"mqtt": {"synchronous": "sometimes"}}},
     "[sink.mqtt] synchronous = 'sometimes' is not allowed; allowed: ['full', 'normal']"),
    ({"sink": {"mqtt": {"max_inflight": 0}}}, "max_inflight = 0 is out of range; allowed: 1..1000"),
    ({"sink": {"mqtt": {"topic": "edgefuse/+/decisions"}}}, "must contain {node}"),
    ({"model": {"providers": ["gpu"]}}, "allowed: a non-empty list of ['cpu', 'cuda', 'tensorrt']"),
    ({"model": {"threads": 0}}, "[model] threads = 0 is out of range; allowed: 1..256"),
    ({"metrics": {"port": 70000}}, "[metrics] port = 70000 is out of range"),
    ({"daemon": {"read_timeout_s": 5.0}}, "[daemon] read_timeout_s = 5.0 is out of range"),
    ({"daemon": {"wait_for_sources": "some"}},
     "[daemon] wait_for_sources = 'some' is not allowed; allowed: ['any', 'all']"),
    ({"daemon": {"stall_timeout_s": 0.0}}, "[daemon] stall_timeout_s = 0.0 is out of range"),
    ({"daemon": {"start_grace_s": -1.0}}, "[daemon] start_grace_s = -1.0 is out of range"),
    ({"pipeline": {"aligner": {"min_coverage": 1.5}}}, "min_coverage = 1.5 is out of range"),
    ({"pipeline": {"max_wait_s": 60.0}}, "max_wait_s = 60.0 is out of range; allowed: 0..10 s"),
    ({"mqtt": {"protocol": "4"}}, "mqtt protocol must be one of ['3.1.1', '5'], found '4'"),
    ({"source": {"mqtt": {"qos": 2}}}, "[source.mqtt] mqtt source qos must be 0 or 1"),
    ({"source": {"serial": [{"device": "/dev/x", "protocol": "modbus"}]}},
     "serial protocol must be one of ('json', 'csv', 'binary'), found 'modbus'"),
    ({"source": {"serial": [{"protocol": "json"}]}}, "[source.serial#1]"),  # device missing
    ({"source": {"serial": {"device": "/dev/x"}}}, "must be an array of tables ([[source.serial]])"),
])
def test_bad_values_name_the_key_and_the_allowed_values(doc, expect):
    with pytest.raises(ConfigError) as err:
        from_dict(doc)
    assert expect in str(err.value)


@pytest.mark.parametrize("doc,expect", [
    ({"mqtt": {"port": "1883"}}, "[mqtt] port = '1883' has the wrong type; expected int"),
    ({"model": {"threads": True}}, "[model] threads = True has the wrong type"),
    ({"model": {"require_provider": 1}}, "require_provider = 1 has the wrong type; expected bool"),
    ({"model": {"providers": "cpu"}}, "providers = 'cpu' has the wrong type"),
    ({"sink": {"mqtt": 3}}, "[sink] mqtt = 3 has the wrong type; expected a table"),
    ({"source": {"mqtt": {"enabled": "no"}}}, "enabled = 'no' has the wrong type"),
])
def test_wrong_types_are_refused(doc, expect):
    with pytest.raises(ConfigError) as err:
        from_dict(doc)
    assert expect in str(err.value)


def test_floats_accept_integers_and_every_default_is_valid():
    c = from_dict({"daemon": {"drain_timeout_s": 5}, "pipeline": {"max_wait_s": 0}})
    assert c.daemon.drain_timeout_s == 5 and c.pipeline.max_wait_s == 0
    assert Config() == from_dict({"source": {"mqtt": {}}})


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt\nhost = 1\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)
