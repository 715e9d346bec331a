"""Offline replay: recorded inputs through the streaming core, as fast as the
CPU allows (or paced by the wall clock with ``speed``).

The same Pipeline object the live daemon uses; replay only feeds it.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Iterable

from edgefuse.runtime.decision import Decision
from edgefuse.runtime.errors import InputError, ModalityMismatchError, UnknownRateError
from edgefuse.runtime.inference import OnnxModel
from edgefuse.runtime.pipeline import Pipeline, PipelineConfig

log = logging.getLogger(__name__)


@dataclass
class ReplaySummary:
    chunks: int = 0
    decisions: int = 0
    span_s: float = 0.0  # sensor seconds replayed (see data_seconds)
    wall_s: float = 0.0
    stats: dict = field(default_factory=dict)

    @property
    def realtime_factor(self) -> float:
        return self.span_s / self.wall_s if self.wall_s > 0 else float("inf")


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
    for s in streams:
        spec = wanted.get(s.modality)
        if spec is not None and s.channels != spec.channels:
            raise ModalityMismatchError(
                f"stream {s.node}/{s.modality} has {s.channels} channels but model "
                f"{contract.ident} expects {spec.channels} for {s.modality}")
    ignored = [m for m in found if m not in wanted]
    if ignored:
        log.warning("modalities %s are not used by model %s and are ignored", ignored,
                    contract.ident)
    absent = [m for m in wanted if m not in found]
    if absent:
        log.warning("the input has no %s: those modalities will be missing in every decision",
                    absent)


def replay(inputs, model: OnnxModel, out: IO[str], config: PipelineConfig | None = None,
           speed: float | None = None, progress: bool = False) -> ReplaySummary:
    """Replay an InputSet (edgefuse.sensors.inputs.open_inputs) and write JSON lines.

    Raises after writing everything it could when an input was corrupt or a
    stream's rate stayed unknown; the caller reports that as a failed run.
    """
    check_streams(inputs.streams, model)
    pipeline = Pipeline(model, config)
    summary = ReplaySummary()
    first_t0 = None
    wall0 = time.perf_counter()
    bar = _progress_bar(progress)

    def emit(decisions: list[Decision]) -> None:
        for d in decisions:
            out.write(d.to_json())
            out.write("\n")
        summary.decisions += len(decisions)

    error: InputError | None = None
    try:
        for chunk in inputs.chunks():
            summary.chunks += 1
            if first_t0 is None:
                first_t0 = chunk.t0_ns
            if speed:
                ahead = (chunk.t0_ns - first_t0) / 1e9 / speed - (time.perf_counter() - wall0)
                if ahead > 0:
                    emit(pipeline.poll(force=True))
                    time.sleep(ahead)
            emit(pipeline.push(chunk))
            if speed:
                emit(pipeline.poll())
            if bar is not None:
                bar.update(1)
    except InputError as exc:  # a corrupt log: finish what was read, then report
        error = exc
    emit(pipeline.flush())
    out.flush()
    if bar is not None:
        bar.close()
    summary.wall_s = time.perf_counter() - wall0
    summary.stats = pipeline.stats()
    summary.span_s = data_seconds(summary.stats["streams"])
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
