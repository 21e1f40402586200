"""What the builder adds to `<engine>.json`: versions and the network's I/O (the schema and checks are in runtime/)."""
from __future__ import annotations

import importlib.metadata
from types import ModuleType
from typing import Any

# The JSON schema and the checks live in the runtime (TrtRunner refuses mismatching engines); re-exported here.
from tokensieve.runtime.engine_metadata import (  # noqa: F401
    SCHEMA, check_engine_compatible, check_engine_file, metadata_path_for, read_engine_metadata, sha256_file)


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
    """Inputs then outputs of a parsed network: name, shape (-1 = dynamic), dtype, mode."""
    def row(t, mode: str) -> dict[str, Any]:
        return {"name": t.name, "shape": [int(d) for d in t.shape], "dtype": dtype_name(trt, t.dtype), "mode": mode}
    return ([row(network.get_input(i), "input") for i in range(network.num_inputs)]
            + [row(network.get_output(i), "output") for i in range(network.num_outputs)])
