"""Eager reference: run the unmodified model with pruning stages applied through forward hooks.

It calls the same method functions as the graph pass (`run_stage`: score, `prune_topk`, fused
token) on the same inputs (q/k captured at scaled_dot_product_attention, the block's input and
output tokens), so exported and eager kept indices can be compared exactly. Like the FX pass, it drops attention masks that mask nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from tokensieve.graph_passes.methods.registry import METHODS, ScoreInput
from tokensieve.graph_passes.methods.stage import run_stage


@dataclass(frozen=True)
class HookStage:
    block_path: str        # dotted submodule path of the block to prune after
    method: str
    keep: int
    num_prefix_tokens: int
    options: tuple[tuple[str, object], ...] = ()


def is_trivial_mask(mask) -> bool:
    if not isinstance(mask, Tensor):
        return False
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


class _Attention(TorchFunctionMode):
    """Capture q, k, scale of each SDPA call (for the current block) and drop no-op masks."""

    def __init__(self):
        super().__init__()
        self.current: str | None = None
        self.captured: dict[str, tuple] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            args = list(args)
            if len(args) > 3 and is_trivial_mask(args[3]):
                args[3] = None
            if is_trivial_mask(kwargs.get("attn_mask")):
                kwargs["attn_mask"] = None
            if self.current is not None:
                self.captured[self.current] = (args[0], args[1], kwargs.get("scale"))
        return func(*args, **kwargs)


def run_reference(model: nn.Module, x: Tensor, stages: list[HookStage]) -> tuple[Tensor, list[Tensor]]:
    """Run `model(x)` with the stages applied; returns (first output, kept positions per stage)."""
    mode = _Attention()
    kept: list[Tensor] = []
    handles = []

    inputs: dict[str, Tensor] = {}

    def pre_hook(path):
        def hook(module, args, kwargs):
            mode.current = path
            inputs[path] = args[0] if args else next(iter(kwargs.values()))
        return hook

    def post_hook(stage: HookStage):
        def hook(module, args, output):
            mode.current = None
            spec = METHODS[stage.method]
            hidden = output[0] if isinstance(output, tuple) else output
            found = {"x_out": hidden, "x_in": inputs.pop(stage.block_path)}
            if spec.score_input is ScoreInput.ATTENTION_QK:
                found |= dict(zip(("q", "k", "scale"), mode.captured.pop(stage.block_path)))
            pruned, idx = run_stage(spec, dict(stage.options), stage.keep, stage.num_prefix_tokens, **found)
            kept.append(idx)
            return (pruned, *output[1:]) if isinstance(output, tuple) else pruned
        return hook

    try:
        for st in stages:
            block = model.get_submodule(st.block_path)
            handles.append(block.register_forward_pre_hook(pre_hook(st.block_path), with_kwargs=True))
            handles.append(block.register_forward_hook(post_hook(st)))
        with torch.no_grad(), mode:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, kept
