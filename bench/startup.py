"""Start-up cost of ``edgefuse replay``: a 10 s log, cold and warm Numba cache.

    python bench/startup.py [--seconds 10] [--repeat 3] [--model M] [--core N] [--json]

Builds a 10 s MCAP log of the 3-stream benchmark workload (bench/_workload.py:
acoustic, seismic, imu; real sample values when ../shared/data exists) and
times the whole command ``edgefuse replay LOG --model M --out /dev/null -q``
as a subprocess, wall seconds from spawn to exit:

- cold: NUMBA_CACHE_DIR is a fresh empty folder, so every kernel compiles;
- warm: the same command again with the same folder (kernels load from it).

Each repetition uses a new folder (cold, then warm); the medians are
reported. Also timed: ``python -c "import edgefuse.runtime.core.pipeline"`` (the
runtime's import cost), the imports of a replay (pipeline + input readers),
and ``python -c pass`` (the interpreter alone). Python's bytecode caches and
the OS file cache are warm in every run. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._workload import (DEFAULT_DATA, environment, loadavg, make_workload,  # noqa: E402
                             pin_to_core, resolve_model)

TARGET_WARM_S = 3.0
_REPLAYED = re.compile(r"replayed ([\d.]+) s of data in ([\d.]+) s")


def build_log(path: Path, seconds: float, data: Path) -> dict:
    from edgefuse.sensors.readers.mcaplog import McapRecorder
    workload = make_workload(seconds, data)
    with McapRecorder(path) as rec:
        for chunk in workload.chunks(1.0):
            rec.write(chunk)
    return {"path": str(path), "seconds": seconds, "bytes": path.stat().st_size,
            "chunks": sum(v for k, v in rec.counts.items() if k != "rejected"),
            "source": workload.source}


def edgefuse_command() -> list[str]:
    script = Path(sys.executable).parent / "edgefuse"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "edgefuse.runtime.cli"]


def timed_run(cmd: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr[-2000:]}")
    return wall, proc


def replay_inner_s(stderr: str) -> float | None:
    """The replay's own wall time, from its INFO line (the rest is start-up)."""
    m = _REPLAYED.search(stderr)
    return float(m.group(2)) if m else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="log length (default 10 s)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default=None,
                    help="model file (default: bundled bench_3m.onnx, else exported here)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--core", type=int, default=None,
                    help="CPU core to pin to (default: the last one); -1: do not pin")
    ap.add_argument("--json", action="store_true", help="end with one JSON line of all numbers")
    args = ap.parse_args(argv)
    core = None if args.core == -1 else (os.cpu_count() - 1 if args.core is None else args.core)
    core = pin_to_core(core)
    load_before = loadavg()
    bench_model = resolve_model(args.model)

    with tempfile.TemporaryDirectory(prefix="edgefuse-startup-") as tmp:
        tmp = Path(tmp)
        log_info = build_log(tmp / "bench10s.mcap", args.seconds, args.data)
        cmd = edgefuse_command() + ["--log-level", "INFO", "replay", log_info["path"],
                                    "--model", str(bench_model.path), "--out", "/dev/null", "-q"]
        # One untimed run that writes the decisions, to show the command does the work.
        out = tmp / "decisions.jsonl"
        check_cmd = cmd[:cmd.index("--out") + 1] + [str(out), "-q"]
        timed_run(check_cmd)
        decisions = sum(1 for _ in open(out))

        cold, warm, cold_inner, warm_inner = [], [], [], []
        for i in range(args.repeat):
            env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp / f"numba-cache-{i}"))
            wall, proc = timed_run(cmd, env)
            cold.append(wall)
            cold_inner.append(replay_inner_s(proc.stderr))
            wall, proc = timed_run(cmd, env)
            warm.append(wall)
            warm_inner.append(replay_inner_s(proc.stderr))

        py = [sys.executable, "-c"]
        imports = {
            "python -c pass": py + ["pass"],
            "import edgefuse.runtime.core.pipeline": py + ["import edgefuse.runtime.core.pipeline"],
            "imports of a replay (pipeline, replay, inputs)":
                py + ["import edgefuse.runtime.core.pipeline, edgefuse.runtime.service.replay, "
                      "edgefuse.sensors.readers.inputs"],
        }
        import_s = {k: statistics.median(timed_run(c)[0] for _ in range(args.repeat))
                    for k, c in imports.items()}

    def med(xs):
        xs = [x for x in xs if x is not None]
        return round(statistics.median(xs), 3) if xs else None

    result = {
        "bench": "startup", "core": core, "load_before": load_before, "load_after": loadavg(),
        "env": environment(), "log": log_info, "decisions": decisions,
        "model": {"path": str(bench_model.path), "origin": bench_model.origin},
        "command": " ".join(cmd), "repeat": args.repeat,
        "cold_s": {"median": med(cold), "runs": [round(x, 3) for x in cold],
                   "replay_inner_median": med(cold_inner)},
        "warm_s": {"median": med(warm), "runs": [round(x, 3) for x in warm],
                   "replay_inner_median": med(warm_inner)},
        "imports_s": {k: round(v, 3) for k, v in import_s.items()},
        "target_warm_s": TARGET_WARM_S,
    }
    print(f"edgefuse replay start-up: {args.seconds:g} s log ({log_info['chunks']} chunks, "
          f"{log_info['bytes']} bytes, {decisions} decisions); core {core}; load before/after "
          f"{load_before} / {result['load_after']}")
    print(f"  log: {log_info['source']}")
    print(f"  command: {result['command']}")
    print(f"  {'run':<48} {'median s':>9}   runs")
    for key, label in (("cold_s", "cold Numba cache (fresh NUMBA_CACHE_DIR)"),
                       ("warm_s", "warm Numba cache (same dir, second run)")):
        r = result[key]
        print(f"  {label:<48} {r['median']:>9.3f}   {r['runs']}  (replay itself "
              f"{r['replay_inner_median']} s)")
    for k, v in result["imports_s"].items():
        print(f"  {k:<48} {v:>9.3f}")
    verdict = "meets" if result["warm_s"]["median"] <= TARGET_WARM_S else "ABOVE"
    print(f"  warm start-up target <= {TARGET_WARM_S:g} s: {verdict}")
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
