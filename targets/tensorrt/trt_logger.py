"""Re-export: the collecting TensorRT logger lives in tokensieve.runtime.tensorrt_logger (the runner uses it too)."""
from tokensieve.runtime.tensorrt_logger import collecting_logger

__all__ = ["collecting_logger"]
