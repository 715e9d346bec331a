"""Replay throughput as users see it: whole ``edgefuse replay`` processes against a naive script.

    nice python bench/replay.py [--seconds 3600] [--passes 1000] [--nodes 50] [--repeat 3]
                                [--edgefuse NAME=COMMAND ...] [--core N] [--json]

Two inputs built from the real goodvibes passes of the data pack (--data,
default ../shared/data; bench/_passes.py, cached under --cache):

- ``1 h pass``: one pass folder, one node, an hour of acoustic + seismic (the
  real passes concatenated and tiled);
- ``N passes``: a folder of ``--passes`` pass folders (copies of the 64 real
  ones) over ``--nodes`` nodes.

Each is replayed by whole processes, start-up and reading included, as a user
runs them: ``edgefuse replay INPUT --model gv_detect.onnx --out FILE -q`` (the
bundled model, one ORT thread, the default) and bench/naive_replay.py (scipy
+ pandas ``.loc`` + ``np.interp`` + one ORT call per window). One untimed run
of each first (Numba cache and OS file cache warm, as on a user's second
run), then ``--repeat`` rounds, the commands taking turns within a round so
that a busy neighbour slows all of them alike; medians are reported. All
processes are pinned to one core (``--core``, default the last; -1: no pin)
with BLAS/OpenMP/Numba at one thread. Wall seconds from spawn to exit, CPU
seconds (user + sys of that child) and its peak RSS; x real time = data
seconds / wall seconds. ``edgefuse replay``'s own INFO line gives the time
inside the replay loop; the rest of the wall time is start-up (imports, model
load, Numba cache load).

``--edgefuse NAME=COMMAND`` (repeatable) times other builds in the same run,
e.g. ``--edgefuse before=/tmp/base/bin/edgefuse --edgefuse after=.venv/bin/edgefuse``.

Secondary line: the in-memory ``Pipeline`` of this checkout on the 1 h pass,
chunks read before timing (bench/replay_stages.py breaks that down by stage).
A benchmark, not a test: it asserts nothing about speed.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ.setdefault(_var, "1")
# onnxruntime 1.32 looks up its telemetry collector after ~30 s of inference; the
# children inherit this
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _passes  # noqa: E402
from bench._workload import DEFAULT_DATA, REPO, environment, loadavg, pin_to_core  # noqa: E402

MODEL = REPO / "models" / "bundled" / "gv_detect.onnx"
NAIVE = Path(__file__).resolve().parent / "naive_replay.py"
TARGETS = {"x_realtime_1h": 2000.0, "vs_naive_1h": 3.0}
_REPLAYED = re.compile(r"replayed ([\d.]+) s of data in ([\d.]+) s")


def default_edgefuse() -> str:
    script = Path(sys.executable).parent / "edgefuse"
    return str(script) if script.is_file() else f"{sys.executable} -m edgefuse.runtime.cli"


def timed(cmd: list[str]) -> dict:
    """Run cmd to the end; wall seconds, its own CPU seconds and peak RSS (os.wait4)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{stderr[-2000:]}")
    inner = _REPLAYED.search(stderr)
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "rss_mb": usage.ru_maxrss / 1024, "inner_s": float(inner.group(2)) if inner else None}


def commands(args, model: Path, input_path: Path, out_dir: Path) -> dict[str, list[str]]:
    cmds = {}
    for name, command in args.edgefuse:
        cmds[f"edgefuse:{name}"] = command.split() + [
            "--log-level", "INFO", "replay", str(input_path), "--model", str(model),
            "--out", str(out_dir / f"{name}.jsonl"), "-q"]
    cmds["naive"] = [sys.executable, str(NAIVE), str(input_path), str(model),
                     "--out", str(out_dir / "naive.jsonl")]
    return cmds


def agreement(ours: Path, naive: Path) -> dict:
    """Label agreement on the windows both decided, matched by (node, window start)."""
    def labels(path: Path) -> dict:
        out = {}
        with open(path) as f:
            for line in f:
                d = json.loads(line)
                out[(d["node"], d["window_start_ns"])] = d["label"]
        return out
    a, b = labels(ours), labels(naive)
    both = a.keys() & b.keys()
    same = sum(a[k] == b[k] for k in both)
    return {"edgefuse_decisions": len(a), "naive_decisions": len(b), "matched": len(both),
            "label_agreement_pct": round(100 * same / len(both), 1) if both else None}


def measure(args, name: str, input_path: Path, data_s: float, tmp: Path) -> dict:
    out_dir = tmp / name.replace(" ", "_")
    out_dir.mkdir()
    cmds = commands(args, MODEL, input_path, out_dir)
    for cmd in cmds.values():  # untimed: warm caches, and the outputs to compare
        timed(cmd)
    runs: dict[str, list[dict]] = {k: [] for k in cmds}
    for _ in range(args.repeat):
        for key, cmd in cmds.items():
            runs[key].append(timed(cmd))
    rows = {}
    for key, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        cpu = statistics.median(r["cpu_s"] for r in rs)
        inner = [r["inner_s"] for r in rs if r["inner_s"] is not None]
        rows[key] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                     "runs_wall_s": [round(r["wall_s"], 3) for r in rs],
                     "rss_mb": round(max(r["rss_mb"] for r in rs), 1),
                     "x_realtime": round(data_s / wall, 1),
                     "x_realtime_cpu": round(data_s / cpu, 1),
                     "replay_loop_s": round(statistics.median(inner), 3) if inner else None}
    naive = rows["naive"]
    for key, row in rows.items():
        if key != "naive":
            row["vs_naive"] = round(naive["wall_s"] / row["wall_s"], 2)
            row["vs_naive_cpu"] = round(naive["cpu_s"] / row["cpu_s"], 2)
            row["agreement"] = agreement(out_dir / f"{key.split(':', 1)[1]}.jsonl",
                                         out_dir / "naive.jsonl")
    return {"input": str(input_path), "data_s": round(data_s, 1), "rows": rows}


def in_memory(input_path: Path, data_s: float, repeat: int) -> dict:
    """This checkout's Pipeline on chunks already read (best of repeat)."""
    from edgefuse.runtime.core.inference import OnnxModel
    from edgefuse.runtime.core.pipeline import Pipeline
    from edgefuse.sensors.readers.inputs import open_inputs
    model = OnnxModel.load(MODEL, intra_op_threads=1)
    chunks = list(open_inputs([input_path]).chunks())
    best = None
    for _ in range(repeat + 1):  # the first run loads the Numba cache
        pipeline = Pipeline(model)
        t = time.perf_counter()
        lines = [d.to_json() for c in chunks for d in pipeline.push(c)]
        lines += [d.to_json() for d in pipeline.flush()]
        wall = time.perf_counter() - t
        best = wall if best is None or wall < best else best
    return {"wall_s": round(best, 3), "x_realtime": round(data_s / best, 1),
            "decisions": len(lines)}


def print_report(r: dict) -> None:
    print(f"edgefuse replay, whole process; core {r['core']}; load before/after "
          f"{r['load_before']} / {r['load_after']}; repeat {r['repeat']} (median)")
    print(f"  model: {MODEL.relative_to(REPO)}; CPU: {r['env']['cpu']}")
    for name, w in r["workloads"].items():
        print(f"\n  {name}: {w['data_s']:,.0f} s of data ({w['input']})")
        print(f"    {'command':<22} {'wall s':>8} {'cpu s':>8} {'x real time':>12} "
              f"{'x (cpu)':>9} {'vs naive':>9} {'loop s':>7} {'RSS MB':>7}  runs")
        for key, row in w["rows"].items():
            vs = f"{row['vs_naive']:.2f}" if "vs_naive" in row else ""
            loop = f"{row['replay_loop_s']:.2f}" if row.get("replay_loop_s") else ""
            print(f"    {key:<22} {row['wall_s']:>8.2f} {row['cpu_s']:>8.2f} "
                  f"{row['x_realtime']:>12,.0f} {row['x_realtime_cpu']:>9,.0f} {vs:>9} "
                  f"{loop:>7} {row['rss_mb']:>7.0f}  {row['runs_wall_s']}")
        for key, row in w["rows"].items():
            if "agreement" in row:
                print(f"    {key} vs naive: {row['agreement']}")
    if r.get("in_memory"):
        m = r["in_memory"]
        print(f"\n  secondary: in-memory Pipeline of this checkout, 1 h pass, chunks read "
              f"before timing: {m['wall_s']:.2f} s, {m['x_realtime']:,.0f}x real time")
    print()
    for key, value in r["figures"].items():
        target = TARGETS[key.split(":", 1)[0]]
        print(f"  {key:<36} {value:>10,.1f}   target >= {target:,.0f}: "
              f"{'meets' if value >= target else 'BELOW'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="data pack (goodvibes/)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edgefuse-bench",
                    help="where the inputs are built once (default: $TMPDIR/edgefuse-bench)")
    ap.add_argument("--seconds", type=float, default=3600.0, help="the long pass (default 1 h)")
    ap.add_argument("--passes", type=int, default=1000, help="passes in the folder (>= 500)")
    ap.add_argument("--nodes", type=int, default=50, help="nodes the passes belong to")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--edgefuse", action="append", default=[], metavar="NAME=COMMAND",
                    help="an edgefuse build to time (repeatable; default: this venv's)")
    ap.add_argument("--only", choices=["long", "fleet"], default=None, help="one input only")
    ap.add_argument("--no-in-memory", action="store_true", help="skip the secondary line")
    ap.add_argument("--core", type=int, default=None,
                    help="CPU core to pin to (default: the last one); -1: do not pin")
    ap.add_argument("--json", action="store_true", help="end with one JSON line of all numbers")
    args = ap.parse_args(argv)
    pairs = []
    for item in args.edgefuse or [f"edgefuse={default_edgefuse()}"]:
        name, sep, command = item.partition("=")
        if not sep or not name or not command:
            ap.error(f"--edgefuse expects NAME=COMMAND, found {item!r}")
        pairs.append((name, command))
    args.edgefuse = pairs
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    core = None if args.core == -1 else (os.cpu_count() - 1 if args.core is None else args.core)
    core = pin_to_core(core)
    result = {"bench": "replay_whole_process", "core": core, "load_before": loadavg(),
              "repeat": args.repeat, "env": environment(("pandas",)), "workloads": {},
              "figures": {}}
    long_path = _passes.long_pass(args.cache, args.data, args.seconds)
    inputs = {}
    if args.only in (None, "long"):
        inputs[f"{args.seconds / 3600:g} h pass"] = (long_path,
                                                     _passes.pass_seconds(long_path))
    if args.only in (None, "fleet"):
        folder, data_s = _passes.fleet(args.cache, args.data, args.passes, args.nodes)
        inputs[f"{args.passes} passes, {args.nodes} nodes"] = (folder, data_s)
    with tempfile.TemporaryDirectory(prefix="edgefuse-bench-replay-") as tmp:
        for name, (path, data_s) in inputs.items():
            result["workloads"][name] = measure(args, name, path, data_s, Path(tmp))
    if not args.no_in_memory:
        result["in_memory"] = in_memory(long_path, _passes.pass_seconds(long_path),
                                        args.repeat)
    for name, w in result["workloads"].items():
        tag = "1h" if name.endswith("h pass") else "fleet"
        for key, row in w["rows"].items():
            if key.startswith("edgefuse:") and tag == "1h":
                result["figures"][f"x_realtime_1h:{key}"] = row["x_realtime"]
                result["figures"][f"vs_naive_1h:{key}"] = row["vs_naive"]
    result["load_after"] = loadavg()
    print_report(result)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
