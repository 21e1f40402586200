"""TensorRT target: ONNX -> engine (+ `<engine>.json`) with TensorRT-RTX (ahead of time, no GPU) or local TensorRT."""
from .builder import BuildSpec, EngineInfo, build_engine
from .engine_metadata import check_engine_compatible, read_engine_metadata
from .flavors import VALID_TARGETS, ParsedTarget, available_flavors, parse_target

__all__ = ["BuildSpec", "EngineInfo", "ParsedTarget", "VALID_TARGETS", "available_flavors", "build_engine",
           "check_engine_compatible", "parse_target", "read_engine_metadata"]
