"""Run built artifacts and time them. Imports onnxruntime and numpy only: never torch.export, onnx or targets/."""
from .onnxruntime_runner import OrtRunner
from .timing import LatencyStats, measure_alternating, speedup

__all__ = ["OrtRunner", "LatencyStats", "measure_alternating", "speedup"]
