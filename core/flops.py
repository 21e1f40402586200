"""Multiply-accumulate count of a traced graph, per sample (the symbolic batch axis counts as 1).

Counts matrix products (linear, matmul, conv) and attention's two quadratic products (q·kᵀ and
softmax·v). Softmax, norms and elementwise ops are left out, so the MAC-ideal speedup slightly
undercounts the savings of pruning (their cost also shrinks with the token count).
"""
from __future__ import annotations

import math

import torch
from torch import fx

aten = torch.ops.aten


def _dims(node, unbacked: int = 1) -> list[int] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return [d if isinstance(d, int) else _symbolic(d, unbacked) for d in val.shape]


def _symbolic(d, unbacked: int) -> int:
    """The batch symbol counts as 1 (per-sample MACs); a data-dependent size (compact_token_axis's u0) as `unbacked`."""
    expr = d.node.expr
    subs = {s: (unbacked if s.name.startswith("u") else 1) for s in expr.free_symbols}
    return int(expr.subs(subs))


def _numel(dims) -> int:
    return math.prod(dims) if dims else 0


def node_macs(node: fx.Node, unbacked_size: int = 1) -> int:
    return op_macs(node.target, node.args, node, lambda a: _dims(a, unbacked_size))


def op_macs(t, args, out, dims) -> int:
    """MACs of op `t` with arguments `args` and result `out`; dims(x) -> the shape of an argument or result."""
    out = dims(out)
    if out is None:
        return 0
    if t in (aten.linear.default,):
        w = dims(args[1])
        return _numel(out) * w[1]
    if t in (aten.matmul.default, aten.mm.default, aten.bmm.default):
        a = dims(args[0])
        return _numel(out) * a[-1]
    if t is aten.addmm.default:
        a = dims(args[1])
        return _numel(out) * a[-1]
    if t in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default):
        w = dims(args[1])
        return _numel(out) * _numel(w[1:])
    if t is aten.scaled_dot_product_attention.default:
        q, k, v = (dims(a) for a in args[:3])
        *batch, nq, d = q
        nk, dv = k[-2], v[-1]
        return _numel(batch) * nq * nk * (d + dv)
    return 0


def count_macs(gm: fx.GraphModule, unbacked_size: int = 1) -> int:
    """Per-sample MACs of every matrix product in `gm` (needs meta['val'] from a fresh trace). A data-dependent
    size counts as `unbacked_size` (the compacted token count's upper bound gives an upper bound of the MACs)."""
    return sum(node_macs(n, unbacked_size) for n in gm.graph.nodes if n.op == "call_function")



def count_model_macs(gm: fx.GraphModule, *inputs) -> float:
    """Per-sample MACs of the model's own matrix products in a GraphModule whose inserted stages are still single
    call_function nodes (the FX passes' output, before the re-trace), by running it once on `inputs` (batch B: the
    total / B). A stage node counts 0: what a method computes inside it (ToMe's one-hot merge MatMuls, which stand in
    for the code's gather / scatter_reduce) is its own overhead, left out as the papers' counters leave it out."""
    total = 0

    def dims(x):
        return list(x.shape) if isinstance(x, torch.Tensor) else None

    class _Count(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            nonlocal total
            out = super().call_function(target, args, kwargs)
            total += op_macs(target, args, out, dims)
            return out

    with torch.no_grad():
        _Count(gm).run(*inputs)
    return total / inputs[0].shape[0]
