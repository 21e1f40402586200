"""Drop the verification outputs: graph(out, kept_idx.1, kept_idx.3) -> graph(out), minus the nodes only they used.

The debug ONNX (model.debug.onnx) returns every stage's kept positions as `kept_idx.<block>` (fx
add_kept_index_outputs); the deployable model.onnx is the same graph without them, and without the nodes that only
fed them (e.g. adaptive's -1 fill of its invalid slots).
"""
from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import PassResult
from onnx_ir.passes.common import RemoveUnusedNodesPass

from tokensieve.graph_passes.pass_manager import PassContext

DEBUG_OUTPUT_PREFIX = "kept_idx."  # api.export names the kept-position outputs kept_idx.<block>


def drop_debug_outputs(model: ir.Model, ctx: PassContext) -> PassResult:
    """Remove the graph outputs named kept_idx.* and the nodes left unused (edits model in place)."""
    outputs = model.graph.outputs
    debug = [i for i, v in enumerate(outputs) if (v.name or "").startswith(DEBUG_OUTPUT_PREFIX)]
    if not debug:
        return PassResult(model, False)
    for i in reversed(debug):
        outputs.pop(i)
    RemoveUnusedNodesPass()(model)
    return PassResult(model, True)
