"""Which TensorRT flavors import here, and what GPU this machine has; shared by the builder and the runner.

Two flavors: TensorRT-RTX (`tensorrt_rtx`) builds ahead-of-time engines for a named compute capability without a GPU;
standard TensorRT (`tensorrt`, 10.x/11.x) builds for the local GPU. Moved here from targets/tensorrt/flavors.py so the
runtime can check an engine without importing targets/.
"""
from __future__ import annotations

import ctypes
import functools
import importlib
from types import ModuleType

from ..errors import TargetError

RTX = "tensorrt_rtx"
STANDARD = "tensorrt"
FLAVOR_LABELS = {RTX: "TensorRT-RTX", STANDARD: "TensorRT"}

# rtx-smXY -> compute capability; the SMs TensorRT-RTX 1.7 can build for (no SM87 Jetson Orin, no SM90 H100).
RTX_COMPUTE_CAPABILITIES = {"sm75": "7.5", "sm80": "8.0", "sm86": "8.6", "sm89": "8.9", "sm120": "12.0", "sm121": "12.1"}


@functools.cache
def _try_import(flavor: str) -> ModuleType | None:
    # The `tensorrt` pip bindings import-fail with OSError/ImportError when libnvinfer is missing.
    try:
        return importlib.import_module(flavor)
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return None


def available_flavors() -> dict[str, str | None]:
    """{'tensorrt_rtx': version or None, 'tensorrt': version or None} for what imports here."""
    return {f: getattr(_try_import(f), "__version__", None) for f in (RTX, STANDARD)}


def import_flavor(flavor: str) -> ModuleType:
    """Import `tensorrt_rtx` or `tensorrt`, or raise a TargetError that says how to get it."""
    trt = _try_import(flavor)
    if trt is not None:
        return trt
    if flavor == RTX:
        raise TargetError("TensorRT-RTX is not installed; pip install 'tokensieve[rtx]' (package tensorrt-rtx)")
    raise TargetError(
        "standard TensorRT is not installed; use --target rtx-sm86 (or another rtx-smXX) to build ahead of time "
        "without a GPU, or install TensorRT (JetPack, or NVIDIA's `tensorrt` wheel) to build for this GPU"
    )


@functools.cache
def local_compute_capability() -> str | None:
    """Compute capability of CUDA device 0 (e.g. '8.7'), read from the driver; None without a usable GPU."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            cuda = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(dev), 0) != 0:
        return None
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76 (cuda.h)
    if cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev):
        return None
    return f"{major.value}.{minor.value}"
