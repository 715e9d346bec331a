"""Prometheus metrics of the daemon, in a registry of its own (not the global one).

Two kinds:

- event metrics the main loop updates as decisions go out: the decision
  latency histogram (the closing chunk's arrival -> decision handed to the
  sinks), decisions per fallback, missing modalities per reason;
- state metrics read from a snapshot of the counters the sources, the
  aligner, the streams, the fuser and the sinks already keep. The main loop
  takes that snapshot (``DaemonMetrics.update``) about once a second, so a
  scrape never touches objects the loop is mutating; a scrape sees values at
  most that old.

The snapshot is exported generically, so a counter added to any ``stats()``
appears without code here:

    edgefuse_stream_<key>_total{node,modality}   aligner per-stream counters
    edgefuse_source_<key>_total{source}          each source's stats()
    edgefuse_aligner_<key>_total                 the aligner's own counters
    edgefuse_fusion_<key>_total{route}           fuser counters (decisions, batches)
    edgefuse_pipeline_<key>_total                pipeline timing (``*_s`` -> ``*_seconds``)
    edgefuse_sink_<key>_total{sink}              each sink's stats()

A value is a counter unless it is a bool, its key is in ``GAUGES`` (a level,
not a count: add new levels there) or ends in ``_ppm`` or ``_hz`` (rates and
drifts are levels); a dict of numbers becomes one family with
an extra label (``reason`` for ``malformed``, ``route`` for fusion, else
``kind``); strings and None are not exported. A generic name that would clash
with a metric defined here is skipped. The names metrics.py used before the
generic export (``edgefuse_stream_late_chunks``, ``edgefuse_aligner_events``,
``edgefuse_outbox_*`` ...) are kept.

``edgefuse_partition_info{partition,partitions}`` is 1 for this daemon's
partition K of N (0 of 1 for a daemon that takes every node); messages of a
node that belongs to another partition are counted in
``edgefuse_source_malformed_total{reason="wrong_partition"}``.

Per stream, from the daemon's own bookkeeping (not the aligner's stats):

    edgefuse_stream_last_seen_age_seconds{node,modality}    seconds since the
        stream's last chunk arrived (computed at scrape time, so it grows during
        an outage between two snapshots)
    edgefuse_stream_missing_windows_total{node,modality,reason}    decided windows
        of the node in which the modality was missing, by reason (gap,
        no_stream, clock_step, ...)

Label cardinality is bounded: stream series by ``aligner.max_nodes`` times the
model's modalities (evicted nodes drop out of the snapshot), source and sink
series by the config, reason/kind labels by the fixed sets the code counts.
The two daemon-side stream families keep only the streams (nodes) that are in
the aligner's snapshot.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edgefuse.runtime.core.decision import Decision
from edgefuse.runtime.core.errors import ConfigError

log = logging.getLogger(__name__)

# 1 ms .. 10 s: the targets are p99 <= 20 ms (1 node) and <= 100 ms (200 nodes)
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                   0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)

# Stats keys that are levels, not counts (exported as gauges under their own name).
GAUGES = frozenset({"rate_hz", "drift_ppm", "queued", "depth", "inflight", "nodes", "streams",
                    "pending", "pending_chunks", "buffered_bytes",
                    # the outbox's levels, also as the decision sink reports them
                    "acks_pending", "disk_full", "outbox_depth", "outbox_acks_pending",
                    "outbox_disk_full",
                    # a stream's clock model (issue 11): its offset against the node's
                    # other streams (clock_skew is a bool: a gauge by itself)
                    "clock_offset_ms"})
# Key endings that are always levels: rates (Hz) and drifts (ppm).
GAUGE_SUFFIXES = ("_hz", "_ppm")


def is_level(key: str) -> bool:
    """True when a stats key is a level (a gauge), not a count."""
    return key in GAUGES or key.endswith(GAUGE_SUFFIXES)
# Derived sums that would duplicate a family (``malformed_total`` sums ``malformed``).
SKIPPED = frozenset({"malformed_total"})

# aligner per-stream counter -> (metric suffix, help); other keys keep their own name
STREAM_COUNTERS = {
    "chunks": ("chunks", "chunks pushed into the aligner"),
    "samples": ("samples", "samples pushed into the aligner"),
    "gaps": ("gaps", "gaps in the stream (missing time between chunks)"),
    "late": ("late_chunks", "chunks that arrived after their time had passed (dropped)"),
    "duplicates": ("duplicate_chunks", "chunks repeating a seen sequence number (dropped)"),
    "out_of_order": ("out_of_order_chunks", "chunks that arrived before an earlier one"),
    "reorder_overflow": ("reorder_overflow_chunks", "chunks forced out of the reorder buffer"),
    "unknown_rate_chunks": ("unknown_rate_chunks", "chunks dropped: no rate known yet"),
    "overlap_samples": ("overlap_samples", "leading samples dropped: already covered"),
    "nonfinite_samples": ("nonfinite_samples", "NaN or infinite samples"),
    "rate_hz": ("rate_hz", "sample rate in use (given or estimated)"),
}
# per-stream counters of chunks the aligner dropped (their sum: edgefuse_stream_drops)
DROP_COUNTERS = ("late", "duplicates", "reorder_overflow", "unknown_rate_chunks",
                 "bad_rate_chunks", "bad_time_chunks", "step_overlap_chunks")
# source counter -> help; these are exported for every source (0 when it lacks them)
SOURCE_COUNTERS = {
    "received": "messages received by the transport",
    "decoded": "messages decoded into chunks",
    "oversized": "messages refused for their size",
    "ignored": "messages ignored (our own decision topic)",
    "dropped_queue_full": "chunks dropped because the daemon fell behind (queue full)",
    "connects": "connections of the transport (broker sessions, port opens)",
    "reconnects": "reconnections of the transport",
    "subscribed": "MQTT subscriptions acknowledged (one per broker session)",
    "disconnects": "losses of the transport",
    "receiver_starts": "starts of the MQTT receiver process (1 + restarts after it died)",
    "clock_offset": "chunks kept whose t0 was further than [daemon] max_clock_offset_s from "
                    "their receipt time (refused ones: malformed{reason=\"bad_time\"})",
}
SOURCE_DOCS = {
    "malformed": "messages skipped as malformed, by reason",
    "connected": "1 while the transport is up",
    "queued": "chunks waiting to be read",
    "bytes": "bytes read from the serial port",
    "skipped_bytes": "bytes skipped while looking for the next frame or line",
    "open_failures": "failed attempts to open the serial port",
}

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _metric_key(key: str) -> str:
    key = _NAME_BAD.sub("_", str(key))
    return key[:-2] + "_seconds" if key.endswith("_s") else key


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Families:
    """Metric families built for one scrape; a name is taken once (first wins)."""

    def __init__(self, reserved: Iterable[str]):
        self._taken = set(reserved)
        # name -> (family, gauge?, label names)
        self._fams: dict[str, tuple[CounterMetricFamily | GaugeMetricFamily, bool, tuple]] = {}

    def get(self, name: str, doc: str, labels: list[str], gauge: bool):
        entry = self._fams.get(name)
        if entry is None:
            if name in self._taken:
                return None  # clashes with a metric of its own: see the module docstring
            self._taken.add(name)
            cls = GaugeMetricFamily if gauge else CounterMetricFamily
            entry = (cls(name, doc, labels=labels), gauge, tuple(labels))
            self._fams[name] = entry
        elif entry[1:] != (gauge, tuple(labels)):
            return None  # the same key changed kind between two objects: keep the first
        return entry[0]

    def add(self, name: str, doc: str, labels: list[str], values: list[str], value: float,
            gauge: bool) -> None:
        fam = self.get(name, doc, labels, gauge)
        if fam is not None:
            fam.add_metric(values, float(value))

    def export(self, prefix: str, what: str, labels: list[str], values: list[str],
               stats: Mapping, *, names: Mapping[str, str] | None = None,
               docs: Mapping[str, str] | None = None, dict_label: str = "kind") -> None:
        """Every numeric stat of one object (see the module docstring)."""
        for key, value in stats.items():
            if key in SKIPPED or value is None or isinstance(value, str):
                continue
            name = f"{prefix}_{(names or {}).get(key, _metric_key(key))}"
            doc = (docs or {}).get(key) or f"{what} stat {key!r} (see its stats())"
            if isinstance(value, Mapping):
                sub_label = "reason" if key == "malformed" else dict_label
                for sub, n in value.items():
                    if _is_number(n):
                        self.add(name, doc, [*labels, sub_label], [*values, str(sub)], n,
                                 gauge=False)
                continue
            if isinstance(value, bool):
                self.add(name, doc, labels, values, 1.0 if value else 0.0, gauge=True)
            elif _is_number(value):
                self.add(name, doc, labels, values, value, gauge=is_level(key))

    def __iter__(self) -> Iterator:
        return (fam for fam, _, _ in self._fams.values())


class _SnapshotCollector(Collector):
    """Builds metric families from the latest snapshot at scrape time."""

    def __init__(self, reserved: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._snap: dict = {}
        self._reserved = frozenset(reserved)

    def set(self, snap: dict) -> None:
        with self._lock:
            self._snap = snap

    def collect(self):
        with self._lock:
            snap = self._snap
        fams = _Families(self._reserved)
        self._streams(fams, snap.get("streams", {}))
        self._stream_health(fams, snap.get("last_seen", {}), snap.get("stream_missing", {}))
        self._sources(fams, snap.get("sources", {}))

        aligner = snap.get("aligner", {})
        events = fams.get("edgefuse_aligner_events", "aligner events by kind (also exported "
                          "one family per kind, edgefuse_aligner_<kind>_total)", ["kind"],
                          gauge=False)
        for kind, n in aligner.items():
            if _is_number(n) and not is_level(kind):
                events.add_metric([kind], float(n))
        fams.export("edgefuse_aligner", "aligner", [], [], aligner)
        fams.export("edgefuse_fusion", "fuser", [], [], snap.get("fusion", {}),
                    dict_label="route")
        fams.export("edgefuse_pipeline", "pipeline", [], [], snap.get("timing", {}))

        sink = snap.get("sinks", {}).get("mqtt")  # the outbox families predate edgefuse_sink_*
        if sink is not None:
            fams.add("edgefuse_outbox_depth", "decisions waiting in the outbox for the "
                     "broker's acknowledgement", [], [], sink.get("outbox_depth", 0), gauge=True)
            for kind in ("outbox_put", "outbox_acked", "outbox_dropped_full", "published",
                         "rejected", "disconnects"):
                fams.add("edgefuse_outbox_events", "outbox and publisher events", ["kind"],
                         [kind], sink.get(kind, 0), gauge=False)
            fams.add("edgefuse_decision_publisher_connected", "1 while the decision publisher "
                     "has the broker", [], [], 1.0 if sink.get("connected") else 0.0, gauge=True)
        for name, stats in snap.get("sinks", {}).items():
            fams.export("edgefuse_sink", "sink", ["sink"], [name], stats)
        fams.add("edgefuse_pending_windows", "windows waiting for a batch", [], [],
                 snap.get("pending_windows", 0), gauge=True)
        yield from fams

    @staticmethod
    def _streams(fams: _Families, streams: Mapping[str, dict]) -> None:
        # the fixed families first, so that they exist (empty) before any stream does
        for suffix, doc in STREAM_COUNTERS.values():
            fams.get(f"edgefuse_stream_{suffix}", doc, ["node", "modality"],
                     gauge=suffix in GAUGES)
        drops = fams.get("edgefuse_stream_drops", "chunks of the stream dropped by the aligner "
                         "(late, duplicate, reorder overflow, unknown or refused rate, "
                         "refused time)", ["node", "modality"], gauge=False)
        names = {key: suffix for key, (suffix, _) in STREAM_COUNTERS.items()}
        docs = {key: doc for key, (_, doc) in STREAM_COUNTERS.items()}
        for name, c in streams.items():
            node, modality = name.rsplit("/", 1)
            fams.export("edgefuse_stream", "stream", ["node", "modality"], [node, modality], c,
                        names=names, docs=docs)
            drops.add_metric([node, modality], float(sum(
                c.get(key, 0) for key in DROP_COUNTERS)))

    @staticmethod
    def _stream_health(fams: _Families, last_seen: Mapping[str, float],
                       missing: Mapping[str, Mapping[str, int]]) -> None:
        age = fams.get("edgefuse_stream_last_seen_age_seconds", "seconds since the stream's "
                       "last chunk arrived at the daemon", ["node", "modality"], gauge=True)
        now = time.monotonic()
        for name, seen in last_seen.items():
            node, modality = name.rsplit("/", 1)
            age.add_metric([node, modality], max(0.0, now - seen))
        windows = fams.get("edgefuse_stream_missing_windows", "decided windows in which the "
                           "stream's modality was missing, by reason",
                           ["node", "modality", "reason"], gauge=False)
        for name, reasons in missing.items():
            node, modality = name.rsplit("/", 1)
            for reason, n in reasons.items():
                windows.add_metric([node, modality, reason], float(n))

    @staticmethod
    def _sources(fams: _Families, sources: Mapping[str, dict]) -> None:
        fams.get("edgefuse_source_malformed", SOURCE_DOCS["malformed"], ["source", "reason"],
                 gauge=False)
        docs = {**SOURCE_COUNTERS, **SOURCE_DOCS}
        for name, s in sources.items():
            # the long-standing families exist for every source, 0 where it lacks them
            defaults = {key: 0 for key in SOURCE_COUNTERS}
            defaults.update(connected=False, queued=0)
            fams.export("edgefuse_source", "source", ["source"], [name], {**defaults, **s},
                        docs=docs)


class DaemonMetrics:
    """The daemon's metrics; ``serve(host, port)`` exposes them over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.latency = Histogram(
            "edgefuse_decision_latency_seconds", "arrival of the chunk that closed a window "
            "-> its decision handed to the sinks", buckets=LATENCY_BUCKETS, registry=r)
        self.decisions = Counter("edgefuse_decisions", "decisions made, by fallback route",
                                 ["fallback"], registry=r)
        self.windows = Counter("edgefuse_modality_windows", "decided windows that expected "
                               "each modality", ["modality"], registry=r)
        self.missing = Counter("edgefuse_modality_missing", "decided windows in which a "
                               "modality was missing, by reason", ["modality", "reason"],
                               registry=r)
        self.missing_rate = Gauge("edgefuse_modality_missing_rate", "share of decided windows "
                                  "in which the modality was missing (since start)",
                                  ["modality"], registry=r)
        self.sink_errors = Counter("edgefuse_sink_errors", "decision batches a sink failed "
                                   "to take", ["sink"], registry=r)
        self.reloads = Counter("edgefuse_model_reloads", "SIGHUP model reloads by result",
                               ["result"], registry=r)
        self.loops = Counter("edgefuse_loop_iterations", "main loop iterations", registry=r)
        self.stalls = Counter("edgefuse_loop_stalls", "times the main loop was stuck longer "
                              "than [daemon] stall_timeout_s", registry=r)
        self.loop_idle = Gauge("edgefuse_loop_idle_seconds", "seconds since the main loop last "
                               "completed an iteration", registry=r)
        self.healthy = Gauge("edgefuse_healthy", "1 while the main loop's health check "
                             "passes and the loop is not stuck", registry=r)
        self.ready = Gauge("edgefuse_ready", "1 once the model is loaded and the sources are "
                           "connected (0 again while the main loop is stuck)", registry=r)
        self.model_info = Gauge("edgefuse_model_info", "the model in use", ["model"],
                                registry=r)
        self.partition_info = Gauge(
            "edgefuse_partition_info", "this daemon's share of the nodes: partition K of N "
            "([source.mqtt] partition, --partition K/N; 0 of 1: every node)",
            ["partition", "partitions"], registry=r)
        self.set_partition(0, 1)
        # The generic snapshot export must not reuse a name defined above.
        reserved = set()
        for metric in (self.latency, self.decisions, self.windows, self.missing,
                       self.missing_rate, self.sink_errors, self.reloads, self.loops,
                       self.stalls, self.loop_idle, self.healthy, self.ready, self.model_info,
                       self.partition_info):
            reserved.update(m.name for m in metric.describe())
        self._snapshot = _SnapshotCollector(reserved)
        r.register(self._snapshot)
        self._missing_counts: dict[str, list[int]] = {}
        # "node/modality" -> reason -> decided windows missing it (pruned in update())
        self._stream_missing: dict[str, dict[str, int]] = {}
        self._server = None
        # healthy/ready combine the loop's own verdict with the stall monitor's (two threads)
        self._state_lock = threading.Lock()
        self._loop_ok = False
        self._started = False
        self._stalled = False

    def observe(self, decisions: Iterable[Decision], modalities: Iterable[str]) -> None:
        """Count decisions, their fallback route and which modalities were missing."""
        modalities = tuple(modalities)
        for d in decisions:
            self.decisions.labels(d.fallback).inc()
            for m in modalities:
                self.windows.labels(m).inc()
                counts = self._missing_counts.setdefault(m, [0, 0])
                counts[1] += 1
                if m in d.missing:
                    counts[0] += 1
                    reason = d.missing_reason.get(m, "unknown")
                    self.missing.labels(m, reason).inc()
                    per = self._stream_missing.setdefault(f"{d.node}/{m}", {})
                    per[reason] = per.get(reason, 0) + 1
        for m, (missing, total) in self._missing_counts.items():
            self.missing_rate.labels(m).set(missing / total if total else 0.0)

    def set_state(self, *, loop_ok: bool | None = None, ready: bool | None = None,
                  stalled: bool | None = None) -> None:
        """healthy = the loop's last health check passed and the loop is not stuck;
        ready = start-up finished and the loop is not stuck."""
        with self._state_lock:
            if loop_ok is not None:
                self._loop_ok = loop_ok
            if ready is not None:
                self._started = ready
            if stalled is not None:
                self._stalled = stalled
                if stalled:
                    self.stalls.inc()
            self.healthy.set(1 if self._loop_ok and not self._stalled else 0)
            self.ready.set(1 if self._started and not self._stalled else 0)

    def set_model(self, ident: str) -> None:
        self.model_info.clear()
        self.model_info.labels(ident).set(1)

    def set_partition(self, index: int, count: int) -> None:
        self.partition_info.clear()
        self.partition_info.labels(str(index), str(count)).set(1)

    def update(self, snapshot: dict) -> None:
        """Take the main loop's snapshot (see the module docstring). ``last_seen``:
        "node/modality" -> time.monotonic() of its last arrival; both it and the
        missing-window counts keep only the nodes in ``streams`` (bounded)."""
        nodes = {name.rsplit("/", 1)[0] for name in snapshot.get("streams", {})}
        for name in [k for k in self._stream_missing if k.rsplit("/", 1)[0] not in nodes]:
            del self._stream_missing[name]
        snapshot = dict(snapshot)
        snapshot["stream_missing"] = {k: dict(v) for k, v in self._stream_missing.items()}
        self._snapshot.set(snapshot)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (a daemon thread); returns the bound port."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; another "
                "process may hold the port: choose a free one with [metrics] port (or "
                "--metrics HOST:PORT), or stop the other process") from exc
        self._server = server
        bound = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
