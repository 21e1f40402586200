"""The `<engine>.json` written next to every engine, and the checks that an engine fits this machine.

Plain JSON and file checks (no TensorRT import), shared by the builder (targets/tensorrt writes the file) and
TrtRunner (which refuses a mismatching engine before deserializing it). Moved here from targets/tensorrt/engine_metadata.py.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import TargetError
from .tensorrt_flavors import FLAVOR_LABELS, RTX_COMPUTE_CAPABILITIES, available_flavors, local_compute_capability

SCHEMA = "tokensieve.tensorrt-engine/1"
_REQUIRED_KEYS = ("schema", "flavor", "tensorrt_version")


def metadata_path_for(engine_path: str | os.PathLike) -> Path:
    """model.engine -> model.engine.json"""
    return Path(str(engine_path) + ".json")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_engine_metadata(engine_path: str | os.PathLike) -> dict:
    """Load `<engine>.json`; TargetError if it is missing or not tokensieve engine metadata."""
    path = metadata_path_for(engine_path)
    fix = "rebuild the engine with `tokensieve build`"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise TargetError(f"No engine metadata {str(path)!r} next to the engine; {fix}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TargetError(f"Engine metadata {str(path)!r} is unreadable ({type(e).__name__}: {e}); {fix}") from e
    if not isinstance(meta, dict) or any(k not in meta for k in _REQUIRED_KEYS):
        raise TargetError(f"{str(path)!r} is not tokensieve engine metadata (needs {', '.join(_REQUIRED_KEYS)}); {fix}")
    return meta


def _rebuild_hint(metadata: dict) -> str:
    target = metadata.get("target")
    return f"rebuild it with `tokensieve build --target {target}`" if target else "rebuild it with `tokensieve build`"


def check_engine_file(engine_path: str | os.PathLike, metadata: dict) -> None:
    """Raise a one-line TargetError if the engine file's size or sha256 differs from what its metadata recorded.

    Catches a truncated copy, an engine overwritten by another build, or metadata that belongs to another engine.
    Metadata written before `engine_sha256` existed is checked by size only.
    """
    path = Path(engine_path)
    fix = _rebuild_hint(metadata)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise TargetError(f"Engine {str(path)!r} does not exist; {fix}") from None
    want_size = metadata.get("engine_size_bytes")
    if want_size is not None and size != want_size:
        raise TargetError(f"Engine {str(path)!r} is {size} bytes but its metadata records {want_size} "
                          f"(truncated, or the .json belongs to another build); {fix}")
    want_sha = metadata.get("engine_sha256")
    if want_sha is not None and sha256_file(path) != want_sha:
        raise TargetError(f"Engine {str(path)!r} does not match the sha256 in its metadata "
                          f"(modified, or the .json belongs to another build); {fix}")


def check_engine_compatible(metadata: dict) -> None:
    """Raise a one-line TargetError if the engine's TensorRT flavor/version or GPU does not match this machine.

    Checks only what can be checked: without a GPU the compute capability is not compared.
    """
    fix = "rebuild it here with `tokensieve build`"
    flavor, built = metadata.get("flavor"), metadata.get("tensorrt_version")
    if flavor not in FLAVOR_LABELS:
        raise TargetError(f"Engine metadata names unknown TensorRT flavor {flavor!r} (expected one of {', '.join(FLAVOR_LABELS)}); {fix}")
    label, installed = FLAVOR_LABELS[flavor], available_flavors()[flavor]
    if installed is None:
        raise TargetError(f"Engine was built with {label} {built} but {label} is not installed; install {label} {built} or {fix}")
    # Plans are tied to the exact TensorRT build that wrote them (no version-compatible plans here).
    if str(built) != str(installed):
        raise TargetError(f"Engine was built with {label} {built} but {label} {installed} is installed; {fix}")
    wanted, local = metadata.get("compute_capability"), local_compute_capability()
    if wanted and local and str(wanted) != local:
        sm = "sm" + local.replace(".", "")
        hint = f" --target rtx-{sm}" if sm in RTX_COMPUTE_CAPABILITIES else " --target local"
        raise TargetError(f"Engine was built for compute capability {wanted} but this GPU is {local}; {fix}{hint}")
