"""The engine target for GPU tests: one that this machine's GPU can run."""
from __future__ import annotations

import pytest

from tokensieve.runtime.tensorrt_flavors import RTX_COMPUTE_CAPABILITIES, available_flavors, local_compute_capability


def engine_target() -> str:
    """Standard TensorRT (`local`) when installed, else TensorRT-RTX for this GPU's SM; skip when neither fits."""
    if available_flavors()["tensorrt"] is not None:
        return "local"
    cc = local_compute_capability()
    sm = "sm" + cc.replace(".", "") if cc else None
    if sm not in RTX_COMPUTE_CAPABILITIES:
        pytest.skip(f"needs standard TensorRT or a GPU TensorRT-RTX can target, found compute capability {cc}")
    return f"rtx-{sm}"
