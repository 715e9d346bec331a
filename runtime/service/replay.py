"""Offline replay: recorded inputs through the streaming core, as fast as the
CPU allows (or paced by the wall clock with ``speed``).

The same Pipeline object the live daemon uses; replay only feeds it.
``faults`` (runtime.faults) are applied to the chunks on their way in, in
the log's order, so a recording can be tried against the field's faults.

The returned ReplaySummary says what happened in one line (``line()``) and,
when chunks were read but no decision came out, why (``no_decision_reason()``):
the CLI prints the first and exits with code 3 on the second.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Iterable, Sequence

from edgefuse.runtime.core.decision import Decision
from edgefuse.runtime.core.errors import InputError, ModalityMismatchError, UnknownRateError
from edgefuse.runtime.core.faults import Fault, FaultSpecError, Injector
from edgefuse.runtime.core.inference import OnnxModel
from edgefuse.runtime.core.pipeline import Pipeline, PipelineConfig
from edgefuse.runtime.core.wire import t0_unit_hint
# Not runtime.service.sinks: that imports the MQTT sink, which replay never uses.
from edgefuse.runtime.service.jsonl_sink import JsonlSink
from edgefuse.runtime.service.sink_base import Sink
from edgefuse.sensors.live.accounting import did_you_mean

if TYPE_CHECKING:
    from edgefuse.sensors.readers.mcap_recorder import McapRecorder

log = logging.getLogger(__name__)

MAX_SUMMARY_STREAMS = 4096  # first t0 kept for this many streams (bounded memory)

# per-stream counters of chunks or samples that never reached a window, as the
# summary names them (stats key -> words)
DROP_NAMES = {
    "late": "late",
    "duplicates": "duplicate",
    "reorder_overflow": "reorder overflow",
    "unknown_rate_chunks": "unknown rate",
    "bad_rate_chunks": "bad rate",
    "bad_time_chunks": "bad time",
    "step_overlap_chunks": "clock step overlap",
}
# per-stream clock anomalies (counts; the chunks were kept), as the summary names them
CLOCK_NAMES = {"clock_steps": "steps", "rate_mismatch": "rate mismatch",
               "clock_skew_events": "skew"}
# chunks the aligner refused before they reached a stream (its own counters)
ALIGNER_DROP_NAMES = {
    "bad_time_chunks": "bad time",
    "bad_rate_chunks": "bad rate",
    "unknown_modality_chunks": "unknown modality",
    "wrong_channel_chunks": "wrong channels",
    "not_allowed_chunks": "not allowed",
    "too_many_nodes_chunks": "too many nodes",
}


@dataclass
class ReplaySummary:
    chunks: int = 0
    decisions: int = 0
    span_s: float = 0.0  # sensor seconds replayed (see data_seconds)
    wall_s: float = 0.0
    stats: dict = field(default_factory=dict)
    streams: int = 0                      # streams (node/modality) read
    # "modality/reason" -> decided windows in which the modality was missing for it
    missing: dict = field(default_factory=dict)
    fallbacks: dict = field(default_factory=dict)  # fallback route -> decisions
    injected: dict = field(default_factory=dict)   # what --inject did (Injector.counts)
    warnings: int = 0                     # warning lines logged during the replay
    first_t0: dict = field(default_factory=dict)   # "node/modality" -> its first t0_ns read

    @property
    def realtime_factor(self) -> float:
        return self.span_s / self.wall_s if self.wall_s > 0 else float("inf")

    def drops(self) -> dict[str, int]:
        """Chunks the aligner dropped, by reason (summed over streams, plus the ones it
        refused before any stream; zeros left out)."""
        out: Counter = Counter()
        for c in self.stats.get("streams", {}).values():
            for key, name in DROP_NAMES.items():
                out[name] += int(c.get(key) or 0)
        aligner = self.stats.get("aligner", {})
        for key, name in ALIGNER_DROP_NAMES.items():
            out[name] += int(aligner.get(key) or 0)
        return {k: v for k, v in out.items() if v}

    def clock(self) -> dict[str, int]:
        """Clock anomalies of the streams (steps, rate mismatches, skew), summed."""
        out: Counter = Counter()
        for c in self.stats.get("streams", {}).values():
            for key, name in CLOCK_NAMES.items():
                value = c.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[name] += int(value)
        return {k: v for k, v in out.items() if v}

    def unit_hints(self) -> dict[str, str]:
        """"node/modality" -> what its t0 looks like when it is not ns since the epoch."""
        return {k: hint for k, t0 in sorted(self.first_t0.items())
                if (hint := t0_unit_hint(t0)) is not None}

    def no_decision_reason(self) -> str | None:
        """Why chunks were read but no decision came out; None when that did not happen."""
        if not self.chunks or self.decisions:
            return None
        samples = sum(int(c.get("samples") or 0) for c in self.stats.get("streams", {}).values())
        why = [f"{n} chunks {name}" for name, n in self.drops().items()]
        if not samples:
            why.append("no sample reached the aligner's timeline")
        by_hint: dict[str, list[str]] = {}
        for stream, hint in self.unit_hints().items():
            by_hint.setdefault(hint, []).append(stream)
        for hint, streams in by_hint.items():
            first = streams[0]
            what = f"of {first}" if len(streams) == 1 else \
                f"of {len(streams)} streams (e.g. {first})"
            why.append(f"t0 {what} looks like {hint}: t0_ns = {self.first_t0[first]:.3g} "
                       "(expected ns since the epoch; fix the sender's unit)")
        if not why:
            why.append(f"{self.span_s:.2f} s of data is less than one window, or every "
                       "window lacked the data to decide")
        return (f"read {self.chunks} chunks of {self.streams} streams but made no decision: "
                + "; ".join(why))

    def line(self) -> str:
        """One line: decisions, missing windows by reason, drops, clock anomalies, t0 unit
        hints, injected faults, warnings."""
        parts = [f"{self.chunks} chunks of {self.streams} streams, {self.decisions} decisions"]
        if self.fallbacks:
            parts[0] += " (" + ", ".join(f"{k} {v}" for k, v in
                                        sorted(self.fallbacks.items())) + ")"
        missing = ", ".join(f"{k} {v}" for k, v in sorted(self.missing.items()))
        parts.append(f"missing windows: {missing or 'none'}")
        drops = self.drops()
        parts.append("drops: " + (", ".join(f"{k} {v}" for k, v in drops.items()) or "none"))
        clock = self.clock()
        if clock:
            parts.append("clock: " + ", ".join(f"{k} {v}" for k, v in clock.items()))
        hints = self.unit_hints()
        if hints:
            shown = ", ".join(f"{k} ({v})" for k, v in list(hints.items())[:4])
            more = f" and {len(hints) - 4} more" if len(hints) > 4 else ""
            parts.append(f"t0 not in ns: {shown}{more}")
        injected = {k: v for k, v in self.injected.items() if v}
        if injected:
            parts.append("injected: " + ", ".join(f"{k} {v}" for k, v in injected.items()))
        parts.append(f"{self.warnings} warning{'s' if self.warnings != 1 else ''}")
        return "; ".join(parts)


class _WarningCounter(logging.Handler):
    """Counts the warning lines edgefuse logs while a replay runs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def check_faults(faults: Sequence[Fault], streams: Iterable) -> None:
    """Refuse a fault that matches no stream of the input (a typo would test nothing)."""
    streams = list(streams)
    names = sorted({f"{s.node}/{s.modality}" for s in streams})
    for f in faults:
        if not any((f.modality == "*" or s.modality == f.modality)
                   and (f.node is None or s.node == f.node) for s in streams):
            raise FaultSpecError(f"fault spec {f.spec!r}: expected a target among the input's "
                                 f"streams {names}, found none matching; e.g. "
                                 f"{f.kind}:{names[0].split('/')[1] if names else 'acoustic'}"
                                 "... (MODALITY or NODE/MODALITY)")


def check_streams(streams: Iterable, model: OnnxModel) -> None:
    """Refuse an input whose modalities cannot feed the model; warn on partial overlap."""
    contract = model.contract
    wanted = {m.name: m for m in contract.modalities}
    streams = list(streams)
    if not streams:
        raise InputError("the input holds no readable stream (an empty or corrupt log?); "
                         "check it with `edgefuse record INPUT -o check.mcap`")
    found = sorted({s.modality for s in streams})
    usable = [m for m in found if m in wanted]
    if not usable:
        raise ModalityMismatchError(
            f"the input has modalities {found} but model {contract.ident} expects "
            f"{list(wanted)}; pick the model trained for this sensor layout (edgefuse info MODEL)")
    # A wrong channel count is not refused here: the aligner owns that check, the
    # same live and in replay (it refuses the chunks, counts wrong_channel_chunks and
    # warns naming the stream; the summary counts them, and exit 3 says so when
    # nothing could be decided).
    ignored = [m for m in found if m not in wanted]
    if ignored:
        hints = "".join(did_you_mean(m, wanted) and f"; {m!r}{did_you_mean(m, wanted)}"
                        for m in ignored)
        log.warning("modalities %s are not used by model %s and are ignored%s", ignored,
                    contract.ident, hints)
    absent = [m for m in wanted if m not in found]
    if absent:
        log.warning("the input has no %s: those modalities will be missing in every decision",
                    absent)


def replay(inputs, model: OnnxModel, out: IO[str] | Sink,
           config: PipelineConfig | None = None, speed: float | None = None,
           progress: bool = False, faults: Sequence[Fault] = (),
           inject_seed: int = 0, record: str | os.PathLike | None = None,
           record_encoding: str = "protobuf") -> ReplaySummary:
    """Replay an InputSet (edgefuse.sensors.readers.inputs.open_inputs) into a sink.

    ``out``: a text stream gets JSON lines through a JsonlSink (the daemon's
    writer); a Sink, opened by the caller, gets every batch of decisions and a
    flush() at the end (the caller closes it).

    ``faults`` (runtime.faults.parse_fault) are injected into the chunks on their
    way into the pipeline, seeded with ``inject_seed``; a fault that matches no
    stream of the input is refused (FaultSpecError).

    ``record``: an MCAP file (sensors.readers.mcap_recorder) that gets every chunk
    as it enters the pipeline (after ``faults``, so replaying the file decides the
    same) and every decision on /<node>/decisions; ``record_encoding`` picks the
    chunks' encoding. The file is finished even when the replay fails.

    Raises after writing everything it could when an input was corrupt or a
    stream's rate stayed unknown; the caller reports that as a failed run.
    """
    warnings = _WarningCounter()
    edgefuse_log = logging.getLogger("edgefuse")
    edgefuse_log.addHandler(warnings)
    recorder = None
    try:
        if record is not None:
            from edgefuse.sensors.readers.mcap_recorder import McapRecorder  # mcap, protobuf
            recorder = McapRecorder(record, encoding=record_encoding, metadata={
                "recorded_by": "edgefuse replay", "model": model.contract.ident})
        summary = _replay(inputs, model, out, config, speed, progress, faults, inject_seed,
                          recorder)
    finally:
        edgefuse_log.removeHandler(warnings)
        if recorder is not None:
            recorder.close()
    summary.warnings = warnings.count
    return summary


def _replay(inputs, model, out, config, speed, progress, faults, inject_seed,
            recorder: McapRecorder | None = None) -> ReplaySummary:
    check_streams(inputs.streams, model)
    if faults:
        check_faults(faults, inputs.streams)
    pipeline = Pipeline(model, config)
    sink = out if isinstance(out, Sink) else JsonlSink(out)
    summary = ReplaySummary()
    wall0 = time.perf_counter()
    bar = _progress_bar(progress)
    missing: Counter = Counter()
    fallbacks: Counter = Counter()

    def emit(decisions: list[Decision]) -> None:
        if not decisions:
            return
        sink.write_many(decisions)
        if recorder is not None:
            recorder.write_decisions(decisions)
        for d in decisions:
            fallbacks[d.fallback] += 1
            for m in d.missing:
                missing[f"{m}/{d.missing_reason.get(m, 'unknown')}"] += 1
        summary.decisions += len(decisions)

    def paced(chunks):
        """The log's chunks, each once the wall clock reaches its log time (speed).
        Pacing follows the recording, before any fault: the arrival times."""
        first_t0 = None
        for chunk in chunks:
            if first_t0 is None:
                first_t0 = chunk.t0_ns
            ahead = (chunk.t0_ns - first_t0) / 1e9 / speed - (time.perf_counter() - wall0)
            if ahead > 0:
                emit(pipeline.poll(force=True))
                time.sleep(ahead)
            yield chunk

    feed = inputs.chunks()
    if speed:
        feed = paced(feed)
    injector = Injector(feed, faults, seed=inject_seed) if faults else None
    error: InputError | None = None
    try:
        for chunk in (injector if injector is not None else feed):
            summary.chunks += 1
            key = f"{chunk.node}/{chunk.modality}"
            if key not in summary.first_t0 and len(summary.first_t0) < MAX_SUMMARY_STREAMS:
                summary.first_t0[key] = chunk.t0_ns
            if recorder is not None:
                recorder.write(chunk)
            emit(pipeline.push(chunk))
            if speed:
                emit(pipeline.poll())
            if bar is not None:
                bar.update(1)
    except InputError as exc:  # a corrupt log: finish what was read, then report
        error = exc
    emit(pipeline.flush())
    sink.flush()
    if bar is not None:
        bar.close()
    summary.wall_s = time.perf_counter() - wall0
    summary.stats = pipeline.stats()
    summary.span_s = data_seconds(summary.stats["streams"])
    summary.streams = len(summary.first_t0)
    summary.missing = dict(missing)
    summary.fallbacks = dict(fallbacks)
    summary.injected = dict(injector.counts) if injector is not None else {}
    unknown = {k: v["unknown_rate_chunks"] for k, v in summary.stats["streams"].items()
               if v["unknown_rate_chunks"]}
    if error is not None:
        raise error
    if unknown:
        raise UnknownRateError(
            f"streams {sorted(unknown)} have no sample rate and too few chunks to estimate "
            "one; give the rate (sidecar .wav.xml, rate_hz in the log) or a longer input")
    return summary


def data_seconds(streams: dict) -> float:
    """Sensor time processed: per node the longest of its streams, summed over nodes."""
    per_node: dict[str, float] = {}
    for key, c in streams.items():
        node = key.rsplit("/", 1)[0]
        secs = c["samples"] / c["rate_hz"] if c["rate_hz"] else 0.0
        per_node[node] = max(per_node.get(node, 0.0), secs)
    return sum(per_node.values())


def _progress_bar(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(unit="chunk", file=sys.stderr, leave=False, desc="replay")
