"""Trace each tiny model once per test session and hand out fresh GraphModules of it."""
from __future__ import annotations

import functools

import torch

from tiny_models import build
from tokensieve.exporter.trace import FirstOutput, trace


@functools.lru_cache(maxsize=None)
def traced_tiny(name: str):
    """(FirstOutput-wrapped eager model, seeded batch-2 input, ExportedProgram with a dynamic batch).

    Call `ep.module()` for a fresh unlifted GraphModule each time: the FX passes edit it in place.
    """
    model, x = build(name)
    module = FirstOutput(model)
    return module, x, trace(module, x)


def random_batch(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """A seeded input shaped like `x` with batch size `n`."""
    return torch.randn(n, *x.shape[1:], generator=torch.Generator().manual_seed(seed))


def run_recipe(ep, x: torch.Tensor, recipe: str, passes=None):
    """A fresh GraphModule of `ep` with `recipe`'s stages run through the FX passes (default FX_PASSES) on example
    input `x` -> (gm, PassContext, blocks, token layout)."""
    from tokensieve.graph_passes.blocks import discover_blocks, token_layout
    from tokensieve.graph_passes.pass_manager import PassContext
    from tokensieve.graph_passes.pipeline import FX_PASSES, run_fx_passes
    from tokensieve.recipe import parse_recipe, resolve_recipe

    gm = ep.module()
    blocks = discover_blocks(gm)
    layout = token_layout(gm, blocks)
    stages = resolve_recipe(parse_recipe(recipe), len(blocks), layout.num_tokens, layout.num_prefix_tokens)
    ctx = PassContext(tuple(blocks), tuple(stages), (x,))
    run_fx_passes(gm, ctx, FX_PASSES if passes is None else passes)
    return gm, ctx, blocks, layout
