"""The unit of data flowing through edgefuse: a chunk of samples of one stream.

A stream is one (node, modality). All times are int64 nanoseconds of the
device clock (UNIX epoch where the device has one); rates are float Hz.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgefuse.runtime.core.errors import InputError

# Bounds every chunk must meet wherever it enters (wire decoding, the aligner).
# One definition here, so the wire and the aligner cannot disagree.
#
# Rates: finite, >= RATE_MIN_HZ and < RATE_MAX_HZ. One sample per 1000 s is no
# sensor stream, and a subnormal or tiny rate makes one sample span an absurd
# time (5e-324 Hz overflows n / rate to inf). The aligner narrows the range
# further per modality (see ``edgefuse.runtime.core.rates.rate_range``).
RATE_MIN_HZ = 1e-3
RATE_MAX_HZ = 1e7
# Times: [0, 2**62) ns, i.e. 1970 .. year 2116. Negative device times are no
# clock we support, and staying a factor 2 inside int64 keeps t0 + span and
# grid arithmetic far from overflow in the Numba kernels.
T0_MIN_NS = 0
T0_MAX_NS = 1 << 62  # exclusive


def rate_ok(rate_hz: object) -> bool:
    """True for a real, finite rate in [RATE_MIN_HZ, RATE_MAX_HZ)."""
    if isinstance(rate_hz, bool) or not isinstance(rate_hz, (int, float, np.floating,
                                                            np.integer)):
        return False
    try:
        r = float(rate_hz)
    except OverflowError:  # a JSON integer beyond float range
        return False
    return math.isfinite(r) and RATE_MIN_HZ <= r < RATE_MAX_HZ


def t0_ok(t0_ns: int) -> bool:
    """True for a device time in [T0_MIN_NS, T0_MAX_NS)."""
    return T0_MIN_NS <= t0_ns < T0_MAX_NS


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

    Construction raises InputError for samples that are not [n, channels], a
    rate outside [RATE_MIN_HZ, RATE_MAX_HZ) and a t0/seq that is no integer.
    t0_ns itself may be any integer here (offline tools use relative times);
    the wire decoders and the aligner refuse t0 outside [T0_MIN_NS, T0_MAX_NS).
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
        if self.rate_hz is not None and not rate_ok(self.rate_hz):
            raise InputError(
                f"chunk {self.node}/{self.modality} seq {self.seq}: rate_hz must be a finite "
                f"number in [{RATE_MIN_HZ:g}, {RATE_MAX_HZ:g}) Hz or None (unknown), found "
                f"{self.rate_hz!r}; send the sensor's sample rate"
            )
        for name in ("t0_ns", "seq"):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, int(value))
            except (TypeError, ValueError, OverflowError):  # None, NaN, inf, text
                raise InputError(
                    f"chunk {self.node}/{self.modality}: {name} must be an integer, found "
                    f"{value!r}") from None

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
