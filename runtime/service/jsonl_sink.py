"""The JSON Lines sink: one canonical JSON line per decision, to a file or a stream.

Its own module so that ``edgefuse replay``, which writes only JSON lines, does
not import the MQTT sink (paho, sqlite, the outbox: ~25 ms of every replay's
start-up); runtime.service.sinks re-exports it with the other sinks.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from edgefuse.runtime.core.decision import Decision
from edgefuse.runtime.core.errors import ConfigError, EdgefuseError
from edgefuse.runtime.service.sink_base import Sink

__all__ = ["JsonlSink"]


class JsonlSink(Sink):
    """JSON Lines to ``target``: a path, "-" for stdout, or an open text stream.

    A path is opened by open() (truncated unless append=True) and closed by
    close(); a stream (stdout too) stays the caller's: close() only flushes it.
    fsync=True fsyncs a path on every flush().
    """

    def __init__(self, target: str | Path | TextIO = "-", *, append: bool = False,
                 fsync: bool = False, name: str = "jsonl"):
        self.name = name
        self._target = target  # as given, for messages
        self._path = Path(target) if isinstance(target, (str, Path)) and target != "-" else None
        self._append = append
        self._fsync = fsync
        # A stream is already open (taking it is no I/O); a path waits for open().
        self._file: TextIO | None = None if self._path is not None else \
            (sys.stdout if target == "-" else target)
        self._written = 0

    def open(self) -> None:
        if self._file is not None or self._path is None:
            return  # open already, or a stream given (after close() it stays closed)
        try:
            self._file = open(self._path, "a" if self._append else "w",  # noqa: SIM115
                              encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot write decisions to {self._target}: "
                              f"{exc.strerror or exc}; choose a writable [sink.jsonl] path "
                              "(--out FILE, or --out - for stdout)") from exc

    def write_many(self, decisions: Sequence[Decision]) -> None:
        if self._file is None:
            raise EdgefuseError(f"sink {self.name} is not open: call open() before writing "
                                "(or use the sink as a context manager)")
        self._file.write("".join([d.to_json() + "\n" for d in decisions]))
        self._written += len(decisions)

    def flush(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        if self._fsync and self._path is not None:
            os.fsync(self._file.fileno())

    def stats(self) -> dict:
        return {"written": self._written}

    def close(self) -> None:
        if self._file is None:
            return
        try:
            self.flush()
        finally:
            if self._path is not None:
                self._file.close()
            self._file = None
