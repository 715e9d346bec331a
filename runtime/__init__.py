"""edgefuse.runtime: the streaming core (alignment, windowing, inference, fusion).

Imports numpy, numba, onnxruntime and scipy only; never torch.
"""
from edgefuse.runtime.errors import EdgefuseError

__version__ = "0.1.0"
__all__ = ["EdgefuseError", "__version__"]
