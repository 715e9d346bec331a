"""Your own sensors, end to end: files -> manifest + labels -> train -> evaluate -> replay.

    python examples/own_sensors.py [--out DIR] [--quick]

Synthesises a small fleet of 3-sensor nodes (pi-a, pi-b, pi-c) as a user's
loggers would leave them, then drives the real `edgefuse` command on them:

  recordings/<node>/acoustic.wav   microphone, 16 kHz int16 mono; the header says 16000 Hz,
                                   the clock really runs 40 ppm fast (rate_hz in the manifest)
  recordings/<node>/seismic.wav    geophone, float32; header 500 Hz, really 499.8 Hz; its
                                   logger started 0.25 s after the microphone (t0 differs)
  recordings/<node>/imu.csv        t_ns,ax,ay,az,gx,gy,gz at ~100 Hz, stamps jittered;
                                   pi-b's IMU drops out for 10 s
  recordings/<node>/recording.toml the three streams and their clocks
  labels.csv                       node,start,end,label: the `vehicle` and `handling` events;
                                   every other window is `quiet` ([labels] background)
  train.toml                       contract (acoustic 8 kHz, seismic 250 Hz, IMU 50 Hz x 6,
                                   1 s windows, 0.5 s hop), split: pi-c held out

Events: `vehicle` (a hum with harmonics in the microphone, a 15-30 Hz rumble in
the geophone) and `handling` (someone moves the node: the IMU turns and
shakes, knocks in the microphone and geophone); `quiet` is background noise.

Steps, each a subprocess of the CLI and checked:
  1. import   `edgefuse record recordings/* -o fleet.mcap` (every stream read) and
              `edgefuse export-streams fleet.mcap -o exported` (the reverse, for labelling)
  2. train    `edgefuse train train.toml` -> model.onnx (+ fallbacks)
  3. evaluate `edgefuse evaluate model.onnx --recordings ... --labels labels.csv
              --group node --test pi-c --json`: held-out accuracy above chance
  4. replay   `edgefuse replay recordings/pi-b --model model.onnx`: decisions name the
              modalities used, and IMU as missing (gap) while it was unplugged
Exit 0 when every step passed, else 1 with one line naming the step.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

NODES = ("pi-a", "pi-b", "pi-c")
LABELS = ("quiet", "vehicle", "handling")
T0_NS = 1_777_636_800_000_000_000          # 2026-05-01T12:00:00Z
ACOUSTIC_HZ, ACOUSTIC_ACTUAL_HZ = 16000, 16000.64
SEISMIC_HZ, SEISMIC_ACTUAL_HZ = 500, 499.8
SEISMIC_LATE_S = 0.25                      # the geophone's logger started later
IMU_HZ = 100.0
DROP_NODE, DROP_S = "pi-b", (30.0, 40.0)   # pi-b's IMU unplugged in [30 s, 40 s)


class StepFailed(Exception):
    """A step's result is not what it should be; the message names the step."""


# ------------------------------------------------------------------ synthesis
def event_plan(rng: np.random.Generator, seconds: float) -> list[tuple[float, float, str]]:
    """(start_s, end_s, label) of events, quiet gaps of 3-7 s between them."""
    events, t, k = [], 3.0, int(rng.integers(0, 2))
    while True:
        length = float(rng.uniform(4.0, 8.0))
        if t + length > seconds - 2.0:
            return events
        events.append((t, t + length, LABELS[1 + k % 2]))
        k += 1
        t += length + float(rng.uniform(3.0, 7.0))


def envelope(t: np.ndarray, events, label: str) -> np.ndarray:
    """0 outside the events of `label`, 0.5..1 (a smooth bump) inside them."""
    env = np.zeros_like(t)
    for a, b, lab in events:
        if lab == label:
            inside = (t >= a) & (t < b)
            env[inside] = 0.5 + 0.5 * np.sin(np.pi * (t[inside] - a) / (b - a))
    return env


def knocks(rng: np.random.Generator, events) -> np.ndarray:
    """Times (s) of the knocks of handling events, ~5 per second."""
    times = [rng.uniform(a, b, size=max(1, int(5 * (b - a)))) for a, b, lab in events
             if lab == "handling"]
    return np.sort(np.concatenate(times)) if times else np.zeros(0)


def bursts(t: np.ndarray, at: np.ndarray, decay_s: float, rng: np.random.Generator) -> np.ndarray:
    """A decaying noise burst at each time in `at`, sampled at times t (sorted)."""
    out = np.zeros_like(t)
    span = int(np.searchsorted(t, t[0] + 6 * decay_s))
    for k in at:
        i = int(np.searchsorted(t, k))
        seg = slice(i, min(t.size, i + span))
        dt = t[seg] - k
        out[seg] += np.exp(-dt / decay_s) * rng.standard_normal(dt.size)
    return out


def acoustic(rng, events, kn, seconds) -> np.ndarray:
    n = int(seconds * ACOUSTIC_ACTUAL_HZ)
    t = np.arange(n) / ACOUSTIC_ACTUAL_HZ
    x = np.convolve(rng.standard_normal(n), np.ones(4) / 4, mode="same") * 300.0
    env = envelope(t, events, "vehicle")
    f0 = float(rng.uniform(80.0, 130.0))
    hum = sum(np.sin(2 * np.pi * f0 * h * t + h) / h for h in range(1, 5))
    x += env * (2500.0 * hum + 800.0 * rng.standard_normal(n))
    x += 4000.0 * bursts(t, kn, 0.01, rng)
    return np.clip(x, -32767, 32767).astype(np.int16)


def seismic(rng, events, kn, seconds) -> np.ndarray:
    n = int((seconds - SEISMIC_LATE_S) * SEISMIC_ACTUAL_HZ)
    t = SEISMIC_LATE_S + np.arange(n) / SEISMIC_ACTUAL_HZ   # node time of each sample
    x = 0.004 * rng.standard_normal(n)
    env = envelope(t, events, "vehicle")
    x += env * (0.08 * np.sin(2 * np.pi * 18.0 * t) + 0.05 * np.sin(2 * np.pi * 29.0 * t)
                + 0.02 * rng.standard_normal(n))
    x += 0.05 * bursts(t, kn, 0.04, rng)
    return x.astype(np.float32)


def imu(rng, events, seconds, drop: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """(t_ns int64, values [n, 6]): ~100 Hz with +-0.3 ms jitter, rows in `drop` removed."""
    n = int(seconds * IMU_HZ)
    t = np.arange(n) / IMU_HZ
    stamps = T0_NS + np.round((t + rng.uniform(-3e-4, 3e-4, n)) * 1e9).astype(np.int64)
    v = np.zeros((n, 6))
    v[:, 2] = 9.81
    v[:, :3] += 0.03 * rng.standard_normal((n, 3))
    v[:, 3:] += 0.005 * rng.standard_normal((n, 3))
    hand = envelope(t, events, "handling")
    for j in range(6):
        f, phase = float(rng.uniform(0.8, 2.5)), float(rng.uniform(0, 2 * np.pi))
        v[:, j] += hand * (3.0 if j < 3 else 1.2) * np.sin(2 * np.pi * f * t + phase)
    v[:, 2] += 0.15 * envelope(t, events, "vehicle") * np.sin(2 * np.pi * 18.0 * t)
    keep = np.ones(n, bool) if drop is None else ~((t >= drop[0]) & (t < drop[1]))
    return stamps[keep], v[keep]


def write_wav(path: str, data: np.ndarray, rate: int) -> None:
    """Mono PCM int16 (format 1) or float32 (format 3) WAV."""
    tag, width = (3, 4) if data.dtype == np.float32 else (1, 2)
    fmt = struct.pack("<HHIIHH", tag, 1, rate, rate * width, width, width * 8)
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" +
            struct.pack("<I", data.nbytes) + data.astype(data.dtype.newbyteorder("<")).tobytes())
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(body)) + body)


def iso(ns: int) -> str:
    sec, frac = divmod(int(ns), 1_000_000_000)
    return np.datetime64(sec, "s").astype(str) + f".{frac:09d}Z"


MANIFEST = """\
# {node}: three loggers, three clocks
[[stream]]
node = "{node}"
modality = "acoustic"
file = "acoustic.wav"
t0 = "{t0_acoustic}"
rate_hz = {acoustic_rate}      # measured; the WAV header says {acoustic_header}

[[stream]]
node = "{node}"
modality = "seismic"
file = "seismic.wav"
t0 = "{t0_seismic}"    # this logger started {late} s later
rate_hz = {seismic_rate}         # measured; the WAV header says {seismic_header}

[[stream]]
node = "{node}"
modality = "imu"
file = "imu.csv"                 # t_ns in its first column: no t0 needed
"""


def synthesise(out: str, seconds: float, seed: int = 0) -> dict[str, list]:
    """Write the fleet's recordings and labels.csv under out; returns the events per node."""
    plans = {}
    rows = []
    for i, node in enumerate(NODES):
        rng = np.random.default_rng(seed + i)
        events = event_plan(rng, seconds)
        plans[node] = events
        folder = os.path.join(out, "recordings", node)
        os.makedirs(folder, exist_ok=True)
        kn = knocks(rng, events)
        write_wav(os.path.join(folder, "acoustic.wav"), acoustic(rng, events, kn, seconds),
                  ACOUSTIC_HZ)
        write_wav(os.path.join(folder, "seismic.wav"), seismic(rng, events, kn, seconds),
                  SEISMIC_HZ)
        stamps, values = imu(rng, events, seconds, DROP_S if node == DROP_NODE else None)
        with open(os.path.join(folder, "imu.csv"), "w") as f:
            f.write("t_ns,ax,ay,az,gx,gy,gz\n")
            for t, v in zip(stamps.tolist(), values.tolist()):
                f.write(f"{t}," + ",".join(f"{x:.5f}" for x in v) + "\n")
        with open(os.path.join(folder, "recording.toml"), "w") as f:
            f.write(MANIFEST.format(
                node=node, t0_acoustic=iso(T0_NS), acoustic_rate=ACOUSTIC_ACTUAL_HZ,
                acoustic_header=ACOUSTIC_HZ, t0_seismic=iso(T0_NS + int(SEISMIC_LATE_S * 1e9)),
                late=SEISMIC_LATE_S, seismic_rate=SEISMIC_ACTUAL_HZ, seismic_header=SEISMIC_HZ))
        for a, b, label in events:
            rows.append(f"{node},{iso(T0_NS + int(a * 1e9))},{iso(T0_NS + int(b * 1e9))},{label}")
    with open(os.path.join(out, "labels.csv"), "w") as f:
        f.write("node,start,end,label\n" + "\n".join(rows) + "\n")
    return plans


TRAIN_TOML = """\
# Written by examples/own_sensors.py. Paths are relative to this file's folder.
[data]
recordings = [{recordings}]
labels = "labels.csv"
group = "node"
test = ["pi-c"]

[contract]
name = "own-sensors"
version = "1.0.0"
window_s = 1.0
hop_s = 0.5
labels = [{labels}]
[contract.modalities]          # channels and the model's rate of each
acoustic = {{ channels = 1, rate_hz = 8000.0 }}
seismic = {{ channels = 1, rate_hz = 250.0 }}
imu = {{ channels = 6, rate_hz = 50.0 }}

[labels]
rule = "majority"
min_share = 0.5
background = "quiet"     # windows no event touches

[train]
seed = 0
epochs = {epochs}
modality_dropout = 0.3
out = "run"
"""


def write_config(out: str, epochs: int) -> str:
    path = os.path.join(out, "train.toml")
    with open(path, "w") as f:
        f.write(TRAIN_TOML.format(
            recordings=", ".join(f'"recordings/{n}"' for n in NODES),
            labels=", ".join(f'"{x}"' for x in LABELS), epochs=epochs))
    return path


# ---------------------------------------------------------------------- steps
def edgefuse_command() -> list[str]:
    """The `edgefuse` script beside this Python, else the CLI module run by it."""
    script = os.path.join(os.path.dirname(sys.executable), "edgefuse")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "edgefuse.runtime.cli"]


def run(step: str, args: list[str], cwd: str) -> str:
    """Run `edgefuse ARGS` in cwd; its stdout, or StepFailed naming the step."""
    cmd = edgefuse_command() + args
    print(f"$ edgefuse {' '.join(args)}", flush=True)
    t = time.monotonic()
    env = dict(os.environ)   # the windows cache of this fleet lives and goes with it
    env.setdefault("EDGEFUSE_CACHE", os.path.join(cwd, ".cache"))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise StepFailed(f"{step}: `edgefuse {' '.join(args)}` exited {proc.returncode}: {tail}")
    print(f"  ok ({time.monotonic() - t:.1f} s)", flush=True)
    return proc.stdout


def step_import(out: str) -> None:
    from edgefuse.sensors.readers.inputs import open_inputs

    run("import", ["record", *[f"recordings/{n}" for n in NODES], "-o", "fleet.mcap"], out)
    streams = {(s.node, s.modality) for s in open_inputs(os.path.join(out, "fleet.mcap")).streams}
    want = {(n, m) for n in NODES for m in ("acoustic", "seismic", "imu")}
    if streams != want:
        raise StepFailed(f"import: fleet.mcap holds streams {sorted(streams)}, expected "
                         f"{sorted(want)}")
    print(f"  fleet.mcap: {len(streams)} streams")
    run("import", ["export-streams", "fleet.mcap", "-o", "exported"], out)
    back = {(s.node, s.modality) for s in open_inputs(os.path.join(out, "exported")).streams}
    if back != want:
        raise StepFailed(f"import: exported/recording.toml reads back {sorted(back)}, "
                         f"expected {sorted(want)}")
    print(f"  exported/: {len(os.listdir(os.path.join(out, 'exported')))} files")


def step_train(out: str) -> str:
    """Train; the model's path relative to out."""
    stdout = run("train", ["train", "train.toml"], out)
    lines = [x for x in stdout.strip().splitlines() if x.strip()]
    model = os.path.join(out, lines[-1].strip()) if lines else ""
    if not model.endswith(".onnx") or not os.path.isfile(model):
        raise StepFailed(f"train: expected the path of the exported model.onnx as the last "
                         f"line of its output, found {lines[-1:] or 'nothing'}")
    model = os.path.relpath(model, out)
    print(f"  model: {model}")
    return model


def step_evaluate(out: str, model: str) -> dict:
    stdout = run("evaluate", ["evaluate", model, "--recordings",
                              *[f"recordings/{n}" for n in NODES], "--labels", "labels.csv",
                              "--group", "node", "--test", "pi-c", "--json"], out)
    try:
        result = json.loads(stdout)
        acc = float(result["conditions"]["all"]["accuracy"])
    except (ValueError, KeyError, TypeError) as exc:
        raise StepFailed(f"evaluate: expected JSON with conditions.all.accuracy, found "
                         f"{stdout[:200]!r} ({exc})") from None
    chance = 1.0 / len(LABELS)
    majority = max(result.get("class_counts", [0])) / max(1, result.get("windows", 1))
    for name, row in sorted(result["conditions"].items()):
        print(f"  {name:<20} accuracy {row['accuracy']:.3f}  macro-F1 {row['macro_f1']:.3f}")
    if not acc > max(chance, majority) + 0.1:
        raise StepFailed(f"evaluate: held-out accuracy {acc:.3f} is not above chance "
                         f"({chance:.3f}) and the majority class ({majority:.3f}) by 0.1")
    return result


def step_replay(out: str, model: str) -> dict:
    run("replay", ["replay", f"recordings/{DROP_NODE}", "--model", model, "--out",
                   "decisions.jsonl", "-q"], out)
    with open(os.path.join(out, "decisions.jsonl")) as f:
        decisions = [json.loads(line) for line in f if line.strip()]
    if not decisions:
        raise StepFailed("replay: no decision written")
    mods = {"acoustic", "seismic", "imu"}
    full = [d for d in decisions if set(d["used"]) == mods]
    lo, hi = (T0_NS + int(s * 1e9) for s in DROP_S)
    dropped = [d for d in decisions if lo <= d["window_start_ns"] and d["window_end_ns"] <= hi]
    bad = [d for d in dropped if "imu" in d["used"] or d["missing_reason"].get("imu") != "gap"]
    if not full or not dropped or bad:
        raise StepFailed(f"replay: expected decisions using {sorted(mods)} and, inside the IMU "
                         f"dropout, decisions with imu missing (gap); found {len(full)} "
                         f"complete, {len(dropped)} in the dropout, {len(bad)} of them wrong "
                         f"(e.g. {bad[:1]})")
    fallbacks = sorted({d["fallback"] for d in dropped})
    print(f"  {len(decisions)} decisions; {len(full)} used {sorted(mods)}; {len(dropped)} "
          f"during the IMU dropout used {dropped[0]['used']} (fallback {fallbacks})")
    return {"decisions": len(decisions), "dropout": len(dropped)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="working folder (default: a temporary one, "
                    "removed at the end)")
    ap.add_argument("--quick", action="store_true",
                    help="75 s per node and 4 epochs (CI); default 180 s and 12 epochs")
    args = ap.parse_args(argv)
    seconds, epochs = (75.0, 4) if args.quick else (180.0, 12)
    out = args.out or tempfile.mkdtemp(prefix="edgefuse-own-sensors-")
    os.makedirs(out, exist_ok=True)
    try:
        plans = synthesise(out, seconds)
        write_config(out, epochs)
        n_events = sum(len(p) for p in plans.values())
        print(f"synthesised {len(NODES)} nodes x {seconds:.0f} s ({n_events} events) in {out}")
        step_import(out)
        model = step_train(out)
        step_evaluate(out, model)
        step_replay(out, model)
    except StepFailed as exc:
        print(f"own_sensors: FAILED at {exc}", file=sys.stderr)
        return 1
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    print("own_sensors: every step passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
