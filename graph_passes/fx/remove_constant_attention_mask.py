"""Drop attention masks that are input-independent no-ops: SDPA(q, k, v, all-true) -> SDPA(q, k, v).

transformers 5.x builds an all-true (B, 1, N, N) mask once from `arange(N)` and feeds it to every
layer. Its N is the unpruned count, so it would not fit the blocks after a pruning stage; since it
masks nothing, removing it is exact (and lets the attention drop a broadcast add).
"""
from __future__ import annotations

import torch
from torch import fx

from onnx_ir.passes import PassResult  # (model, modified); model is a GraphModule here

from tokensieve.errors import PassError
from tokensieve.graph_passes.blocks import SDPA_TARGETS, STAGE_TAG
from tokensieve.graph_passes.pass_manager import PassContext


def _mask_arg(node: fx.Node):
    if len(node.args) > 3:
        return node.args[3], ("args", 3)
    return node.kwargs.get("attn_mask"), ("kwargs", "attn_mask")


def _depends_on_input_data(node: fx.Node) -> bool:
    """True if `node` reads an input's values (reading only its sizes through sym_size is fine)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return True
        if n.op == "call_function" and n.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_size):
            continue
        stack.extend(n.all_input_nodes)
    return False


def remove_constant_attention_mask(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remove all-true / all-zero attention masks that depend only on shapes (edits gm in place).

    With stages to insert (ctx.stages), a mask that does mask something is an error (pruning could not keep it
    right); without, it stays. The key masks a stateful stage gives later attention (tagged) are tokensieve's own.
    """
    strict = bool(ctx.stages)
    masks = {}
    for node in gm.graph.nodes:
        if node.target in SDPA_TARGETS:
            mask, where = _mask_arg(node)
            if isinstance(mask, fx.Node) and STAGE_TAG not in mask.meta:  # idempotent: skip the stages' own masks
                masks.setdefault(mask, []).append((node, where))
    if not masks:
        return PassResult(gm, False)
    values = _evaluate(gm, ctx.example_inputs, set(masks))
    modified = False
    for mask, users in masks.items():
        value = values[mask]
        trivial = bool(value.all()) if value.dtype == torch.bool else bool((value == 0).all())
        if _depends_on_input_data(mask) or not trivial:
            if not strict:
                continue
            # A real mask would have to be gathered with the kept indices too; not supported yet.
            raise PassError(
                f"Attention op {users[0][0].name!r} uses an input-dependent attention mask ({mask.name!r}); "
                "token pruning of masked attention is not supported yet, export without an attention mask"
            )
        for sdpa, (kind, key) in users:
            if kind == "args":
                sdpa.args = sdpa.args[:3] + (None,) + sdpa.args[4:]
            else:
                sdpa.kwargs = {**sdpa.kwargs, "attn_mask": None}
        modified = True
    if modified:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, modified)


def _evaluate(gm: fx.GraphModule, example_inputs: tuple, wanted: set) -> dict:
    captured = {}

    class Capture(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                captured[n] = out
            return out

    with torch.no_grad():
        Capture(gm).run(*example_inputs)
    return captured
