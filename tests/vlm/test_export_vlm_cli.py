"""`tokensieve export-vlm`: one command from a saved LLaVA / Qwen2-VL folder to the three ONNX parts, verified by
greedy decoding against eager; bad input is one line with exit code 2."""
from __future__ import annotations

import json

import pytest

from test_llava_parts import tiny_llava
from test_qwen2_vl_parts import _tiny_qwen2_vl
from tokensieve.cli import main


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_ckpt")
    tiny_llava().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_ckpt")
    _tiny_qwen2_vl().save_pretrained(path)
    return path


def test_llava_one_command(llava_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export-vlm", str(llava_dir), "--prune", "cls-topk:0.25", "-o", str(out), "--steps", "4"]) == 0
    text = capsys.readouterr().out
    assert "16 patches -> 4 kept" in text and "verify          PASS" in text and "4 greedy tokens identical" in text
    assert "keep_idx identical" in text
    assert {"vision_prune.onnx", "lm_prefill.onnx", "lm_decode.onnx"} <= {p.name for p in out.iterdir()}


def test_qwen2_vl_one_command(qwen_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["export-vlm", str(qwen_dir), "--prune", "attn-mean:6", "--grid", "1,8,8", "-o", str(out), "--steps", "4"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "16 merged tokens -> 6 kept" in text and "verify          PASS" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["keep"] == 6 and manifest["method"] == "attn-mean"


@pytest.mark.parametrize("args,match", [
    (["--prune", "attn-mean:6"], "needs the static image grid"),
    (["--prune", "attn-mean:6", "--grid", "1,x,8"], "three integers"),
    (["--prune", "cls-topk:6", "--grid", "1,8,8"], "[CLS]"),
    (["--prune", "attn-mean@3:6", "--grid", "1,8,8"], "METHOD[(options)]:KEEP"),
    (["--prune", "attn-mean:6", "--grid", "1,8,8", "--steps", "0"], "--steps"),
])
def test_qwen2_vl_bad_input_is_one_line(qwen_dir, tmp_path, capsys, args, match):
    out = tmp_path / "out"
    assert main(["export-vlm", str(qwen_dir), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokensieve export-vlm: error: ") and match in err[0], err
    assert not out.exists()


def test_not_a_vlm_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert main(["export-vlm", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a supported VLM" in err[0] and "tokensieve export --model" in err[0]
    assert main(["export-vlm", str(tmp_path / "missing"), "-o", str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err
