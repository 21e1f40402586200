"""Run built artifacts and time them. Never imports torch.export, onnx or targets/ (torch.cuda only in TrtRunner)."""
from .onnxruntime_runner import OrtRunner
from .tensorrt_runner import TrtRunner
from .timing import LatencyStats, measure_alternating, speedup

# The one place a backend is named by a string (`tokensieve bench --backend`, api.bench).
RUNNERS = {"onnxruntime": OrtRunner, "tensorrt": TrtRunner}

__all__ = ["OrtRunner", "TrtRunner", "RUNNERS", "LatencyStats", "measure_alternating", "speedup"]
