"""Rewrite literal sizes that still name the unpruned token count: view(x, [B, 197, 6, 64]) -> view(x, [B, 139, 6, 64]).

torch.export bakes static sizes into shape arguments. After a pruning stage the token axis is
shorter, so every downstream view/reshape/expand/slice that names the old count must name the new
one. The pass runs the graph once on example inputs and, at each shape op, maps each old size of
its input (from the trace's metadata) to the size that actually arrives.
"""
from __future__ import annotations

import torch
from onnx_ir.passes import PassResult  # (model, modified); model is a GraphModule here
from torch import fx

from tokensieve.errors import PassError
from tokensieve.graph_passes.blocks import traced_shape
from tokensieve.graph_passes.pass_manager import PassContext

aten = torch.ops.aten
_SIZE_ARG_OPS = {  # op -> index of its size-list argument
    aten.view.default: 1,
    aten.reshape.default: 1,
    aten._unsafe_view.default: 1,
    aten.expand.default: 1,
    aten.new_zeros.default: 1,
    aten.new_ones.default: 1,
    aten.new_empty.default: 1,
}
_SLICE_OPS = {aten.slice.Tensor}


def _changes(old: tuple | None, new: torch.Size) -> dict[int, int]:
    if old is None or len(old) != len(new):
        return {}
    return {o: n for o, n in zip(old, new) if isinstance(o, int) and o != n}


def respecialize_token_counts(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Fix literal token counts downstream of pruning stages by running gm once on ctx.example_inputs (edits gm in
    place). Idempotent: a second run finds every literal already naming the size that arrives."""
    edits = []

    class Respecialize(fx.Interpreter):
        def run_node(self, n: fx.Node):
            if n.op == "call_function" and (n.target in _SIZE_ARG_OPS or n.target in _SLICE_OPS):
                src = n.args[0]
                actual = self.env[src].shape if isinstance(src, fx.Node) else None
                changes = _changes(traced_shape(src), actual) if actual is not None else {}
                if changes:
                    new_args = _rewrite(n, changes)
                    if new_args != n.args:
                        edits.append((n.name, n.args, new_args))
                        n.args = new_args
            try:
                return super().run_node(n)
            except RuntimeError as e:
                first = str(e).splitlines()[0]
                raise PassError(
                    f"After pruning, node {n.name!r} ({n.target}) no longer fits the shorter token axis: {first}. "
                    "This model computes a size tokensieve cannot rewrite; please report it"
                ) from e

    with torch.no_grad():
        Respecialize(gm).run(*ctx.example_inputs)
    if edits:
        gm.recompile()
    return PassResult(gm, bool(edits))


def _rewrite(n: fx.Node, changes: dict[int, int]) -> tuple:
    args = list(n.args)
    if n.target in _SLICE_OPS:
        # slice(x, dim, start, end): an end equal to the old length means "to the end".
        if len(args) > 3 and isinstance(args[3], int) and args[3] in changes:
            args[3] = changes[args[3]]
        return tuple(args)
    i = _SIZE_ARG_OPS[n.target]
    sizes = args[i]
    if isinstance(sizes, (list, tuple)):
        args[i] = type(sizes)(changes.get(s, s) if isinstance(s, int) and s > 1 else s for s in sizes)
    return tuple(args)
