"""The reverse of a manifest: one WAV or CSV per stream out of any input, for labelling tools.

    export_streams("log.mcap", "out/")   # out/recording.toml + one file per stream (segment)

Streams at audio rates (>= WAV_MIN_RATE_HZ, rate known) become float32 WAVs, a
new file at every discontinuity (a chunk that does not start where the last
one ended, or a new rate), each with its t0_ns, rate_hz and full_scale in the
manifest (samples are written as they are in the chunks, so full_scale stays
the sensor's: 32767 for int16 counts).
Other streams become CSVs `t_ns,c0,c1,...`: sample k of a chunk at
t0 + offset_ns(k, rate); a chunk without a rate is spread evenly up to the
next chunk's t0. The written recording.toml reads back through open_inputs.
Everything is streamed; at most MAX_STREAMS files are open at once.
"""
from __future__ import annotations

import csv
import os
import struct
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import InputError
from edgefuse.sensors.readers._common import NS_PER_S, offset_ns
from edgefuse.sensors.readers.manifest import MANIFEST_NAME

WAV_MIN_RATE_HZ = 1000.0
MAX_STREAMS = 256
_SAFE = str.maketrans({c: "_" for c in '/\\:*?"<>| '})


def _wav_header(channels: int, rate: int, data_bytes: int) -> bytes:
    fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * channels * 4, channels * 4, 32)
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + data_bytes) + b"WAVE" +
            b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" +
            struct.pack("<I", data_bytes))


@dataclass
class _Wav:
    path: str
    t0_ns: int
    rate_hz: float
    channels: int
    fh: IO[bytes]
    frames: int = 0

    def end_ns(self) -> int:
        return self.t0_ns + offset_ns(self.frames, self.rate_hz)

    def close(self) -> None:
        # the header's sizes are known only now (the reader clamps them anyway)
        self.fh.seek(0)
        self.fh.write(_wav_header(self.channels, max(1, round(self.rate_hz)),
                                  self.frames * self.channels * 4))
        self.fh.close()


@dataclass
class _Csv:
    name: str
    fh: IO[str]
    writer: "csv._writer"
    pending: Chunk | None = None  # a rate-less chunk waits for the next t0
    last_period_ns: int | None = None

    def write(self, chunk: Chunk, end_ns: int | None) -> None:
        if chunk.rate_hz is not None:
            times = [chunk.t0_ns + offset_ns(k, chunk.rate_hz) for k in range(chunk.n)]
        else:
            period = (end_ns - chunk.t0_ns) / chunk.n if end_ns is not None and \
                end_ns > chunk.t0_ns else (self.last_period_ns or NS_PER_S // 100)
            self.last_period_ns = int(period)
            times = [chunk.t0_ns + round(k * period) for k in range(chunk.n)]
        for t, row in zip(times, chunk.samples.tolist()):
            self.writer.writerow([t, *(f"{v:.9g}" for v in row)])  # 9 digits: float32 exactly


@dataclass
class _Stream:
    node: str
    modality: str
    entries: list[dict] = field(default_factory=list)
    wav: _Wav | None = None
    csv: _Csv | None = None


def _stem(node: str, modality: str) -> str:
    return f"{node}_{modality}".translate(_SAFE)


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def export_streams(inputs, out_dir: str | os.PathLike) -> dict[str, int]:
    """Write one file per stream (per WAV segment) and recording.toml into out_dir.

    inputs: an InputSet (open_inputs(...)). Returns {file name: samples}.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, MANIFEST_NAME)):
        raise InputError(f"{out_dir} already holds a {MANIFEST_NAME}; choose an empty folder")
    streams: dict[tuple[str, str], _Stream] = {}
    written: dict[str, int] = {}
    try:
        for chunk in inputs.chunks():
            s = streams.get(chunk.stream)
            if s is None:
                if len(streams) >= MAX_STREAMS:
                    raise InputError(f"more than {MAX_STREAMS} streams; export fewer inputs "
                                     "at a time")
                s = streams[chunk.stream] = _Stream(chunk.node, chunk.modality)
            if chunk.rate_hz is not None and chunk.rate_hz >= WAV_MIN_RATE_HZ:
                _write_wav(out_dir, s, chunk, written)
            else:
                _write_csv(out_dir, s, chunk, written)
    finally:
        for s in streams.values():
            _flush_csv(s, None)
            if s.wav is not None:
                s.wav.close()
            if s.csv is not None:
                s.csv.fh.close()
    with open(os.path.join(out_dir, MANIFEST_NAME), "w", encoding="utf-8") as f:
        for s in streams.values():
            for e in s.entries:
                f.write("[[stream]]\n" + "".join(
                    f"{k} = {_toml_str(v) if isinstance(v, str) else repr(v)}\n"
                    for k, v in e.items()) + "\n")
    return written


def _write_wav(out_dir: str, s: _Stream, chunk: Chunk, written: dict[str, int]) -> None:
    w = s.wav
    half_sample = NS_PER_S / chunk.rate_hz / 2
    if w is None or w.rate_hz != chunk.rate_hz or w.channels != chunk.channels or \
            abs(chunk.t0_ns - w.end_ns()) > half_sample:
        if w is not None:
            w.close()
        name = f"{_stem(s.node, s.modality)}_{len(s.entries):03d}.wav"
        path = os.path.join(out_dir, name)
        fh = open(path, "wb")
        fh.write(_wav_header(chunk.channels, max(1, round(chunk.rate_hz)), 0))
        w = s.wav = _Wav(path, chunk.t0_ns, chunk.rate_hz, chunk.channels, fh)
        entry = {"node": s.node, "modality": s.modality, "file": name, "t0_ns": chunk.t0_ns,
                 "rate_hz": chunk.rate_hz, "full_scale": float(chunk.full_scale or 0.0)}
        if chunk.rate_is_nominal and chunk.rate_hz == round(chunk.rate_hz):
            del entry["rate_hz"]  # the header's rate, nominal again when read back
        s.entries.append(entry)
    w.fh.write(np.ascontiguousarray(chunk.samples, "<f4").tobytes())
    w.frames += chunk.n
    written[os.path.basename(w.path)] = w.frames


def _flush_csv(s: _Stream, next_t0_ns: int | None) -> None:
    if s.csv is not None and s.csv.pending is not None:
        s.csv.write(s.csv.pending, next_t0_ns)
        s.csv.pending = None


def _write_csv(out_dir: str, s: _Stream, chunk: Chunk, written: dict[str, int]) -> None:
    if s.csv is None:
        name = f"{_stem(s.node, s.modality)}.csv"
        fh = open(os.path.join(out_dir, name), "w", newline="", encoding="utf-8")
        writer = csv.writer(fh)
        writer.writerow(["t_ns", *(f"c{i}" for i in range(chunk.channels))])
        s.csv = _Csv(name, fh, writer)
        s.entries.append({"node": s.node, "modality": s.modality, "file": name,
                          "full_scale": float(chunk.full_scale or 0.0)})
    _flush_csv(s, chunk.t0_ns)
    if chunk.rate_hz is None:
        s.csv.pending = chunk
    else:
        s.csv.write(chunk, None)
    written[s.csv.name] = written.get(s.csv.name, 0) + chunk.n
