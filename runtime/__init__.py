"""Run built artifacts and time them. Never imports onnx or targets/, nor torch.export tracing (torch.cuda only in TrtRunner and TorchRunner, torch.export.load only in TorchRunner)."""
from .onnxruntime_runner import OrtRunner
from .tensorrt_runner import TrtRunner
from .timing import LatencyStats, measure_alternating, speedup
from .torch_runner import TorchRunner

# The one place a backend is named by a string (`tokensieve bench --backend`, api.bench).
RUNNERS = {"onnxruntime": OrtRunner, "tensorrt": TrtRunner, "torch": TorchRunner}

__all__ = ["OrtRunner", "TrtRunner", "TorchRunner", "RUNNERS", "LatencyStats", "measure_alternating", "speedup"]
