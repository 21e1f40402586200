"""ToMe's recipe form `tome(r=R[,inflect=I])`: R tokens merged in every block with tome/utils.py `parse_r`'s schedule,
each capped at half the patch tokens as bipartite_soft_matching does; one-line errors for bad r / inflect."""
from __future__ import annotations

import pytest

from tokensieve.errors import ConfigError
from tokensieve.recipe import MergeSchedule, Recipe, parse_recipe, recipe_from_dict, resolve_recipe


def parse_r(num_layers: int, r) -> list[int]:
    """facebookresearch/ToMe tome/utils.py `parse_r` (@ 207459a), the int and (r, inflect) forms, verbatim."""
    inflect = 0
    if isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


def _merged(recipe: str, blocks=12, tokens=197, prefix=1) -> list[int]:
    """Tokens merged in each block (0 where no stage)."""
    merged, n = [0] * blocks, tokens - prefix
    for s in resolve_recipe(parse_recipe(recipe), blocks, tokens, prefix):
        merged[s.stage.after_block] = n - s.keep
        n = s.keep
    return merged


@pytest.mark.parametrize("r, inflect", [(8, 0.0), (13, 0.0), (16, 0.0), (8, -1.0), (8, -0.5), (5, 0.5), (7, 1.0)])
def test_every_block_merges_parse_r_tokens_capped_as_the_code(r, inflect):
    text = f"tome(r={r})" if inflect == 0 else f"tome(r={r},inflect={inflect})"
    want, t = [], 197
    for ri in parse_r(12, (r, inflect)):
        ri = min(ri, (t - 1) // 2)   # bipartite_soft_matching: min(r, (t - protected) // 2), protected = [CLS]
        want.append(ri)
        t -= ri
    assert _merged(text) == want


def test_the_cap_binds_on_a_short_sequence():
    """17 tokens, r = 8 in each of 4 blocks: 8, 4, 2, 1 (half of what is left)."""
    assert _merged("tome(r=8)", blocks=4, tokens=17) == [8, 4, 2, 1]


def test_stages_run_in_every_block_at_the_papers_placement_with_the_other_options():
    stages = resolve_recipe(parse_recipe("tome(r=4,prop_attn=true)"), 4, 17, 1)
    assert [s.stage.after_block for s in stages] == [0, 1, 2, 3]
    assert all(s.stage.placement == "paper" and s.options["prop_attn"] for s in stages)
    assert {s.stage.placement for s in resolve_recipe(parse_recipe("tome(r=4,at=block_out)"), 4, 17, 1)} == {"block_out"}


@pytest.mark.parametrize("text", ["tome(r=8)", "tome(r=8,inflect=-0.5)", "tome(r=3,inflect=1,sizes=false)"])
def test_round_trips(text):
    recipe = parse_recipe(text)
    assert recipe.schedule is not None and recipe.stages == ()
    assert parse_recipe(recipe.shorthand()) == recipe
    assert recipe_from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("text, match", [
    ("tome(r=0)", "r=0 must be an integer from 1"),
    ("tome(r=2.5)", "r=2.5 must be an integer"),
    ("tome(r=true)", "r=True must be an integer"),
    ("tome(r=8,inflect=2)", r"inflect=2 must be a number in \[-1, 1\]"),
    ("tome(r=8,inflect=nan)", "inflect=nan must be a number"),
    ("tome(r=8,inflect=x)", "inflect='x' must be a number"),
    ("tome(inflect=-1)", "needs r"),
    ("tome(r=8,depth=3)", "has no parameter 'depth'"),
    ("cls-topk(fuse=true)", "only tome has the every-block form"),
    ("tome(r=8)+cls-topk@3:0.5", "cannot be combined"),
])
def test_bad_forms_are_one_line_errors(text, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_recipe(text)
    assert "\n" not in str(e.value)


def test_one_block_model():
    assert MergeSchedule(8, -1.0).per_block(1) == [16]
    assert Recipe(schedule=MergeSchedule(8)).shorthand() == "tome(r=8)"
