"""run_stage, the one stage dispatcher: the calls it records as FX nodes (the FX pass's `call`) compute exactly what
it computes eagerly, for each way a stage reduces (TopK + token reuse, a custom reduce, a carried state, the capped
and the compacted adaptive form, caller-given scores)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.graph_passes.methods.stage import PRUNE_TOPK, run_stage

H, D = 2, 8


def _inputs(b: int, n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(b, H, n, D, generator=g), "k": torch.randn(b, H, n, D, generator=g), "scale": D ** -0.5,
            "x_in": torch.randn(b, n, H * D, generator=g), "x_out": torch.randn(b, n, H * D, generator=g)}


def _recorded(method: str, options: dict, keep: int, p: int, inputs: dict, **kw):
    """The stage as an FX graph built through run_stage's `call`, run on `inputs`; also the op targets it recorded."""
    graph = fx.Graph()
    nodes = {name: graph.placeholder(name) if torch.is_tensor(v) else v for name, v in inputs.items()}
    targets = []

    def call(fn, *args, **kwargs):
        targets.append(fn)
        return graph.call_function(fn, args, kwargs)

    tokens, kept, state = run_stage(METHODS[method], options, keep, p, call=call, **nodes, **kw)
    graph.output((tokens, kept) if state is None else (tokens, kept, state))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    return gm(*(v for v in inputs.values() if torch.is_tensor(v))), targets


CASES = [
    ("cls-topk", {}),
    ("cls-topk", {"fuse": True, "pospad": True}),       # reuse: EViT's fused token + PosPad markers
    ("ttv", {"recycle": True}),                          # HIDDEN score + recycling
    ("tome", {"prop_attn": True}),                       # custom reduce carrying a size state
    ("divprune", {}),                                    # greedy selection (its own reduce)
    ("adaptive", {}),                                    # capped slots + validity state
]


@pytest.mark.parametrize(("method", "options"), CASES)
@settings(max_examples=4, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(6, 20), seed=st.integers(0, 2**16))
def test_recorded_calls_compute_what_eager_computes(method, options, b, n, seed):
    spec, p = METHODS[method], 1
    opts = {**spec.defaults(), **options}
    keep = (n - p) // 2 + 1
    inputs = _inputs(b, n, seed)
    with torch.no_grad():
        got, targets = _recorded(method, opts, keep, p, inputs, capped=True)
        want = run_stage(spec, opts, keep, p, capped=True, **inputs)
    want = tuple(w for w in want if w is not None)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert (PRUNE_TOPK in targets) == (spec.reduce_fn is None)  # a plain gather is always tokensieve::prune_topk
    assert got[1].shape == (b, keep)


def test_adaptive_eager_compacts_capped_keeps_the_slots():
    spec, inputs = METHODS["adaptive"], _inputs(1, 17, 0)
    opts = spec.defaults()
    capped, kept, valid = run_stage(spec, opts, 8, 1, capped=True, **inputs)
    compacted, kept_eager, state = run_stage(spec, opts, 8, 1, **inputs)
    torch.testing.assert_close(kept, kept_eager, rtol=0, atol=0)
    assert capped.shape == (1, 9, H * D) and state is None
    count = int(valid.sum())
    assert compacted.shape == (1, count, H * D)
    torch.testing.assert_close(compacted, capped[:, :count], rtol=0, atol=0)  # valid slots come first


def test_given_scores_skip_the_score():
    """A VLM part that computes its own scores (Qwen2-VL: pooled over merge groups) runs only the selection."""
    spec, inputs = METHODS["cls-topk"], _inputs(2, 12, 3)
    scores = torch.arange(12.0).flip(0).expand(2, 12)  # position 0 (prefix) ... highest first
    tokens, idx, _ = run_stage(spec, spec.defaults(), 4, 1, scores=scores, x_out=inputs["x_out"])
    assert idx.tolist() == [[1, 2, 3, 4]] * 2
    torch.testing.assert_close(tokens, inputs["x_out"][:, :5], rtol=0, atol=0)
