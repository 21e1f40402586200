"""One plugin library per test session: TensorRT(-RTX) lets a process load only one copy of the tokensieve plugins
(`plugins.load_plugins` refuses a second path), so every test module must share this build."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from assets import require

from tokensieve.targets.tensorrt import plugins


@pytest.fixture(scope="session")
def plugin_build(tmp_path_factory) -> tuple[Path, float]:
    """Compile once per session for sm_86 (+ compute_86 PTX); (library, seconds)."""
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file():
        pytest.skip("nvcc (CUDA toolkit) is not installed")
    require("tensorrt-headers")  # fetched before the tests (tests/assets.py); never downloaded here
    t0 = time.perf_counter()
    lib = plugins.build_plugin_library(tmp_path_factory.mktemp("plugins"), archs=("86",))
    return lib, time.perf_counter() - t0


@pytest.fixture(scope="session")
def plugin_lib(plugin_build) -> Path:
    return plugin_build[0]
