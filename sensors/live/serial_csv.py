"""CSV lines on a serial port: ``modality,t_ns,v1,v2,...``, one sample per line.

The lines carry no node (it comes from the settings) and no rate (given per
modality in the settings, else the aligner estimates it). Consecutive samples
of one modality are grouped into chunks (``CsvLineParser``); a pure parser
like those of sensors.live.serial_framing, whose ``Parser`` it shares: bytes
in, chunks out, everything else counted, every buffer bounded.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from edgefuse.runtime.core import wire
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.errors import InputError, WireFormatError
from edgefuse.sensors.live.accounting import BAD_CSV, RejectedMessage, check_modality
from edgefuse.sensors.live.serial_framing import Parser

if TYPE_CHECKING:  # the settings import this module
    from edgefuse.sensors.live.serial_source import SerialSettings


def encode_csv_lines(chunk: Chunk) -> bytes:
    """One ``modality,t_ns,v...`` line per sample; needs the chunk's rate for t_ns."""
    if chunk.rate_hz is None:
        raise WireFormatError("CSV lines carry one time per sample; the chunk needs a rate")
    period = 1e9 / chunk.rate_hz
    return b"".join(
        (f"{chunk.modality},{chunk.t0_ns + int(round(i * period))},"
         + ",".join(repr(float(v)) for v in row) + "\n").encode()
        for i, row in enumerate(chunk.samples))


class CsvLineParser(Parser):
    """``modality,t_ns,v1,...`` lines grouped into chunks of one modality.

    A chunk is emitted when it holds ``group_samples`` samples, or before a
    sample that changes the modality or channel count, goes back in time, or
    comes more than ``max_gap_ns`` after the previous one (default: 1.5
    periods when the modality's rate is configured, else 200 ms), and on
    ``flush()``. rate_hz is the configured rate of the modality, else None
    (the aligner estimates it). ``flushes`` counts why chunks were emitted.
    """

    DEFAULT_GAP_NS = 200_000_000

    def __init__(self, node: str, *, group_samples: int = 64, max_gap_ns: int | None = None,
                 rate_hz: Mapping[str, float] | None = None,
                 max_line_bytes: int = 4096, allowed: Iterable[str] | None = None):
        super().__init__(max_line_bytes, allowed)
        if not node:
            raise ValueError("CSV lines carry no node; give the node name")
        if not 1 <= group_samples <= 1 << 16:
            raise ValueError(f"group_samples must be 1..65536, found {group_samples!r}")
        self.node = node
        self.group_samples = group_samples
        self.max_gap_ns = max_gap_ns
        self.rate_hz = dict(rate_hz or {})
        self.flushes = {"size": 0, "modality": 0, "gap": 0, "backwards": 0, "channels": 0,
                        "explicit": 0}
        self._seq: dict[str, int] = {}
        self._modality: str | None = None
        self._times: list[int] = []
        self._rows: list[list[float]] = []

    @classmethod
    def from_settings(cls, s: SerialSettings, allowed: Iterable[str] | None) -> CsvLineParser:
        # one sample per line: 64 KiB is far beyond any real line and bounds the buffer
        return cls(s.node, group_samples=s.csv_group_samples, max_gap_ns=s.csv_max_gap_ns,
                   rate_hz=s.csv_rate_hz, max_line_bytes=min(s.max_line_bytes, 64 * 1024),
                   allowed=allowed)

    def stats(self) -> dict:
        """The parser's stats plus ``csv_flushes_<why>``: why chunks were cut."""
        out = super().stats()
        out.update((f"csv_flushes_{why}", n) for why, n in self.flushes.items())
        return out

    def _gap_ns(self, modality: str) -> int:
        if self.max_gap_ns is not None:
            return self.max_gap_ns
        rate = self.rate_hz.get(modality)
        return int(1.5e9 / rate) if rate else self.DEFAULT_GAP_NS

    def _emit(self, why: str) -> list[Chunk]:
        if not self._rows:
            return []
        modality, rows, t0 = self._modality, self._rows, self._times[0]
        self._rows, self._times = [], []
        self.flushes[why] += 1
        seq = self._seq.get(modality, 0)
        self._seq[modality] = seq + 1
        try:
            return [Chunk(self.node, modality, t0, self.rate_hz.get(modality),
                          np.asarray(rows, dtype=np.float32), seq)]
        except InputError as exc:
            self._error(BAD_CSV, f"samples that make no chunk: {str(exc)[:160]}", self.node,
                        modality)
        return []

    def _sample(self, line: bytes) -> tuple[str, int, list[float]] | None:
        try:
            fields_ = line.decode("ascii").split(",")
            modality = fields_[0].strip()
            t_ns = int(fields_[1])
            values = [float(v) for v in fields_[2:]]
        except (UnicodeDecodeError, ValueError, IndexError):
            return None
        if (not modality or not values or len(values) > wire.MAX_CHANNELS
                or not -(1 << 63) <= t_ns < (1 << 63)):
            return None
        return modality, t_ns, values

    def feed(self, data: bytes) -> list[Chunk]:
        out: list[Chunk] = []
        for line in self._lines(data):
            if not line.strip() or line.startswith(b"#"):
                continue
            sample = self._sample(line)
            if sample is None:
                self._error(BAD_CSV, f"expected 'modality,t_ns,v1,...' (at most "
                            f"{wire.MAX_CHANNELS} values), found {line[:60]!r}")
                continue
            modality, t_ns, values = sample
            try:
                check_modality(modality, self.allowed)
            except RejectedMessage as exc:
                self._error(exc.reason, str(exc), self.node, modality)
                continue
            if self._rows:
                last = self._times[-1]
                why = ("modality" if modality != self._modality
                       else "channels" if len(values) != len(self._rows[0])
                       else "backwards" if t_ns <= last
                       else "gap" if t_ns - last > self._gap_ns(modality) else None)
                if why:
                    out += self._emit(why)
            self._modality = modality
            self._times.append(t_ns)
            self._rows.append(values)
            if len(self._rows) >= self.group_samples:
                out += self._emit("size")
        return out

    def flush(self) -> list[Chunk]:
        """Emit the samples held back (call when the line goes idle)."""
        return self._emit("explicit")

    def idle(self) -> list[Chunk]:
        return self.flush()

    def reset(self) -> list[Chunk]:
        super().reset()
        return self.flush()
