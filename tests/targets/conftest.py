"""One plugin library per test session: TensorRT(-RTX) lets a process load only one copy of the tokensieve plugins
(`plugins.load_plugins` refuses a second path), so every test module must share this build."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from assets import require

from tokensieve.targets.tensorrt import plugins


@pytest.fixture(scope="session")
def plugin_build(tmp_path_factory) -> tuple[Path, float]:
    """Compile once per test run for sm_86 (+ compute_86 PTX); (library, seconds the compile took).

    Under pytest-xdist the workers share one build (~15-25 s each otherwise): the first to get here compiles into the
    run's common base folder under a lock and records its time; the others wait for it and load that library."""
    import fcntl
    import os

    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file():
        pytest.skip("nvcc (CUDA toolkit) is not installed")
    require("tensorrt-headers")  # fetched before the tests (tests/assets.py); never downloaded here
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        t0 = time.perf_counter()
        lib = plugins.build_plugin_library(tmp_path_factory.mktemp("plugins"), archs=("86",))
        return lib, time.perf_counter() - t0
    shared = tmp_path_factory.getbasetemp().parent / "plugins-shared"  # this run's folder, common to its workers
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (also if the compile raises)
        done = shared / "built.json"  # written last: {library, seconds}
        if not done.is_file():
            t0 = time.perf_counter()
            lib = plugins.build_plugin_library(shared, archs=("86",))
            done.write_text(json.dumps({"library": str(lib), "seconds": time.perf_counter() - t0}))
        built = json.loads(done.read_text())
        return Path(built["library"]), built["seconds"]


@pytest.fixture(scope="session")
def plugin_lib(plugin_build) -> Path:
    return plugin_build[0]
