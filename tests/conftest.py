"""Make the helper modules in tests/ (tiny_models, tiny_traced) importable from every test folder."""
from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def _has_gpu() -> bool:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pytest_collection_modifyitems(config, items):
    """Skip every @pytest.mark.gpu test cleanly on a machine without an NVIDIA GPU."""
    import pytest

    if any("gpu" in item.keywords for item in items) and not _has_gpu():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi found none)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
