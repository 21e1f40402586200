"""The `<engine>.json` written next to every engine, and the check that an engine fits this machine."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from tokensieve.errors import TargetError

from .flavors import FLAVOR_LABELS, RTX_COMPUTE_CAPABILITIES, available_flavors, local_compute_capability

SCHEMA = "tokensieve.tensorrt-engine/1"
_REQUIRED_KEYS = ("schema", "flavor", "tensorrt_version")


def metadata_path_for(engine_path: str | os.PathLike) -> Path:
    """model.engine -> model.engine.json"""
    return Path(str(engine_path) + ".json")


def tokensieve_version() -> str:
    try:
        return importlib.metadata.version("tokensieve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dtype_name(trt: ModuleType, dtype) -> str:
    """trt.DataType.FLOAT -> 'float32' (ONNX/numpy spelling); unknown types keep TensorRT's name, lowercased."""
    names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
             "INT32": "int32", "INT64": "int64", "BOOL": "bool", "FP8": "float8e4m3fn", "INT4": "int4", "FP4": "float4e2m1"}
    return names.get(dtype.name, dtype.name.lower())


def network_io(trt: ModuleType, network) -> list[dict[str, Any]]:
    """Inputs then outputs of a parsed network: name, shape (-1 = dynamic), dtype, mode."""
    def row(t, mode: str) -> dict[str, Any]:
        return {"name": t.name, "shape": [int(d) for d in t.shape], "dtype": dtype_name(trt, t.dtype), "mode": mode}
    return ([row(network.get_input(i), "input") for i in range(network.num_inputs)]
            + [row(network.get_output(i), "output") for i in range(network.num_outputs)])


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
