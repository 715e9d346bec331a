"""Shared parts of the benchmarks: the 3-stream workload, the benchmark model, the machine.

The workload is one node with three streams at the real, drifting rates of
the goodvibes sensors and a phone IMU: acoustic 9866.44 Hz (1 ch), seismic
1605.23 Hz (1 ch), imu 100.0 Hz (6 ch), each starting at its own offset, cut
into chunks of ``chunk_s``. Sample values are real when the data pack is
there (goodvibes acoustic and seismic recordings, sp-sw-har phone rows,
concatenated and tiled to the requested length), else seeded noise; the
``source`` field says which.
"""
from __future__ import annotations

import gc
import glob
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgefuse.runtime.core.chunk import Chunk

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
NODE = "bench"
# 2023-04-11 15:20:00 UTC: a real goodvibes recording day; any epoch works.
T0_NS = 1_681_226_400_000_000_000
PCM_FULL_SCALE = 32767.0
BENCH_SEED = 0            # models/build_standin.py builds bench_3m with seed 0


@dataclass(frozen=True)
class StreamSpec:
    modality: str
    channels: int
    rate_hz: float          # the actual (drifting) rate the sensor delivers
    offset_ns: int          # first sample after T0_NS: streams do not start together
    full_scale: float | None


STREAMS = (
    StreamSpec("acoustic", 1, 9866.44, 12_345_678, PCM_FULL_SCALE),
    StreamSpec("seismic", 1, 1605.23, 37_100_000, PCM_FULL_SCALE),
    StreamSpec("imu", 6, 100.0, 4_700_000, None),
)


@dataclass
class Workload:
    seconds: float
    source: str
    signals: dict[str, np.ndarray] = field(default_factory=dict)   # modality -> float32 [n, ch]

    def spec(self, modality: str) -> StreamSpec:
        return next(s for s in STREAMS if s.modality == modality)

    def times_ns(self, modality: str, n: int | None = None) -> np.ndarray:
        """Time of every sample (int64 ns) of a stream: start + i / rate."""
        s = self.spec(modality)
        n = len(self.signals[modality]) if n is None else n
        return T0_NS + s.offset_ns + np.round(np.arange(n) * (1e9 / s.rate_hz)).astype(np.int64)

    def chunks(self, chunk_s: float = 1.0, seconds: float | None = None) -> list[Chunk]:
        """All chunks in time order (as a replay or a live feed delivers them). The
        samples are views into ``signals``: building the list copies nothing."""
        out = []
        for s in STREAMS:
            x = self.signals[s.modality]
            n_total = len(x) if seconds is None else min(len(x), int(seconds * s.rate_hz))
            bounds = np.floor(np.arange(0.0, n_total / s.rate_hz + chunk_s, chunk_s)
                              * s.rate_hz).astype(np.int64)
            bounds = np.unique(np.clip(bounds, 0, n_total))
            for seq, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                t0 = T0_NS + s.offset_ns + int(round(lo * 1e9 / s.rate_hz))
                out.append(Chunk(NODE, s.modality, t0, s.rate_hz, x[lo:hi], seq, s.full_scale))
        out.sort(key=lambda c: (c.t0_ns, c.modality))
        return out


def _tile(pieces: list[np.ndarray], n: int, channels: int) -> np.ndarray:
    joined = np.concatenate(pieces) if pieces else np.zeros((0, channels), np.float32)
    reps = -(-n // max(1, len(joined)))
    return np.ascontiguousarray(np.tile(joined, (reps, 1))[:n], dtype=np.float32)


def _wav_pieces(paths: list[str], need: int) -> tuple[list[np.ndarray], list[str]]:
    from edgefuse.sensors.readers.wavfile import read_wav
    pieces, used, have = [], [], 0
    for p in paths:
        if have >= need:
            break
        _, frames = read_wav(p)
        if len(frames) == 0:
            continue
        pieces.append(np.asarray(frames, np.float32).reshape(-1, 1))
        used.append(os.path.basename(p))
        have += len(frames)
    return pieces, used


def _imu_pieces(root: Path, need: int) -> tuple[list[np.ndarray], int]:
    from edgefuse.sensors.readers.sphar import read_csv
    pieces, have, files = [], 0, 0
    for p in sorted(glob.glob(str(root / "s*" / "s*_sp.csv"))):
        if have >= need:
            break
        _, values, _ = read_csv(p)
        pieces.append(values)
        have += len(values)
        files += 1
    return pieces, files


def real_workload(data: Path, seconds: float) -> Workload | None:
    """Real sample values tiled to ``seconds``; None when the data pack is missing."""
    gv, har = data / "goodvibes", data / "sp-sw-har"
    acoustic = sorted(glob.glob(str(gv / "raw" / "Node*-Ch1-*.wav"))) + \
        sorted(glob.glob(str(gv / "noise" / "acoustic" / "*.wav")))
    seismic = sorted(glob.glob(str(gv / "raw" / "Node*-Ch2-*.wav"))) + \
        sorted(glob.glob(str(gv / "noise" / "seismic" / "*.wav")))
    if not (acoustic and seismic and har.is_dir()):
        return None
    logging.getLogger("edgefuse.sensors").setLevel(logging.ERROR)  # placeholder-size notes
    w = Workload(seconds, "")
    notes = []
    for s, paths in ((STREAMS[0], acoustic), (STREAMS[1], seismic)):
        n = int(seconds * s.rate_hz)
        pieces, used = _wav_pieces(paths, n)
        w.signals[s.modality] = _tile(pieces, n, 1)
        real_s = sum(len(p) for p in pieces) / s.rate_hz
        notes.append(f"{s.modality}: {len(used)} goodvibes WAVs ({real_s:.0f} s of samples)")
    n = int(seconds * STREAMS[2].rate_hz)
    pieces, files = _imu_pieces(har, n)
    if not pieces:
        return None
    w.signals["imu"] = _tile(pieces, n, 6)
    notes.append(f"imu: {files} sp-sw-har phone CSVs ({sum(len(p) for p in pieces)} rows)")
    w.source = "real data, tiled: " + "; ".join(notes)
    return w


def synthetic_workload(seconds: float, seed: int = 0) -> Workload:
    """Seeded noise at sensor-like levels (PCM counts; m/s^2 and rad/s for the IMU)."""
    rng = np.random.default_rng(seed)
    w = Workload(seconds, f"synthetic: seeded noise (seed {seed}); data pack not found")
    for s, scale in ((STREAMS[0], 30.0), (STREAMS[1], 2.0)):
        x = rng.standard_normal((int(seconds * s.rate_hz), 1), dtype=np.float32) * scale
        w.signals[s.modality] = np.rint(x)
    n = int(seconds * STREAMS[2].rate_hz)
    imu = rng.standard_normal((n, 6), dtype=np.float32) * np.float32(0.3)
    imu[:, 2] += np.float32(9.81)
    w.signals["imu"] = imu
    return w


def make_workload(seconds: float, data: Path | None = DEFAULT_DATA) -> Workload:
    w = real_workload(Path(data), seconds) if data is not None and Path(data).is_dir() else None
    return w if w is not None else synthetic_workload(seconds)


# -- the benchmark model ------------------------------------------------------
@dataclass
class BenchModel:
    path: Path
    origin: str                 # where the file came from
    tmpdir: tempfile.TemporaryDirectory | None = None


def resolve_model(path: str | os.PathLike | None = None) -> BenchModel:
    """The model file: ``path``, else the bundled bench_3m.onnx, else the same
    architecture (models.standin.build_bench_3m, seed 0) exported into a temp dir."""
    if path is not None:
        return BenchModel(Path(path), "given with --model")
    bundled = REPO / "models" / "bundled" / "bench_3m.onnx"
    if bundled.is_file():
        return BenchModel(bundled, "bundled models/bundled/bench_3m.onnx")
    from edgefuse.exporters.onnx_export import export
    from edgefuse.models import standin
    tmp = tempfile.TemporaryDirectory(prefix="edgefuse-bench-")
    out = export(standin.build_bench_3m(BENCH_SEED), standin.bench_contract(),
                 Path(tmp.name) / "bench_3m.onnx")
    return BenchModel(out, "exported here from models.standin.build_bench_3m(seed=0) "
                           "(no bundled bench_3m.onnx)", tmp)


def torch_twin(model_path: Path, tolerance: float = 1e-3):
    """The torch module with the weights of ``model_path`` (build_bench_3m, seed 0),
    checked against the file: returns (module, max |ORT - torch| logit difference).
    Raises ValueError when the file holds other weights."""
    import torch

    from edgefuse.exporters.onnx_export import parity
    from edgefuse.models import standin
    torch.set_num_threads(1)
    net = standin.build_bench_3m(BENCH_SEED).eval()
    diff = parity(net, model_path)
    if not diff <= tolerance:
        raise ValueError(f"{model_path} is not models.standin.build_bench_3m(seed={BENCH_SEED}): "
                         f"its logits differ from the torch module's by {diff:.3g} (> "
                         f"{tolerance}); pass no --model to benchmark the bench model")
    return net, diff


# -- the machine --------------------------------------------------------------
def pin_to_core(core: int | None) -> int | None:
    """Pin this process (and its children) to one core; returns it (None: not pinned)."""
    if core is None or not hasattr(os, "sched_setaffinity"):
        return None
    os.sched_setaffinity(0, {core})
    return core


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def environment(extra_modules: tuple[str, ...] = ()) -> dict:
    import importlib
    versions = {"python": platform.python_version()}
    for name in ("numpy", "numba", "onnxruntime", "scipy") + tuple(extra_modules):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            versions[name] = None
    return {"cpu": cpu_model(), "cores_online": os.cpu_count(), "versions": versions,
            "platform": platform.platform()}


# -- measuring ----------------------------------------------------------------
@dataclass
class Timed:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)


class Clock:
    """Wall and CPU time of a block (CPU time shows whether another process took the core)."""

    def __enter__(self) -> "Clock":
        gc.collect()
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self.w0
        self.cpu_s = time.process_time() - self.c0


class TimedSession:
    """Wraps an ORT session to add up the time spent inside session.run."""

    def __init__(self, session):
        self._session = session
        self.seconds = 0.0
        self.calls = 0

    def run(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self._session.run(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1

    def __getattr__(self, name):
        return getattr(self._session, name)
