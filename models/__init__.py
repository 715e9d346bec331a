"""edgefuse.models: bundled models and the PyTorch code that builds them.

Importing this package stays torch-free: torch lives in the submodules
(``frontends``, ``standin``, ``build_standin``), which need the train extra.
``bundled_path(name)`` gives the path of a bundled ONNX file. ``commands``
(the train/export/evaluate/quantize CLI subcommands) is torch-free to import.
"""
from __future__ import annotations

from pathlib import Path

from edgefuse.runtime.core.errors import InputError

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
STANDIN_AV = "standin_av.onnx"
BENCH_3M = "bench_3m.onnx"
GV_DETECT = "gv_detect.onnx"    # trained acoustic+seismic vehicle detector (+ 2 fallbacks)
HAR_IMU = "har_imu.onnx"        # trained phone+watch IMU activity model (+ 2 fallbacks)


def bundled_path(name: str = STANDIN_AV) -> Path:
    """Path of a bundled model file (e.g. "standin_av.onnx", "bench_3m.onnx")."""
    path = BUNDLED_DIR / name
    if not path.is_file():
        available = sorted(p.name for p in BUNDLED_DIR.glob("*.onnx"))
        raise InputError(f"no bundled model {name!r} in {BUNDLED_DIR}; available: "
                         f"{available}; rebuild them with python -m edgefuse.models.build_standin",
                         path=str(path))
    return path
