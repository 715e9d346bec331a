"""edgefuse.runtime: the streaming core and the service around it.

``edgefuse.runtime.core``: chunks -> aligned windows -> fused decisions
(numpy, numba and onnxruntime only; never torch).
``edgefuse.runtime.service``: the daemon, sinks, outbox, metrics, replay.
``edgefuse.runtime.cli``: the ``edgefuse`` command on top of everything.
"""
from edgefuse.runtime.core.errors import EdgefuseError

__version__ = "0.1.0"
__all__ = ["EdgefuseError", "__version__"]
