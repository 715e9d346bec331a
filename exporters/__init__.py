"""edgefuse.exporters: write edgefuse ONNX models from PyTorch (needs the train extra).

Import ``edgefuse.exporters.onnx_export`` explicitly; this package itself
imports nothing heavy.
"""

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")   # see edgefuse/runtime/__init__.py
