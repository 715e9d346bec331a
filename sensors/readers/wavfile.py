"""A small, strict PCM WAV reader for sensor recordings.

Why not the `wave` module: the real sensor files can carry placeholder sizes
(0x7FFFFFFF) in their RIFF and data headers when the recording stopped before
the header was finalised; we clamp to the bytes that are really there and
say so. Samples are read through a read-only memory map, so opening a
5-minute file costs nothing until frames are asked for.
"""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

import numpy as np

from edgefuse.runtime.core.errors import InputError

log = logging.getLogger(__name__)

_FORMAT_PCM = 0x0001
_FORMAT_FLOAT = 0x0003
_FORMAT_EXTENSIBLE = 0xFFFE
# (format tag, bits per sample) -> little-endian dtype we can read.
_DTYPES = {
    (_FORMAT_PCM, 16): np.dtype("<i2"),
    (_FORMAT_PCM, 32): np.dtype("<i4"),
    (_FORMAT_FLOAT, 32): np.dtype("<f4"),
}
_SUPPORTED = "PCM 16/32-bit integer or 32-bit float, little-endian RIFF"
_MAX_HEADER_CHUNKS = 64  # bound the chunk walk on garbage input


@dataclass(frozen=True)
class WavInfo:
    """What the header says, after clamping to the file's real size."""

    path: str
    rate_hz: int          # header sample rate (an integer in WAV)
    channels: int
    dtype: np.dtype
    frames: int           # whole frames really present in the file
    data_offset: int      # byte offset of the first sample
    declared_data_bytes: int  # size the data chunk header claims

    @property
    def full_scale(self) -> float | None:
        if self.dtype.kind == "i":
            return float(np.iinfo(self.dtype).max)
        return None


def _fail(path: str, message: str) -> InputError:
    return InputError(f"{path}: {message}", path=path)


def read_wav_info(path: str | os.PathLike, *, quiet: bool = False) -> WavInfo:
    """Walk the RIFF chunks up to 'data'; raise InputError for what we cannot read.

    quiet: log size repairs at debug level (for a second look at a file whose
    header was already described)."""
    path = os.fspath(path)
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            riff = f.read(12)
            if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
                raise _fail(path, f"expected a RIFF/WAVE file (bytes 'RIFF'....'WAVE'), found "
                                  f"{riff[:4]!r}...{riff[8:12]!r}; {_SUPPORTED} is supported")
            fmt = None
            pos = 12
            for _ in range(_MAX_HEADER_CHUNKS):
                head = f.read(8)
                if len(head) < 8:
                    raise _fail(path, "no 'data' chunk before the end of the file "
                                      "(truncated header?)")
                chunk_id, size = struct.unpack("<4sI", head)
                pos += 8
                if chunk_id == b"fmt ":
                    fmt = f.read(min(size, 64))
                    if len(fmt) < 16:
                        raise _fail(path, f"'fmt ' chunk of {len(fmt)} bytes, expected >= 16")
                elif chunk_id == b"data":
                    if fmt is None:
                        raise _fail(path, "'data' chunk before the 'fmt ' chunk; expected fmt "
                                          "first (re-save the file with a standard tool)")
                    return _make_info(path, fmt, pos, size, file_size, quiet)
                pos += size + (size & 1)  # chunks are padded to even sizes
                f.seek(pos)
            raise _fail(path, f"no 'data' chunk in the first {_MAX_HEADER_CHUNKS} RIFF chunks")
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc}", path=path) from exc


def _make_info(path: str, fmt: bytes, data_offset: int, declared: int, file_size: int,
               quiet: bool) -> WavInfo:
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _FORMAT_EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack_from("<H", fmt, 24)[0]  # first two bytes of the sub-format GUID
    dtype = _DTYPES.get((tag, bits))
    if dtype is None:
        raise _fail(path, f"expected {_SUPPORTED}; found format tag 0x{tag:04x} with "
                          f"{bits} bits per sample")
    if channels < 1 or rate < 1:
        raise _fail(path, f"expected >= 1 channel and a rate >= 1 Hz, found {channels} "
                          f"channel(s) at {rate} Hz")
    frame = channels * dtype.itemsize
    if block_align != frame:
        raise _fail(path, f"block align {block_align} does not match {channels} channel(s) x "
                          f"{dtype.itemsize} bytes = {frame}")
    warn = log.debug if quiet else log.warning
    available = max(0, file_size - data_offset)
    size = declared
    if declared > available:
        warn("%s: data chunk declares %d bytes but only %d follow in the file "
                    "(placeholder size of an unfinished recording?); reading the %d present",
                    path, declared, available, available)
        size = available
    if size % frame:
        warn("%s: dropping %d trailing byte(s) that do not make a whole %d-byte frame",
                    path, size % frame, frame)
    return WavInfo(path, int(rate), int(channels), dtype, size // frame, data_offset, declared)


class WavReader:
    """Random access to the frames of one WAV file (read-only memory map).

    Use as a context manager, or call close(); frames are returned as new
    arrays [n, channels] of the file's dtype, never views of the map.
    """

    def __init__(self, path: str | os.PathLike, *, quiet: bool = False):
        self.info = read_wav_info(path, quiet=quiet)
        self._map: np.ndarray | None = None
        self._closed = False
        if self.info.frames:
            try:
                # a plain ndarray view of the map: slicing a np.memmap runs Python
                # (__array_finalize__) on every read, per chunk
                self._map = np.memmap(self.info.path, dtype=self.info.dtype, mode="r",
                                      offset=self.info.data_offset,
                                      shape=(self.info.frames, self.info.channels)
                                      ).view(np.ndarray)
            except (OSError, ValueError) as exc:
                raise InputError(f"{self.info.path}: cannot map the samples: {exc}",
                                 path=self.info.path) from exc

    def read(self, start: int, count: int) -> np.ndarray:
        """Frames [start, start+count) clipped to the file; may be shorter or empty."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, found {start}, {count}")
        if self._closed:
            raise ValueError(f"{self.info.path}: reader is closed")
        if self._map is None:
            return np.zeros((0, self.info.channels), dtype=self.info.dtype)
        return np.array(self._map[start:start + count])

    def close(self) -> None:
        # Dropping the only reference unmaps the file (CPython refcounting); the
        # arrays handed out are copies, so nothing else keeps the map alive.
        self._map = None
        self._closed = True

    def __enter__(self) -> "WavReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_wav(path: str | os.PathLike) -> tuple[WavInfo, np.ndarray]:
    """The whole file: (info, frames [n, channels] in the file's dtype)."""
    with WavReader(path) as reader:
        return reader.info, reader.read(0, reader.info.frames)
