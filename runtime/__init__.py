"""edgefuse.runtime: the streaming core and the service around it.

``edgefuse.runtime.core``: chunks -> aligned windows -> fused decisions
(numpy, numba and onnxruntime only; never torch).
``edgefuse.runtime.service``: the daemon, sinks, outbox, metrics, replay.
``edgefuse.runtime.cli``: the ``edgefuse`` command on top of everything.
"""
import os

# onnxruntime (1.32 seen here) looks up its telemetry collector after ~30 s of
# inference; an edge box must not call out on its own. Set before any module of
# edgefuse imports onnxruntime (they all import this package first); a user's
# own setting wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from edgefuse.runtime.core.errors import EdgefuseError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["EdgefuseError", "__version__"]
