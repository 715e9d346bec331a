"""deploy/grafana/edgefuse.json queries only metrics a running daemon exports.

Every PromQL expression of the dashboard (panel targets and the template
variables' ``label_values(...)`` queries) is parsed with a real PromQL parser
(promql-parser) after Grafana's own variables are given values; the metric
names are those of its vector selectors, never label names or functions. A
real daemon with a real broker is fed data (a silent modality, a malformed
payload, a model reload) until every family the dashboard shows has samples,
and its /metrics must hold every queried name.
"""
from __future__ import annotations

import copy
import json
import re
import signal
from pathlib import Path

import promql_parser
import pytest

from edgefuse.runtime.service.simulate import simulate
from tests.conftest import publish, wait_until
from tests.daemon_helpers import DaemonProcess, mqtt_args, mqtt_publisher, synthetic_chunks

pytestmark = pytest.mark.timeout(120)

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "edgefuse.json"
# Grafana's built-in interval variables, given any valid duration for parsing
GRAFANA_DURATIONS = ("$__rate_interval", "$__interval", "$__range")
LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*$")
# What issue 13 asks the dashboard to show, as the families that carry it.
REQUIRED = {
    "decisions by fallback": "edgefuse_decisions_total",
    "missing windows by modality and reason": "edgefuse_modality_missing_total",
    "per-stream last seen": "edgefuse_stream_last_seen_age_seconds",
    "per-stream drift": "edgefuse_stream_drift_ppm",
    "latency p50/p99": "edgefuse_decision_latency_seconds_bucket",
    "outbox depth": "edgefuse_outbox_depth",
    "drops": "edgefuse_stream_drops_total",
    "receiver restarts": "edgefuse_source_receiver_starts_total",
}


def _panels(items: list[dict]):
    for p in items:
        yield p
        yield from _panels(p.get("panels", []))  # a collapsed row holds its panels


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard."""
    out = []
    for p in _panels(dashboard["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} target {t.get('refId')}", t["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = LABEL_VALUES.match(query)
        assert m, f"variable {var['name']}: expected label_values(SELECTOR, label), " \
                  f"found {query!r}"
        out.append((f"variable {var['name']!r}", m["selector"]))
    return out


def _walk(node, names: set[str]) -> None:
    if isinstance(node, promql_parser.VectorSelector):
        if node.name:
            names.add(node.name)
        for matcher in node.matchers.matchers:  # {__name__="x"}
            if matcher.name == "__name__":
                names.add(matcher.value)
        return
    if isinstance(node, promql_parser.MatrixSelector):
        _walk(node.vector_selector, names)
    elif isinstance(node, promql_parser.Call):
        for arg in node.args:
            _walk(arg, names)
    elif isinstance(node, promql_parser.BinaryExpr):
        _walk(node.lhs, names)
        _walk(node.rhs, names)
    elif isinstance(node, promql_parser.AggregateExpr):
        _walk(node.expr, names)
        if node.param is not None:
            _walk(node.param, names)
    elif isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr,
                           promql_parser.SubqueryExpr)):
        _walk(node.expr, names)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (Grafana variables substituted)."""
    for var in GRAFANA_DURATIONS:
        expr = expr.replace(var, "5m")
    names: set[str] = set()
    _walk(promql_parser.parse(expr), names)
    return names


def unknown_metrics(dashboard: dict, exported: set[str]) -> list[str]:
    return [f"{where}: {name}" for where, expr in expressions(dashboard)
            for name in sorted(metric_names(expr)) if name not in exported]


def _load() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_metric_names_come_from_selectors_not_labels_or_functions():
    expr = ('histogram_quantile(0.99, sum by (le, node) (rate(edgefuse_a_bucket{node=~"$node",'
            'reason="gap"}[$__rate_interval]))) / on (node) group_left () '
            'max_over_time(count({__name__="edgefuse_b"})[$__range:$__interval]) - -up')
    assert metric_names(expr) == {"edgefuse_a_bucket", "edgefuse_b", "up"}
    assert metric_names("max by (source) (edgefuse_c_total) - 1") == {"edgefuse_c_total"}
    with pytest.raises(Exception):
        metric_names("rate(edgefuse_d_total[$not_a_grafana_duration])")


def test_a_panel_querying_an_unknown_metric_is_reported():
    dashboard = _load()
    every = {n for _, e in expressions(dashboard) for n in metric_names(e)}
    assert unknown_metrics(dashboard, every) == []
    broken = copy.deepcopy(dashboard)
    panel = next(p for p in broken["panels"] if p.get("targets"))
    panel["targets"].append({"refId": "Z", "expr": 'sum by (node) (rate('
                             'edgefuse_no_such_metric_total{node="a"}[5m]))'})
    assert unknown_metrics(broken, every) == [
        f"panel {panel['title']!r} target Z: edgefuse_no_such_metric_total"]


def test_the_dashboard_is_well_formed_and_shows_what_the_issue_asks():
    dashboard = _load()
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
            for t in p["targets"]:
                used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval", "__range",
                                                                   "__interval"}
                assert used <= variables, (p["title"], used)
    queried = {n for _, e in expressions(dashboard) for n in metric_names(e)}
    assert {what: name for what, name in REQUIRED.items() if name not in queried} == {}


def test_every_metric_the_dashboard_queries_is_exported_by_a_running_daemon(tmp_path, broker):
    dashboard = _load()
    daemon = DaemonProcess(tmp_path, mqtt_args(broker, tmp_path / "d.jsonl", tmp_path / "ob"))
    try:
        daemon.wait_ready()
        # 8 s of one node whose seismic sensor is silent from 3 s to 5 s (missing windows;
        # drift needs >= 4 s of a stream), one payload that is no chunk, one model reload
        chunks = synthetic_chunks("n1", 8.0, pause=("seismic", 3.0, 5.0))
        simulate(chunks, mqtt_publisher(broker), speed=20.0)
        publish(broker, [("edgefuse/n1/acoustic", b"not a chunk")])
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_metric("edgefuse_source_decoded_total", len(chunks))
        daemon.wait_metric("edgefuse_source_malformed_total", 1)
        daemon.wait_metric("edgefuse_model_reloads_total", 1, result="ok")
        daemon.wait_metric("edgefuse_stream_missing_windows_total", 1)
        # the state families come from the main loop's snapshot, taken about once a second
        queried = {n for _, e in expressions(dashboard) for n in metric_names(e)}
        exported: set[str] = set()

        def all_there() -> bool:
            exported.update(name for name, _ in daemon.metrics())
            return queried <= exported
        try:
            wait_until(all_there, 15, "every queried family", 0.2)
        except AssertionError:
            pass  # the assertion below names what is missing
        assert daemon.terminate() == 0, daemon.log()
    finally:
        daemon.close()
    assert unknown_metrics(dashboard, exported) == []
