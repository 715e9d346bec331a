"""The unit of data flowing through edgefuse: a chunk of samples of one stream.

A stream is one (node, modality). All times are int64 nanoseconds of the
device clock (UNIX epoch where the device has one); rates are float Hz.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgefuse.runtime.errors import InputError


@dataclass(frozen=True)
class Chunk:
    """Samples of one (node, modality).

    t0_ns:      device time of the first sample, int64 ns.
    rate_hz:    the actual sample rate where known, else the nominal one;
                None when unknown (the aligner then estimates it from t0_ns).
    samples:    float32 array [n, channels].
    seq:        sequence number, increasing per stream (gaps/duplicates are
                detected from it and from time).
    full_scale: the largest magnitude the sensor can report (e.g. 32767 for
                int16 PCM), used to detect clipping; None when unknown.
    """

    node: str
    modality: str
    t0_ns: int
    rate_hz: float | None
    samples: np.ndarray
    seq: int
    full_scale: float | None = None
    rate_is_nominal: bool = field(default=False, compare=False)
    # CLOCK_MONOTONIC ns at which a live source received the chunk (None offline);
    # the daemon measures decision latency from it. Not data: not compared.
    received_ns: int | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        s = self.samples
        if not isinstance(s, np.ndarray) or s.ndim != 2:
            found = getattr(s, "shape", type(s).__name__)
            raise InputError(
                f"chunk {self.node}/{self.modality} seq {self.seq}: samples must be a 2-D "
                f"array [n, channels], found {found}; reshape 1-channel data with x[:, None]"
            )
        if s.dtype != np.float32:
            object.__setattr__(self, "samples", np.ascontiguousarray(s, dtype=np.float32))
        elif not s.flags.c_contiguous:
            object.__setattr__(self, "samples", np.ascontiguousarray(s))
        if self.rate_hz is not None and not (0.0 < float(self.rate_hz) < 1e7):
            raise InputError(
                f"chunk {self.node}/{self.modality} seq {self.seq}: rate_hz must be in "
                f"(0, 1e7) Hz, found {self.rate_hz!r}"
            )
        object.__setattr__(self, "t0_ns", int(self.t0_ns))
        object.__setattr__(self, "seq", int(self.seq))

    @property
    def n(self) -> int:
        return int(self.samples.shape[0])

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])

    @property
    def stream(self) -> tuple[str, str]:
        return (self.node, self.modality)

    def end_ns(self) -> int:
        """Time just after the last sample (t0 + n / rate); needs a rate."""
        if self.rate_hz is None:
            raise InputError(f"chunk {self.node}/{self.modality} seq {self.seq} has no rate")
        return self.t0_ns + int(round(self.n * 1e9 / self.rate_hz))
