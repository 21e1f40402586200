"""What a build needs from the installed TensorRT flavor: its typing, its compute-capability enum, RTX's parser link.

Two flavors share one build path: TensorRT-RTX (`tensorrt_rtx`) builds ahead-of-time engines for a named
compute capability without a GPU; standard TensorRT (`tensorrt`, 10.x/11.x) builds for the local GPU. Target names
are parsed in targets/base.py (`parse_target`); whether a flavor is installed and what GPU this machine has is the
runtime's (tokensieve.runtime.tensorrt_flavors).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType

from tokensieve.errors import TargetError
from tokensieve.runtime.tensorrt_flavors import RTX


def is_strongly_typed(trt: ModuleType, flavor: str) -> bool:
    """TensorRT-RTX and TensorRT 11 take precision from the ONNX; TensorRT 10.x still has the FP16 builder flag."""
    return flavor == RTX or not hasattr(trt.BuilderFlag, "FP16")


def rtx_compute_capability_enum(trt: ModuleType, compute_capability: str):
    """'8.6' -> trt.ComputeCapability.SM86."""
    return getattr(trt.ComputeCapability, "SM" + compute_capability.replace(".", ""))


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
