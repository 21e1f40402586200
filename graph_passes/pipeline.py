"""The pass lists, written once (as torch-tensorrt's ATEN_POST_LOWERING_PASSES), and their runners.

Every pass is `pass(model, ctx: PassContext) -> PassResult` (graph_passes/pass_manager.py); `run_passes` repeats a
list until nothing changes. TensorRT's ONNX lowering (split TopK, fp16, plugin rules) is not here: it is a rule list
under targets/ that the builder receives.
"""
from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes import PassResult
from torch import fx

from tokensieve.graph_passes.fx.add_kept_index_outputs import add_kept_index_outputs
from tokensieve.graph_passes.fx.compact_token_axis import compact_token_axis
from tokensieve.graph_passes.fx.hoist_token_gathers import hoist_token_gathers
from tokensieve.graph_passes.fx.insert_prune_stages import insert_prune_stages
from tokensieve.graph_passes.fx.place_in_block import place_in_block
from tokensieve.graph_passes.fx.remove_constant_attention_mask import remove_constant_attention_mask
from tokensieve.graph_passes.fx.respecialize_token_counts import respecialize_token_counts
from tokensieve.graph_passes.onnx.check_static import check_static_model
from tokensieve.graph_passes.onnx.drop_debug_outputs import drop_debug_outputs
from tokensieve.graph_passes.pass_manager import PassContext, run_passes

# The dense canonicalization, shared by the dense baseline and the pruned model (they differ only by the stages).
CANONICALIZE_PASSES = (
    remove_constant_attention_mask,   # SDPA(q, k, v, all-true mask) -> SDPA(q, k, v)
)

# The unlifted GraphModule of a torch.export trace -> the pruned graph the ONNX exporter converts.
FX_PASSES = (
    *CANONICALIZE_PASSES,
    insert_prune_stages,              # block output x -> run_stage(x, ...) after each stage's block
    place_in_block,                   # run_stage(x_mid + mlp(x_mid)) -> t = run_stage(x_mid); t + mlp(t) (merge, fuse)
    respecialize_token_counts,        # view(x, [B, 197, h, d]) -> view(x, [B, 99, h, d]) downstream of a stage
    hoist_token_gathers,              # prune_topk(x1 + mlp(x1)) -> take(x1) + mlp(take(x1)): the MLP on K tokens
    add_kept_index_outputs,           # return (out,) -> return (out, kept_0, kept_1, ...)
    compact_token_axis,               # adaptive(compact=true): tokens -> compact_valid(tokens, valid), sym sizes
)

# The debug ONNX (model output + kept_idx.<block>) -> the deployable ONNX; checks run once at the end.
ONNX_PASSES = (
    drop_debug_outputs,               # graph(out, kept_idx.*) -> graph(out)
    check_static_model,               # check: no NonZero/Scatter/Loop/If, only the batch axis dynamic
)


def run_fx_passes(gm: fx.GraphModule, ctx: PassContext, passes=FX_PASSES) -> PassResult:
    """Run an FX pass list on `gm` (edited in place) until nothing changes."""
    return run_passes(gm, passes, ctx)


def run_onnx_passes(model: onnx.ModelProto, ctx: PassContext, passes=ONNX_PASSES) -> onnx.ModelProto:
    """Run an ONNX pass list on a copy of `model` until nothing changes; `model` itself is left as it is (and
    returned when no pass changed anything)."""
    result = run_passes(ir.from_proto(model), passes, ctx)
    return ir.to_proto(result.model) if result.modified else model
