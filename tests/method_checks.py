"""Checks every method test repeats: exported ONNX vs the eager reference, and the static-graph op census.

    from method_checks import assert_matches_eager, assert_static_without_dynamic_ops, exported_cases
    exported = exported_cases(CASES)   # CASES: case id -> (tiny model, recipe, ...): a module fixture (id, result)
"""
from __future__ import annotations

import pytest

from tiny_models import build
from tokensieve import api
from tokensieve.graph_passes.onnx.check_static import check_static, op_census

# Ops that mean data-dependent shapes or scatter (no ONNX lowering / slow on TensorRT); Loop only where asked.
DYNAMIC_OPS = frozenset({"NonZero", "ScatterND", "ScatterElements", "Loop", "If"})
ATOL = 1e-4


def assert_matches_eager(result: api.ExportResult, num_inputs: int = 20, batch: int = 3) -> api.VerifyReport:
    """ONNX Runtime vs eager on `num_inputs` random batches: identical kept indices at every stage, max |Δ| <= ATOL."""
    report = api.verify(result, num_inputs=num_inputs, batch=batch, atol=ATOL)
    assert report.stage_blocks == [s.stage.after_block for s in result.stages]
    assert report.indices_match == [True] * len(result.stages), report.indices_match
    assert report.max_abs_diff <= ATOL, report.max_abs_diff
    assert report.passed
    return report


def assert_exported_case(result: api.ExportResult, tokens: list[int]) -> None:
    """A method test's end-to-end check: the token counts per stage, ORT == eager, a static graph."""
    assert result.tokens == tokens
    assert_matches_eager(result)
    assert_static_without_dynamic_ops(result)


def assert_static_without_dynamic_ops(result: api.ExportResult, allowed: frozenset = frozenset()) -> None:
    """Both the deployable and the debug ONNX have static shapes (batch fixed) and none of DYNAMIC_OPS - allowed."""
    for model in (result.onnx_model, result.debug_onnx):
        check_static(model, allowed_ops=allowed)
        census = op_census(model)
        bad = {op: census[op] for op in DYNAMIC_OPS - allowed if census[op]}
        assert not bad, bad
    assert_no_dead_nodes(result.onnx_model)


def assert_no_dead_nodes(model) -> None:
    """Every node of the deployable ONNX feeds a graph output (dropping kept_idx leaves nothing behind)."""
    used = {o.name for o in model.graph.output} | {i for n in model.graph.node for i in n.input}
    dead = [n.name for n in model.graph.node if not any(o in used for o in n.output)]
    assert not dead, dead


def exported_cases(cases: dict):
    """A module-scoped fixture over `cases` (id -> (tiny model name, recipe, ...)): (id, ExportResult), each once."""
    @pytest.fixture(scope="module", params=list(cases))
    def exported(request):
        name, recipe, *_ = cases[request.param]
        return request.param, api.export(*build(name), recipe)

    return exported
