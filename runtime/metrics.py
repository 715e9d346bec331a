"""Prometheus metrics of the daemon, in a registry of its own (not the global one).

Two kinds:

- event metrics the main loop updates as decisions go out: the decision
  latency histogram (the closing chunk's arrival -> decision handed to the
  sinks), decisions per fallback, missing modalities per reason;
- state metrics read from a snapshot of the counters the sources, the
  aligner and the sinks already keep. The main loop takes that snapshot
  (``DaemonMetrics.update``) about once a second, so a scrape never touches
  objects the loop is mutating; a scrape sees values at most that old.

Metric names start with ``edgefuse_``; per-stream series carry ``node`` and
``modality`` labels, per-source series a ``source`` label.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edgefuse.runtime.decision import Decision

log = logging.getLogger(__name__)

# 1 ms .. 10 s: the targets are p99 <= 20 ms (1 node) and <= 100 ms (200 nodes)
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                   0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)

# aligner per-stream counter -> (metric suffix, help)
STREAM_COUNTERS = {
    "chunks": ("chunks", "chunks pushed into the aligner"),
    "samples": ("samples", "samples pushed into the aligner"),
    "gaps": ("gaps", "gaps in the stream (missing time between chunks)"),
    "late": ("late_chunks", "chunks that arrived after their time had passed (dropped)"),
    "duplicates": ("duplicate_chunks", "chunks repeating a seen sequence number (dropped)"),
    "out_of_order": ("out_of_order_chunks", "chunks that arrived before an earlier one"),
    "reorder_overflow": ("reorder_overflow_chunks", "chunks forced out of the reorder buffer"),
    "unknown_rate_chunks": ("unknown_rate_chunks", "chunks dropped: no rate known yet"),
}
# source counter -> help
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
}


class _SnapshotCollector(Collector):
    """Builds metric families from the latest snapshot at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snap: dict = {}

    def set(self, snap: dict) -> None:
        with self._lock:
            self._snap = snap

    def collect(self):
        with self._lock:
            snap = self._snap
        streams: Mapping[str, dict] = snap.get("streams", {})
        for key, (suffix, doc) in STREAM_COUNTERS.items():
            fam = CounterMetricFamily(f"edgefuse_stream_{suffix}", doc,
                                      labels=["node", "modality"])
            for name, c in streams.items():
                node, modality = name.rsplit("/", 1)
                fam.add_metric([node, modality], float(c.get(key, 0)))
            yield fam
        drops = CounterMetricFamily(
            "edgefuse_stream_drops", "chunks of the stream dropped by the aligner (late, "
            "duplicate, reorder overflow, unknown rate)", labels=["node", "modality"])
        for name, c in streams.items():
            node, modality = name.rsplit("/", 1)
            drops.add_metric([node, modality], float(
                c.get("late", 0) + c.get("duplicates", 0) + c.get("reorder_overflow", 0)
                + c.get("unknown_rate_chunks", 0)))
        yield drops
        rate = GaugeMetricFamily("edgefuse_stream_rate_hz", "sample rate in use (given or "
                                 "estimated)", labels=["node", "modality"])
        for name, c in streams.items():
            rate.add_metric(name.rsplit("/", 1), float(c.get("rate_hz", 0.0)))
        yield rate

        sources: Mapping[str, dict] = snap.get("sources", {})
        for key, doc in SOURCE_COUNTERS.items():
            fam = CounterMetricFamily(f"edgefuse_source_{key}", doc, labels=["source"])
            for name, s in sources.items():
                fam.add_metric([name], float(s.get(key, 0)))
            yield fam
        bad = CounterMetricFamily("edgefuse_source_malformed", "messages skipped as malformed, "
                                  "by reason", labels=["source", "reason"])
        connected = GaugeMetricFamily("edgefuse_source_connected", "1 while the transport is up",
                                      labels=["source"])
        queued = GaugeMetricFamily("edgefuse_source_queued", "chunks waiting to be read",
                                   labels=["source"])
        for name, s in sources.items():
            for reason, n in s.get("malformed", {}).items():
                bad.add_metric([name, reason], float(n))
            connected.add_metric([name], 1.0 if s.get("connected") else 0.0)
            queued.add_metric([name], float(s.get("queued", 0)))
        yield bad
        yield connected
        yield queued

        aligner = snap.get("aligner", {})
        fam = CounterMetricFamily("edgefuse_aligner_events", "aligner events by kind",
                                  labels=["kind"])
        for kind, n in aligner.items():
            fam.add_metric([kind], float(n))
        yield fam

        sink = snap.get("mqtt_sink")
        if sink is not None:
            yield GaugeMetricFamily("edgefuse_outbox_depth", "decisions waiting in the outbox "
                                    "for the broker's acknowledgement",
                                    value=float(sink.get("outbox_depth", 0)))
            fam = CounterMetricFamily("edgefuse_outbox_events", "outbox and publisher events",
                                      labels=["kind"])
            for kind in ("outbox_put", "outbox_acked", "outbox_dropped_full", "published",
                         "rejected", "disconnects"):
                fam.add_metric([kind], float(sink.get(kind, 0)))
            yield fam
            yield GaugeMetricFamily("edgefuse_decision_publisher_connected",
                                    "1 while the decision publisher has the broker",
                                    value=1.0 if sink.get("connected") else 0.0)
        yield GaugeMetricFamily("edgefuse_pending_windows", "windows waiting for a batch",
                                value=float(snap.get("pending_windows", 0)))


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
        self.healthy = Gauge("edgefuse_healthy", "1 while the main loop's health check "
                             "passes", registry=r)
        self.ready = Gauge("edgefuse_ready", "1 once the model is loaded and the sources are "
                           "connected", registry=r)
        self.model_info = Gauge("edgefuse_model_info", "the model in use", ["model"],
                                registry=r)
        self._snapshot = _SnapshotCollector()
        r.register(self._snapshot)
        self._missing_counts: dict[str, list[int]] = {}
        self._server = None

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
                    self.missing.labels(m, d.missing_reason.get(m, "unknown")).inc()
        for m, (missing, total) in self._missing_counts.items():
            self.missing_rate.labels(m).set(missing / total if total else 0.0)

    def set_model(self, ident: str) -> None:
        self.model_info.clear()
        self.model_info.labels(ident).set(1)

    def update(self, snapshot: dict) -> None:
        self._snapshot.set(snapshot)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (a daemon thread); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        bound = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
