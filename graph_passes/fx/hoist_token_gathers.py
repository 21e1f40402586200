"""Move each stage's token gather up through the per-token ops of its block: the MLP then runs on the kept tokens.

    x1 = x + proj(attn)                          x1' = take(x) + proj(take(o))
    y  = x1 + fc2(gelu(fc1(ln2(x1))))    ->      y'  = x1' + fc2(gelu(fc1(ln2(x1'))))
    prune_topk(y, score(q, k))                   select_topk(score(q, k)) -> idx;  y' = the pruned tokens

A row gather commutes with every op that treats tokens independently (linear layers, norms over the channels,
elementwise activations, adds of same-shape token tensors or of channel-only biases), so gathering first gives the
same tokens, up to float rounding: the stage keeps the same positions and its output is what the eager reference
computes, but the work after the attention of the pruning block is done on K tokens instead of N — the in-block
placement EViT's code uses (prune between attention and MLP) — and the residual add stays directly in front of the
next LayerNorm, so ONNX Runtime fuses it (SkipLayerNormalization) as in the dense model.

The pass splits `tokensieve::prune_topk(x, scores, K, p)` into `tokensieve::select_topk(scores, K, p)` and
`tokensieve::take_tokens(x, idx, p)` only where the gather can move (x's producer is a per-token op whose one user
is the stage), then repeats: take(f(a, b)) -> f(take(a), take(b)) while f is per-token and take is f's only user;
gathers of one tensor by one index are shared. It stops at anything else (attention, reshapes, a tensor the score
also reads): stages whose method reads the block output for its score, merges, or reuses dropped tokens are left as
they are.
"""
from __future__ import annotations

import operator

import torch
from onnx_ir.passes import PassResult  # (model, modified); model is a GraphModule here
from torch import fx

import tokensieve.graph_passes.methods.ops  # noqa: F401  registers torch.ops.tokensieve.*
from tokensieve.graph_passes.blocks import STAGE_TAG as TAG
from tokensieve.graph_passes.blocks import traced_shape

aten = torch.ops.aten
PRUNE_TOPK = torch.ops.tokensieve.prune_topk.default
SELECT_TOPK = torch.ops.tokensieve.select_topk.default
TAKE_TOKENS = torch.ops.tokensieve.take_tokens.default

# op -> indices of its arguments that carry tokens (B, N, C); the other arguments are weights, sizes or scalars.
_TOKEN_ARGS = {
    aten.linear.default: (0,),
    aten.layer_norm.default: (0,),
    aten.rms_norm.default: (0,),
    aten.gelu.default: (0,),
    aten.relu.default: (0,),
    aten.silu.default: (0,),
    aten.tanh.default: (0,),
    aten.sigmoid.default: (0,),
    aten.dropout.default: (0,),
    aten.clone.default: (0,),
    aten.add.Tensor: (0, 1),
    aten.sub.Tensor: (0, 1),
    aten.mul.Tensor: (0, 1),
    aten.div.Tensor: (0, 1),
}


def _shape(node) -> tuple | None:
    """The traced shape (an earlier stage's output: that of the tensor it replaced; all sizes as traced, so
    comparisons between nodes stay consistent)."""
    return traced_shape(node)


def _per_token(node: fx.Node) -> bool:
    """Whether `node` maps each token (row of axis 1) of its (B, N, C) output from that token alone."""
    if node.op != "call_function" or node.target not in _TOKEN_ARGS or TAG in node.meta:
        return False
    out = _shape(node)
    if out is None or len(out) != 3:
        return False
    if node.target in (aten.layer_norm.default, aten.rms_norm.default) and len(node.args[1]) != 1:
        return False  # a norm over the channels only
    for i, a in enumerate(node.args):
        if i in _TOKEN_ARGS[node.target]:
            if isinstance(a, fx.Node) and not _channel_only(a):
                shape = _shape(a)
                if shape is None or len(shape) != 3 or shape[:2] != out[:2]:
                    return False  # a token operand has the output's (B, N); channels may differ (linear)
        elif isinstance(a, fx.Node) and a.op != "get_attr":
            return False  # weights and biases are parameters; anything computed may carry tokens
    return not any(isinstance(v, fx.Node) for v in node.kwargs.values())


def _channel_only(node: fx.Node) -> bool:
    """A broadcast operand with no batch or token extent: (C,), or (1, 1, C)."""
    shape = _shape(node)
    return shape is not None and (len(shape) <= 1 or (len(shape) == 3 and shape[0] == 1 and shape[1] == 1))


def hoist_token_gathers(gm: fx.GraphModule, ctx) -> PassResult:
    """Split movable prune_topk stages and hoist their gathers (edits gm in place); idempotent."""
    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is PRUNE_TOPK and _movable(node):
            _split(graph, node)
            changed = True
    while True:
        moved = False
        takes = {}
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not TAKE_TOKENS:
                continue
            key = node.args
            if key in takes:  # one gather per (tensor, index): share it
                node.replace_all_uses_with(takes[key])
                graph.erase_node(node)
                moved = True
                continue
            takes[key] = node
        for node in list(takes.values()):
            if _hoist_once(graph, node, takes):
                moved = True
        if not moved:
            break
        changed = True
    if changed:  # dead code of the moves; an earlier stage's kept positions (read only by a later pass) stay
        graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or n.meta.get(TAG, {}).get("kept_indices"))
        gm.recompile()
    return PassResult(gm, changed)


def _movable(stage: fx.Node) -> bool:
    if stage.meta.get(TAG, {}).get("placement") == "block_out":
        return False  # the recipe asked for the block output (`at=block_out`)
    x = stage.args[0]
    return isinstance(x, fx.Node) and len(x.users) == 1 and _per_token(x)


def _split(graph: fx.Graph, stage: fx.Node) -> None:
    """prune_topk(x, s, K, p) -> select_topk(s, K, p), take_tokens(x, idx, p); the getitems re-pointed."""
    x, scores, keep, p = stage.args
    info = stage.meta.get(TAG, {})
    with graph.inserting_before(stage):
        idx = graph.call_function(SELECT_TOPK, (scores, keep, p))
        take = graph.call_function(TAKE_TOKENS, (x, idx, p))
    for node in (idx, take):
        _copy_meta(stage, node, {**info, "pass": "hoist_token_gathers"})
    for user in list(stage.users):
        if user.target is operator.getitem:
            new = take if user.args[1] == 0 else idx
            new.meta[TAG] = {**user.meta.get(TAG, {}), **new.meta[TAG], "pass": "hoist_token_gathers"}
            user.replace_all_uses_with(new)
            graph.erase_node(user)
    graph.erase_node(stage)


def _hoist_once(graph: fx.Graph, take: fx.Node, takes: dict) -> bool:
    """take(f(a, b, ...)) -> f(take(a), take(b), ...) when f is per-token and take is its only user."""
    x, idx, p = take.args
    if not isinstance(x, fx.Node) or len(x.users) != 1 or not _per_token(x):
        return False
    info = {**take.meta.get(TAG, {}), "pass": "hoist_token_gathers"}
    info.pop("kept_indices", None)
    args = list(x.args)
    for i in _TOKEN_ARGS[x.target]:
        a = args[i] if i < len(args) else None
        if isinstance(a, fx.Node) and not _channel_only(a):
            key = (a, idx, p)
            if key not in takes:  # new nodes go right before `take`: after idx (and the score), after a
                with graph.inserting_before(take):
                    takes[key] = graph.call_function(TAKE_TOKENS, key)
                _copy_meta(x, takes[key], info)
            elif not _is_before(takes[key], take):  # a shared gather placed further down: move it up (it only
                take.prepend(takes[key])             # reads `a` and idx, both defined before `take`)
            args[i] = takes[key]
    with graph.inserting_before(take):
        new = graph.call_function(x.target, tuple(args), dict(x.kwargs))
    _copy_meta(x, new, {**info, "replaced_shape": _shape(x)})
    takes.pop(take.args, None)
    take.replace_all_uses_with(new)
    graph.erase_node(take)
    graph.erase_node(x)
    return True


def _is_before(a: fx.Node, b: fx.Node) -> bool:
    """Whether node `a` comes before node `b` in graph order."""
    node = a
    while node.op != "root":
        if node is b:
            return True
        node = node.next
    return False


def _copy_meta(src: fx.Node, dst: fx.Node, tag: dict) -> None:
    """Readable provenance on an inserted node; no meta["val"] (its token count differs from the traced one)."""
    dst.meta["nn_module_stack"] = dict(src.meta.get("nn_module_stack") or {})
    dst.meta["stack_trace"] = src.meta.get("stack_trace")
    dst.meta[TAG] = dict(tag)
