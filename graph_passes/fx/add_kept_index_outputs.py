"""Expose each stage's kept positions as graph outputs: return (out, ...) -> return (out, kept_0, kept_1, ...).

The first output is the model's (a pytree output keeps only its first leaf); the (B, K) kept-position tensors of
the inserted stages follow in graph order. The exporter names them `kept_idx.<block>` and verification compares them
with the eager reference; the deployable ONNX drops them again (graph_passes/onnx/drop_debug_outputs.py).
"""
from __future__ import annotations

from onnx_ir.passes import PassResult  # (model, modified); model is a GraphModule here
from torch import fx

from tokensieve.graph_passes.fx.insert_prune_stages import kept_index_nodes
from tokensieve.graph_passes.pass_manager import PassContext


def add_kept_index_outputs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Make gm return (original first output, *kept positions of every stage) as a flat tuple (edits gm in place).

    A graph without stages is left alone. Idempotent: outputs that already are exactly that are not touched."""
    kept = kept_index_nodes(gm)
    if not kept:
        return PassResult(gm, False)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    (orig,) = out_node.args
    first = orig[0] if isinstance(orig, (tuple, list)) else orig
    wanted = (tuple([first, *kept]),)
    plain = type(gm.graph._codegen) is fx.graph.CodeGen
    if plain and out_node.args == wanted:
        return PassResult(gm, False)
    gm.graph._codegen = fx.graph.CodeGen()  # plain positional inputs, flat tuple output
    out_node.args = wanted
    gm.recompile()
    return PassResult(gm, True)
