"""edgefuse.exporters: write edgefuse ONNX models from PyTorch (needs the train extra).

Import ``edgefuse.exporters.onnx_export`` explicitly; this package itself
imports nothing heavy.
"""
