"""TensorRT target: ONNX -> engine (+ `<engine>.json`) with TensorRT-RTX (ahead of time, no GPU) or local TensorRT."""
from ..base import VALID_TARGETS, BuildSpec, EngineInfo, ParsedTarget, Precision, parse_target
from .target import TensorRTTarget, build_engine

__all__ = ["BuildSpec", "EngineInfo", "ParsedTarget", "Precision", "TensorRTTarget", "VALID_TARGETS", "build_engine",
           "parse_target"]
