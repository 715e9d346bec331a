"""Replay stage by stage, in memory, on one core, against pandas + ORT/torch per window.

    python bench/replay_stages.py [--minutes 60] [--baseline-minutes 10] [--core N] [--json]

The figures users see are bench/replay.py's (the whole ``edgefuse replay``
process, start-up and log reading included); this one breaks the streaming
core down by stage, with log decoding and start-up left out.

Workload: one node, three streams for ``--minutes`` (default one hour):
acoustic 9866.44 Hz, seismic 1605.23 Hz, imu 6 ch at 100.0 Hz (the real,
drifting rates), 1 s chunks, real sample values when ../shared/data exists
(bench/_workload.py). Model: bench_3m (acoustic + seismic + imu; 1 s windows,
0.5 s hop). Measured in one process, pinned to one core, one thread
everywhere (ORT intra-op 1, torch 1, BLAS/OpenMP 1):

1. alignment + windowing alone: Aligner push/flush, no inference;
2. end to end: Pipeline push/flush (max_batch 64) -> Decision objects, with
   its stage breakdown (aligner, ORT, fusion bookkeeping); JSON lines timed
   apart;
3. baseline (a): a pandas DataFrame per stream indexed by time, ``.loc``
   label slicing per window (binary search), ``np.interp`` onto the model's
   input length, one ONNX Runtime call per window;
4. baseline (b): the same slicing, then PyTorch eager per window with the
   same weights.

The baselines run over the first ``--baseline-minutes`` (they are slow) on
the same windows edgefuse emitted; their throughput is per stream-second,
so spans of different length compare. Their decisions are compared with
edgefuse's (argmax agreement, score correlation) to show they compute the
same thing. The workload is built in memory before timing: log reading and
decoding are not in these numbers (bench/startup.py times a whole CLI run).
Each edgefuse stage runs ``--repeat`` times; the table shows the least wall
and the least CPU time (CPU time is what the stage costs when no other
process takes the core: on a shared machine, read that column).
A benchmark, not a test: it asserts nothing about speed.
"""
from __future__ import annotations

import os

# One thread everywhere, set before numpy/numba/torch load their pools.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench._workload import (DEFAULT_DATA, T0_NS, Clock, Timed, TimedSession,  # noqa: E402
                             Workload, environment, loadavg, make_workload, pin_to_core,
                             resolve_model, torch_twin)
from edgefuse.runtime.core.aligner import Aligner, AlignerConfig  # noqa: E402
from edgefuse.runtime.core.inference import OnnxModel, session_options  # noqa: E402
from edgefuse.runtime.core.pipeline import Pipeline, PipelineConfig  # noqa: E402

TARGETS = {"end_to_end_x_realtime": 2000.0, "vs_baseline_a": 3.0, "vs_baseline_b": 5.0,
           "align_x_realtime": 10000.0}
WARMUP_S = 45.0          # > 64 windows: the warm-up runs a full batch too
KERNELS = ("_lowpass4", "_resample_into", "_mark_gap", "_window_stats")


# -- edgefuse ------------------------------------------------------------------
def run_align(model: OnnxModel, chunks) -> tuple[Timed, int]:
    aligner = Aligner(model.contract, AlignerConfig())
    windows = 0
    with Clock() as clk:
        for c in chunks:
            windows += len(aligner.push(c))
        windows += len(aligner.flush())
    return Timed(clk.wall_s, clk.cpu_s), windows


def run_align_kernels(model: OnnxModel, chunks) -> dict[str, float]:
    """One more alignment pass with every Numba kernel wrapped in a timer (the
    stream and aligner look kernels up on the module at each call). A separate
    run: the wrappers add ~0.3 us per call, so it is not the timed one."""
    from edgefuse.runtime.core import kernels
    spent = dict.fromkeys(KERNELS, 0.0)
    originals = {name: getattr(kernels, name) for name in KERNELS}

    def timed(name, fn):
        def call(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[name] += time.perf_counter() - t
        return call

    for name, fn in originals.items():
        setattr(kernels, name, timed(name, fn))
    try:
        t, _ = run_align(model, chunks)
    finally:
        for name, fn in originals.items():
            setattr(kernels, name, fn)
    parts = {f"Numba {name}": sec for name, sec in spent.items() if sec > 0}
    parts["Python: chunk bookkeeping, Window objects"] = t.wall_s - sum(spent.values())
    parts["(instrumented run total)"] = t.wall_s
    return parts


def run_pipeline(model: OnnxModel, chunks, max_batch: int):
    timed_session = TimedSession(model.session)
    model.session = timed_session
    try:
        pipeline = Pipeline(model, PipelineConfig(max_batch=max_batch))
        decisions = []
        with Clock() as clk:
            for c in chunks:
                decisions.extend(pipeline.push(c))
            decisions.extend(pipeline.flush())
    finally:
        model.session = timed_session._session
    t = Timed(clk.wall_s, clk.cpu_s)
    align_s, infer_s = pipeline.timing["align_s"], pipeline.timing["infer_s"]
    t.parts = {"aligner (resample, filter, windows)": align_s,
               "ONNX Runtime session.run": timed_session.seconds,
               "fusion (stack batches, softmax, Decision objects)": infer_s - timed_session.seconds,
               "pipeline loop and batching": clk.wall_s - align_s - infer_s}
    with Clock() as js:
        lines = [d.to_json() for d in decisions]
    t.parts["(apart) JSON lines of the decisions"] = js.wall_s
    del lines
    return t, decisions, pipeline.stats(), timed_session.calls


# -- the baselines: the script a user would write ------------------------------
def make_frames(workload: Workload, seconds: float) -> dict:
    """One DataFrame per stream, indexed by sample time (DatetimeIndex, sorted)."""
    import pandas as pd
    frames = {}
    for modality, x in workload.signals.items():
        spec = workload.spec(modality)
        n = min(len(x), int(seconds * spec.rate_hz) + int(2 * spec.rate_hz))
        cols = ["value"] if x.shape[1] == 1 else [f"c{i}" for i in range(x.shape[1])]
        index = pd.DatetimeIndex(pd.to_datetime(workload.times_ns(modality, n), unit="ns"))
        frames[modality] = pd.DataFrame(x[:n], index=index, columns=cols)
    return frames


def baseline_window(frames: dict, contract, start_ns: int) -> dict[str, np.ndarray]:
    """Slice each stream with .loc (label slicing on a sorted index = binary search)
    and interpolate it onto the model's input length."""
    import pandas as pd
    out = {}
    for m in contract.modalities:
        n = m.samples(contract.window_ns)
        seg = frames[m.name].loc[pd.Timestamp(start_ns): pd.Timestamp(start_ns + contract.window_ns)]
        t = seg.index.asi8
        grid = start_ns + np.arange(n) * (1e9 / m.rate_hz)
        out[m.input] = np.stack([np.interp(grid, t, seg[col].to_numpy()) for col in seg.columns]
                                ).astype(np.float32)[None]
    return out


def run_baseline_ort(frames, model_path: Path, contract, starts) -> tuple[Timed, np.ndarray]:
    import onnxruntime as ort
    session = ort.InferenceSession(str(model_path), session_options(1),
                                   providers=["CPUExecutionProvider"])
    mask = np.ones((1, len(contract.modalities)), np.float32)
    logits = np.zeros((len(starts), len(contract.labels)), np.float32)
    prep = 0.0
    for s in starts[:3]:  # warm-up
        session.run([contract.output], {**baseline_window(frames, contract, s),
                                        contract.mask_input: mask})
    with Clock() as clk:
        for i, s in enumerate(starts):
            t = time.perf_counter()
            feed = baseline_window(frames, contract, s)
            prep += time.perf_counter() - t
            feed[contract.mask_input] = mask
            logits[i] = session.run([contract.output], feed)[0][0]
    t = Timed(clk.wall_s, clk.cpu_s,
              {"pandas .loc slicing + np.interp": prep,
               "ONNX Runtime, one call per window": clk.wall_s - prep})
    return t, logits


def run_baseline_torch(frames, net, contract, starts) -> tuple[Timed, np.ndarray]:
    import torch
    mask = torch.ones(1, len(contract.modalities))
    logits = np.zeros((len(starts), len(contract.labels)), np.float32)
    names = [m.input for m in contract.modalities]
    prep = 0.0
    with torch.inference_mode():
        for s in starts[:3]:  # warm-up
            feed = baseline_window(frames, contract, s)
            net(*[torch.from_numpy(feed[k]) for k in names], mask)
        with Clock() as clk:
            for i, s in enumerate(starts):
                t = time.perf_counter()
                feed = baseline_window(frames, contract, s)
                prep += time.perf_counter() - t
                logits[i] = net(*[torch.from_numpy(feed[k]) for k in names], mask)[0].numpy()
    t = Timed(clk.wall_s, clk.cpu_s,
              {"pandas .loc slicing + np.interp": prep,
               "PyTorch eager, one call per window": clk.wall_s - prep})
    return t, logits


def agreement(ours_top: np.ndarray, ours_p: np.ndarray, logits: np.ndarray) -> dict:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    same = float(np.mean(ours_top == p.argmax(axis=1))) if len(p) else float("nan")
    corr = float(np.corrcoef(ours_p, p[:, -1])[0, 1]) if len(p) > 2 else float("nan")
    return {"argmax_agreement_pct": round(100 * same, 2),
            "p_last_label_corr": round(corr, 4),
            "median_abs_p_diff": round(float(np.median(np.abs(ours_p - p[:, -1]))), 4)}


# -- report --------------------------------------------------------------------
def _x(span_s: float, wall_s: float) -> float:
    return span_s / wall_s if wall_s > 0 else float("inf")


def print_table(r: dict) -> None:
    print(f"edgefuse replay benchmark: {r['workload']['minutes']:g} min, one node, "
          f"{r['workload']['windows']} windows; core {r['core']}; load before/after "
          f"{r['load_before']} / {r['load_after']}")
    print(f"  workload: {r['workload']['source']}")
    print(f"  model: {r['model']['ident']} ({r['model']['origin']})")
    print(f"  CPU: {r['env']['cpu']}")
    print()
    print(f"  {'stage':<52} {'span s':>8} {'wall s':>8} {'cpu s':>8} {'x real time':>12} "
          f"{'x (cpu s)':>10}")
    for key, label in (("align", "alignment + windowing alone"),
                       ("end_to_end", "edgefuse end to end (Pipeline, batch 64)"),
                       ("baseline_a", "baseline (a) pandas .loc + np.interp + ORT/window"),
                       ("baseline_b", "baseline (b) pandas .loc + np.interp + torch/window")):
        s = r["stages"].get(key)
        if s is None:
            continue
        print(f"  {label:<52} {s['span_s']:>8.0f} {s['wall_s']:>8.3f} {s['cpu_s']:>8.3f} "
              f"{s['x_realtime']:>12,.0f} {s['x_realtime_cpu']:>10,.0f}")
        parts = s.get("parts", {})
        total = parts.get("(instrumented run total)", s["wall_s"])
        for part, sec in parts.items():
            share = 100 * sec / total if total > 0 else 0.0
            print(f"      {part:<48} {'':>8} {sec:>8.3f} {'':>8} {share:>11.1f}%")
    print()
    print(f"  {'figure':<28} {'wall':>10} {'cpu s':>10}   target")
    for key, target in TARGETS.items():
        val, val_cpu = r["ratios"].get(key), r["ratios_cpu"].get(key)
        if val is not None:
            verdict = "meets" if val >= target else "BELOW"
            print(f"  {key:<28} {val:>10,.1f} {val_cpu:>10,.1f}   >= {target:,.0f}: {verdict} "
                  "(wall)")
    for key in ("baseline_a", "baseline_b"):
        if key in r.get("agreement", {}):
            print(f"  agreement with {key}: {r['agreement'][key]}")
    w = r["workload"]
    print(f"  routes (edgefuse decisions): {w['routes']}; share labelled "
          f"{w['last_label']!r}: {w['last_label_share_pct']}%; missing: {w['missing']}")
    if r.get("notes"):
        print()
        for note in r["notes"]:
            print(f"  note: {note}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="workload length (default 60)")
    ap.add_argument("--baseline-minutes", type=float, default=10.0,
                    help="span the baselines run over (default 10; capped at --minutes)")
    ap.add_argument("--chunk-s", type=float, default=1.0, help="chunk length in seconds")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="data pack with goodvibes/ and sp-sw-har/ (else synthetic noise)")
    ap.add_argument("--model", default=None,
                    help="model file (default: bundled bench_3m.onnx, else exported here)")
    ap.add_argument("--core", type=int, default=None,
                    help="CPU core to pin to (default: the last one); -1: do not pin")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3,
                    help="run the edgefuse stages this many times, keep the fastest (default 3)")
    ap.add_argument("--skip-torch", action="store_true", help="leave out baseline (b)")
    ap.add_argument("--json", action="store_true", help="end with one JSON line of all numbers")
    return ap.parse_args(argv)


def edgefuse_stages(model: OnnxModel, workload: Workload, args) -> tuple[dict, list, dict, int]:
    """Warm up, then time alignment alone and the whole pipeline (best of --repeat)."""
    seconds = workload.seconds
    chunks = workload.chunks(args.chunk_s)
    p = Pipeline(model, PipelineConfig(max_batch=args.max_batch))
    for c in workload.chunks(args.chunk_s, seconds=min(WARMUP_S, seconds)):
        p.push(c)  # Numba kernels compile or load from the cache; ORT's first calls
    p.flush()
    repeat = max(1, args.repeat)
    align_runs = [run_align(model, chunks)[0] for _ in range(repeat)]
    align_t = min(align_runs, key=lambda t: t.wall_s)
    align_t.cpu_s = min(t.cpu_s for t in align_runs)
    align_t.parts = run_align_kernels(model, chunks)
    e2e_runs = [run_pipeline(model, chunks, args.max_batch) for _ in range(repeat)]
    e2e_t, decisions, stats, ort_calls = min(e2e_runs, key=lambda r: r[0].wall_s)
    e2e_t.cpu_s = min(r[0].cpu_s for r in e2e_runs)
    stages = {"align": _stage(align_t, seconds), "end_to_end": _stage(e2e_t, seconds)}
    return stages, decisions, {"chunks": len(chunks), "routes": stats["fusion"]["decisions"],
                               "windows": stats["aligner"]["windows"]}, ort_calls


def baseline_stages(bench_model, contract, workload: Workload, decisions, args,
                    stages: dict, notes: list) -> dict:
    """Both baselines over the first --baseline-minutes, on the windows edgefuse decided
    with every modality present; returns the agreement figures."""
    labels = contract.labels
    base_seconds = min(args.baseline_minutes, args.minutes) * 60.0
    base_end = T0_NS + int(base_seconds * 1e9)
    chosen = [d for d in decisions if d.fallback == "none" and d.window_end_ns <= base_end]
    starts = [d.window_start_ns for d in chosen]
    ours_top = np.array([labels.index(d.label) for d in chosen])
    ours_p = np.array([d.scores[labels[-1]] for d in chosen])
    span = len(starts) * contract.hop_ns / 1e9
    if base_seconds < workload.seconds:
        notes.append(f"baselines ran over the first {span:.0f} s of stream time "
                     f"({len(starts)} windows with every modality present) and are scaled "
                     "per stream-second")
    frames = make_frames(workload, base_seconds)
    agree = {}
    ta, logits_a = run_baseline_ort(frames, bench_model.path, contract, starts)
    stages["baseline_a"] = _stage(ta, span)
    agree["baseline_a"] = agreement(ours_top, ours_p, logits_a)
    if args.skip_torch:
        return agree
    try:
        net, parity_diff = torch_twin(bench_model.path)
    except (ValueError, ImportError) as exc:
        notes.append(f"baseline (b) skipped: {exc}")
        return agree
    tb, logits_b = run_baseline_torch(frames, net, contract, starts)
    stages["baseline_b"] = _stage(tb, span)
    agree["baseline_b"] = agreement(ours_top, ours_p, logits_b)
    agree["baseline_a_vs_b_max_abs_logit_diff"] = float(np.max(np.abs(logits_a - logits_b)))
    agree["onnx_vs_torch_parity_max_abs"] = parity_diff
    return agree


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    core = None if args.core == -1 else (os.cpu_count() - 1 if args.core is None else args.core)
    core = pin_to_core(core)
    load_before = loadavg()
    notes: list[str] = []
    bench_model = resolve_model(args.model)
    if "torch" in sys.modules:
        notes.append("torch was imported before the edgefuse stages (model exported here)")
    model = OnnxModel.load(bench_model.path, intra_op_threads=1)
    contract = model.contract
    t = time.perf_counter()
    workload = make_workload(args.minutes * 60.0, args.data)
    build_s = time.perf_counter() - t

    stages, decisions, counts, ort_calls = edgefuse_stages(model, workload, args)
    agree = baseline_stages(bench_model, contract, workload, decisions, args, stages, notes)

    e2e_x = stages["end_to_end"]["x_realtime"]
    ratios = {"end_to_end_x_realtime": e2e_x, "align_x_realtime": stages["align"]["x_realtime"],
              "vs_baseline_a": e2e_x / stages["baseline_a"]["x_realtime"]}
    if "baseline_b" in stages:
        ratios["vs_baseline_b"] = e2e_x / stages["baseline_b"]["x_realtime"]
    cpu = {k: s["x_realtime_cpu"] for k, s in stages.items()}
    ratios_cpu = {"end_to_end_x_realtime": cpu["end_to_end"], "align_x_realtime": cpu["align"]}
    ratios_cpu.update({f"vs_{k}": cpu["end_to_end"] / cpu[k] for k in ("baseline_a", "baseline_b")
                       if k in cpu})
    for key, s in stages.items():
        if s["cpu_s"] < 0.9 * s["wall_s"]:
            notes.append(f"{key}: cpu {s['cpu_s']:.2f} s < 90% of wall {s['wall_s']:.2f} s: "
                         "another process shared the core; the wall figure is pessimistic")
    last = contract.labels[-1]
    result = {
        "bench": "replay", "core": core, "load_before": load_before, "load_after": loadavg(),
        "env": environment(("pandas", "torch") if "torch" in sys.modules else ("pandas",)),
        "workload": {"minutes": args.minutes, "chunk_s": args.chunk_s, **counts,
                     "decisions": len(decisions), "missing": _missing_reasons(decisions),
                     "last_label": last,
                     "last_label_share_pct": round(100 * sum(d.label == last for d in decisions)
                                                   / max(1, len(decisions)), 1),
                     "source": workload.source, "build_s": round(build_s, 2),
                     "streams": {m: {"rate_hz": workload.spec(m).rate_hz,
                                     "channels": workload.spec(m).channels}
                                 for m in workload.signals}},
        "model": {"ident": contract.ident, "path": str(bench_model.path),
                  "origin": bench_model.origin, "ort_calls": ort_calls,
                  "max_batch": args.max_batch},
        "stages": stages, "ratios": {k: round(v, 2) for k, v in ratios.items()},
        "ratios_cpu": {k: round(v, 2) for k, v in ratios_cpu.items()},
        "targets": TARGETS, "agreement": agree, "notes": notes,
    }
    print_table(result)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


def _missing_reasons(decisions) -> dict[str, int]:
    """How often each modality was missing, and why ("seismic:flatline": 3)."""
    out: dict[str, int] = {}
    for d in decisions:
        for m in d.missing:
            key = f"{m}:{d.missing_reason.get(m)}"
            out[key] = out.get(key, 0) + 1
    return out


def _stage(t: Timed, span_s: float) -> dict:
    return {"span_s": round(span_s, 1), "wall_s": round(t.wall_s, 4), "cpu_s": round(t.cpu_s, 4),
            "x_realtime": round(_x(span_s, t.wall_s), 1),
            "x_realtime_cpu": round(_x(span_s, t.cpu_s), 1),
            "parts": {k: round(v, 4) for k, v in t.parts.items()}}


if __name__ == "__main__":
    sys.exit(main())
