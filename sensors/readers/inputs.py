"""Open any offline input by path and replay it as one time-ordered chunk stream.

    inputs = open_inputs(["log.mcap", "passes/close/2D.16.123"])
    inputs.streams          # what is in there, from headers/metadata only
    for chunk in inputs.chunks(): ...

Kinds (detected per path): a recording manifest (recording.toml, or any
.toml; see manifest.py) or a folder holding one; an edgefuse MCAP log; a goodvibes pass folder
(meta.json), a folder of pass folders, a raw 5-minute WAV (+ .wav.xml), a
folder of raw WAVs, a noise WAV or noise folder (beside noise.csv); an
sp-sw-har CSV (its whole execution: phone + watch), subject folder or root.
"""
from __future__ import annotations

import heapq
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import InputError
from edgefuse.sensors.readers import goodvibes, goodvibes_noise, manifest, sphar
from edgefuse.sensors.readers._common import (
    OfflineSource, StreamInfo, chunk_order, merge_chunks, seq_step_over,
)

log = logging.getLogger(__name__)

__all__ = ["InputSet", "OfflineSource", "StreamInfo", "chunk_order", "merge_chunks",
           "open_inputs", "record", "SUPPORTED_KINDS"]

SUPPORTED_KINDS = (
    "a recording manifest (recording.toml or any *.toml: one [[stream]] per WAV/CSV file) "
    "or a folder holding recording.toml, or a folder of node folders that each hold one",
    "an edgefuse MCAP log (*.mcap) or a folder of them",
    "a goodvibes pass folder (holding meta.json), or one WAV in it",
    "a folder of goodvibes pass folders (searched recursively, e.g. passes/close)",
    "a raw goodvibes WAV Node<N>-Ch<1|2>-<seq>-<date>-<rate>Hz.wav (+ .wav.xml sidecar)",
    "a folder of raw goodvibes WAVs",
    "a goodvibes noise WAV or noise folder (beside its noise.csv)",
    "an sp-sw-har CSV s<NN>_<EE>_sp|sw.csv (loads the execution: phone + watch), "
    "a subject folder s<NN>/ or the dataset root",
)


def _mcap_source(path: str) -> OfflineSource:
    # imported here: the mcap library is ~20 ms of start-up that WAV/CSV inputs don't need
    from edgefuse.sensors.readers.mcaplog import McapLog
    mlog = McapLog(path)
    return OfflineSource(path, tuple(mlog.streams()), mlog.start_ns, mlog.chunks)


def _unknown(path: str, found: str) -> InputError:
    kinds = "\n  - ".join(SUPPORTED_KINDS)
    return InputError(f"{path}: cannot tell what kind of input this is ({found}); "
                      f"supported kinds:\n  - {kinds}", path=path)


def _file_sources(path: str, chunk_s: float) -> list[OfflineSource]:
    name = os.path.basename(path)
    folder = os.path.dirname(os.path.abspath(path))
    if name.lower().endswith(".mcap"):
        return [_mcap_source(path)]
    if name.lower().endswith(".toml"):
        return manifest.manifest_sources(path, chunk_s)
    if goodvibes.RAW_NAME.match(name):
        return goodvibes.raw_sources(path, chunk_s)
    if goodvibes_noise.NOISE_NAME.match(name) and \
            os.path.exists(os.path.join(folder, "noise.csv")):
        return goodvibes_noise.noise_sources(path, chunk_s)
    if os.path.exists(os.path.join(folder, "meta.json")):
        if name == "meta.json":
            return goodvibes.pass_sources(folder, chunk_s)
        stem = name[:-4] if name.endswith(".wav") else None
        chosen = [s for s in goodvibes.pass_sources(folder, chunk_s)
                  if s.streams[0].modality == stem]
        if chosen:
            return chosen
    if sphar.FILE_NAME.match(name):
        return [s for p in sphar.execution_files(path) for s in sphar.csv_sources(p, chunk_s)]
    if name.endswith(".wav.xml") and os.path.exists(path[:-4]):
        return _file_sources(path[:-4], chunk_s)  # a sidecar stands for its recording
    if name.lower().endswith((".wav", ".csv")):
        raise _unknown(path, "a WAV/CSV of no known dataset layout: describe your own files "
                             f"in a {manifest.MANIFEST_NAME} (README, Your own recordings)")
    raise _unknown(path, "a file whose name matches none of the kinds")


def _dir_sources(path: str, chunk_s: float) -> list[OfflineSource]:
    names = sorted(os.listdir(path))
    if manifest.MANIFEST_NAME in names:
        return manifest.manifest_sources(os.path.join(path, manifest.MANIFEST_NAME), chunk_s)
    if "meta.json" in names:
        return goodvibes.pass_sources(path, chunk_s)
    raws = goodvibes.find_raw_wavs(path)
    if raws:
        return [s for p in raws for s in goodvibes.raw_sources(p, chunk_s)]
    if "noise.csv" in names:
        return [s for n in goodvibes_noise.load_noise(path)
                for s in goodvibes_noise.noise_sources(n.path, chunk_s)]
    if sphar.is_sphar(path):
        return [s for p in sphar.find_csvs(path) for s in sphar.csv_sources(p, chunk_s)]
    mcaps = [os.path.join(path, n) for n in names if n.lower().endswith(".mcap")]
    if mcaps:
        return [_mcap_source(p) for p in mcaps]
    passes = goodvibes.find_passes(path)
    if passes:
        return [s for p in passes for s in goodvibes.pass_sources(p, chunk_s)]
    # a folder of node folders, each with its own manifest (one level down only)
    manifests = [os.path.join(path, n, manifest.MANIFEST_NAME) for n in names
                 if os.path.isfile(os.path.join(path, n, manifest.MANIFEST_NAME))]
    if manifests:
        return [s for m in manifests for s in manifest.manifest_sources(m, chunk_s)]
    raise _unknown(path, "a folder holding none of them")


# Consecutive raw 5-minute files of a node overlap by up to ~0.53 s on the
# sensor clock (data README, Clocks); that much is tolerated with a warning.
OVERLAP_TOLERANCE_NS = 1_000_000_000


def _check_overlaps(sources: list[OfflineSource]) -> None:
    """Two inputs with the same stream must not overlap in time (e.g. passes/close
    and passes/full of the same run): their samples would interleave."""
    spans: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
    for src in sources:
        for s in src.streams:
            end = s.end_ns()
            if s.t0_ns is not None and end is not None:
                spans.setdefault((s.node, s.modality), []).append((s.t0_ns, end, s.source))
    for (node, modality), items in spans.items():
        items.sort()
        for (a0, a1, a), (b0, b1, b) in zip(items, items[1:]):
            if b0 < a1 <= b0 + OVERLAP_TOLERANCE_NS:
                log.warning("stream %s/%s: %s and %s overlap by %.3f s (sensor clock seam); "
                            "the aligner sees the overlap as late/duplicate samples",
                            node, modality, a, b, (a1 - b0) / 1e9)
            elif b0 < a1:
                raise InputError(
                    f"stream {node}/{modality} comes from two inputs that overlap in time by "
                    f"{(a1 - b0) / 1e9:.3f} s: {a} and {b}; expected each stream's inputs to be "
                    "disjoint in time (pass passes/close or passes/full, not both)")


@dataclass
class InputSet:
    """The sources of one replay. chunks() may be called more than once."""

    sources: list[OfflineSource]
    errors: list[InputError] = field(default_factory=list)

    @property
    def streams(self) -> list[StreamInfo]:
        return [s for src in self.sources for s in src.streams]

    def chunks(self) -> Iterator[Chunk]:
        """All chunks merged by (t0_ns, node, modality, seq), deterministically.

        A source that fails midway (corrupt log) is dropped after its readable
        chunks; the others go on; at the end the first such error is raised (all
        of them are in `errors`).
        """
        self.errors = []
        counts: dict[tuple[str, str], int] = {}
        for src in self.sources:
            for s in src.streams:
                counts[(s.node, s.modality)] = counts.get((s.node, s.modality), 0) + 1
        # A stream fed by several inputs gets one sequence in merged order: each
        # input counts from 0 and the aligner would see resets. Within an input
        # its own seq steps are kept (its holes are its lost data); from one input
        # to the next seq skips as many chunks as the time between them holds, so
        # the silence between two files is a gap, not a clock step.
        renumber = {k for k, n in counts.items() if n > 1}
        last: dict[tuple[str, str], tuple[int, Chunk, Chunk]] = {}  # source, read, renumbered
        for source, chunk in self._merge():
            key = chunk.stream
            if key in renumber:
                prev = last.get(key)
                if prev is None:
                    seq = 0
                elif prev[0] == source and chunk.seq > prev[1].seq:
                    seq = prev[2].seq + (chunk.seq - prev[1].seq)
                elif prev[0] == source:
                    seq = prev[2].seq + 1
                else:
                    seq = prev[2].seq + seq_step_over(prev[2], chunk.t0_ns)
                renumbered = Chunk(chunk.node, chunk.modality, chunk.t0_ns, chunk.rate_hz,
                                   chunk.samples, seq, chunk.full_scale,
                                   chunk.rate_is_nominal)
                last[key] = (source, chunk, renumbered)
                chunk = renumbered
            yield chunk
        if self.errors:
            if len(self.errors) > 1:
                log.error("%d inputs failed; raising the first", len(self.errors))
            raise self.errors[0]

    def _merge(self) -> Iterator[tuple[int, Chunk]]:
        """(source index, chunk) in merge_chunks' order (chunk_order, ties by source) but opening a source only
        when the output reaches its start time, so a folder of many files holds few
        of them open at once."""
        never = -(1 << 63)
        pending = [(never if s.start_ns is None else s.start_ns, i) for i, s in
                   enumerate(self.sources)]
        heapq.heapify(pending)
        active: list[tuple[tuple, Chunk, Iterator[Chunk]]] = []

        def advance(i: int, it: Iterator[Chunk]) -> None:
            try:
                c = next(it, None)
            except InputError as exc:  # CorruptLogError included: keep the other inputs
                log.error("input %s failed: %s", self.sources[i].label, exc)
                self.errors.append(exc)
                return
            if c is not None:
                heapq.heappush(active, ((*chunk_order(c), i), c, it))

        while pending or active:
            while pending and (not active or pending[0][0] <= active[0][0][0]):
                _, i = heapq.heappop(pending)
                try:
                    it = iter(self.sources[i].open())
                except InputError as exc:
                    log.error("input %s failed to open: %s", self.sources[i].label, exc)
                    self.errors.append(exc)
                    continue
                advance(i, it)
            if active:
                key, chunk, it = heapq.heappop(active)
                yield key[-1], chunk
                advance(key[-1], it)


def open_inputs(paths: list[str | os.PathLike] | str | os.PathLike,
                chunk_s: float = 1.0) -> InputSet:
    """Detect the kind of every path and describe its streams (no samples read)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not chunk_s > 0:
        raise InputError(f"chunk_s must be > 0 seconds, found {chunk_s!r}")
    sources: list[OfflineSource] = []
    for p in map(os.fspath, paths):
        if not os.path.exists(p):
            raise InputError(f"{p} does not exist; expected a file or folder of recordings",
                             path=p)
        found = _dir_sources(p, chunk_s) if os.path.isdir(p) else _file_sources(p, chunk_s)
        if not found:
            log.warning("%s: no samples in this input", p)
        sources += found
    # The same file named twice (e.g. both CSVs of one execution) is read once.
    unique: dict[str, OfflineSource] = {}
    for s in sources:
        unique.setdefault(os.path.abspath(s.label), s)
    sources = list(unique.values())
    _check_overlaps(sources)
    return InputSet(sources)


def record(paths: list[str | os.PathLike] | str | os.PathLike, out_path: str | os.PathLike,
           chunk_s: float = 1.0, *, compression: str = "auto",
           metadata: dict[str, str] | None = None, encoding: str = "protobuf") -> dict:
    """Convert any readable input into an edgefuse MCAP log.

    Written to `<out>.partial` and renamed when complete; if an input fails
    midway the error is raised and the (valid, shorter) `.partial` file kept.
    """
    out_path = os.fspath(out_path)
    inputs = open_inputs(paths, chunk_s)
    partial = out_path + ".partial"
    md = {"chunk_s": repr(float(chunk_s)),
          "sources": ";".join(os.fspath(p) for p in
                              ([paths] if isinstance(paths, (str, os.PathLike)) else paths))}
    md.update(metadata or {})
    chunks = 0
    from edgefuse.sensors.readers.mcaplog import McapRecorder
    with McapRecorder(partial, compression=compression, metadata=md,
                      encoding=encoding) as rec:
        try:
            for chunk in inputs.chunks():
                chunks += rec.write(chunk)
        except InputError:
            log.warning("input failed; the chunks read so far are in %s", partial)
            raise
    os.replace(partial, out_path)
    per_stream = {k: v for k, v in rec.counts.items() if k != "rejected"}
    return {"chunks": chunks, "samples": rec.samples, "streams": len(per_stream),
            "rejected": rec.counts["rejected"], "bytes": os.path.getsize(out_path),
            "compression": rec.compression.name.lower(), "encoding": encoding,
            "per_stream": per_stream}
