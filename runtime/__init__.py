"""Run built artifacts and time them. Never imports onnx or targets/, nor torch.export tracing (torch.cuda only in
TrtRunner and TorchRunner, torch.export.load only in TorchRunner).

The runners load on first use (`from tokensieve.runtime import OrtRunner`), so importing a light submodule
(tensorrt_flavors, engine_metadata) does not import ONNX Runtime.
"""
from __future__ import annotations

import importlib

_LAZY = {"OrtRunner": "onnxruntime_runner", "TrtRunner": "tensorrt_runner", "TorchRunner": "torch_runner",
         "LatencyStats": "timing",
         "measure_alternating": "timing", "speedup": "timing", "BaseRunner": "base"}

__all__ = ["BaseRunner", "OrtRunner", "TrtRunner", "TorchRunner", "RUNNERS", "LatencyStats", "measure_alternating", "speedup"]


def __getattr__(name: str):
    if name == "RUNNERS":
        # The one place a backend is named by a string (`tokensieve bench --backend`, api.bench).
        runners = {"onnxruntime": __getattr__("OrtRunner"), "tensorrt": __getattr__("TrtRunner"),
                   "torch": __getattr__("TorchRunner")}
        globals()["RUNNERS"] = runners
        return runners
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
