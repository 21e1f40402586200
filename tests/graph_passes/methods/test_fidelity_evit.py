"""EViT fidelity: cls-topk (+ fuse) against the released code (tests/reference/evit.py, youweiliang/evit).

Same kept set and fused token (<= 1e-5) from the same block attention, on integer q/k with many exact score ties;
the kept counts of a ratio recipe equal EViT's ceil(keep_rate * (N - 1)) with the fused token counted. Pinned
differences (docs/fidelity.md): kept tokens in position order (EViT: descending attention; attention is
permutation-equivariant, so only the order differs), fuse_mean=true renormalizes the weights.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.evit import evit_block_prune, evit_token_counts
from tokensieve.graph_passes.methods.attention_scores import cls_attention_scores
from tokensieve.graph_passes.methods.stage import gather_options
from tokensieve.graph_passes.methods.topk import prune_topk
from tokensieve.recipe import parse_recipe, resolve_recipe

SETTINGS = settings(max_examples=30, deadline=None)


@st.composite
def cases(draw):
    B, H, n = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 40))
    D = draw(st.sampled_from([1, 4, 16]))          # scale 1, 1/2, 1/4: exact
    keep = draw(st.integers(1, n - 1))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # small integers: exact logits, and many tokens with equal [CLS] attention
    q = torch.randint(-2, 3, (B, H, n + 1, D), generator=gen).float()
    k = torch.randint(-2, 3, (B, H, n + 1, D), generator=gen).float()
    x = torch.randn(B, n + 1, 6, generator=gen)
    return q, k, x, keep


def _tokensieve(q, k, x, keep, **options):
    scores = cls_attention_scores(q, k)
    tokens, idx = prune_topk(x, scores, keep, 1)
    return gather_options(x, scores, tokens, idx, keep, 1, {"fuse": True, **options}), idx


@SETTINGS
@given(cases())
def test_cls_topk_fuse_is_evits_block_prune(case):
    q, k, x, keep = case
    attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
    ref, ref_idx = evit_block_prune(x, attn, keep, fuse_token=True)
    out, idx = _tokensieve(q, k, x, keep)
    order = ref_idx.argsort(dim=1)                                          # EViT's order -> position order
    assert torch.equal(idx - 1, ref_idx.gather(1, order))                   # the same kept tokens
    torch.testing.assert_close(out[:, 0], ref[:, 0], rtol=0, atol=0)        # [CLS]
    kept_ref = ref[:, 1:1 + keep].gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    torch.testing.assert_close(out[:, 1:1 + keep], kept_ref, rtol=0, atol=0)
    torch.testing.assert_close(out[:, -1], ref[:, -1], rtol=1e-5, atol=1e-5)  # the fused token: weighted SUM
    # fuse_mean=true: tokensieve's earlier form, the same sum divided by the dropped tokens' attention
    mean, _ = _tokensieve(q, k, x, keep, fuse_mean=True)
    scores = attn[:, :, 0, 1:].mean(1)
    dropped = torch.ones_like(scores, dtype=torch.bool).scatter(1, ref_idx, False)
    torch.testing.assert_close(mean[:, -1], ref[:, -1] / (scores * dropped).sum(1, keepdim=True), rtol=1e-5, atol=1e-5)


def test_ratio_budgets_are_evits_left_tokens():
    """DeiT-S, keep 0.7 at 0-based blocks 3, 6, 9 (EViT's deit_small_patch16_shrink_base), fused token counted."""
    stages = resolve_recipe(parse_recipe("cls-topk(fuse=true)@3,6,9:0.7"), 12, 197, 1)
    counts = evit_token_counts(196, 0.7, (3, 6, 9), 12, fuse_token=True)
    assert [1 + s.keep + 1 for s in stages] == [counts[3], counts[6], counts[9]] == [140, 100, 72]
    plain = resolve_recipe(parse_recipe("cls-topk@3,6,9:0.7"), 12, 197, 1)
    assert [1 + s.keep for s in plain] == [evit_token_counts(196, 0.7, (3, 6, 9), 12, False)[i] for i in (3, 6, 9)]


def test_exported_macs_of_evits_deit_s_recipe_are_the_published_figure():
    """DeiT-S/16-224 (random init from its config), EViT's keep 0.7 in blocks 3, 6, 9 without fusion: the traced
    pruned graph counts 2.98 GMACs, EViT's README gives 3.0 G ("✗ fusion, keep 0.7"); the dense graph 4.60 G (4.6).
    The in-block placement (hoist_token_gathers: the MLP of each pruning block on the kept tokens) is what gets
    there: gathering after the block counts 3.15 G."""
    from transformers import ViTConfig, ViTForImageClassification

    from tokensieve.flops import count_macs
    from tokensieve.graph_passes.blocks import discover_blocks, token_layout
    from tokensieve.graph_passes.pass_manager import PassContext
    from tokensieve.graph_passes.pipeline import FX_PASSES, run_fx_passes
    from tokensieve.exporter.trace import FirstOutput, trace

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       image_size=224, patch_size=16, num_labels=1000, attn_implementation="sdpa")
    module = FirstOutput(ViTForImageClassification(config).eval())
    x = torch.randn(2, 3, 224, 224)
    ep = trace(module, x)
    dense = count_macs(ep.graph_module)
    gm = ep.module()
    blocks = discover_blocks(gm)
    layout = token_layout(gm, blocks)
    stages = resolve_recipe(parse_recipe("cls-topk@3,6,9:0.7"), len(blocks), layout.num_tokens,
                            layout.num_prefix_tokens)
    run_fx_passes(gm, PassContext(tuple(blocks), tuple(stages), (x,)), FX_PASSES)
    pruned = count_macs(trace(gm, x).graph_module)
    assert abs(dense / 1e9 - 4.6) < 0.01
    assert abs(pruned / 1e9 - 3.0) / 3.0 < 0.01, pruned / 1e9
