"""Build examples/data/sample.mcap, the demo's log, from real goodvibes passes.

    python examples/make_sample.py [--data tests/data/goodvibes] [-o examples/data/sample.mcap]

Contents: three close passes with acoustic + seismic (nodes 123, 129, 121)
and the full run 3A.9.81, which has no acoustic recording, cut to the 20 s
around the vehicle's closest approach. Every node appears once, so the log
has no day-long gaps inside a node's stream. The output is deterministic.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import wave
from decimal import Decimal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from edgefuse.sensors.readers.goodvibes import load_pass  # noqa: E402
from edgefuse.sensors.readers.inputs import record  # noqa: E402
from edgefuse.sensors.readers.wavfile import read_wav  # noqa: E402

CLOSE = ["passes/close/2D.16.123", "passes/close/2H.22.129", "passes/close/3A.9.121"]
FULL_MISSING_ACOUSTIC = "passes/full/3A.9.81"
TRIM_S = 20


def trim_pass(src: str, dst: str, seconds: float) -> str:
    """Copy a pass folder keeping `seconds` around its CPA; meta.json times shifted
    (Decimal arithmetic, written as float like the source) so the cut samples keep
    their original timestamps to within 0.2 us."""
    info = load_pass(src)
    with open(os.path.join(src, "meta.json")) as f:
        meta = json.load(f, parse_float=Decimal)
    os.makedirs(dst)
    for name, m in meta["modalities"].items():
        wav_info, frames = read_wav(os.path.join(src, f"{name}.wav"))
        rate = m["rate_hz"]  # the labelled time base, where the CPA time lives
        cpa = Decimal(info.cpa_ns) / Decimal(10**9)
        centre = int((cpa - m["t0_unix_s"]) * rate)
        n = int(seconds * float(rate))
        start = min(max(0, centre - n // 2), max(0, len(frames) - n))
        cut = frames[start:start + n]
        with wave.open(os.path.join(dst, f"{name}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(wav_info.rate_hz)
            w.writeframes(cut.astype("<i2").tobytes())
        m["t0_unix_s"] += Decimal(start) / rate
        m["t0_unix_s_sensor_clock"] += Decimal(start) / m["sensor_rate_hz_actual"]
        m["samples"] = len(cut)
        m.pop("source_segments", None)  # no longer describes the cut
        m["trimmed_from_sample"] = start
    with open(os.path.join(dst, "meta.json"), "w") as f:
        # float: the source stored float seconds too (~0.2 us resolution at 1.7e9 s)
        json.dump(meta, f, indent=2, default=float)
    shutil.copy(os.path.join(src, "distance.csv"), dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "tests", "data", "goodvibes"),
                    help="goodvibes root holding passes/ (default: the test fixtures)")
    ap.add_argument("-o", "--out", default=os.path.join(ROOT, "examples", "data", "sample.mcap"))
    args = ap.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        full = os.path.join(args.data, FULL_MISSING_ACOUSTIC)
        trimmed = trim_pass(full, os.path.join(tmp, os.path.basename(full)), TRIM_S)
        paths = [os.path.join(args.data, p) for p in CLOSE] + [trimmed]
        names = CLOSE + [f"{FULL_MISSING_ACOUSTIC} (seismic only, {TRIM_S} s around CPA)"]
        counts = record(paths, args.out, chunk_s=1.0,
                        metadata={"sources": "; ".join(names),
                                  "data": "goodvibes (MIT), see tests/data/README.md"})
    print(f"wrote {args.out}: {counts['bytes']} bytes, {counts['chunks']} chunks, "
          f"{counts['samples']} samples, compression {counts['compression']}")
    for stream, n in sorted(counts["per_stream"].items()):
        print(f"  {stream}: {n} chunks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
