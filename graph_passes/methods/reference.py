"""Eager reference: run the unmodified model with pruning stages applied through forward hooks.

Each stage runs `methods/stage.run_stage`, the dispatcher whose calls the FX pass records as graph nodes (score,
`tokensieve::prune_topk` or the method's reduce, reused tokens), on the same inputs (q/k captured at
scaled_dot_product_attention, the block's input and output tokens), so exported and eager kept indices can be
compared exactly. Only an adaptive stage differs on purpose: eager drops the invalid slots (batch 1), the graph masks
them. Like the FX pass, it drops attention masks that mask nothing.

A stage whose paper runs it inside the block (`PruneMethod.runs_in_block`: ToMe, EViT's fused token, DiffRate) runs
where graph_passes/fx/place_in_block.py places it: on the block's attention residual add x_mid = x + attn (the first
add after the block's attention with the block input as an operand), whose result the MLP's norm and the final
residual add (the block output) then read. The block runs once to check that structure (x_mid used twice, by a norm
and by the add that gives the block output) and again with the stage's tokens in place of x_mid; a block of another
shape keeps the stage on its output, as the FX pass does.
"""
from __future__ import annotations

from collections.abc import Sequence
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
    grid: tuple[int, int] | None = None   # the patch grid (h, w), for scores that read 2D neighbours (HiPrune)
    earlier_path: str | None = None       # dotted path of the earlier block a two-block score also reads (HiPrune)
    placement: str = "paper"              # the recipe's `at`: paper (in the block where the method says) or block_out

    @classmethod
    def for_block(cls, block_paths: Sequence[str], after_block: int, method: str, keep: int, num_prefix_tokens: int,
                  options: tuple[tuple[str, object], ...] = (), grid: tuple[int, int] | None = None,
                  placement: str = "paper") -> HookStage:
        """The stage after block `after_block` of `block_paths`, with `earlier_path` filled if its method needs it."""
        earlier = METHODS[method].earlier_block
        earlier_path = block_paths[earlier(dict(options), after_block)] if earlier is not None else None
        return cls(block_paths[after_block], method, keep, num_prefix_tokens, options, grid, earlier_path, placement)

    @property
    def in_block(self) -> bool:
        return METHODS[self.method].runs_in_block(dict(self.options), self.placement)


def is_trivial_mask(mask) -> bool:
    if not isinstance(mask, Tensor):
        return False
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


# How `a + b` / torch.add and a norm reach a TorchFunctionMode.
_ADDS = (torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.add)
_NORMS = (F.layer_norm, torch.layer_norm, *((F.rms_norm,) if hasattr(F, "rms_norm") else ()))


class _Watch:
    """What one block does with its attention residual add x_mid = x_in + attn (after its attention): a first run
    records its uses; a second run (`stage` set) returns stage(x_mid) in its place."""

    def __init__(self, x_in: Tensor, stage=None):
        self.x_in, self.stage = x_in, stage
        self.x_mid: Tensor | None = None
        self.uses, self.norms, self.final = 0, 0, None

    def see(self, func, args, kwargs, out):
        if self.x_mid is None:
            if func in _ADDS and isinstance(out, Tensor) and out.shape == self.x_in.shape and any(
                    a is self.x_in for a in args[:2]):
                self.x_mid = out if self.stage is None else self.stage(out)
                return self.x_mid
            return out
        if isinstance(out, Tensor) and any(a is self.x_mid for a in (*args, *kwargs.values())):
            self.uses += 1
            self.norms += func in _NORMS
            if func in _ADDS:
                self.final = out
        return out

    def pre_norm(self, output: Tensor) -> bool:
        """Whether x_mid fed exactly the MLP's norm and the add that gave the block output (the FX pass's test)."""
        return self.x_mid is not None and self.uses == 2 and self.norms == 1 and self.final is output


class _Attention(TorchFunctionMode):
    """Capture q, k, scale of each SDPA call (for the current block), drop no-op masks, and give the blocks after a
    stateful stage its key mask (as the FX pass does); `watch` follows an in-block stage's attention residual add."""

    def __init__(self):
        super().__init__()
        self.current: str | None = None
        self.captured: dict[str, tuple] = {}
        self.key_mask: Tensor | None = None
        self.watch: _Watch | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if self.watch is not None and self.current in self.captured and func is not F.scaled_dot_product_attention:
            return self.watch.see(func, args, kwargs, func(*args, **kwargs))
        if func is F.scaled_dot_product_attention:
            args = list(args)
            if len(args) > 3 and is_trivial_mask(args[3]):
                args[3] = None
            if is_trivial_mask(kwargs.get("attn_mask")):
                kwargs["attn_mask"] = None
            if self.key_mask is not None:
                if (len(args) > 3 and args[3] is not None) or kwargs.get("attn_mask") is not None:
                    raise ValueError("an attention op after a stateful stage already has a mask")
                mask = self.key_mask.to(args[0].dtype)
                if len(args) > 3:
                    args[3] = mask
                else:
                    kwargs["attn_mask"] = mask
            if self.current is not None:
                self.captured[self.current] = (args[0], args[1], kwargs.get("scale"))
        return func(*args, **kwargs)


def run_reference(model: nn.Module, x: Tensor, stages: list[HookStage]) -> tuple[Tensor, list[Tensor]]:
    """Run `model(x)` with the stages applied; returns (first output, kept positions per stage).

    With an adaptive (input-dependent count) stage, each sample runs alone and its tokens are really compacted;
    a per-token output shorter than the exported capped sequence is padded with NaN (rows the export marks invalid).
    """
    if any(METHODS[s.method].compacts for s in stages):
        runs = [_run_hooked(model, x[b:b + 1], stages) for b in range(x.shape[0])]
        slots = stages[-1].num_prefix_tokens + stages[-1].keep
        outs = [_pad_tokens(out, slots) for out, _ in runs]
        return torch.cat(outs), [torch.cat(k) for k in zip(*(kept for _, kept in runs))]
    return _run_hooked(model, x, stages)


def _pad_tokens(out: Tensor, slots: int) -> Tensor:
    """(1, n, C) with n < slots -> (1, slots, C), NaN rows after the n real ones; other outputs unchanged."""
    if out.dim() != 3 or out.shape[1] >= slots:
        return out
    return torch.cat([out, out.new_full((1, slots - out.shape[1], out.shape[2]), float("nan"))], dim=1)


def _earlier_path(stage: HookStage) -> str | None:
    """Path of the earlier block a two-block score reads (HookStage.earlier_path), else None."""
    if METHODS[stage.method].score_input is not ScoreInput.ATTENTION_QK_TWO_BLOCKS:
        return None
    if stage.earlier_path is None:
        raise ValueError(f"{stage.method} reads an earlier block's attention: set HookStage.earlier_path "
                         "(HookStage.for_block fills it)")
    return stage.earlier_path


def _run_hooked(model: nn.Module, x: Tensor, stages: list[HookStage]) -> tuple[Tensor, list[Tensor]]:
    mode = _Attention()
    kept: list[Tensor] = []
    handles = []

    inputs: dict[str, Tensor] = {}
    state: list = [None, None]  # token state carried by a stateful stage (PruneMethod.carries_state), its method

    def pre_hook(path):
        def hook(module, args, kwargs):
            mode.current = path
            inputs[path] = args[0] if args else next(iter(kwargs.values()))
        return hook

    def stage_pre_hook(stage: HookStage):
        capture = pre_hook(stage.block_path)

        def hook(module, args, kwargs):
            capture(module, args, kwargs)
            if stage.in_block:  # record what the block does with its attention residual add (see _Watch)
                mode.watch = _Watch(inputs[stage.block_path])
        return hook

    def post_hook(stage: HookStage):
        def hook(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            watch, mode.watch = mode.watch, None
            if stage.in_block and watch.pre_norm(hidden):  # again, the stage on x_mid (`place_in_block`)
                mode.current = stage.block_path
                mode.captured.pop(stage.block_path, None)  # `see` starts after the rerun's own attention
                mode.watch = _Watch(watch.x_in, lambda x_mid: run(stage, x_mid))
                try:
                    output = module.forward(*args, **kwargs)
                finally:
                    mode.watch, mode.current = None, None
                return output
            mode.current = None  # on the block output (also an in-block stage in a block of another shape)
            pruned = run(stage, hidden)
            return (pruned, *output[1:]) if isinstance(output, tuple) else pruned
        return hook

    def run(stage: HookStage, hidden: Tensor) -> Tensor:
        spec = METHODS[stage.method]
        found = {"x_out": hidden, "x_in": inputs.pop(stage.block_path)}
        if spec.score_input in (ScoreInput.ATTENTION_QK, ScoreInput.ATTENTION_QK_TWO_BLOCKS):
            found |= dict(zip(("q", "k", "scale"), mode.captured.pop(stage.block_path)))
        if spec.score_input is ScoreInput.ATTENTION_QK_TWO_BLOCKS:
            if stage.grid is None:
                raise ValueError(f"{stage.method} needs the patch grid: set HookStage.grid")
            found |= dict(zip(("q_early", "k_early", "scale_early"), mode.captured.pop(_earlier_path(stage))))
            found["grid"] = stage.grid
        options = dict(stage.options)
        mine = state[0] if state[1] == stage.method else None  # read by later stages of its method only
        pruned, idx, new_state = run_stage(spec, options, stage.keep, stage.num_prefix_tokens, state=mine,
                                           **found)
        kept.append(idx)
        state[:] = [new_state, stage.method]
        if new_state is not None and spec.masks_attention(options):  # later attention: the state's key mask
            mode.key_mask = spec.state_mask(new_state)
        return pruned

    def capture_hooks(path):  # an earlier block whose q/k a later stage also reads (HiPrune's anchor block)
        def pre(module, args, kwargs):
            mode.current = path

        def post(module, args, output):
            mode.current = None
        return pre, post

    try:
        for st in stages:
            if (early := _earlier_path(st)) is not None:
                pre, post = capture_hooks(early)
                handles.append(model.get_submodule(early).register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(model.get_submodule(early).register_forward_hook(post))
            block = model.get_submodule(st.block_path)
            handles.append(block.register_forward_pre_hook(stage_pre_hook(st), with_kwargs=True))
            handles.append(block.register_forward_hook(post_hook(st), with_kwargs=True))
        with torch.no_grad(), mode:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, kept
