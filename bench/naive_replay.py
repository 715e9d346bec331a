"""The script a user would write without edgefuse: goodvibes passes through an ONNX model.

    python bench/naive_replay.py PASS_OR_FOLDER MODEL.onnx --out decisions.jsonl

The baseline bench/replay.py runs as a whole process beside ``edgefuse replay``.
What a careful user writes in an afternoon, with the usual libraries:
scipy reads each WAV, pandas holds each stream as a Series indexed by sample
time (meta.json's sensor-clock t0 and rate), windows of the model's length
every hop (on the hop grid since the epoch, as edgefuse cuts them) are
sliced with ``.loc`` (binary search on the sorted index) and interpolated
with ``np.interp`` onto the model's input length; one ONNX Runtime call per
window (one thread), a missing modality zero-filled and masked; one JSON
line per window. It imports nothing of edgefuse: the model's input names,
rates, window and hop come from the model's metadata.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# onnxruntime 1.32 looks up its telemetry collector after ~30 s of inference
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.io import wavfile  # noqa: E402


def load_streams(folder: Path) -> tuple[str, dict[str, pd.Series]]:
    meta = json.loads((folder / "meta.json").read_text())
    streams = {}
    for name, m in meta["modalities"].items():
        wav = folder / f"{name}.wav"
        if not wav.is_file():
            continue
        _, x = wavfile.read(wav)
        t0 = m.get("t0_unix_s_sensor_clock", m["t0_unix_s"])
        rate = m.get("sensor_rate_hz_actual", m["rate_hz"])
        t_ns = np.round((t0 + np.arange(len(x)) / rate) * 1e9).astype(np.int64)
        streams[name] = pd.Series(x.astype(np.float32), index=pd.to_datetime(t_ns, unit="ns"))
    return str(meta["node"]), streams


def replay_pass(folder: Path, session: ort.InferenceSession, contract: dict, out) -> int:
    node, streams = load_streams(folder)
    if not streams:
        return 0
    window, hop = contract["window_ns"], contract["hop_ns"]
    first = max(s.index[0].value for s in streams.values())
    last = min(s.index[-1].value for s in streams.values())
    start = -(-first // hop) * hop
    mods = contract["modalities"]
    mask = np.array([[1.0 if m["name"] in streams else 0.0 for m in mods]], np.float32)
    labels = contract["labels"]
    written = 0
    while start + window <= last:
        feed = {contract["mask_input"]: mask}
        for m in mods:
            n = int(round(m["rate_hz"] * window / 1e9))
            if m["name"] not in streams:
                feed[m["input"]] = np.zeros((1, m["channels"], n), np.float32)
                continue
            seg = streams[m["name"]].loc[pd.Timestamp(start, unit="ns"):
                                         pd.Timestamp(start + window, unit="ns")]
            grid = start + np.arange(n) * (1e9 / m["rate_hz"])
            feed[m["input"]] = np.interp(grid, seg.index.asi8, seg.to_numpy()
                                         ).astype(np.float32)[None, None]
        logits = session.run([contract["output"]], feed)[0][0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out.write(json.dumps({"node": node, "window_start_ns": int(start),
                              "label": labels[int(p.argmax())],
                              "scores": {k: round(float(v), 6) for k, v in zip(labels, p)}})
                  + "\n")
        written += 1
        start += hop
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", type=Path, help="a pass folder or a folder of them")
    ap.add_argument("model", type=Path)
    ap.add_argument("--out", default="-")
    args = ap.parse_args(argv)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    contract = json.loads(session.get_modelmeta().custom_metadata_map["edgefuse"])
    folders = sorted(p.parent for p in args.input.rglob("meta.json"))
    out = sys.stdout if args.out == "-" else open(args.out, "w")  # noqa: SIM115
    try:
        total = sum(replay_pass(f, session, contract, out) for f in folders)
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"naive replay: {len(folders)} passes, {total} windows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
