"""What every graph pass gets (`PassContext`) and the manager that runs a pass list until nothing changes.

One signature for every pass, FX or ONNX (the lists: graph_passes/pipeline.py):

    pass(model, ctx: PassContext) -> PassResult(model, modified)

model is a torch.fx.GraphModule for an FX pass, an onnx_ir.Model for an ONNX pass. `PassResult` comes from onnx-ir.
A pass run a second time must do nothing and report modified=False (passes tag what they insert, STYLE.md section 2);
`run_passes` repeats its list until a whole round modifies nothing, as onnx-ir's PassManager(steps=...) does.
A check (`@check_pass`: raises on a bad model, never modifies it) runs once, on the converged model.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from onnx_ir.passes import PassResult

from tokensieve.errors import InternalError

if TYPE_CHECKING:
    from tokensieve.graph_passes.blocks import Block
    from tokensieve.recipe import ResolvedStage


@dataclass(frozen=True)
class PassContext:
    """What the passes read, fixed for one export: the traced model's blocks, the recipe's stages bound to them, and
    the sample inputs that passes which run the graph once use (batch >= 2 for a dynamic-batch trace)."""

    blocks: tuple[Block, ...] = ()
    stages: tuple[ResolvedStage, ...] = ()
    example_inputs: tuple = ()

    @property
    def compacts(self) -> bool:
        """Whether a stage really shortens the token axis (adaptive compact=true): a data-dependent axis downstream."""
        return any(s.options.get("compact") for s in self.stages)

    @property
    def allowed_ops(self) -> frozenset[str]:
        """Ops check_static lets through: an ONNX Loop only where a stage asked for it (divprune/mmr loop=true)."""
        return frozenset({"Loop"}) if any(s.options.get("loop") for s in self.stages) else frozenset()


Pass = Callable[[Any, PassContext], PassResult]


def check_pass(fn: Pass) -> Pass:
    """Mark `fn` as a check: it raises on a bad model and never modifies it, so run_passes runs it once at the end."""
    fn.is_check = True
    return fn


def is_check(p: Pass) -> bool:
    return getattr(p, "is_check", False)


def run_passes(model, passes: Sequence[Pass], ctx: PassContext, *, max_iterations: int = 4) -> PassResult:
    """Run the rewrites of `passes` in order, repeating them until a whole round modifies nothing, then each check
    once on the result.

    -> PassResult(final model, whether any pass modified it). A list that still modifies the model after
    `max_iterations` rounds has a pass that is not idempotent (or two that undo each other): InternalError.
    """
    rewrites = [p for p in passes if not is_check(p)]
    modified = False
    for _ in range(max_iterations):
        changed = []
        for p in rewrites:
            result = p(model, ctx)
            model = result.model
            if result.modified:
                changed.append(p.__name__)
        if not changed:
            for p in passes:
                if is_check(p) and p(model, ctx).modified:
                    raise InternalError(f"check {p.__name__} modified the model; a check must not")
            return PassResult(model, modified)
        modified = True
    raise InternalError(f"Graph passes did not converge in {max_iterations} rounds: {', '.join(changed)} still modify "
                        "the model on every round (a pass that is not idempotent)")
