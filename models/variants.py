"""Accuracy and speed of a model's fp32, INT8 and FP16 variants (no torch).

    python -m edgefuse.models.variants MODEL [DATA] [--out DIR]

For each variant (written by ``edgefuse.exporters.quantize`` into DIR):
file size, accuracy / macro-F1 with all modalities on the model's held-out
windows (and the change versus fp32), ORT time per window at batch 1 and 64
(1 intra-op thread; best of 3 interleaved rounds of medians; timings of one machine are comparable only with
each other).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from edgefuse.exporters.quantize import quantize_model, time_per_window_us
from edgefuse.models.evaluate import calibration_windows, evaluate_on_data


def variants_report(model: str, data_dir: str, out_dir: str, rounds: int = 3) -> list[dict]:
    files = {"fp32": model}
    cal = calibration_windows(model, data_dir)
    for mode in ("int8", "int8-static", "fp16"):
        dst = Path(out_dir) / f"{Path(model).stem}.{mode}.onnx"
        files[mode] = quantize_model(model, dst, mode,
                                     calibration=cal if mode == "int8-static" else None)[0]
    # Interleaved rounds, best median of each: other processes share this machine's cores.
    timing = {mode: {"us_b1": float("inf"), "us_b64": float("inf")} for mode in files}
    for _ in range(rounds):
        for mode, path in files.items():
            t = timing[mode]
            t["us_b1"] = min(t["us_b1"], time_per_window_us(path, 1, 200))
            t["us_b64"] = min(t["us_b64"], time_per_window_us(path, 64, 40))
    rows = []
    for mode, path in files.items():
        res = evaluate_on_data(path, data_dir)["conditions"]
        size = sum(os.path.getsize(p) for p in Path(path).parent.glob(Path(path).stem + "*.onnx")
                   if p.name.count(".") == Path(path).name.count(".") or p == Path(path))
        rows.append({"variant": mode, "bytes_main": os.path.getsize(path), "bytes_all": size,
                     "accuracy": res["all"]["accuracy"], "macro_f1": res["all"]["macro_f1"],
                     "worst_without_accuracy": min(r["accuracy"] for k, r in res.items()
                                                   if k.startswith("without:")),
                     **timing[mode]})
    ref = rows[0]
    for r in rows:
        r["d_accuracy_points"] = 100 * (r["accuracy"] - ref["accuracy"])
        r["d_macro_f1_points"] = 100 * (r["macro_f1"] - ref["macro_f1"])
        r["speedup_b1"] = ref["us_b1"] / r["us_b1"]
        r["speedup_b64"] = ref["us_b64"] / r["us_b64"]
    return rows


def format_rows(rows: list[dict]) -> str:
    out = [f"{'variant':<12}{'KiB':>7}{'acc':>7}{'dAcc':>7}{'F1':>7}{'dF1':>7}"
           f"{'us/win b1':>11}{'x':>6}{'us/win b64':>12}{'x':>6}"]
    for r in rows:
        out.append(f"{r['variant']:<12}{r['bytes_main'] / 1024:7.1f}{r['accuracy']:7.3f}"
                   f"{r['d_accuracy_points']:+7.1f}{r['macro_f1']:7.3f}"
                   f"{r['d_macro_f1_points']:+7.1f}{r['us_b1']:11.1f}{r['speedup_b1']:6.2f}"
                   f"{r['us_b64']:12.1f}{r['speedup_b64']:6.2f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgefuse.models.variants")
    p.add_argument("model")
    p.add_argument("data", nargs="?", default=None)
    p.add_argument("--out", default=None, help="folder for the variants (default: a temp dir)")
    args = p.parse_args(argv)
    from edgefuse.models.segments import default_data_dir
    data = args.data or default_data_dir()
    with tempfile.TemporaryDirectory() as tmp:
        print(format_rows(variants_report(args.model, data, args.out or tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
