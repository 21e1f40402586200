"""The sdist a user gets from `pip download --no-binary tokensieve` / `python -m build --sdist`: it carries the C++
runtime (runtime/cpp) and the plugin sources, the LICENSE, and builds without a setuptools warning."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the sdist is built from: the package folders and the files pyproject.toml / MANIFEST.in name
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "core", "exporter", "graph_passes", "runtime",
           "scripts", "targets")


def _tracked(folder: Path, names: list[str]) -> list[str]:
    return [n for n in names if n in ("__pycache__", "build", ".pytest_cache") or n.endswith((".pyc", ".so", ".engine"))]


def test_sdist_ships_cpp_runtime_plugins_and_license(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=_tracked)
        else:
            shutil.copy2(path, src / name)
    code = ("import sys; from setuptools import build_meta; "
            "print('SDIST', build_meta.build_sdist(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code, str(tmp_path / "dist")], cwd=src,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "always"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, warnings  # e.g. SetuptoolsDeprecationWarning: `project.license` as a TOML table
    sdist = tmp_path / "dist" / log.split("SDIST ", 1)[1].split()[0]
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO")
                                        and m.name.count("/") == 1)).read().decode()
    cpp = {f"runtime/cpp/{p}" for p in ("CMakeLists.txt", "README.md", "include/tokensieve/runtime.h",
                                       "src/engine_runner.cpp", "tools/tokensieve_run.cpp", "tests/selftest.cpp")}
    plugins = {f"targets/tensorrt/plugin_src/{p}" for p in ("CMakeLists.txt", "plugin_library.cpp", "token_compact.cu")}
    assert cpp | plugins | {"LICENSE", "targets/tensorrt/harness/harness.cu"} <= names, sorted(
        (cpp | plugins | {"LICENSE"}) - names)
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".engine"))]
    assert "License-Expression: Apache-2.0" in pkg_info and "License-File: LICENSE" in pkg_info
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
