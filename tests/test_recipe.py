"""Recipes: the CLI shorthand, recipe files, token counts per model, and one-line errors for every bad input."""
from __future__ import annotations

import json

import pytest

from tokensieve.errors import ConfigError, TokenSieveError
from tokensieve.recipe import Budget, Recipe, Stage, load_recipe, parse_recipe, recipe_from_dict, resolve_recipe

# ViT-S/16-224: 12 blocks, 1 [CLS] + 196 patch tokens.
VIT_S = dict(num_blocks=12, num_tokens=197, num_prefix_tokens=1)


def stages(recipe: Recipe) -> list[tuple[str, int, float | None, int | None]]:
    return [(s.method, s.after_block, s.keep.ratio, s.keep.count) for s in recipe.stages]


def tokens(recipe: Recipe, num_blocks=12, num_tokens=197, num_prefix_tokens=1) -> list[int]:
    resolved = resolve_recipe(recipe, num_blocks, num_tokens, num_prefix_tokens)
    return [num_tokens] + [r.tokens_out for r in resolved]


def assert_one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg and "\r" not in msg, f"multi-line error message: {msg!r}"
    return msg


# ------------------------------------------------------------------------------------------ shorthand


def test_shorthand_multiple_blocks_share_one_budget():
    r = parse_recipe("cls-topk@3,6,9:0.7")
    assert stages(r) == [("cls-topk", 3, 0.7, None), ("cls-topk", 6, 0.7, None), ("cls-topk", 9, 0.7, None)]
    assert r.shorthand() == "cls-topk@3:0.7+cls-topk@6:0.7+cls-topk@9:0.7"
    assert str(r) == r.shorthand()


def test_shorthand_plus_chaining_and_sorting():
    r = parse_recipe("cls-topk@6:0.5+cls-topk@2,4:0.8")
    assert stages(r) == [("cls-topk", 2, 0.8, None), ("cls-topk", 4, 0.8, None), ("cls-topk", 6, 0.5, None)]


def test_shorthand_ratio_vs_count():
    """KEEP with a dot (or exponent) is a ratio, without one a count of patch tokens."""
    assert stages(parse_recipe("cls-topk@4:98")) == [("cls-topk", 4, None, 98)]
    assert stages(parse_recipe("cls-topk@4:0.5")) == [("cls-topk", 4, 0.5, None)]
    assert stages(parse_recipe("cls-topk@4:1.0")) == [("cls-topk", 4, 1.0, None)]
    assert stages(parse_recipe("cls-topk@4:1")) == [("cls-topk", 4, None, 1)]
    assert stages(parse_recipe("cls-topk@4:5e-1")) == [("cls-topk", 4, 0.5, None)]
    assert stages(parse_recipe("cls-topk@1:0.5+cls-topk@3:20")) == [("cls-topk", 1, 0.5, None), ("cls-topk", 3, None, 20)]


def test_shorthand_tolerates_whitespace():
    assert stages(parse_recipe("  cls-topk@3, 6 : 0.7 ")) == stages(parse_recipe("cls-topk@3,6:0.7"))


@pytest.mark.parametrize("text", ["", "dense", "none", "  dense  "])
def test_shorthand_dense(text):
    r = parse_recipe(text)
    assert r.stages == ()
    assert r.shorthand() == "dense"


@pytest.mark.parametrize("text", ["cls-topk@3,6,9:0.7", "cls-topk@1:0.5+cls-topk@3:20", "cls-topk@4:1.0",
                                  "cls-topk@2:1", "cls-topk@0:0.001", "cls-topk@5:1e-05"])
def test_shorthand_round_trips(text):
    r = parse_recipe(text)
    assert parse_recipe(r.shorthand()) == r


def test_to_dict_round_trips_through_recipe_from_dict():
    r = parse_recipe("cls-topk@1:0.5+cls-topk@3:20")
    assert r.to_dict() == {"stages": [{"method": "cls-topk", "after_block": 1, "keep": 0.5},
                                      {"method": "cls-topk", "after_block": 3, "keep": 20}]}
    assert recipe_from_dict(r.to_dict()) == r


# ------------------------------------------------------------------------------------------ files

TOML = """
[[stage]]
method = "cls-topk"
after_block = 6
keep = 0.7

[[stage]]
method = "cls-topk"
after_block = 3
keep = 98
"""

YAML = """
stage:
  - method: cls-topk
    after_block: 6
    keep: 0.7
  - {method: cls-topk, after_block: 3, keep: 98}
"""

JSON = json.dumps({"stages": [{"method": "cls-topk", "after_block": 6, "keep": 0.7},
                              {"method": "cls-topk", "after_block": 3, "keep": 98}]})

EXPECTED = [("cls-topk", 3, None, 98), ("cls-topk", 6, 0.7, None)]


@pytest.mark.parametrize("name, text", [("r.toml", TOML), ("r.yaml", YAML), ("r.yml", YAML), ("r.json", JSON),
                                        ("R.TOML", TOML)])
def test_recipe_files(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert stages(parse_recipe(str(path))) == EXPECTED
    assert stages(load_recipe(path)) == EXPECTED


def test_recipe_file_string_keep_and_empty_params(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[stage]]\nmethod = "cls-topk"\nafter_block = 2\nkeep = "0.5"\nparams = {}\n')
    assert stages(parse_recipe(str(path))) == [("cls-topk", 2, 0.5, None)]


# ------------------------------------------------------------------------------------------ token counts


def test_resolve_vit_s_default_recipe():
    r = parse_recipe("cls-topk@3,6,9:0.7")
    resolved = resolve_recipe(r, **VIT_S)
    assert [x.tokens_in for x in resolved] == [197, 139, 98]
    assert [x.tokens_out for x in resolved] == [139, 98, 69]
    assert [x.keep for x in resolved] == [138, 97, 68]  # ceil(0.7 * patches)
    assert all(x.num_prefix_tokens == 1 for x in resolved)
    assert tokens(r) == [197, 139, 98, 69]


def test_resolve_counts_and_ratios_mixed():
    assert tokens(parse_recipe("cls-topk@3:98+cls-topk@6:0.5")) == [197, 99, 50]
    assert tokens(parse_recipe("cls-topk@3:195")) == [197, 196]  # largest count below the 196 patches
    assert tokens(parse_recipe("cls-topk@3:1.0")) == [197, 197]  # ratio 1 keeps everything
    assert tokens(parse_recipe("cls-topk@0:0.001")) == [197, 2]  # a ratio keeps at least one patch


def test_resolve_prefix_tokens_and_last_block():
    # DeiT-style [CLS] + distillation token; prune after the last block is allowed
    assert tokens(parse_recipe("cls-topk@11:0.5"), num_prefix_tokens=2, num_tokens=198) == [198, 100]
    assert resolve_recipe(parse_recipe("dense"), **VIT_S) == []


def test_resolve_ratio_property():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=200, deadline=None)
    @hypothesis.given(ratio=st.floats(min_value=1e-6, max_value=1.0), patches=st.integers(1, 4096))
    def check(ratio, patches):
        k = Budget(ratio=ratio).resolve(patches)
        assert 1 <= k <= patches
        assert k >= ratio * patches - 1e-6

    check()


# ------------------------------------------------------------------------------------------ bad input


BAD_SHORTHAND = {
    "unknown method": ("nope@3:0.7", "Unknown method 'nope'"),
    "empty method": ("@3:0.7", "Cannot parse recipe '@3:0.7'; write METHOD@BLOCKS:KEEP"),
    "unclosed parameters": ("cls-topk(fuse=true@3:0.7", "Cannot parse recipe"),
    "parameter twice": ("cls-topk(fuse=true,fuse=false)@3:0.7", "Parameter 'fuse' is given twice"),
    "keep ratio 0": ("cls-topk@3:0.0", "keep ratio 0.0 is out of range"),
    "keep ratio negative": ("cls-topk@3:-0.5", "keep ratio -0.5 is out of range"),
    "keep ratio > 1": ("cls-topk@3:1.5", "keep ratio 1.5 is out of range"),
    "keep ratio inf": ("cls-topk@3:1e999", "out of range"),
    "keep count 0": ("cls-topk@3:0", "keep count 0 is out of range"),
    "keep count negative": ("cls-topk@3:-4", "keep count -4 is out of range"),
    "keep not a number": ("cls-topk@3:lots", "keep 'lots' in 'cls-topk@3:lots' is not a number"),
    "keep nan": ("cls-topk@3:nan", "is not a number"),
    "negative block": ("cls-topk@-1:0.5", "after_block=-1 is negative"),
    "duplicate block in list": ("cls-topk@3,3:0.5", "Two stages after the same block"),
    "duplicate block across +": ("cls-topk@3:0.5+cls-topk@3:0.7", "Two stages after the same block"),
    "no @": ("cls-topk", "Cannot parse recipe 'cls-topk'"),
    "no keep": ("cls-topk@3", "Cannot parse recipe"),
    "empty blocks": ("cls-topk@:0.7", "Cannot parse recipe"),
    "empty keep": ("cls-topk@3:", "Cannot parse recipe"),
    "trailing +": ("cls-topk@3:0.7+", "Cannot parse recipe ''"),
    "non-integer blocks": ("cls-topk@a,b:0.7", "Block list 'a,b'"),
    "float block": ("cls-topk@3.5:0.7", "Block list '3.5'"),
    "empty block in list": ("cls-topk@3,,6:0.7", "must be comma-separated integers"),
}


@pytest.mark.parametrize("text, match", BAD_SHORTHAND.values(), ids=BAD_SHORTHAND.keys())
def test_bad_shorthand(text, match):
    with pytest.raises(ConfigError) as e:
        parse_recipe(text)
    assert match in assert_one_line(e)


BAD_RESOLVE = {
    "block out of range": ("cls-topk@12:0.7", dict(VIT_S), "the model has blocks 0..11"),
    "block far out of range": ("cls-topk@3,99:0.7", dict(VIT_S), "cls-topk@99"),
    "count equals patches": ("cls-topk@3:196", dict(VIT_S), "keep=196 must be below the 196 patch tokens"),
    "count above patches": ("cls-topk@3:500", dict(VIT_S), "keep=500 must be below the 196 patch tokens"),
    "count too big after an earlier stage": ("cls-topk@3:0.5+cls-topk@6:98", dict(VIT_S), "keep=98 must be below the 98"),
    "tiny model count 16": ("cls-topk@1:16", dict(num_blocks=4, num_tokens=17, num_prefix_tokens=1), "16 patch tokens"),
}


@pytest.mark.parametrize("text, model, match", BAD_RESOLVE.values(), ids=BAD_RESOLVE.keys())
def test_bad_recipe_for_model(text, model, match):
    recipe = parse_recipe(text)  # fine on its own, wrong for this model
    with pytest.raises(ConfigError) as e:
        resolve_recipe(recipe, **model)
    assert match in assert_one_line(e)


def _toml_stage(extra: str = "", method: str = "cls-topk", after_block: str = "3", keep: str = "0.7") -> str:
    return f'[[stage]]\nmethod = "{method}"\nafter_block = {after_block}\nkeep = {keep}\n{extra}'


BAD_FILES = {
    "unknown stage field": ("r.toml", _toml_stage("ratio = 0.5\n"), "unknown field(s) ['ratio']"),
    "unknown method parameter": ("r.toml", _toml_stage("params = { alpha = 1 }\n"),
                                 "Method 'cls-topk' has no parameter 'alpha'; its parameters: fuse"),
    "unknown method": ("r.toml", _toml_stage(method="evit"), "Unknown method 'evit'"),
    "duplicate block": ("r.toml", _toml_stage() + _toml_stage(keep="0.5"), "Two stages after the same block"),
    "keep ratio 0": ("r.toml", _toml_stage(keep="0.0"), "keep ratio 0.0 is out of range"),
    "keep ratio 1.5": ("r.toml", _toml_stage(keep="1.5"), "keep ratio 1.5 is out of range"),
    "keep count 0": ("r.toml", _toml_stage(keep="0"), "keep count 0 is out of range"),
    "keep nan": ("r.toml", _toml_stage(keep="nan"), "keep ratio nan is out of range"),
    "keep boolean": ("r.toml", _toml_stage(keep="true"), "not a boolean"),
    "keep string": ("r.toml", _toml_stage(keep='"most"'), "keep 'most'"),
    "after_block float": ("r.toml", _toml_stage(after_block="3.0"), "after_block must be an integer"),
    "after_block string": ("r.toml", _toml_stage(after_block='"3"'), "after_block must be an integer"),
    "after_block bool": ("r.toml", _toml_stage(after_block="true"), "after_block must be an integer"),
    "missing keep": ("r.json", '{"stage": [{"method": "cls-topk", "after_block": 3}]}', "missing field 'keep'"),
    "params not a table": ("r.json", '{"stage": [{"method": "cls-topk", "after_block": 3, "keep": 0.5, "params": [1]}]}',
                           "params must be a table"),
    "stage not a table": ("r.json", '{"stage": [3]}', "stage 0 must be a table"),
    "empty stage list": ("r.json", '{"stage": []}', "needs a non-empty `stage` list"),
    "no stage list": ("r.toml", 'method = "cls-topk"\n', "needs a non-empty `stage` list"),
    "top level is a list": ("r.yaml", "- method: cls-topk\n", "expected a table"),
    "empty yaml": ("r.yaml", "", "expected a table"),
    "bad toml syntax": ("r.toml", "[[stage]\nmethod = cls-topk\n", "is not valid TOML"),
    "bad yaml syntax": ("r.yaml", "stage: [ {method: cls-topk, after_block: 3\n", "is not valid YAML"),
    "bad yml syntax": ("r.yml", "stage:\n  - method: a\n   bad: indent\n", "is not valid YML"),
    "bad json syntax": ("r.json", '{"stage": [', "is not valid JSON"),
    "not utf-8": ("r.toml", b"\xff\xfe[[stage]]", "is not valid TOML"),
}


@pytest.mark.parametrize("name, text, match", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_recipe_file(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as e:
        parse_recipe(str(path))
    assert match in assert_one_line(e)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_recipe(str(tmp_path / "nope.toml"))
    msg = assert_one_line(e)
    assert "Cannot read recipe file" in msg and "nope.toml" in msg and "No such file or directory" in msg


def test_recipe_file_is_a_folder(tmp_path):
    (tmp_path / "r.yaml").mkdir()
    with pytest.raises(ConfigError) as e:
        parse_recipe(str(tmp_path / "r.yaml"))
    assert "Cannot read recipe file" in assert_one_line(e)


def test_stage_and_budget_constructors_validate():
    with pytest.raises(ConfigError):
        Budget()
    with pytest.raises(ConfigError):
        Budget(ratio=0.5, count=3)
    with pytest.raises(ConfigError):
        Stage("nope", 1, Budget(ratio=0.5))
    with pytest.raises(ConfigError):
        Stage("cls-topk", 1, Budget(ratio=0.5), params=(("alpha", 1),))


def test_config_error_is_a_user_error():
    """The CLI prints TokenSieveErrors as one line; anything else would show a traceback."""
    assert issubclass(ConfigError, TokenSieveError)
