"""``edgefuse run``: live sources -> the streaming core -> sinks, under systemd.

The daemon feeds the same ``Pipeline`` replay feeds, the same way: push
every chunk read, ``poll()`` so a partial batch waits at most max_wait_s,
``flush()`` at the end. Decisions therefore equal a replay of the recorded
input (``daemon.record``, which keeps them too, beside the chunks) for the
windows both emit.

One thread runs the main loop; the transports (the MQTT receiver process or
paho's thread, serial readers), the decision publisher and the metrics
endpoint have their own threads or process and only hand data over through
bounded queues and pipes. Signal handlers only set flags:

- SIGTERM / SIGINT: stop reading, decide what was read (flush), wait up to
  drain_timeout_s for the outbox to reach the broker, exit 0; rows left in
  the outbox are sent by the next start.
- SIGHUP: load the model file again in a background thread and swap it in
  between two batches; a model that fails to load, or whose windows or
  modalities differ (the buffered streams would not fit it), is refused and
  the old one keeps running.

Start-up: READY=1 once the model is loaded and the sources are connected.
With ``[daemon] wait_for_sources = "any"`` (the default) one connected
source is enough: after waiting up to ``start_grace_s`` for the others, the
daemon decides from the connected ones while the rest keep connecting in
the background (a broker that is down must not stop a serial node's
decisions; they queue in the outbox). ``"all"`` keeps the strict start:
every source within ``connect_timeout_s`` or exit 1. Either way a start
that cannot work (port in use, unwritable output) fails with one line.

A stuck iteration (a blocked disk write, a slow sink) stops the WATCHDOG=1
pings, since only the loop sends them, and a ``StallMonitor`` thread turns
``edgefuse_healthy``/``edgefuse_ready`` to 0 after ``stall_timeout_s``.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

from edgefuse.runtime.core import kernels
from edgefuse.runtime.service.config import Config
from edgefuse.runtime.core.decision import Decision
from edgefuse.runtime.core.errors import ConfigError, EdgefuseError, TransportError
from edgefuse.runtime.service.health import Health, Notifier, StallMonitor
from edgefuse.runtime.core.inference import OnnxModel
from edgefuse.runtime.core.info import bundled_model_path
from edgefuse.runtime.service.metrics import DaemonMetrics
from edgefuse.runtime.core.pipeline import Pipeline
from edgefuse.runtime.service.sinks import Sink, make_sinks

log = logging.getLogger(__name__)

SNAPSHOT_PERIOD_S = 1.0
PENDING_WARN_PERIOD_S = 60.0  # a source still not connected after start: warned this often


def model_path(config: Config) -> Path:
    if config.model.path:
        return Path(config.model.path).expanduser()
    return bundled_model_path()


def load_model(config: Config) -> OnnxModel:
    m = config.model
    return OnnxModel.load(model_path(config), providers=list(m.providers),
                          require_provider=m.require_provider, intra_op_threads=m.threads)


class Daemon:
    def __init__(self, config: Config, notifier: Notifier | None = None):
        self.config = config
        self.notifier = notifier or Notifier()
        self.metrics = DaemonMetrics()
        if config.partition is not None:  # --partition K/N: edgefuse_partition_info
            self.metrics.set_partition(config.partition.index, config.partition.count)
        self.metrics_port: int | None = None
        self.sources: list = []
        self.sinks: list[Sink] = []
        self.pipeline: Pipeline | None = None
        self.recorder = None
        self.health = Health(self.notifier)
        stall_s = config.daemon.stall_timeout_s
        if self.health.watchdog_s:  # systemd kills a silent loop after this anyway
            stall_s = min(stall_s, self.health.watchdog_s)
        self.monitor = StallMonitor(stall_s, self._on_stall)
        self.metrics.loop_idle.set_function(self.monitor.idle_s)
        # source name -> [source, since, next reminder]: not connected since the start
        self._pending: dict[str, list] = {}
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._reloaded: list = []            # [OnnxModel | Exception] from the reload thread
        self._reload_thread: threading.Thread | None = None
        # (node, modality) -> CLOCK_MONOTONIC ns of its last chunk's arrival; pruned to
        # the aligner's streams at every snapshot (edgefuse_stream_last_seen_age_seconds)
        self._last_seen: dict[tuple[str, str], int] = {}
        self._sink_failures = 0
        self._last_snapshot = 0.0
        self._trace = None

    def _on_stall(self, stalled: bool) -> None:
        """From the stall monitor's thread: gauges and systemd's status line only."""
        self.metrics.set_state(stalled=stalled)
        if stalled:
            self.notifier.notify(f"STATUS=main loop stuck in {self.monitor.where()}")
        elif self.pipeline is not None:
            self.notifier.notify(self._status())

    # --- control (signal handlers call these: flags only) ------------------
    def request_stop(self, *_args) -> None:
        self._stop.set()

    def request_reload(self, *_args) -> None:
        self._reload.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    # --- life cycle -----------------------------------------------------
    def run(self) -> int:
        """start(), loop until SIGTERM, drain; returns the exit status."""
        try:
            self.start()
            self.monitor.start(threading.current_thread())  # the thread that runs the loop
            while not self._stop.is_set():
                self.step()
            self.monitor.stop()  # draining may legitimately take drain_timeout_s
            self.drain()
        finally:
            self.close()
        return 0

    def start(self) -> None:
        cfg = self.config
        # Metrics first: a busy port fails at once, and a scrape shows ready 0 while
        # the model loads and the sources connect.
        if cfg.metrics.enabled:
            self.metrics_port = self.metrics.serve(cfg.metrics.host, cfg.metrics.port)
        self.notifier.notify("STATUS=loading the model")
        kernels.warm_up()  # compile or load the Numba cache before the first chunk
        model = load_model(cfg)
        self.pipeline = Pipeline(model, cfg.pipeline)
        self.metrics.set_model(model.contract.ident)
        self._open_sinks()
        if cfg.daemon.record:
            from edgefuse.sensors.readers.mcaplog import McapRecorder
            self.recorder = McapRecorder(cfg.daemon.record,
                                         metadata={"recorded_by": "edgefuse run"})
        if cfg.daemon.latency_trace:
            self._trace = _open_output(cfg.daemon.latency_trace, "the latency trace",
                                       "[daemon] latency_trace (--latency-trace)")
        self._open_sources(model)
        self._wait_connected()
        self._snapshot()
        self.metrics.set_state(ready=True)
        metrics = (f"http://{cfg.metrics.host}:{self.metrics_port}/metrics"
                   if self.metrics_port is not None else "off")
        sources = [src.name + (" (not connected yet)" if src.name in self._pending else "")
                   for src in self.sources]
        log.info("ready: model %s, sources %s, sinks %s, metrics %s", model.contract.ident,
                 sources, [sink.name for sink in self.sinks], metrics)
        self.notifier.notify("READY=1", self._status())

    def _status(self) -> str:
        status = f"STATUS=running model {self.pipeline.model.contract.ident}"
        if self._pending:
            status += f"; not connected yet: {', '.join(list(self._pending))}"
        return status

    def _open_sinks(self) -> None:
        # In make_sinks' order: the MQTT sink's outbox lock refuses a second daemon
        # before that daemon truncates a JSONL file the first one is writing.
        self.sinks = make_sinks(self.config)
        for sink in self.sinks:
            sink.open()

    def _open_sources(self, model: OnnxModel) -> None:
        from edgefuse.sensors.live.base import ClockCheck
        from edgefuse.sensors.live.factory import make_sources
        d = self.config.daemon
        # The model's modalities: what MQTT subscribes to, what a serial line may carry.
        # Their channel counts are checked once, by the aligner.
        self.sources = make_sources(
            self.config.source, modalities=[m.name for m in model.contract.modalities],
            clock_check=ClockCheck(d.max_clock_offset_s, d.clock_offset_action))
        if not self.sources:
            raise ConfigError("no source is configured: enable [source.mqtt] or add a "
                              "[[source.serial]] table (or pass --mqtt / --serial)")
        for src in self.sources:
            src.open()

    @staticmethod
    def _last_error(src) -> str:
        error = src.last_error
        return str(error) if error else "no error reported yet"

    def _wait_connected(self) -> None:
        """Wait for the sources as ``[daemon] wait_for_sources`` says (module docstring)."""
        cfg = self.config.daemon
        start = time.monotonic()
        deadline = start + cfg.connect_timeout_s
        grace_end = None  # "any": once one source is up, the others get start_grace_s
        waiting = list(self.sources)
        while True:
            step = 0.2 / len(waiting)
            # wait_connected: an MQTT source once its subscription is acknowledged,
            # a serial one once its port is open
            waiting = [src for src in waiting if not src.wait_connected(step)]
            now = time.monotonic()
            if not waiting:
                return
            if now - self._last_snapshot >= SNAPSHOT_PERIOD_S:
                self._snapshot()  # a scrape during the wait shows the sources' state
            if cfg.wait_for_sources == "any" and len(waiting) < len(self.sources):
                grace_end = grace_end or min(deadline, now + cfg.start_grace_s)
                if now >= grace_end:
                    break
            if self._stop.is_set():
                raise TransportError("stopped while waiting for the sources to connect")
            if now >= deadline:
                what = "every source" if cfg.wait_for_sources == "all" else "a source"
                raise TransportError(
                    "; ".join(f"source {s.name} did not connect within "
                              f"{cfg.connect_timeout_s} s: {self._last_error(s)}"
                              for s in waiting)
                    + f"; check that the broker/device is there and reachable (the start "
                    f"waits for {what}: [daemon] wait_for_sources, connect_timeout_s)")
        connected = [s.name for s in self.sources if s not in waiting]
        for src in waiting:
            self._pending[src.name] = [src, start, time.monotonic() + PENDING_WARN_PERIOD_S]
            log.warning("source %s is not connected after %.1f s (%s); deciding from %s "
                        "meanwhile, it keeps connecting in the background", src.name,
                        time.monotonic() - start, self._last_error(src), connected)

    def _check_pending(self) -> None:
        """Log when a source that was not connected at start connects (or still not)."""
        now = time.monotonic()
        for name, entry in list(self._pending.items()):
            src, since, next_warn = entry
            if src.wait_connected(0):
                del self._pending[name]
                log.info("source %s connected, %.1f s after the start", name, now - since)
                self.notifier.notify(self._status())
            elif now >= next_warn:  # a reminder once a period, not one per check
                entry[2] = now + PENDING_WARN_PERIOD_S
                log.warning("source %s still not connected, %.0f s after the start: %s",
                            name, now - since, self._last_error(src))

    # --- the main loop ----------------------------------------------------
    def step(self) -> None:
        """One iteration: read, push, poll, emit, reload, health."""
        pipeline = self.pipeline
        out: list[Decision] = []
        got = 0
        wait = self.config.daemon.read_timeout_s / len(self.sources)
        for src in self.sources:
            chunks = src.read(0.0 if got else wait)
            got += len(chunks)
            for chunk in chunks:
                out += self._push(chunk)
        out += pipeline.poll()
        if out:
            self._emit(out)
        self.metrics.loops.inc()
        if self._reload.is_set() or self._reloaded:
            self._handle_reload()
        now = time.monotonic()
        if self.health.due(now):
            ok = self.health.check(now, self.sources, self._sink_failures)
            self._sink_failures = 0
            self.metrics.set_state(loop_ok=ok)
            if self._pending:
                self._check_pending()
        if now - self._last_snapshot >= SNAPSHOT_PERIOD_S:
            self._snapshot()
        self.monitor.beat()

    def _push(self, chunk) -> list[Decision]:
        self._last_seen[(chunk.node, chunk.modality)] = chunk.received_ns or time.monotonic_ns()
        if self.recorder is not None:
            self.recorder.write(chunk)
        return self.pipeline.push(chunk)

    def _emit(self, decisions: list[Decision]) -> None:
        if self.recorder is not None:  # beside the chunks, on /<node>/decisions
            self.recorder.write_decisions(decisions)
        for sink in self.sinks:
            try:
                sink.write_many(decisions)
                sink.flush()
            except Exception:  # noqa: BLE001 - one failing sink must not stop the others
                self._sink_failures += 1
                self.metrics.sink_errors.labels(sink.name).inc()
                log.exception("sink %s failed to take %d decision(s)", sink.name,
                              len(decisions))
        done = time.monotonic_ns()
        trace = []
        for d in decisions:
            # Latency counts from the source's receipt of the chunk that closed the
            # window (the pipeline stamps it on the decision; the MQTT receiver process
            # stamps the chunk), so time in the input queues is included; windows no
            # chunk closed (end of input) count from now.
            arrival = done if d.received_ns is None else d.received_ns
            self.metrics.latency.observe((done - arrival) / 1e9)
            if self._trace is not None:
                trace.append(json.dumps({"node": d.node, "seq": d.seq,
                                         "window_end_ns": d.window_end_ns,
                                         "closing": list(d.closed_by or ("", "", -1)),
                                         "arrival_ns": arrival, "out_ns": done}))
        if trace:
            self._trace.write("\n".join(trace) + "\n")
        self.metrics.observe(decisions, self.pipeline.model.contract.modality_names)

    # --- reload ---------------------------------------------------------------
    def _handle_reload(self) -> None:
        if self._reload.is_set() and self._reload_thread is None:
            self._reload.clear()
            self.notifier.notify("RELOADING=1", "STATUS=reloading the model")
            log.info("SIGHUP: reloading %s", model_path(self.config))

            def load() -> None:
                try:
                    self._reloaded.append(load_model(self.config))
                except Exception as exc:  # noqa: BLE001 - reported by the main loop
                    self._reloaded.append(exc)

            self._reload_thread = threading.Thread(target=load, name="model-reload", daemon=True)
            self._reload_thread.start()
        if not self._reloaded:
            return
        result = self._reloaded.pop()
        self._reload_thread = None
        old = self.pipeline.model
        if isinstance(result, Exception):
            self.metrics.reloads.labels("failed").inc()
            log.error("model reload failed, keeping %s: %s", old.contract.ident, result)
        elif old.contract.alignment != result.contract.alignment:
            self.metrics.reloads.labels("refused").inc()
            log.error("model reload refused: %s cuts other windows or modalities than %s; "
                      "restart the service to change them", result.contract.ident,
                      old.contract.ident)
        else:
            pending = self.pipeline.poll(force=True)  # the old model decides its windows
            if pending:
                self._emit(pending)
            self._swap_model(result)
            self.metrics.reloads.labels("ok").inc()
            self.metrics.set_model(result.contract.ident)
            log.info("model reloaded: %s -> %s", old.contract.ident, result.contract.ident)
        ident = self.pipeline.model.contract.ident
        self.notifier.notify("READY=1", f"STATUS=running model {ident}")

    def _swap_model(self, model: OnnxModel) -> None:
        """Replace the pipeline's model, keeping the aligner state; seq is the window
        index, so decision numbering carries over by itself."""
        self.pipeline.swap_model(model)

    # --- shutdown ---------------------------------------------------------
    def drain(self) -> None:
        """SIGTERM: decide everything read, then give the outbox time to empty."""
        self.notifier.notify("STOPPING=1", "STATUS=draining")
        for src in self.sources:
            src.close()
        out: list[Decision] = []
        for src in self.sources:
            while True:
                chunks = src.read(0.0)
                if not chunks:
                    break
                for chunk in chunks:
                    out += self._push(chunk)
        out += self.pipeline.flush()
        if out:
            self._emit(out)
        # One budget for all sinks; a sink that cannot empty in time says what it keeps.
        deadline = time.monotonic() + self.config.daemon.drain_timeout_s
        for sink in self.sinks:
            try:
                sink.drain(max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - the other sinks still get their drain
                log.exception("draining sink %s failed", sink.name)
        self._snapshot()
        log.info("drained: %s decisions total", sum(
            v for v in self.pipeline.stats()["fusion"]["decisions"].values()))

    def close(self) -> None:
        self.monitor.stop()
        for src in self.sources:
            try:
                src.close()
            except Exception:  # noqa: BLE001 - closing must reach every resource
                log.exception("closing a source failed")
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:  # noqa: BLE001
                log.exception("closing sink %s failed", sink.name)
        if self.recorder is not None:
            self.recorder.close()
        if self._trace is not None:
            self._trace.close()
        self.metrics.close()
        self.sources, self.sinks = [], []

    # --- metrics ------------------------------------------------------------
    def _snapshot(self) -> None:
        self._last_snapshot = time.monotonic()
        stats = self.pipeline.stats()
        streams = stats["streams"]
        for key in [k for k in self._last_seen if f"{k[0]}/{k[1]}" not in streams]:
            del self._last_seen[key]  # evicted or refused streams: bounded by the aligner's
        snap = {"streams": streams, "aligner": stats["aligner"],
                "last_seen": {f"{n}/{m}": t / 1e9 for (n, m), t in self._last_seen.items()},
                "fusion": stats.get("fusion", {}), "timing": stats.get("timing", {}),
                "sources": {s.name: s.stats() for s in self.sources},
                "sinks": {sink.name: sink.stats() for sink in self.sinks},
                "pending_windows": self.pipeline.pending_windows()}
        self.metrics.update(snap)


def _open_output(path: str, what: str, key: str):
    """A text file to append to; ConfigError naming the path, the cause and the key."""
    try:
        return open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by Daemon.close
    except OSError as exc:
        raise ConfigError(f"cannot write {what} to {path}: {exc.strerror or exc}; choose a "
                          f"writable path for {key}") from exc


def run_daemon(config: Config) -> int:
    """Build, install signal handlers, run; EdgefuseError at start propagates."""
    daemon = Daemon(config)
    daemon.install_signal_handlers()
    try:
        return daemon.run()
    except EdgefuseError:
        daemon.notifier.notify("STATUS=failed to start")
        raise
