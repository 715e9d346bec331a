"""An aligned window of one node: what the aligner emits and inference consumes."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Why a modality is missing from a window (Decision.missing_reason values).
REASON_GAP = "gap"            # too little data arrived for the window (unplugged, lost packets)
REASON_NAN = "nan"            # the data holds NaN/inf
REASON_FLATLINE = "flatline"  # constant signal
REASON_STUCK = "stuck"        # long runs of one repeated value
REASON_CLIPPED = "clipped"    # too many samples at the sensor's full scale
REASON_NO_STREAM = "no_stream"  # the node has never sent this modality
REASON_CLOCK_STEP = "clock_step"  # the stream's clock stepped inside the window


@dataclass
class Window:
    """Window ``index`` of ``node``: [index*hop_ns, index*hop_ns + window_ns).

    data[m] is float32 [channels, samples] on the model's grid for modality m;
    samples without data are 0 there. present[m] is False when m is missing,
    and then missing_reason[m] says why. coverage[m] is the fraction of the
    window's grid samples that had valid data.

    received_ns and closed_by say which pushed chunk emitted the window (the
    Pipeline stamps them; not data, not compared): the CLOCK_MONOTONIC ns at
    which a live source received that chunk (None offline) and its (node,
    modality, seq). The daemon measures decision latency from them. Windows
    emitted by the end of input (flush) carry None for both.
    """

    node: str
    index: int
    start_ns: int
    end_ns: int
    data: dict[str, np.ndarray]
    present: dict[str, bool]
    missing_reason: dict[str, str]
    coverage: dict[str, float]
    received_ns: int | None = field(default=None, compare=False, repr=False)
    closed_by: tuple[str, str, int] | None = field(default=None, compare=False, repr=False)
