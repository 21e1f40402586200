"""What `python -m build` / `pip install` make of the tree: the sdist carries the C++ runtime (runtime/cpp), the plugin
sources and the LICENSE; the wheel (and the editable install, the same setuptools configuration) carries the plugin,
kernel-harness and toy-ViT files but not the C++ runtime; neither build prints a setuptools warning."""
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
    log = ""
    for hook in ("build_sdist", "build_wheel"):  # one process each, as pip / build run them
        code = f"import sys; from setuptools import build_meta; build_meta.{hook}(sys.argv[1])"
        proc = subprocess.run([sys.executable, "-W", "always", "-c", code, str(tmp_path / "dist")], cwd=src,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONWARNINGS": "always"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        log += proc.stdout + proc.stderr
    warnings = [line for line in log.splitlines() if "warning" in line.lower()
                and "byte-compiling is disabled" not in line]  # $PYTHONDONTWRITEBYTECODE, not the configuration
    # e.g. SetuptoolsDeprecationWarning: `project.license` as a TOML table; "Package 'tokensieve.runtime.cpp' is
    # absent from the `packages` configuration" (MANIFEST.in files taken as package data)
    assert not warnings, warnings
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
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
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    import zipfile

    with zipfile.ZipFile(wheel) as whl:
        files = set(whl.namelist())
    assert {"tokensieve/targets/tensorrt/plugin_src/token_compact.cu", "tokensieve/targets/tensorrt/harness/harness.cu",
            "tokensieve/toy_vit/config.json"} <= files
    assert not [n for n in files if "/cpp/" in n]  # the C++ runtime is built from the sdist / repository, not installed
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in files)
