"""Do a raw seismic recording and its acoustic counterpart stay aligned?

The goodvibes nodes record acoustic (Ch1, ~9866 Hz) and seismic (Ch2, e.g.
1528.3 Hz) in separate files whose clocks and rates differ from the nominal
9868 / 1600 Hz. This script takes such a pair, adds the same click to both
recordings at the same true instants (rendered at each file's own sample
times from its sidecar: sensorTime + i / sampleRateActual), runs them through
the runtime's aligner and measures where each click lands in each modality.

With the sidecar rates the clicks of both modalities coincide to within a
millisecond or two over the whole file; placed at the nominal rates (what a
reader that ignores the sidecar would do) they drift apart by more than a
hop within seconds.

    python examples/check_alignment.py [ACOUSTIC.wav SEISMIC.wav]

Default: the only pair in the data pack (Node81, cochise 2023-04-11 18:20,
30 s: the recording ended early), committed under tests/data.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from edgefuse.runtime.core.aligner import Aligner
from edgefuse.runtime.core.chunk import Chunk
from edgefuse.runtime.core.contract import ModelContract
from edgefuse.sensors.readers.goodvibes import iter_raw_wav, raw_wav_info

RAW = Path(__file__).resolve().parents[1] / "tests" / "data" / "goodvibes" / "raw"
PAIR = (RAW / "Node81-Ch1-23-2023_04_11_18_20_00-9866Hz.wav",
        RAW / "Node81-Ch2-23-2023_04_11_18_20_00-1528Hz.wav")
CLICK_EVERY_S = 1.7
CLICK_SIGMA_S = 0.004
RATES = {"acoustic": 4934.0, "seismic": 800.0}


def contract() -> ModelContract:
    return ModelContract.from_dict({
        "contract": 1, "name": "alignment-check", "version": "1",
        "modalities": [{"name": m, "channels": 1, "rate_hz": r, "input": m}
                       for m, r in RATES.items()],
        "window_ns": 1_000_000_000, "hop_ns": 500_000_000, "labels": ["a", "b"],
        "mask_input": "modality_mask", "output": "scores"})


def clicked_chunks(path: Path, clicks_ns: np.ndarray, placement_rate: float | None):
    """The recording's chunks with clicks added at their true instants; optionally
    re-stamped as if the file ran at placement_rate (the uncorrected view)."""
    info = raw_wav_info(path)
    amp = 50.0 * float(np.std(next(iter_raw_wav(path)).samples)) + 100.0
    out, first = [], 0
    for c in iter_raw_wav(path):
        t = (c.t0_ns - info.t0_ns) / 1e9 + np.arange(c.n) / info.rate_hz  # true seconds
        rel = (clicks_ns - info.t0_ns) / 1e9
        pulse = np.zeros(c.n)
        for r in rel[(rel > t[0] - 0.05) & (rel < t[-1] + 0.05)]:
            pulse += amp * np.exp(-0.5 * ((t - r) / CLICK_SIGMA_S) ** 2)
        rate = placement_rate or c.rate_hz
        t0 = info.t0_ns + int(round(first * 1e9 / rate))
        out.append(Chunk(c.node, c.modality, t0, rate, c.samples + pulse[:, None].astype(
            np.float32), c.seq))
        first += c.n
    return out, info


def click_positions(windows, clicks_ns, modality):
    """Time of each click's peak as it appears in the aligned windows (ns)."""
    fs = RATES[modality]
    found = {}
    for w in windows:
        x = w.data[modality][0]
        for j, tc in enumerate(clicks_ns):
            if not (w.start_ns + 0.2e9 < tc < w.end_ns - 0.2e9) or j in found:
                continue
            centre = int(round((tc - w.start_ns) * fs / 1e9))
            lo, hi = max(0, centre - int(0.3 * fs)), min(len(x), centre + int(0.3 * fs))
            k = lo + int(np.argmax(x[lo:hi]))
            found[j] = w.start_ns + k * 1e9 / fs
    return found


def measure(acoustic: Path, seismic: Path, nominal: bool = False
            ) -> list[tuple[float, float, float]]:
    ia, is_ = raw_wav_info(acoustic), raw_wav_info(seismic)
    start = max(ia.t0_ns, is_.t0_ns) + 500_000_000
    end = min(ia.t0_ns + int(ia.frames * 1e9 / ia.rate_hz),
              is_.t0_ns + int(is_.frames * 1e9 / is_.rate_hz)) - 500_000_000
    clicks = np.arange(start, end, int(CLICK_EVERY_S * 1e9), dtype=np.int64)
    rate_a = float(ia.sidecar.get("sampleRateNominal", 9868)) if nominal else None
    rate_s = float(is_.sidecar.get("sampleRateNominal", 1600)) if nominal else None
    ca, _ = clicked_chunks(acoustic, clicks, rate_a)
    cs, _ = clicked_chunks(seismic, clicks, rate_s)
    aligner = Aligner(contract())
    windows = []
    for c in sorted(ca + cs, key=lambda c: (c.t0_ns, c.modality)):
        windows += aligner.push(c)
    windows += aligner.flush()
    pa, ps = click_positions(windows, clicks, "acoustic"), click_positions(windows, clicks,
                                                                           "seismic")
    return [((clicks[j] - clicks[0]) / 1e9, (pa[j] - clicks[j]) / 1e6, (ps[j] - clicks[j]) / 1e6)
            for j in sorted(set(pa) & set(ps))]


def main(argv: list[str]) -> int:
    import logging
    logging.basicConfig(level=logging.ERROR)
    acoustic, seismic = (Path(argv[0]), Path(argv[1])) if len(argv) == 2 else PAIR
    ia, is_ = raw_wav_info(acoustic), raw_wav_info(seismic)
    print(f"pair: {acoustic.name} ({ia.rate_hz} Hz) + {seismic.name} ({is_.rate_hz} Hz)")
    rows = measure(acoustic, seismic, nominal=False)
    print("click time in the aligned windows minus true time (ms); drift if placed at the "
          "nominal rate (ms)")
    print("   t (s)   acoustic   seismic   acoustic-seismic   |  nominal: acoustic  seismic")
    nom_a = float(ia.sidecar.get("sampleRateNominal", 9868))
    nom_s = float(is_.sidecar.get("sampleRateNominal", 1600))
    for t, ea, es in rows:
        # A sample recorded t seconds in is placed at t * actual / nominal when the
        # actual rate is ignored.
        da, ds = t * (ia.rate_hz / nom_a - 1) * 1e3, t * (is_.rate_hz / nom_s - 1) * 1e3
        print(f"{t:8.1f} {ea:10.2f} {es:9.2f} {ea - es:14.2f}       | {da:14.1f} {ds:9.1f}")
    worst = max(abs(ea - es) for _, ea, es in rows)
    print(f"max |acoustic - seismic| = {worst:.2f} ms over {rows[-1][0]:.1f} s "
          f"(one hop = 500 ms); {len(rows)} clicks")
    span = 300.0
    print(f"at the nominal rates a full 5-minute file would drift "
          f"{span * (is_.rate_hz / nom_s - 1):+.2f} s (seismic) and "
          f"{span * (ia.rate_hz / nom_a - 1):+.3f} s (acoustic)")
    return 0 if worst < 500 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
