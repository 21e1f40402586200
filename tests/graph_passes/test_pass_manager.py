"""run_passes: repeats the rewrites until a round changes nothing, runs checks once at the end, and refuses a list
that never converges (a pass that is not idempotent)."""
from __future__ import annotations

import pytest
from onnx_ir.passes import PassResult

from tokensieve.errors import InternalError
from tokensieve.graph_passes.pass_manager import PassContext, check_pass, is_check, run_passes


def _bump_until(limit: int):
    def bump(model: list, ctx: PassContext) -> PassResult:
        """Append one item while the list is shorter than `limit`."""
        if len(model) >= limit:
            return PassResult(model, False)
        model.append(len(model))
        return PassResult(model, True)
    return bump


def test_repeats_until_a_round_changes_nothing():
    calls = []

    def log(model, ctx):
        calls.append(len(model))
        return PassResult(model, False)

    result = run_passes([], [_bump_until(3), log], PassContext(), max_iterations=5)
    assert result.modified and result.model == [0, 1, 2]
    assert calls == [1, 2, 3, 3]  # three rounds that changed something, one that did not


def test_nothing_to_do_reports_unmodified():
    result = run_passes([0, 1], [_bump_until(2)], PassContext())
    assert result.modified is False and result.model == [0, 1]


def test_a_pass_that_always_modifies_raises_internal_error():
    def always(model, ctx):
        model.append(0)
        return PassResult(model, True)

    with pytest.raises(InternalError, match="always still modify"):
        run_passes([], [_bump_until(1), always], PassContext(), max_iterations=3)


def test_checks_run_once_on_the_converged_model():
    seen = []

    @check_pass
    def check(model, ctx):
        seen.append(list(model))
        return PassResult(model, False)

    assert is_check(check) and not is_check(_bump_until(1))
    run_passes([], [check, _bump_until(2)], PassContext())  # listed first, still runs last
    assert seen == [[0, 1]]


def test_a_check_that_modifies_is_a_bug():
    @check_pass
    def sneaky(model, ctx):
        return PassResult(model, True)

    with pytest.raises(InternalError, match="sneaky modified"):
        run_passes([], [sneaky], PassContext())
