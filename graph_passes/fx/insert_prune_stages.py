"""Insert a pruning stage after each block a recipe names: x -> prune_topk(x, score(q, k)).

The score is recomputed from the block's own attention inputs (the q and k given to its SDPA),
so the fused attention op stays fused. Token counts after the stage change; the
`respecialize_token_counts` pass fixes the literal sizes downstream.
"""
from __future__ import annotations

import operator

import torch

from onnx_ir.passes import PassResult  # (model, modified); model is a GraphModule here
from torch import fx

from tokensieve.errors import PassError
from tokensieve.graph_passes.blocks import STAGE_TAG as TAG
from tokensieve.graph_passes.blocks import Block
from tokensieve.graph_passes.methods.attention_scores import cls_attention_scores
import tokensieve.graph_passes.methods.ops  # noqa: F401  registers torch.ops.tokensieve.prune_topk
from tokensieve.graph_passes.methods.registry import METHODS, ScoreInput


def _score_node(graph: fx.Graph, block: Block, method: str) -> fx.Node:
    spec = METHODS[method]
    if spec.score_input is ScoreInput.ATTENTION_QK:
        if len(block.attention) != 1:
            raise PassError(
                f"Block {block.index} ({block.path}) has {len(block.attention)} attention ops; {method} needs exactly one "
                "scaled_dot_product_attention per block (load the model with attn_implementation='sdpa')"
            )
        sdpa = block.attention[0]
        scale = sdpa.kwargs.get("scale", sdpa.args[6] if len(sdpa.args) > 6 else None)
        return graph.call_function(cls_attention_scores, (sdpa.args[0], sdpa.args[1], scale))
    raise PassError(f"Method {method!r} reads {spec.score_input.value}, which the FX pass cannot provide yet")


def insert_prune_stages(gm: fx.GraphModule, blocks: list[Block], stages) -> PassResult:
    """Insert tokensieve::prune_topk after the blocks named by `stages` (ResolvedStage list); edits gm in place."""
    graph = gm.graph
    inserted = 0
    for rs in stages:
        block = blocks[rs.stage.after_block]
        out = block.output
        if any(TAG in u.meta for u in out.users):
            continue  # idempotent: this block already has a stage
        with graph.inserting_after(out):
            score = _score_node(graph, block, rs.stage.method)
        with graph.inserting_after(score):
            prune = graph.call_function(torch.ops.tokensieve.prune_topk.default, (out, score, rs.keep, rs.num_prefix_tokens))
        with graph.inserting_after(prune):
            tokens = graph.call_function(operator.getitem, (prune, 0))
        with graph.inserting_after(tokens):
            kept = graph.call_function(operator.getitem, (prune, 1))
        out.replace_all_uses_with(tokens, delete_user_cb=lambda user: user not in (score, prune))
        info = {"pass": "insert_prune_stages", "block": block.index, "method": rs.stage.method, "keep": rs.keep,
                "tokens_in": rs.tokens_in, "tokens_out": rs.tokens_out}
        for node in (score, prune, tokens, kept):
            node.meta["nn_module_stack"] = dict(out.meta.get("nn_module_stack") or {})
            node.meta["stack_trace"] = out.meta.get("stack_trace")
            node.meta[TAG] = info
        kept.meta[TAG] = {**info, "kept_indices": True}
        # No meta["val"] (the token count changed); respecialize_token_counts reads the traced shape here.
        old = out.meta.get("val")
        tokens.meta[TAG] = {**info, "replaced_shape": tuple(old.shape) if old is not None else None}
        inserted += 1
    if inserted:
        gm.recompile()
    return PassResult(gm, inserted > 0)


def kept_index_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The (B, K) kept-position outputs of every inserted stage, in graph order."""
    return [n for n in gm.graph.nodes if n.meta.get(TAG, {}).get("kept_indices")]
