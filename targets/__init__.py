"""Targets: ONNX -> deployable artifacts (TensorRT / TensorRT-RTX engines + metadata) behind one `Target` interface.

`tokensieve.targets.base` (Target, BuildSpec, Precision, the defaults) imports no backend; the backends load when
`TARGETS` (tokensieve.targets.registry) is first used.
"""
from .base import DEFAULT_MAX_BATCH, DEFAULT_PRECISION, DEFAULT_TARGET, BuildSpec, EngineInfo, Precision, Target

__all__ = ["BuildSpec", "DEFAULT_MAX_BATCH", "DEFAULT_PRECISION", "DEFAULT_TARGET", "EngineInfo", "Precision",
           "TARGETS", "Target", "get_target"]


def __getattr__(name: str):
    if name in ("TARGETS", "get_target"):
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
