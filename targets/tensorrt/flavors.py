"""Which TensorRT a target string means, whether it is installed, and what GPU this machine has.

Two flavors share one build path: TensorRT-RTX (`tensorrt_rtx`) builds ahead-of-time engines for a named
compute capability without a GPU; standard TensorRT (`tensorrt`, 10.x/11.x) builds for the local GPU.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

from tokensieve.errors import ConfigError, TargetError

RTX = "tensorrt_rtx"
STANDARD = "tensorrt"
FLAVOR_LABELS = {RTX: "TensorRT-RTX", STANDARD: "TensorRT"}

# rtx-smXY -> compute capability; the SMs TensorRT-RTX 1.7 can build for (no SM87 Jetson Orin, no SM90 H100).
RTX_COMPUTE_CAPABILITIES = {"sm75": "7.5", "sm80": "8.0", "sm86": "8.6", "sm89": "8.9", "sm120": "12.0", "sm121": "12.1"}
VALID_TARGETS = tuple(f"rtx-{sm}" for sm in RTX_COMPUTE_CAPABILITIES) + ("local",)


class ParsedTarget(NamedTuple):
    flavor: str                      # "tensorrt_rtx" | "tensorrt"
    compute_capability: str | None   # "8.6"; None means the local GPU (standard TensorRT)


def parse_target(s: str) -> ParsedTarget:
    """'rtx-sm86' -> ('tensorrt_rtx', '8.6'); 'local' -> ('tensorrt', None)."""
    key = str(s).strip().lower()
    if key == "local":
        return ParsedTarget(STANDARD, None)
    sm = key.removeprefix("rtx-")
    if key.startswith("rtx-") and sm in RTX_COMPUTE_CAPABILITIES:
        return ParsedTarget(RTX, RTX_COMPUTE_CAPABILITIES[sm])
    raise ConfigError(f"Unknown TensorRT target {s!r}; use one of {', '.join(VALID_TARGETS)}")


def rtx_compute_capability_enum(trt: ModuleType, compute_capability: str):
    """'8.6' -> trt.ComputeCapability.SM86."""
    return getattr(trt.ComputeCapability, "SM" + compute_capability.replace(".", ""))


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


def ensure_rtx_parser_link(folder: Path | None = None) -> Path | None:
    """Make sure `libtensorrt_rtx.so` exists next to the wheel's `libtensorrt_rtx.so.1`; return the link.

    The TensorRT-RTX ONNX parser dlopens the unversioned `libtensorrt_rtx.so`, which the pip wheel does not ship;
    without it some parses abort the whole process ("terminate called without an active exception", FACTS.md).
    The parser reaches that dlopen (for `getPrivateApi_INTERNAL`) when it creates an IPluginV3 plugin: custom
    plugin nodes such as tokensieve's, and importers backed by built-in V3 plugins (NonZero, GroupQueryAttention,
    MatMulNBits, ...). The parser's RPATH is $ORIGIN, so a link in the wheel folder is found.
    `folder` defaults to the `tensorrt_rtx_libs` package folder; returns None when there is none (a system
    install provides the unversioned name itself).
    """
    if folder is None:
        spec = importlib.util.find_spec("tensorrt_rtx_libs")
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = Path(list(spec.submodule_search_locations)[0])
    versioned, link = folder / "libtensorrt_rtx.so.1", folder / "libtensorrt_rtx.so"
    if not versioned.exists() or link.exists():  # exists() follows the link, so a dangling one is redone
        return link if link.exists() else None
    if not os.access(folder, os.W_OK):
        raise TargetError(
            f"TensorRT-RTX's ONNX parser needs {str(link)!r} but {str(folder)!r} is not writable; "
            f"run: ln -sf libtensorrt_rtx.so.1 {link}"
        )
    # Symlink under a temp name, then rename: safe when several processes build at once.
    tmp = folder / f".libtensorrt_rtx.so.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.symlink(versioned.name, tmp)
        os.replace(tmp, link)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise TargetError(f"Cannot create {str(link)!r} ({e.strerror}); run: ln -sf libtensorrt_rtx.so.1 {link}") from e
    return link


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
