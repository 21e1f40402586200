"""Test assets that need a download, fetched before the tests by `bash scripts/test.sh` (never at test time).

    python tests/assets.py fetch      # what scripts/test.sh runs: both assets, each once, atomically
    python tests/assets.py status     # where each one is, or that it is missing

- TensorRT 10.14 headers (NvInfer*.h), vendored in the PyPI wheel `kernel-lens==2.0.1` (only the headers are
  unpacked; kernel-lens itself is never installed or imported): the C++ runtime and plugin builds compile against
  them. $TENSORRT_INCLUDE_DIR wins when it holds NvInferRuntime.h.
- transformers 4.57 and its pins (scripts/transformers-4.57.txt), installed with `pip --target` into the ignored
  build/compat/: the compatibility test runs tokensieve under the other module spelling.

A test that needs one calls `require(...)`: without the asset it skips with the command that fetches it, and under
CI (CI=true) it fails instead, so a missing asset can never pass silently.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PINS = REPO / "scripts" / "transformers-4.57.txt"
FETCH = "python tests/assets.py fetch (scripts/test.sh runs it)"


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokensieve"


def tensorrt_headers() -> Path | None:
    """A folder holding NvInferRuntime.h: $TENSORRT_INCLUDE_DIR or the fetched kernel-lens headers; None if neither."""
    env = os.environ.get("TENSORRT_INCLUDE_DIR")
    if env and (Path(env) / "NvInferRuntime.h").is_file():
        return Path(env)
    dest = _cache_root() / "kernel-lens-2.0.1" / "include" / "tensorrt"
    return dest if (dest / "NvInferRuntime.h").is_file() else None


def transformers_457_site() -> Path:
    """Where the transformers 4.57 pins are (or will be) installed, keyed by the pin file's hash."""
    digest = hashlib.sha256(PINS.read_bytes()).hexdigest()[:12]
    return REPO / "build" / "compat" / f"transformers-4.57-{digest}"


ASSETS = {
    "tensorrt-headers": tensorrt_headers,
    "transformers-4.57": lambda: (site if (site := transformers_457_site()).is_dir() else None),
}


def require(name: str) -> Path:
    """The asset's path; pytest.skip (pytest.fail under CI=true) naming the fetch command when it is missing."""
    import pytest

    path = ASSETS[name]()
    if path is not None:
        return path
    message = f"test asset {name!r} is missing: run {FETCH}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def _fetch_headers() -> Path:
    from tokensieve.targets.tensorrt.plugins import ensure_headers  # the same cache the plugin build reads

    return ensure_headers()


def _fetch_transformers_457() -> Path:
    site = transformers_457_site()
    if site.is_dir():
        return site
    site.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{site.name}.", dir=site.parent))
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-input", "--target", str(tmp),
                        "-r", str(PINS)], check=True, timeout=600)
        try:
            tmp.rename(site)
        except OSError:  # another process installed it first
            if not site.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return site


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "status"
    if command == "fetch":
        for name, fetch in (("tensorrt-headers", _fetch_headers), ("transformers-4.57", _fetch_transformers_457)):
            print(f"test asset {name}: {fetch()}", file=sys.stderr)
        return 0
    if command == "status":
        for name, find in ASSETS.items():
            print(f"{name}: {find() or 'MISSING (' + FETCH + ')'}")
        return 0
    print("usage: python tests/assets.py fetch|status", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
