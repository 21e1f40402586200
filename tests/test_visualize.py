"""`tokensieve visualize`: kept positions composed back to patches (by hand), the PNG, and one-line errors."""
from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import matplotlib.image as mpimg  # noqa: E402

from tokensieve.errors import ConfigError  # noqa: E402
from tokensieve.recipe import parse_recipe, resolve_recipe  # noqa: E402
from tokensieve.visualize import kept_patch_masks, load_image, token_origins  # noqa: E402


def stages(text: str, num_blocks=4, num_tokens=9, prefix=1):
    return resolve_recipe(parse_recipe(text), num_blocks, num_tokens, prefix)


def as_set(mask):
    return set(np.flatnonzero(mask).tolist())


# ------------------------------------------------------------------ composition by hand


def test_two_stages_by_hand():
    # 1 [CLS] + 8 patches. Stage 1 keeps sequence positions 2,3,6,8 = patches 1,2,5,7;
    # stage 2 sees [CLS, p1, p2, p5, p7] and keeps positions 1,4 = patches 1,7.
    rs = stages("cls-topk@0:4+cls-topk@1:2")
    masks = kept_patch_masks([np.array([2, 3, 6, 8]), np.array([1, 4])], rs, 1, 8)
    assert as_set(masks[0]) == {1, 2, 5, 7}
    assert as_set(masks[1]) == {1, 7}
    origins = token_origins([np.array([2, 3, 6, 8]), np.array([1, 4])], rs, 1, 8)
    assert origins[0].tolist() == [-1, 1, 2, 5, 7] and origins[1].tolist() == [-1, 1, 7]


def test_fused_token_is_not_a_patch():
    # EViT fuse: stage 1 leaves [CLS, 4 kept, fused]; stage 2 keeping the fused token (position 5) shows no patch.
    rs = stages("cls-topk(fuse=true)@0:4+cls-topk@1:2")
    assert rs[0].tokens_out == 6
    masks = kept_patch_masks([np.array([1, 2, 3, 4]), np.array([2, 5])], rs, 1, 8)
    assert as_set(masks[0]) == {0, 1, 2, 3}
    assert as_set(masks[1]) == {1}


def test_no_prefix_tokens():
    rs = stages("attn-mean@0:3+attn-mean@1:1", num_tokens=6, prefix=0)
    masks = kept_patch_masks([np.array([0, 4, 5]), np.array([2])], rs, 0, 6)
    assert as_set(masks[0]) == {0, 4, 5} and as_set(masks[1]) == {5}


def test_pospad_markers_are_not_patches():
    # 8 patches, keep 1,2,5 (positions 2,3,6): PosPad emits [m(0), 1, 2, m(3,4), 5, m(6,7)] in position order.
    rs = stages("cls-topk(pospad=true)@0:3+cls-topk@1:2")
    origins = token_origins([np.array([2, 3, 6]), np.array([1, 2])], rs, 1, 8)
    assert origins[0][0] == -1 and sorted(o for o in origins[0] if o >= 0) == [1, 2, 5]
    assert len(origins[0]) == rs[0].tokens_out
    marker_pos = int(np.flatnonzero(origins[0] == -1)[1])  # first marker slot after [CLS]
    masks = kept_patch_masks([np.array([2, 3, 6]), np.array([marker_pos, 2])], rs, 1, 8)
    assert len(as_set(masks[1])) == 1                       # the marker contributes no patch


def test_mismatched_stages_are_rejected():
    rs = stages("cls-topk@0:4+cls-topk@1:2")
    with pytest.raises(ConfigError):
        kept_patch_masks([np.array([1, 2, 3, 4])], rs, 1, 8)
    with pytest.raises(ConfigError, match="expects"):
        kept_patch_masks([np.array([1, 2]), np.array([1])], rs, 1, 8)   # stage 1 kept 2, the recipe says 4


# ------------------------------------------------------------------ end to end on the tiny model


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "in.png"
    y, x = np.mgrid[0:48, 0:80]
    img = np.stack([x / 79, y / 47, ((x // 8 + y // 8) % 2).astype(float)], axis=-1).astype(np.float32)
    mpimg.imsave(path, img)
    return path


def test_load_image_resizes(png):
    img = load_image(png, (64, 64))
    assert img.shape == (64, 64, 3) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1


def test_visualize_end_to_end(png, tmp_path, capsys):
    from tokensieve.cli import main
    from tokensieve.exporter.trace import FirstOutput
    from tokensieve.graph_passes.methods.reference import HookStage, run_reference
    from tokensieve.models import load_model
    from tokensieve.visualize import normalization, to_pixels

    out, js = tmp_path / "kept.png", tmp_path / "kept.json"
    assert main(["visualize", str(png), "--model", "tiny", "--prune", "cls-topk@1:0.5+cls-topk@2:0.5", "-o", str(out),
                 "--json", str(js)]) == 0
    assert "16 of a 8x8 grid" in capsys.readouterr().out
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 3 * 200   # input + 2 panels side by side
    summary = json.loads(js.read_text())
    assert summary["grid"] == [8, 8] and summary["kept_patches"] == [32, 16] and summary["mean"] == [0.5] * 3

    # The reference run on the same pixels, composed by hand: stage 2 indexes stage 1's survivors.
    model, shape = load_model("tiny")
    x = to_pixels(load_image(png, shape[2:]), *normalization(model))
    blocks = [f"model.{n}" for n, _ in model.named_modules() if re.fullmatch(r".*\.layers?\.\d+", n)]
    hooks = [HookStage(blocks[1], "cls-topk", 32, 1), HookStage(blocks[2], "cls-topk", 16, 1)]
    _, kept = run_reference(FirstOutput(model), x, hooks)
    first = kept[0][0].numpy() - 1                    # patches kept by stage 1 (sequence position - [CLS])
    second = first[kept[1][0].numpy() - 1]            # stage 2's positions index stage 1's kept sequence
    assert summary["kept_positions"] == [k[0].tolist() for k in kept]
    assert summary["patches"] == [sorted(first.tolist()), sorted(second.tolist())]
    assert set(second) <= set(first)


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"),
    ("garbage", "not a readable image"),
    ("prune", "Cannot parse recipe"),
    ("output", "ending in .png"),
    ("dense", "at least one stage"),
])
def test_visualize_bad_inputs_one_line(png, tmp_path, capsys, case, match):
    from tokensieve.cli import main

    image, prune, out = str(png), "cls-topk@1:0.5", str(tmp_path / "k.png")
    if case == "missing":
        image = str(tmp_path / "nope.png")
    elif case == "garbage":
        image = str(tmp_path / "bad.png")
        (tmp_path / "bad.png").write_text("not an image")
    elif case == "prune":
        prune = "cls-topk@1"
    elif case == "output":
        out = str(tmp_path / "k.txt")
    elif case == "dense":
        prune = "dense"
    assert main(["visualize", image, "--model", "tiny", "--prune", prune, "-o", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokensieve visualize: error: ") and match in err[0]
    assert not (tmp_path / "k.png").exists()


def test_missing_matplotlib_is_one_line(png, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"pip install tokensieve\[plot\]"):
        load_image(png, (64, 64))


def test_center_crop_follows_the_processor(tmp_path):
    """A wide image whose outer thirds are red and middle green: a center-cropping processor (CLIP's
    do_center_crop) sees only green; a plain resize (ViT's) keeps the red edges."""
    import json as _json

    from tokensieve.visualize import center_crops

    img = np.zeros((20, 60, 3), np.uint8)
    img[:, :20, 0] = img[:, 40:, 0] = 255
    img[:, 20:40, 1] = 255
    path = tmp_path / "wide.png"
    mpimg.imsave(path, img)
    cropped, stretched = load_image(path, (8, 8), center_crop=True), load_image(path, (8, 8))
    assert cropped[..., 0].max() < 0.05 and cropped[..., 1].min() > 0.95
    assert stretched[:, 0, 0].min() > 0.95 and stretched[:, -1, 0].min() > 0.95
    (tmp_path / "preprocessor_config.json").write_text(_json.dumps({"do_center_crop": True}))
    assert center_crops(tmp_path) and not center_crops(None)
