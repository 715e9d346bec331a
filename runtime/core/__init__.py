"""edgefuse.runtime.core: the pure streaming core.

chunks -> stream (reorder, clock, resample) -> aligner (windows) -> pipeline
(micro-batches) -> fusion (ONNX model, fallbacks) -> decisions. No threads,
no I/O, no transport: it imports the standard library, numpy, numba and
onnxruntime only (tests/test_layers.py holds it to that).
"""
