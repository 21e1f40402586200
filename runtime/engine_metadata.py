"""The `<engine>.json` written next to every engine: its schema (one place), and the checks that an engine fits here.

Plain JSON and file checks (no TensorRT import). The builder (targets/tensorrt/builder.py) writes a document with
`engine_metadata(...)`, which refuses a missing or unknown key; every reader (TrtRunner, bench, inspect, the C++
runtime) goes through `read_engine_metadata`, which hands back every key of the current version.

Versions (the number after the slash in "schema"):
- 2 (current): every key of `FIELDS` is written; `dims` / `input_dim_names` are {} unless a non-batch dim is
  dynamic, `plugins` / `plugin_substitutions` are [] without a plugin library.
- 1 (tokensieve before 2026-12): only "schema", "flavor" and "tensorrt_version" were always there; the others were
  added over time or only when they applied. A version-1 document is read with `V1_DEFAULTS` for what it lacks
  (a missing `engine_sha256`: the file is checked by size only; a missing `io_tensors`: TrtRunner cannot bind it).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import TargetError
from ..manifest import read_document
from .tensorrt_flavors import FLAVOR_LABELS, RTX_COMPUTE_CAPABILITIES, available_flavors, local_compute_capability

SCHEMA_PREFIX = "tokensieve.tensorrt-engine/"
SCHEMA_VERSION = 2
SCHEMA = f"{SCHEMA_PREFIX}{SCHEMA_VERSION}"
_REQUIRED_KEYS = ("schema", "flavor", "tensorrt_version")   # in every version

# Every key of a version-2 document, in the order the builder writes them.
FIELDS = (
    "schema", "tokensieve_version", "flavor", "tensorrt_version",
    "target",                  # rtx-smXY | local
    "compute_capability",      # "8.6"
    "precision",               # fp32 | fp16
    "tf32",                    # TF32 math for fp32 layers; None where the flavor has no such flag
    "build_seconds", "engine_size_bytes",
    "engine_sha256",           # TrtRunner refuses a file that differs
    "created_utc",
    "onnx",                    # {"file", "sha256"} of the ONNX the engine was built from
    "io_tensors",              # [{"name", "shape" (-1 = dynamic), "dtype", "mode": input|output}]
    "optimization_profile",    # {input: {"min", "opt", "max"}}, {} for a static engine
    "dims",                    # {dim name: {"min", "opt", "max"}} of dynamic dims other than batch (--dims)
    "input_dim_names",         # {input: [dim name or None per axis]} when `dims` is not empty
    "build_warnings",          # the first 20 TensorRT warnings
    "data_dependent_shapes",   # a size computed from data (CUDA graphs cannot capture it)
    "plugins",                 # [{"file", "sha256", "embedded"}] of the plugin library the engine needs
    "plugin_substitutions",    # standard-op subgraphs the plugins replaced in this build
)

# A dynamic dim named after another in `dims` / `input_dim_names`: torch.export spells a derived dim as an
# expression, e.g. FastV decode's "pruned_past_sequence + 1"; its range is NAME's shifted by K (builder and runner).
OFFSET_DIM = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*\+\s*(\d+)\s*")

# What a version-1 reader assumes for a key the document lacks (see the module docstring).
V1_DEFAULTS = {"tokensieve_version": None, "target": None, "compute_capability": None, "precision": "fp32",
               "tf32": None, "build_seconds": None, "engine_size_bytes": None, "engine_sha256": None,
               "created_utc": None, "onnx": None, "io_tensors": [], "optimization_profile": {}, "dims": {},
               "input_dim_names": {}, "build_warnings": [], "data_dependent_shapes": False, "plugins": [],
               "plugin_substitutions": []}


def tokensieve_version() -> str:
    try:
        return importlib.metadata.version("tokensieve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def dtype_name(trt: ModuleType, dtype) -> str:
    """trt.DataType.FLOAT -> 'float32' (ONNX/numpy spelling); unknown types keep TensorRT's name, lowercased."""
    names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
             "INT32": "int32", "INT64": "int64", "BOOL": "bool", "FP8": "float8e4m3fn", "INT4": "int4", "FP4": "float4e2m1"}
    return names.get(dtype.name, dtype.name.lower())


def network_io(trt: ModuleType, network) -> list[dict[str, Any]]:
    """Inputs then outputs of a parsed network (`io_tensors`): name, shape (-1 = dynamic), dtype, mode."""
    def row(t, mode: str) -> dict[str, Any]:
        return {"name": t.name, "shape": [int(d) for d in t.shape], "dtype": dtype_name(trt, t.dtype), "mode": mode}
    return ([row(network.get_input(i), "input") for i in range(network.num_inputs)]
            + [row(network.get_output(i), "output") for i in range(network.num_outputs)])


def metadata_path_for(engine_path: str | os.PathLike) -> Path:
    """model.engine -> model.engine.json"""
    return Path(str(engine_path) + ".json")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def engine_metadata(extra: dict | None = None, **fields) -> dict:
    """A version-2 document: every key of FIELDS given as a keyword (InternalError otherwise), then `extra`
    (caller keys such as {"tokensieve": ...}, which may not reuse a schema key)."""
    from ..errors import InternalError

    missing, unknown = [k for k in FIELDS[1:] if k not in fields], sorted(set(fields) - set(FIELDS))
    if missing or unknown:
        raise InternalError(f"engine metadata: missing keys {missing}, unknown keys {unknown}")
    clash = sorted(set(extra or {}) & set(FIELDS))
    if clash:
        raise InternalError(f"extra_metadata keys {clash} collide with engine metadata keys")
    return {"schema": SCHEMA, **{k: fields[k] for k in FIELDS[1:]}, **(extra or {})}


def schema_version(metadata: dict) -> int | None:
    """2 for "tokensieve.tensorrt-engine/2"; None if "schema" is not a tokensieve engine schema."""
    schema = metadata.get("schema") if isinstance(metadata, dict) else None
    version = schema[len(SCHEMA_PREFIX):] if isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX) else ""
    return int(version) if version.isdigit() else None


def normalized(metadata: dict, where: str = "engine metadata") -> dict:
    """`metadata` with every key of the current version: version 1 gets V1_DEFAULTS for what it lacks; a version-2
    document must have them all. TargetError (one line) for anything else."""
    fix = "rebuild the engine with `tokensieve build`"
    version = schema_version(metadata)
    if version is None or any(k not in metadata for k in _REQUIRED_KEYS):
        raise TargetError(f"{where} is not tokensieve engine metadata (needs {', '.join(_REQUIRED_KEYS)}); {fix}")
    if version == 1:
        return {**V1_DEFAULTS, **metadata}
    if version != SCHEMA_VERSION:
        raise TargetError(f"{where} has schema version {version}, this tokensieve reads 1..{SCHEMA_VERSION}; "
                          f"upgrade tokensieve or {fix}")
    missing = [k for k in FIELDS if k not in metadata]
    if missing:
        raise TargetError(f"{where} lacks {', '.join(missing)} (required by {SCHEMA}); {fix}")
    return dict(metadata)


def read_engine_metadata(engine_path: str | os.PathLike) -> dict:
    """Load `<engine>.json` with every key of the current schema; TargetError if it is missing or not tokensieve
    engine metadata."""
    path = metadata_path_for(engine_path)
    fix = "rebuild the engine with `tokensieve build`"
    if not os.path.lexists(path):
        raise TargetError(f"No engine metadata {str(path)!r} next to the engine; {fix}")
    try:  # bounded: a regular file of at most 16 MiB (not a FIFO, device or folder), valid UTF-8 JSON
        meta = read_document(path, "json", "engine metadata", fix, error=TargetError)  # a non-object: normalized
    except TargetError as e:
        raise TargetError(f"Engine metadata {str(path)!r} is unreadable ({e.detail}); {fix}") from None
    return normalized(meta, repr(str(path)))


def rebuild_hint(metadata: dict) -> str:
    """How to rebuild the engine this (normalized) metadata describes, for the end of an error message."""
    target = metadata["target"]
    return f"rebuild it with `tokensieve build --target {target}`" if target else "rebuild it with `tokensieve build`"


def check_engine_file(engine_path: str | os.PathLike, metadata: dict) -> None:
    """Raise a one-line TargetError if the engine file's size or sha256 differs from what its metadata recorded.

    Catches a truncated copy, an engine overwritten by another build, or metadata that belongs to another engine.
    Metadata written before `engine_sha256` existed is checked by size only.
    """
    path, metadata = Path(engine_path), normalized(metadata)
    fix = rebuild_hint(metadata)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise TargetError(f"Engine {str(path)!r} does not exist; {fix}") from None
    want_size = metadata["engine_size_bytes"]   # None only in version 1
    if want_size is not None and size != want_size:
        raise TargetError(f"Engine {str(path)!r} is {size} bytes but its metadata records {want_size} "
                          f"(truncated, or the .json belongs to another build); {fix}")
    want_sha = metadata["engine_sha256"]
    if want_sha is not None and sha256_file(path) != want_sha:
        raise TargetError(f"Engine {str(path)!r} does not match the sha256 in its metadata "
                          f"(modified, or the .json belongs to another build); {fix}")


def check_engine_compatible(metadata: dict) -> None:
    """Raise a one-line TargetError if the engine's TensorRT flavor/version or GPU does not match this machine.

    Checks only what can be checked: without a GPU the compute capability is not compared.
    """
    metadata = normalized(metadata)
    fix = "rebuild it here with `tokensieve build`"
    flavor, built = metadata["flavor"], metadata["tensorrt_version"]
    if flavor not in FLAVOR_LABELS:
        raise TargetError(f"Engine metadata names unknown TensorRT flavor {flavor!r} (expected one of {', '.join(FLAVOR_LABELS)}); {fix}")
    label, installed = FLAVOR_LABELS[flavor], available_flavors()[flavor]
    if installed is None:
        raise TargetError(f"Engine was built with {label} {built} but {label} is not installed; install {label} {built} or {fix}")
    # Plans are tied to the exact TensorRT build that wrote them (no version-compatible plans here).
    if str(built) != str(installed):
        raise TargetError(f"Engine was built with {label} {built} but {label} {installed} is installed; {fix}")
    wanted, local = metadata["compute_capability"], local_compute_capability()
    if wanted and local and str(wanted) != local:
        sm = "sm" + local.replace(".", "")
        hint = f" --target rtx-{sm}" if sm in RTX_COMPUTE_CAPABILITIES else " --target local"
        raise TargetError(f"Engine was built for compute capability {wanted} but this GPU is {local}; {fix}{hint}")
