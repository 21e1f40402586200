"""Insert a pruning stage after each block a recipe names: x -> prune_topk(x, score(…)) [-> recycled dropped tokens |
PosPad markers, fused token]. The nodes are the calls of methods/stage.py `run_stage`, the dispatcher the eager
reference runs, recorded as call_function nodes (its `call` argument).

A stateful stage carries a token state to later stages: an adaptive stage (input-dependent count) the validity of
its K capped slots, ToMe with prop_attn the token sizes. Every later attention op gets the state's additive key mask
(-inf on invalid slots / log size), and a later adaptive stage's score gets it as `key_bias`.

The score reads what its method needs from the block: the q and k given to its SDPA (recomputing
one attention row keeps the fused attention fused), its input/output tokens, or only positions.
Token counts after the stage change; `respecialize_token_counts` fixes literal sizes downstream.
"""
from __future__ import annotations

from onnx_ir.passes import PassResult  # (model, modified); model is a GraphModule here
from torch import fx

from tokensieve.errors import PassError
from tokensieve.graph_passes.blocks import STAGE_TAG as TAG
from tokensieve.graph_passes.blocks import Block, token_layout
from tokensieve.graph_passes.methods.registry import METHODS, ScoreInput
from tokensieve.graph_passes.methods.stage import run_stage
from tokensieve.graph_passes.pass_manager import PassContext


def _attention_inputs(block: Block, method: str) -> dict:
    if len(block.attention) != 1:
        raise PassError(
            f"Block {block.index} ({block.path}) has {len(block.attention)} attention ops; {method} needs exactly one "
            "scaled_dot_product_attention per block (load the model with attn_implementation='sdpa')"
        )
    sdpa = block.attention[0]
    scale = sdpa.kwargs.get("scale", sdpa.args[6] if len(sdpa.args) > 6 else None)
    return {"q": sdpa.args[0], "k": sdpa.args[1], "scale": scale}


def _earlier_inputs(gm: fx.GraphModule, blocks: list[Block], rs, spec) -> dict:
    """q/k/scale of the earlier block a two-block score also reads (HiPrune's anchor block) and the patch grid."""
    early = _attention_inputs(blocks[spec.earlier_block(rs.options, rs.stage.after_block)], rs.stage.method)
    grid = token_layout(gm, blocks, rs.num_prefix_tokens).grid
    patches = rs.tokens_in - rs.num_prefix_tokens
    if grid is None or grid[0] * grid[1] != patches:
        raise PassError(f"{rs.stage.method}@{rs.stage.after_block} needs the 2D patch grid of its {patches} patch "
                        f"tokens, but the patch embedding gives {grid}; use a model with a conv patch embedding")
    return {"q_early": early["q"], "k_early": early["k"], "scale_early": early["scale"], "grid": grid}


def insert_prune_stages(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Insert the stages (ctx.stages, in block order) after their blocks (ctx.blocks); edits gm in place."""
    graph, blocks = gm.graph, ctx.blocks
    inserted = 0
    current: dict[fx.Node, fx.Node] = {}  # a block output replaced by an earlier stage -> its pruned tokens
    state, state_of = None, None  # (B, N) token state after a stateful stage (adaptive: validity; tome: sizes), method
    staged = {n.meta[TAG].get("block") for n in graph.nodes if TAG in n.meta}
    for rs in ctx.stages:
        block = blocks[rs.stage.after_block]
        out = block.output
        if out._erased or block.index in staged:
            continue  # idempotent: this block already has a stage (hoist_token_gathers / place_in_block moved it)
        spec, options = METHODS[rs.stage.method], rs.options
        inputs = {"x_out": out, "x_in": current.get(block.input, block.input)}
        if spec.score_input is ScoreInput.ATTENTION_QK:
            inputs |= _attention_inputs(block, rs.stage.method)
        elif spec.score_input is ScoreInput.ATTENTION_QK_TWO_BLOCKS:
            inputs |= _attention_inputs(block, rs.stage.method) | _earlier_inputs(gm, blocks, rs, spec)
        # The dispatcher the eager reference runs, its calls recorded as nodes right after the block output.
        calls = _GraphCalls(graph, before=out.next)
        mine = state if state_of == rs.stage.method else None  # a state is read by later stages of its method only
        tokens, kept, new_state = run_stage(spec, options, rs.keep, rs.num_prefix_tokens, mine, capped=True,
                                            call=calls, **inputs)
        state, state_of = new_state, rs.stage.method
        masks = new_state is not None and spec.masks_attention(options)
        if masks:
            mask = calls(spec.state_mask, new_state)
        users = set(calls.nodes)
        out.replace_all_uses_with(tokens, delete_user_cb=lambda user: user not in users)
        info = {"pass": "insert_prune_stages", "block": block.index, "method": rs.stage.method, "keep": rs.keep,
                "tokens_in": rs.tokens_in, "tokens_out": rs.tokens_out, "placement": rs.stage.placement}
        for node in calls.nodes:
            node.meta["nn_module_stack"] = dict(out.meta.get("nn_module_stack") or {})
            node.meta["stack_trace"] = out.meta.get("stack_trace")
            node.meta[TAG] = dict(info)
        kept.meta[TAG]["kept_indices"] = True
        # No meta["val"] (the token count changed); passes read the traced shape of what it replaced.
        old = out.meta.get("val")
        tokens.meta[TAG]["replaced_shape"] = tuple(old.shape) if old is not None else None
        current[out] = tokens
        if masks:
            _mask_later_attention(blocks[rs.stage.after_block + 1:], mask)
        inserted += 1
    if inserted:
        gm.recompile()
    return PassResult(gm, inserted > 0)


class _GraphCalls:
    """run_stage's `call` for the FX pass: each call becomes a call_function node, in call order before `before`."""

    def __init__(self, graph: fx.Graph, before: fx.Node):
        self.graph, self.before, self.nodes = graph, before, []

    def __call__(self, fn, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.before):
            node = self.graph.call_function(fn, args, kwargs)
        self.nodes.append(node)
        return node


def _mask_later_attention(later: list[Block], mask: fx.Node) -> None:
    """Give every attention op after a stateful stage its key mask (replacing an earlier stage's)."""
    for block in later:
        for sdpa in block.attention:
            old = sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")
            if old is not None and not (isinstance(old, fx.Node) and TAG in old.meta):
                raise PassError(f"Block {block.index} ({block.path}) already has an attention mask; a stage before it "
                                "cannot add its key mask (export without an attention mask)")
            if len(sdpa.args) > 3:
                sdpa.args = sdpa.args[:3] + (mask,) + sdpa.args[4:]
            else:
                sdpa.kwargs = {**sdpa.kwargs, "attn_mask": mask}


def kept_index_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The (B, K) kept-position outputs of every inserted stage, in graph order."""
    return [n for n in gm.graph.nodes if n.meta.get(TAG, {}).get("kept_indices")]
