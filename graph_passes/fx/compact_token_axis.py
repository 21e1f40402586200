"""Really shorten the sequence after an `adaptive(compact=true)` stage: a data-dependent token axis downstream.

The capped form of `adaptive` keeps K slots, valid first, and masks the invalid ones in every later attention, so
latency follows the cap K, not the count. With compact=true the stage's tokens and validity go through
`tokensieve::compact_valid`, which keeps the first S slots, S = the largest valid count in the batch (at batch 1
exactly the valid tokens: the eager reference's `x[:, kept]`). Every block after it then runs on S tokens:

    tokens (B, p+K, C), valid (B, p+K)  ->  compact_valid  ->  (B, S, C), (B, S)      S = max_b count_b, p+1 <= S <= p+K
    view(x, [B, p+K, h, d])             ->  view(x, [B, sym_size(x, 1), h, d])        (every literal p+K downstream)
    output (B, p+K, C) per-token        ->  pad_tokens(output, 1, p+K)                 (zero rows: same I/O shapes)

torch.export bakes p+K into shape arguments (respecialize_token_counts wrote them). To find which literals name
the token axis, the graph runs once with compact_valid forced to a probe size S' = p+K-1: a shape op whose input
has S' on exactly one axis where the literal says p+K gets `aten.sym_size(input, axis)` there. The re-trace
(torch.export) turns S into an unbacked size u0, and the ONNX computes shapes with Shape ops. Batch > 1 stays
correct: the slots beyond a sample's own count are still invalid and still masked.
"""
from __future__ import annotations

import operator
import sys

import torch
from onnx_ir.passes import PassResult  # (model, modified); model is a GraphModule here
from torch import fx

import tokensieve.graph_passes.methods.ops  # noqa: F401  registers torch.ops.tokensieve.compact_valid / pad_tokens
from tokensieve.errors import PassError
from tokensieve.graph_passes.blocks import STAGE_TAG as TAG
from tokensieve.graph_passes.fx.respecialize_token_counts import _SIZE_ARG_OPS, _SLICE_OPS
from tokensieve.graph_passes.pass_manager import PassContext

COMPACT = torch.ops.tokensieve.compact_valid.default
PAD = torch.ops.tokensieve.pad_tokens.default
_SYM_SIZE = torch.ops.aten.sym_size.int


def compact_token_axis(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Compact after each stage of ctx.stages with options compact=true (edits gm in place); gm's outputs must
    already be final (add_kept_index_outputs). Idempotent: a stage whose tokens already go through compact_valid is
    skipped."""
    compacted = 0
    for rs in ctx.stages:
        if not rs.options.get("compact"):
            continue
        tokens, state = _stage_outputs(gm, rs.stage.after_block)
        if any(u.target is COMPACT for u in tokens.users):
            continue  # idempotent: compacted on an earlier run
        total = rs.num_prefix_tokens + rs.keep  # the capped length p + K
        graph = gm.graph
        with graph.inserting_after(state):
            node = graph.call_function(COMPACT, (tokens, state, rs.num_prefix_tokens + 1))
        with graph.inserting_after(node):
            new_tokens = graph.call_function(operator.getitem, (node, 0))
        with graph.inserting_after(new_tokens):
            new_state = graph.call_function(operator.getitem, (node, 1))
        for n in (node, new_tokens, new_state):
            n.meta[TAG] = {**tokens.meta[TAG], "pass": "compact_token_axis"}
            n.meta["nn_module_stack"] = dict(tokens.meta.get("nn_module_stack") or {})
        tokens.replace_all_uses_with(new_tokens, delete_user_cb=lambda u: u is not node)
        state.replace_all_uses_with(new_state, delete_user_cb=lambda u: u is not node)
        gm.recompile()
        _symbolize(gm, node, total, rs.num_prefix_tokens, ctx.example_inputs)
        compacted += 1
    return PassResult(gm, compacted > 0)


def _stage_outputs(gm: fx.GraphModule, block: int) -> tuple[fx.Node, fx.Node]:
    """The (tokens, state) getitems of the stateful prune node inserted after `block`."""
    for n in gm.graph.nodes:
        info = n.meta.get(TAG, {})
        if info.get("block") == block and info.get("pass") == "insert_prune_stages" and n.op == "call_function" \
                and n.target is not operator.getitem and any(u.target is operator.getitem and u.args[1] == 2 for u in n.users):
            items = {u.args[1]: u for u in n.users if u.target is operator.getitem}
            return items[0], items[2]
    raise PassError(f"compact=true after block {block}: no stateful stage with a validity output there")


def _probe_sizes(total: int, num_prefix: int):
    return [s for s in (total - 1, total - 2, total - 3) if s >= num_prefix + 1]


def _symbolize(gm: fx.GraphModule, compact: fx.Node, total: int, num_prefix: int, example_inputs: tuple) -> None:
    """Replace the literal `total` downstream of `compact` by sym_size of the token axis; pad per-token outputs."""
    if total < num_prefix + 2:
        raise PassError("compact=true needs a cap of at least 2 tokens (with 1 the count is always 1)")
    last_error = None
    for probe in _probe_sizes(total, num_prefix):
        try:
            edits, outputs = _find_token_axes(gm, compact, total, probe, example_inputs)
            break
        except _Ambiguous as e:
            last_error = e
    else:
        raise PassError(f"After compaction, {last_error}; tokensieve cannot tell which axis is the token axis")
    graph = gm.graph
    for n, arg_index, axes in edits:
        args = list(n.args)
        if n.target in _SLICE_OPS:
            args[3] = sys.maxsize  # "to the end" of the shorter axis
        else:
            src = n.args[0]
            with graph.inserting_before(n):
                sizes = list(args[arg_index])
                for pos, axis in axes.items():
                    sizes[pos] = graph.call_function(_SYM_SIZE, (src, axis))
            args[arg_index] = type(n.args[arg_index])(sizes)
        n.args = tuple(args)
    out_node = next(n for n in graph.nodes if n.op == "output")
    values = list(out_node.args[0])
    for i, axis in outputs.items():
        with graph.inserting_before(out_node):
            values[i] = graph.call_function(PAD, (values[i], axis, total))
    out_node.args = (tuple(values),)
    gm.recompile()


class _Ambiguous(Exception):
    pass


def _find_token_axes(gm, compact, total, probe, example_inputs):
    """Run gm with compact_valid returning `probe` slots, and with all `total`. -> (shape-op edits,
    {output index: token axis})."""
    with torch.no_grad():
        probed, edits = _run_probe(gm, compact, total, probe, example_inputs)
        capped, _ = _run_probe(gm, compact, total, total, example_inputs)
    outputs = {}
    for i, (a, b) in enumerate(zip(_flat(probed), _flat(capped))):
        if isinstance(a, torch.Tensor) and a.dim() == b.dim() and a.shape != b.shape:
            if i > 0:
                raise PassError(f"compact=true changed the shape of output {i} ({tuple(b.shape)}); only the model "
                                "output may follow the compacted token axis")
            (axis,) = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]]
            outputs[i] = axis
    return edits, outputs


def _flat(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _run_probe(gm, compact, total, probe, example_inputs):
    edits = []

    class Probe(fx.Interpreter):
        def run_node(self, n: fx.Node):
            if n is compact:
                x, valid = self.env[n.args[0]], self.env[n.args[1]]
                return x[:, :probe].clone(), valid[:, :probe].clone()
            if probe == total:  # the capped reference run
                return super().run_node(n)
            if n.op == "call_function" and n.target in _SLICE_OPS:
                if len(n.args) > 3 and n.args[3] == total and self._axis_len(n.args[0], n.args[1]) == probe:
                    edits.append((n, 3, None))
                    return self._with_args(n, 3, sys.maxsize)
            elif n.op == "call_function" and n.target in _SIZE_ARG_OPS:
                i = _SIZE_ARG_OPS[n.target]
                sizes = n.args[i]
                if isinstance(sizes, (list, tuple)) and total in sizes:
                    shape = self.env[n.args[0]].shape
                    axes = [a for a, d in enumerate(shape) if d == probe]
                    if axes:  # the input shrank: every literal `total` is its token axis
                        if len(axes) > 1:
                            raise _Ambiguous(f"node {n.name!r} has input shape {tuple(shape)} with {probe} on "
                                             f"{len(axes)} axes")
                        positions = {pos: axes[0] for pos, s in enumerate(sizes) if s == total}
                        edits.append((n, i, positions))
                        new = type(sizes)(probe if s == total else s for s in sizes)
                        return self._with_args(n, i, new)
            try:
                return super().run_node(n)
            except RuntimeError as e:
                raise PassError(f"After compaction, node {n.name!r} ({n.target}) does not fit the data-dependent token "
                                f"axis: {str(e).splitlines()[0]}; use the capped form (compact=false)") from e

        def _axis_len(self, src, dim):
            v = self.env.get(src) if isinstance(src, fx.Node) else None
            return v.shape[dim] if isinstance(v, torch.Tensor) else None

        def _with_args(self, n, i, value):
            old = n.args
            args = list(old)
            args[i] = value
            n.args = tuple(args)
            try:
                return super().run_node(n)
            finally:
                n.args = old

    return Probe(gm).run(*example_inputs), edits
