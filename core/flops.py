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
    u = unbacked_size
    t = node.target
    out = _dims(node, u)
    if out is None:
        return 0
    if t in (aten.linear.default,):
        w = _dims(node.args[1], u)
        return _numel(out) * w[1]
    if t in (aten.matmul.default, aten.mm.default, aten.bmm.default):
        a = _dims(node.args[0], u)
        return _numel(out) * a[-1]
    if t is aten.addmm.default:
        a = _dims(node.args[1], u)
        return _numel(out) * a[-1]
    if t in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default):
        w = _dims(node.args[1], u)
        return _numel(out) * _numel(w[1:])
    if t is aten.scaled_dot_product_attention.default:
        q, k, v = (_dims(a, u) for a in node.args[:3])
        *batch, nq, d = q
        nk, dv = k[-2], v[-1]
        return _numel(batch) * nq * nk * (d + dv)
    return 0


def count_macs(gm: fx.GraphModule, unbacked_size: int = 1) -> int:
    """Per-sample MACs of every matrix product in `gm` (needs meta['val'] from a fresh trace). A data-dependent
    size counts as `unbacked_size` (the compacted token count's upper bound gives an upper bound of the MACs)."""
    return sum(node_macs(n, unbacked_size) for n in gm.graph.nodes if n.op == "call_function")
