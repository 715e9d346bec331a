"""A recording manifest: a user's own sensor files and their clocks.

`recording.toml` (in a folder, or any .toml path) lists one `[[stream]]` per file:

    [[stream]]
    node = "pi-a"
    modality = "acoustic"
    file = "pi-a_acoustic.wav"            # relative to the manifest
    t0 = "2026-05-01T12:00:00.123456789Z"  # or t0_ns = 1777636800123456789
    rate_hz = 15999.87                     # the actual rate; default: the WAV header's
    # full_scale = 32767.0                 # largest magnitude (clipping); 0 = unknown

    [[stream]]
    node = "pi-a"
    modality = "imu"
    file = "pi-a_imu.csv"                  # time column t_ns|t_us|t_ms|t_s|time

A WAV (int16, int32 or float32, any channel count) needs t0 or t0_ns; its
full scale comes from the sample format (32767, 2147483647, 1.0) unless
`full_scale` says otherwise (a CSV has none unless given). A CSV
carries its own time (see csvfile.py); rate_hz, if given, overrides the rate
estimated from its timestamps. Unknown keys are refused; every error names
the stream (index, node/modality) and the key.
"""
from __future__ import annotations

import calendar
import datetime as dt
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import InputError
from edgefuse.sensors.readers import csvfile
from edgefuse.sensors.readers._common import (
    NS_PER_S, OfflineSource, StreamInfo, chunk_frames, utc_to_ns,
)
from edgefuse.sensors.readers.wavfile import WavReader, read_wav_info

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

MANIFEST_NAME = "recording.toml"
KEYS = ("node", "modality", "file", "t0", "t0_ns", "rate_hz", "full_scale")
_MAX_MANIFEST_BYTES = 1 << 20
_MAX_STREAMS = 10_000


@dataclass(frozen=True)
class StreamEntry:
    """One checked [[stream]] of a manifest; path is absolute."""

    node: str
    modality: str
    path: str
    t0_ns: int | None
    rate_hz: float | None
    full_scale: float | None = None  # None: the format's (WAV) or unknown (CSV)


def _t0_from_datetime(value: dt.datetime) -> int:
    """A TOML datetime (microsecond precision) -> ns, if it is explicitly UTC."""
    if value.tzinfo is None or value.utcoffset() != dt.timedelta(0):
        raise ValueError(f"expected a UTC time ending in Z, found {value.isoformat()!r}")
    whole = calendar.timegm(value.utctimetuple())
    return whole * NS_PER_S + value.microsecond * 1000


def _entry(manifest: str, index: int, raw: object) -> StreamEntry:
    if not isinstance(raw, dict):
        raise InputError(f"{manifest}: stream {index}: expected a [[stream]] table, found "
                         f"{type(raw).__name__}", path=manifest)
    name = f"{raw.get('node', '?')}/{raw.get('modality', '?')}"

    def fail(key: str, message: str) -> InputError:
        return InputError(f"{manifest}: stream {index} ({name}): {key}: {message}",
                          path=manifest)

    for key in raw:
        if key not in KEYS:
            raise fail(key, f"unknown key; expected one of {', '.join(KEYS)}")
    for key in ("node", "modality", "file"):
        value = raw.get(key)
        if not isinstance(value, str) or not value.strip():
            raise fail(key, f"expected a non-empty string, found {value!r}")
    for key in ("node", "modality"):
        if "/" in raw[key] or raw[key] != raw[key].strip():
            raise fail(key, f"expected a name without '/' or surrounding spaces, found "
                            f"{raw[key]!r}")
    path = os.path.join(os.path.dirname(os.path.abspath(manifest)), raw["file"])
    if not os.path.isfile(path):
        raise fail("file", f"{path} does not exist; paths are relative to the manifest")
    if "t0" in raw and "t0_ns" in raw:
        raise fail("t0", "give t0 or t0_ns, not both")
    t0_ns = None
    if "t0" in raw:
        value = raw["t0"]
        try:
            t0_ns = _t0_from_datetime(value) if isinstance(value, dt.datetime) else \
                utc_to_ns(value) if isinstance(value, str) else None
        except (InputError, ValueError) as exc:
            raise fail("t0", f"{exc}; e.g. t0 = \"2026-05-01T12:00:00.123456789Z\"") from None
        if t0_ns is None:
            raise fail("t0", f"expected an ISO-8601 UTC time as a string, found {value!r}")
    if "t0_ns" in raw:
        t0_ns = raw["t0_ns"]
        if isinstance(t0_ns, bool) or not isinstance(t0_ns, int):
            raise fail("t0_ns", f"expected an integer number of ns since 1970, found {t0_ns!r}")
    rate = raw.get("rate_hz")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                             or not 0 < rate < float("inf")):
        raise fail("rate_hz", f"expected a positive number of Hz, found {rate!r}")
    full_scale = raw.get("full_scale")
    if full_scale is not None and (isinstance(full_scale, bool) or
                                   not isinstance(full_scale, (int, float)) or
                                   not 0 <= full_scale < float("inf")):
        raise fail("full_scale", f"expected a number >= 0 (0 = unknown), found {full_scale!r}")
    kind = _kind(path)
    if kind is None:
        raise fail("file", f"expected a .wav or .csv file, found {raw['file']!r}")
    if kind == "wav" and t0_ns is None:
        raise fail("t0", "a WAV file needs its clock: give t0 (ISO-8601 UTC) or t0_ns")
    if kind == "csv" and t0_ns is not None:
        raise fail("t0_ns" if "t0_ns" in raw else "t0",
                   "a CSV carries its own time in its first column; remove the key")
    return StreamEntry(raw["node"], raw["modality"], path, t0_ns,
                       None if rate is None else float(rate),
                       None if full_scale is None else float(full_scale))


def _kind(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    return {".wav": "wav", ".csv": "csv"}.get(ext)


def read_manifest(path: str | os.PathLike) -> list[StreamEntry]:
    """The checked entries of one manifest file."""
    path = os.fspath(path)
    try:
        if os.path.getsize(path) > _MAX_MANIFEST_BYTES:
            raise InputError(f"{path}: larger than {_MAX_MANIFEST_BYTES} bytes; expected a "
                             "short list of [[stream]] tables", path=path)
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}", path=path) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML: {exc}", path=path) from exc
    for key in data:
        if key != "stream":
            raise InputError(f"{path}: {key}: unknown key; expected only [[stream]] tables",
                             path=path)
    streams = data.get("stream")
    if not isinstance(streams, list) or not streams:
        raise InputError(f"{path}: expected one or more [[stream]] tables (node, modality, "
                         "file, t0 ...), found none", path=path)
    if len(streams) > _MAX_STREAMS:
        raise InputError(f"{path}: {len(streams)} streams; at most {_MAX_STREAMS}", path=path)
    return [_entry(path, i, raw) for i, raw in enumerate(streams)]


def wav_full_scale(dtype: np.dtype) -> float:
    """The largest magnitude the sample format holds (float WAV: 1.0)."""
    return float(np.iinfo(dtype).max) if dtype.kind == "i" else 1.0


def _wav_source(e: StreamEntry) -> OfflineSource:
    info = read_wav_info(e.path)
    rate = e.rate_hz if e.rate_hz is not None else float(info.rate_hz)
    nominal = e.rate_hz is None  # the header's integer rate, not a measured one
    full_scale = wav_full_scale(info.dtype) if e.full_scale is None else e.full_scale or None
    stream = StreamInfo(e.node, e.modality, info.channels, rate, e.path, nominal, e.t0_ns,
                        info.frames)

    def chunks(chunk_s: float) -> Iterator[Chunk]:
        with WavReader(e.path, quiet=True) as reader:  # described at open already
            yield from chunk_frames(e.node, e.modality, reader.read, reader.info.frames,
                                    e.t0_ns, rate, chunk_s, full_scale=full_scale,
                                    rate_is_nominal=nominal)
    return OfflineSource(e.path, (stream,), e.t0_ns, chunks)


def _csv_source(e: StreamEntry) -> OfflineSource:
    layout = csvfile.scan(e.path, e.rate_hz)
    one_run = len(layout.runs) == 1
    # samples only where t0 + samples / rate is the true end (one run, no gaps)
    stream = StreamInfo(e.node, e.modality, layout.channels,
                        layout.runs[0].rate_hz if one_run else layout.rate_hz, e.path, False,
                        layout.t0_ns, layout.rows if one_run else None)
    return OfflineSource(e.path, (stream,), layout.t0_ns,
                         lambda chunk_s: csvfile.iter_chunks(layout, e.node, e.modality,
                                                             chunk_s, e.full_scale or None))


def manifest_sources(path: str | os.PathLike, chunk_s: float) -> list[OfflineSource]:
    """One source per [[stream]] (files are opened when their time comes)."""
    out = []
    for e in read_manifest(path):
        src = _wav_source(e) if _kind(e.path) == "wav" else _csv_source(e)
        out.append(OfflineSource(src.label, src.streams, src.start_ns,
                                 lambda src=src: src.open(chunk_s)))
    return out
