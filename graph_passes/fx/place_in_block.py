"""Move a stage whose paper runs it inside its block from the block output to the attention residual add:

    x_mid = x + attn_branch(x)                       x_mid = x + attn_branch(x)
    y     = x_mid + mlp(norm(x_mid))         ->      t     = stage(x_mid, score(q, k))
    t     = stage(y, score(q, k))                    y'    = t + mlp(norm(t))
    ... t ...                                        ... y' ...

as ToMe's `ToMeBlock` (x = x + attn; merge; x = x + mlp(x)), EViT's `Block.forward` (the fused token is built from
the post-attention tokens and goes through the MLP) and DiffRate's `DiffRateBlock` do. The stages are those of
methods with `PruneMethod.in_block` at the default placement (`at=paper`); `at=block_out` keeps them on the output.
Unlike hoist_token_gathers this changes the values (a merge or a fused token does not commute with the MLP): the
eager reference (methods/reference.py) runs such a stage at the same add.

The boundary comes from the traced graph, not from module names: x_mid is the add of block L whose one operand is
computed from the block's attention (its output projection, layer scale ...) and the other not (the residual
stream), whose result has exactly two users, a norm (the MLP's) and the final residual add, and that final add is
the block's output, its other operand computed from x_mid (the MLP branch). A block without exactly one such add
(e.g. a parallel attention + MLP block, a post-norm block) keeps its stage on the block output: the stage's nodes
record `placement: block_out` and `placement_reason` (the eager reference falls back alike). Edits gm in place.
"""
from __future__ import annotations

import torch
from onnx_ir.passes import PassResult  # (model, modified); model is a GraphModule here
from torch import fx

from tokensieve.graph_passes.blocks import STAGE_TAG as TAG
from tokensieve.graph_passes.blocks import Block
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.graph_passes.pass_manager import PassContext

aten = torch.ops.aten
_NORMS = (aten.layer_norm.default, aten.rms_norm.default, aten.native_layer_norm.default)
IN_BLOCK = "in_block"


def place_in_block(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Run each in-block stage (PruneMethod.runs_in_block) on its block's attention residual add; idempotent."""
    graph = gm.graph
    placed = 0
    for rs in ctx.stages:
        if not METHODS[rs.stage.method].runs_in_block(rs.options, rs.stage.placement):
            continue
        block = ctx.blocks[rs.stage.after_block]
        nodes = [n for n in graph.nodes
                 if n.meta.get(TAG, {}).get("block") == block.index and n.meta[TAG].get("pass") == "insert_prune_stages"]
        if not nodes or any(n.meta[TAG].get("placement") in (IN_BLOCK, "block_out") for n in nodes):
            continue  # no stage inserted (yet), or already placed / refused
        reason = _place(graph, block, nodes)
        for n in nodes:
            n.meta[TAG]["placement"] = IN_BLOCK if reason is None else "block_out"
            if reason is not None:
                n.meta[TAG]["placement_reason"] = reason
        placed += 1
    if placed:
        gm.recompile()
    return PassResult(gm, placed > 0)


def attention_residual_add(block: Block) -> tuple[fx.Node | None, str | None]:
    """(x_mid, None): block's add x_mid = x + attn whose result feeds the MLP's norm and the final residual add
    (= the block output); or (None, why not)."""
    if len(block.attention) != 1:
        return None, f"{len(block.attention)} attention ops in the block (one expected)"
    y = block.output
    if y._erased or y.target is not aten.add.Tensor:
        return None, "the block output is not a residual add"
    inside = set(block.nodes)
    sdpa = block.attention[0]
    found = []
    for n in block.nodes:
        if n._erased or n.target is not aten.add.Tensor or n is y or len(n.args) != 2:
            continue
        a, b = n.args
        if not all(isinstance(v, fx.Node) for v in (a, b)):
            continue
        if _depends_on(a, sdpa, inside) == _depends_on(b, sdpa, inside):
            continue  # both or neither from the attention: not the residual add of the attention branch
        users = [u for u in n.users if TAG not in u.meta]
        norms = [u for u in users if u.target in _NORMS]
        if len(users) != 2 or y not in users or len(norms) != 1:
            continue
        other = y.args[1] if y.args[0] is n else y.args[0]
        if n not in y.args or not _depends_on(other, norms[0], inside):
            continue
        found.append(n)
    if len(found) != 1:
        return None, (f"{len(found)} candidate attention residual adds (x + attn feeding the MLP's norm and the final "
                      "residual add) in the block; one expected")
    return found[0], None


def _depends_on(node: fx.Node, target: fx.Node, inside: set) -> bool:
    """Whether `target` is an ancestor of `node` (or `node` itself), following nodes of the block only."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is target:
            return True
        if n in seen or n not in inside:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _place(graph: fx.Graph, block: Block, stage_nodes: list[fx.Node]) -> str | None:
    """Rewire one stage inserted after `block` onto its attention residual add; None, or the reason it stays."""
    x_mid, reason = attention_residual_add(block)
    if reason:
        return reason
    y = block.output
    stage = set(stage_nodes)
    if any(u not in stage for u in y.users):
        return "something besides the stage reads the block output"
    tokens = [n for n in stage_nodes if "replaced_shape" in n.meta[TAG]]
    if len(tokens) != 1:
        return "the stage's token output was not found"
    t = tokens[0]
    mlp_users = [u for u in x_mid.users if u not in stage]   # the MLP's norm and y
    downstream = [u for u in t.users if u not in stage]
    for n in stage_nodes:   # the stage reads x_mid instead of y, and runs right after it
        n.replace_input_with(y, x_mid)
    anchor = x_mid
    for n in stage_nodes:
        anchor.append(n)
        anchor = n
    for u in mlp_users:     # the MLP branch and the final residual add read the stage's tokens
        u.replace_input_with(x_mid, t)
    for u in downstream:    # what read the stage's tokens reads the block output again
        u.replace_input_with(t, y)
    return None
