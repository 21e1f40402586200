"""TARGETS: the one place a build backend is named by a string (`--target`'s family, api.build)."""
from __future__ import annotations

from tokensieve.errors import ConfigError

from .base import Target
from .tensorrt.target import TensorRTTarget

TARGETS: dict[str, Target] = {
    "tensorrt": TensorRTTarget(),   # rtx-smXY (TensorRT-RTX, no GPU needed) and local (standard TensorRT)
}


def get_target(name: str) -> Target:
    """TARGETS[name], or a one-line ConfigError naming the choices."""
    try:
        return TARGETS[name]
    except KeyError:
        raise ConfigError(f"Unknown target backend {name!r}; use one of {', '.join(TARGETS)}") from None
