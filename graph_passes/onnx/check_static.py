"""Structural check of an exported ONNX: no data-dependent ops or shapes, only the batch axis dynamic."""
from __future__ import annotations

import re
from collections import Counter

import onnx

from tokensieve.errors import ExportError

FORBIDDEN_OPS = {
    "NonZero": "data-dependent output size",
    "ScatterND": "TensorRT's parser rejects reductions; scatters are slow",
    "Loop": "sequential loop",
    "If": "data-dependent control flow",
    "Unique": "data-dependent output size",
    "Compress": "data-dependent output size",
}
# Symbols torch.export gives backed sizes (the batch axis) look like s12; data-dependent ones like u0.
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")


def op_census(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def check_static(model: onnx.ModelProto, allowed_ops: frozenset[str] = frozenset()) -> dict:
    """Raise ExportError if `model` has a forbidden op or a non-batch dynamic dim; return a summary."""
    census = op_census(model)
    bad = {op: why for op, why in FORBIDDEN_OPS.items() if census.get(op) and op not in allowed_ops}
    if bad:
        op, why = next(iter(bad.items()))
        raise ExportError(f"Exported graph contains {op} ({why}); the graph passes should have rewritten it to a fixed budget")
    batch_symbols = {
        vi.type.tensor_type.shape.dim[0].dim_param
        for vi in model.graph.input
        if vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].dim_param
    }
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    values = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    dynamic = []
    for vi in values:
        if not vi.type.HasField("tensor_type"):
            continue
        shape = vi.type.tensor_type.shape
        for d in shape.dim:
            if d.HasField("dim_value"):
                continue
            symbols = set(_SYMBOL.findall(d.dim_param))
            if not d.dim_param or not symbols <= (batch_symbols | {"batch"}):
                dynamic.append((vi.name, d.dim_param or "?"))
    if dynamic:
        name, dim = dynamic[0]
        raise ExportError(
            f"Exported graph has {len(dynamic)} value(s) with a non-batch dynamic size, e.g. {name!r} dim {dim!r}; "
            "only the batch axis may be dynamic"
        )
    return {"ops": dict(census), "num_values_checked": len(values)}
