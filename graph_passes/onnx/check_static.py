"""Structural check of an exported ONNX: no data-dependent ops or shapes, only the batch axis dynamic.

`check_static` checks a ModelProto; `check_static_model` is the same check as an ONNX pass (graph_passes/pipeline.py
ONNX_PASSES): it never modifies the model, so it is idempotent by construction.
"""
from __future__ import annotations

from collections import Counter

import onnx
import onnx_ir as ir
from onnx_ir.passes import PassResult

from tokensieve.errors import ExportError
from tokensieve.graph_passes.pass_manager import PassContext, check_pass

FORBIDDEN_OPS = {
    "NonZero": "data-dependent output size",
    "ScatterND": "TensorRT's parser rejects reductions; scatters are slow",
    "Loop": "sequential loop",
    "If": "data-dependent control flow",
    "Unique": "data-dependent output size",
    "Compress": "data-dependent output size",
}


def _infer_with_batch(model: onnx.ModelProto, batch: int) -> list:
    """Fix every input's leading symbolic dim to `batch`, re-run shape inference, return all tensor values."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for vi in list(m.graph.input) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    values = list(inferred.graph.value_info) + list(inferred.graph.output)
    return [vi for vi in values if vi.type.HasField("tensor_type")]


def op_census(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def check_static(model: onnx.ModelProto, allowed_ops: frozenset[str] = frozenset(), compacted: bool = False) -> dict:
    """Raise ExportError if `model` has a forbidden op, or a size that stays unknown once the batch is fixed.

    `compacted` (adaptive compact=true): the token axis after the compaction Slice is data-dependent by design;
    only values computed from it may have unknown sizes, and the graph outputs must still be static."""
    census = op_census(model)
    bad = {op: why for op, why in FORBIDDEN_OPS.items() if census.get(op) and op not in allowed_ops}
    if bad:
        op, why = next(iter(bad.items()))
        raise ExportError(f"Exported graph contains {op} ({why}); the graph passes should have rewritten it to a fixed budget")
    checked = 0
    for batch in (1, 2):
        values = _infer_with_batch(model, batch)
        checked = len(values)
        allowed = _downstream_of_compaction(model) if compacted else set()
        dynamic = [(vi.name, d.dim_param or "?") for vi in values for d in vi.type.tensor_type.shape.dim
                   if not d.HasField("dim_value") and vi.name not in allowed]
        if dynamic:
            name, dim = dynamic[0]
            raise ExportError(
                f"Exported graph has {len(dynamic)} value(s) whose size is unknown even with batch={batch}, e.g. {name!r} "
                f"dim {dim!r}; only the batch axis may be dynamic"
            )
    return {"ops": dict(census), "num_values_checked": checked}


@check_pass
def check_static_model(model: ir.Model, ctx: PassContext) -> PassResult:
    """check_static as a pass: ops a stage asked for (ctx.allowed_ops: Loop for loop=true) are allowed, and a
    compacted token axis (ctx.compacts) may be data-dependent. Raises ExportError; never modifies `model`."""
    check_static(ir.to_proto(model), allowed_ops=ctx.allowed_ops, compacted=ctx.compacts)
    return PassResult(model, False)


def _downstream_of_compaction(model: onnx.ModelProto) -> set[str]:
    """Names of the values computed from a compact_valid Slice (exporter/onnx_translations.py) - graph outputs
    excluded, so those must stay static."""
    frontier = {o for n in model.graph.node if n.op_type == "Slice" and _from_compact_valid(n) for o in n.output}
    seen = set(frontier)
    for n in model.graph.node:  # nodes are topologically sorted
        if any(i in seen for i in n.input):
            seen.update(n.output)
    return seen - {o.name for o in model.graph.output}


def _from_compact_valid(node: onnx.NodeProto) -> bool:
    return any(p.key == "pkg.torch.onnx.fx_node" and "tokensieve.compact_valid" in p.value for p in node.metadata_props)
