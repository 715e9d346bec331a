"""Fleet replay on Ray against the single process, in the same run; the byte comparison.

    nice python bench/fleet.py [--passes 1000] [--nodes 50] [--workers 1,2]
                               [--address ADDRESS] [--repeat 1] [--json]

Input: bench/_passes.py's folder of ``--passes`` real goodvibes passes over
``--nodes`` nodes. Whole processes, as a user runs them:

- ``edgefuse replay FOLDER --out single.jsonl -q`` (one process, one core);
- ``edgefuse replay FOLDER --ray [ADDRESS] --workers W --out DIR/ -q`` for each
  W of ``--workers`` (no ADDRESS: a local Ray started by the command on W CPUs;
  ``--address auto``: the cluster ``ray start`` made on this machine).

Each fleet output is compared with the single process: every node file's
lines concatenated, sorted by (node, seq), against the single process's lines
sorted the same way; equal means byte-identical (the SHA-256 of both sorted
texts is printed). Wall seconds from spawn to exit, Ray's start and stop
included; from the command's own line also the seconds to start (Ray up,
workers ready) and the replay itself (the rest of the run up to the last
node; Ray's shutdown and the interpreter's start are outside both). Medians
of ``--repeat``. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# onnxruntime 1.32 looks up its telemetry collector after ~30 s of inference; the
# commands run here inherit this
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from bench import _passes  # noqa: E402
from bench._workload import DEFAULT_DATA, REPO, environment, loadavg  # noqa: E402

MODEL = REPO / "models" / "bundled" / "gv_detect.onnx"
_FLEET_LINE = re.compile(r"(\d+) nodes on (\d+) Ray workers in ([\d.]+) s \(([\d.]+) s to start")


def edgefuse() -> list[str]:
    script = Path(sys.executable).parent / "edgefuse"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "edgefuse.runtime.cli"]


def run(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return wall, proc.stderr


def sorted_text(lines: list[str]) -> str:
    def key(line: str) -> tuple[str, int]:
        d = json.loads(line)
        return d["node"], d["seq"]
    return "".join(x + "\n" for x in sorted(lines, key=key))


def folder_lines(folder: Path) -> list[str]:
    return [x for p in sorted(folder.glob("*.jsonl")) for x in p.read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edgefuse-bench")
    ap.add_argument("--passes", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--address", default=None, help="Ray cluster (auto: `ray start` here)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    folder, data_s = _passes.fleet(args.cache, args.data, args.passes, args.nodes)
    base = edgefuse() + ["--log-level", "WARNING", "replay", str(folder), "--model", str(MODEL),
                         "-q"]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="edgefuse-bench-fleet-") as tmp:
        tmp = Path(tmp)
        single_out = tmp / "single.jsonl"
        walls = [run(base + ["--out", str(single_out)])[0] for _ in range(args.repeat)]
        reference = sorted_text(single_out.read_text().splitlines())
        rows["single process"] = {"wall_s": statistics.median(walls), "identical": True,
                                  "decisions": reference.count("\n")}
        for w in (int(x) for x in args.workers.split(",")):
            walls, starts, inner, out = [], [], [], tmp / f"ray{w}"
            for _ in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                ray_args = ["--ray"] + ([args.address] if args.address else [])
                wall, err = run(base + ["--out", f"{out}/", "--workers", str(w)] + ray_args)
                m = _FLEET_LINE.search(err)
                walls.append(wall)
                starts.append(float(m.group(4)) if m else float("nan"))
                inner.append(float(m.group(3)) - starts[-1] if m else float("nan"))
            text = sorted_text(folder_lines(out))
            rows[f"--ray, {w} worker{'s' if w > 1 else ''}"] = {
                "wall_s": statistics.median(walls), "start_s": statistics.median(starts),
                "replay_s": statistics.median(inner),
                "identical": text == reference, "decisions": text.count("\n"),
                "nodes": len(list(out.glob("*.jsonl"))),
                "sha256_sorted": hashlib.sha256(text.encode()).hexdigest()[:16]}
        digest = hashlib.sha256(reference.encode()).hexdigest()[:16]
        rows["single process"]["sha256_sorted"] = digest
    one = next((r["wall_s"] for k, r in rows.items() if k.endswith(" 1 worker")), None)
    print(f"fleet replay: {args.passes} passes, {args.nodes} nodes, {data_s:,.0f} s of data; "
          f"{os.cpu_count()} cores; load {loadavg()}; Ray address {args.address or 'local'}")
    print(f"  {'command':<20} {'wall s':>7} {'x real time':>12} {'vs 1 worker':>12} "
          f"{'Ray start s':>12} {'replay s':>9} {'vs 1 worker':>12} {'decisions':>10}  "
          "sorted == single process (sha256)")
    one_inner = next((r["replay_s"] for k, r in rows.items() if k.endswith(" 1 worker")), None)
    for key, r in rows.items():
        ray = "start_s" in r
        start = f"{r['start_s']:.1f}" if ray else ""
        inner = f"{r['replay_s']:.2f}" if ray else ""
        speedup = f"{one / r['wall_s']:.2f}" if one and ray else ""
        inner_up = f"{one_inner / r['replay_s']:.2f}" if one_inner and ray else ""
        print(f"  {key:<20} {r['wall_s']:>7.2f} {data_s / r['wall_s']:>12,.0f} {speedup:>12} "
              f"{start:>12} {inner:>9} {inner_up:>12} {r['decisions']:>10}  {r['identical']} "
              f"({r['sha256_sorted']})")
    if args.json:
        print(json.dumps({"bench": "fleet", "data_s": data_s, "rows": rows,
                          "env": environment()}, sort_keys=True))
    return 0 if all(r["identical"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
