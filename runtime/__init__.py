"""edgefuse.runtime: the streaming core (alignment, windowing, inference, fusion).

Imports numpy, numba and onnxruntime only (scipy is a dependency of the
readers' tests, not of the core path); never torch.
"""
from edgefuse.runtime.errors import EdgefuseError

__version__ = "0.1.0"
__all__ = ["EdgefuseError", "__version__"]
