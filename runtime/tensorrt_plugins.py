"""Register a TensorRT plugin library (libtokensieve_plugins.so) with a flavor's plugin registry, once per process.

Shared by the builder (targets/tensorrt/plugins.py, before parsing) and TrtRunner (before deserializing).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from types import ModuleType

from ..errors import TargetError

LIBRARY_NAME = "libtokensieve_plugins.so"   # what targets/tensorrt/plugins.py builds
PLUGIN_LIB_ENV = "TOKENSIEVE_PLUGIN_LIB"      # where the Python API looks for it first

_LOADED: dict[str, Path] = {}   # TensorRT module name -> the plugin library its registry holds
_LOAD_LOCK = threading.Lock()


def loaded_plugin_library(trt_module: ModuleType) -> Path | None:
    """The library `trt_module`'s registry already holds (loaded through this module), or None."""
    return _LOADED.get(trt_module.__name__)


def register_plugin_library(trt_module: ModuleType, path: str | os.PathLike, fix: str) -> Path:
    """Register the library's creators with `trt_module`'s plugin registry (once per process); return its path.

    Goes through `load_library`, i.e. the exported getCreators: never registerCreator, which crashes under
    TensorRT-RTX (its IPluginRegistry vtable differs from the 10.x headers the library is compiled against).
    `fix` ends the one-line error when the file is missing or does not load.
    """
    lib = Path(path)
    if not lib.is_file():
        raise TargetError(f"Plugin library {str(lib)!r} does not exist; {fix}")
    lib = lib.resolve()
    with _LOAD_LOCK:
        loaded = _LOADED.get(trt_module.__name__)
        if loaded == lib:
            return lib
        if loaded is not None:  # creators are global per (name, version, namespace): a second copy cannot register
            raise TargetError(f"{trt_module.__name__} already holds tokensieve plugins from {str(loaded)!r}; "
                              f"one process can load one copy, so restart to use {str(lib)!r}")
        handle = trt_module.get_plugin_registry().load_library(str(lib))
        if handle is None:
            raise TargetError(f"{trt_module.__name__} could not load plugin library {str(lib)!r} (it must export "
                              f"getCreators, see `nm -D`, and match this CPU architecture); rebuild it or {fix}")
        _LOADED[trt_module.__name__] = lib
    return lib
