"""The Python API; the only module that chains stages (export -> passes -> ONNX -> verify -> build -> bench)."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import fx, nn

from tokensieve.errors import ConfigError, TargetError, VerificationError
from tokensieve.exporter.to_onnx import to_onnx
from tokensieve.exporter.trace import FirstOutput, _is_hf, quiet, trace
from tokensieve.fileio import atomic_path, ensure_writable_dir, write_json_atomic
from tokensieve.flops import count_macs
from tokensieve.graph_passes.blocks import TokenLayout, discover_blocks, token_layout
from tokensieve.graph_passes.fx.insert_prune_stages import insert_prune_stages, kept_index_nodes
from tokensieve.graph_passes.fx.remove_constant_attention_mask import remove_constant_attention_mask
from tokensieve.graph_passes.fx.respecialize_token_counts import respecialize_token_counts
from tokensieve.graph_passes.methods.reference import HookStage, run_reference
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.graph_passes.onnx.check_static import check_static
from tokensieve.recipe import Recipe, ResolvedStage, parse_recipe, resolve_recipe

__all__ = ["export", "ExportResult", "verify", "VerifyReport", "save", "build", "bench", "BenchReport"]


@dataclass
class ExportResult:
    """A pruned model in ONNX, the dense baseline, and what is needed to check it against eager."""

    module: nn.Module = field(repr=False)            # the eager model, wrapped to return one tensor
    input_shape: tuple[int, ...]
    recipe: Recipe
    stages: list[ResolvedStage]
    hook_stages: list[HookStage]
    layout: TokenLayout
    block_paths: list[str]
    output_name: str
    onnx_model: onnx.ModelProto = field(repr=False)   # deployable: the model's output only
    debug_onnx: onnx.ModelProto = field(repr=False)   # + kept_idx.<block> outputs, for verification
    dense_onnx: onnx.ModelProto = field(repr=False)
    macs_dense: int
    macs_pruned: int
    seconds: dict[str, float]

    @property
    def tokens(self) -> list[int]:
        """Token counts: entering block 0, then after each stage."""
        return [self.layout.num_tokens] + [s.tokens_out for s in self.stages]

    @property
    def ideal_speedup(self) -> float:
        return self.macs_dense / self.macs_pruned

    def summary(self) -> dict:
        return {
            "recipe": self.recipe.to_dict(),
            "recipe_shorthand": self.recipe.shorthand(),
            "input_shape": list(self.input_shape),
            "num_blocks": len(self.block_paths),
            "block_paths": self.block_paths,
            "layout": asdict(self.layout),
            "stages": [
                {"after_block": s.stage.after_block, "method": s.stage.method, "keep": s.keep,
                 "tokens_in": s.tokens_in, "tokens_out": s.tokens_out} for s in self.stages
            ],
            "tokens_per_block": self.tokens_per_block(),
            "macs_dense": self.macs_dense,
            "macs_pruned": self.macs_pruned,
            "ideal_speedup": self.ideal_speedup,
            "seconds": self.seconds,
        }

    def tokens_per_block(self) -> list[int]:
        """Tokens each block processes."""
        n, out, by_block = self.layout.num_tokens, [], {s.stage.after_block: s for s in self.stages}
        for i in range(len(self.block_paths)):
            out.append(n)
            if i in by_block:
                n = by_block[i].tokens_out
        return out

    def reference(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Eager output and kept positions per stage for input `x`."""
        return run_reference(self.module, x, self.hook_stages)


def export(model: nn.Module, example_inputs, recipe: Recipe | str, *, num_prefix_tokens: int | None = None,
           dynamic_batch: bool = True) -> ExportResult:
    """Trace `model`, insert the recipe's pruning stages into the graph, convert both pruned and dense to ONNX."""
    if isinstance(recipe, str):
        recipe = parse_recipe(recipe)
    example = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ConfigError("example_inputs must be one (B, C, H, W) image tensor")
    model = model.eval()
    module = FirstOutput(model)
    output_name = _output_name(model, example)
    seconds = {}

    t0 = time.perf_counter()
    ep = trace(module, example, dynamic_batch)
    seconds["trace"] = time.perf_counter() - t0

    gm = ep.module()
    blocks = discover_blocks(gm)
    layout = token_layout(gm, blocks, num_prefix_tokens)
    stages = resolve_recipe(recipe, len(blocks), layout.num_tokens, layout.num_prefix_tokens)
    for s in stages:
        if METHODS[s.stage.method].requires_cls and layout.num_prefix_tokens == 0:
            raise ConfigError(
                f"Method {s.stage.method!r} scores tokens by [CLS] attention, but this model has no [CLS] token "
                "(0 prefix tokens); choose a CLS-free method (see `tokensieve methods`)"
            )

    t0 = time.perf_counter()
    dense_onnx = to_onnx(ep, [output_name])
    seconds["onnx_dense"] = time.perf_counter() - t0
    macs_dense = count_macs(ep.graph_module)

    if stages:
        t0 = time.perf_counter()
        sample = (example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:])).contiguous()
        remove_constant_attention_mask(gm, (sample,))
        insert_prune_stages(gm, blocks, stages)
        respecialize_token_counts(gm, (sample,))
        kept = kept_index_nodes(gm)
        _set_outputs(gm, kept)
        seconds["passes"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ep_pruned = trace(gm, example, dynamic_batch)
        seconds["trace_pruned"] = time.perf_counter() - t0
        names = [output_name] + [f"kept_idx.{s.stage.after_block}" for s in stages]
        t0 = time.perf_counter()
        debug_onnx = to_onnx(ep_pruned, names)
        seconds["onnx_pruned"] = time.perf_counter() - t0
        macs_pruned = count_macs(ep_pruned.graph_module)
        onnx_model = _drop_outputs(debug_onnx, keep=1)
    else:
        debug_onnx = onnx_model = dense_onnx
        macs_pruned = macs_dense

    for m in (onnx_model, dense_onnx):
        check_static(m)
    hook_stages = [HookStage(blocks[s.stage.after_block].path, s.stage.method, s.keep, s.num_prefix_tokens) for s in stages]
    return ExportResult(
        module=module, input_shape=tuple(example.shape), recipe=recipe, stages=stages, hook_stages=hook_stages,
        layout=layout, block_paths=[b.path for b in blocks], output_name=output_name, onnx_model=onnx_model,
        debug_onnx=debug_onnx, dense_onnx=dense_onnx, macs_dense=macs_dense, macs_pruned=macs_pruned, seconds=seconds,
    )


def _output_name(model: nn.Module, example: torch.Tensor) -> str:
    if not _is_hf(model):
        return "output"
    with torch.no_grad(), quiet():
        out = model(pixel_values=example[:1])
    keys = list(out.keys()) if hasattr(out, "keys") else []
    return keys[0] if keys else "output"


def _set_outputs(gm: fx.GraphModule, extra: list[fx.Node]) -> None:
    """Make gm return (original output, *extra) as a flat tuple."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    (orig,) = out_node.args
    first = orig[0] if isinstance(orig, (tuple, list)) else orig
    gm.graph._codegen = fx.graph.CodeGen()  # plain positional inputs, flat tuple output
    out_node.args = (tuple([first, *extra]),)
    gm.recompile()


def _drop_outputs(model: onnx.ModelProto, keep: int) -> onnx.ModelProto:
    m = copy.deepcopy(model)
    del m.graph.output[keep:]
    return m
