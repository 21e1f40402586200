"""`tokensieve eval` / tokensieve.evaluate on hand-built export folders (no torch.export: a linear ONNX classifier)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tokensieve import toy
from tokensieve.api import REPORT_SCHEMA
from tokensieve.cli import main
from tokensieve.evaluate import evaluate, paired_drop, scan_images, wilson

N_IMAGES = 24


def _linear_onnx(path, w: np.ndarray, b: np.ndarray):
    """logits = flatten(pixel_values) @ w + b, dynamic batch."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixel_values"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])],
        "linear", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", w.shape[1]])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An HF-style model folder (config.json with id2label + preprocessor_config.json), an export folder whose
    model.onnx / dense.onnx are two different linear classifiers, and the toy held-out images as folders."""
    root = tmp_path_factory.mktemp("eval")
    model_dir = root / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"id2label": dict(enumerate(toy.LABELS))}))
    toy.image_processor().save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    w_dense = rng.normal(0, 0.02, (3 * 64 * 64, 10)).astype(np.float32)
    w_pruned = w_dense + rng.normal(0, 0.02, w_dense.shape).astype(np.float32)
    b = rng.normal(0, 0.1, 10).astype(np.float32)
    out = root / "out"
    out.mkdir()
    _linear_onnx(out / "model.onnx", w_pruned, b)
    _linear_onnx(out / "dense.onnx", w_dense, b)
    (out / "report.json").write_text(json.dumps({"schema": REPORT_SCHEMA, "model": str(model_dir),
                                                 "recipe_shorthand": "linear"}))
    labelled = toy.write_image_folder(root / "labelled", N_IMAGES)
    unlabelled = toy.write_image_folder(root / "unlabelled", N_IMAGES, labels=False)
    return dict(root=root, out=out, model_dir=model_dir, labelled=labelled, unlabelled=unlabelled,
                w_dense=w_dense, w_pruned=w_pruned, b=b)


def _expected(s, labels: bool = True):
    images, ys = toy.make_images(N_IMAGES, toy.HELDOUT_SEED)
    x = toy.to_pixels(images).numpy().reshape(N_IMAGES, -1)
    dense, pruned = x @ s["w_dense"] + s["b"], x @ s["w_pruned"] + s["b"]
    return dense, pruned, ys


def test_labelled_folder_matches_numpy(setup):
    r = evaluate(setup["out"], setup["labelled"], batch=5)   # 24 images in batches of 5: a short last batch
    dense, pruned, ys = _expected(setup)
    # the images are read in class-folder order; compare counts, which do not depend on the order
    assert r["num_images"] == N_IMAGES and r["label_mapping"] == "id2label"
    assert r["dense"]["top1"]["count"] == int((dense.argmax(1) == ys).sum())
    assert r["pruned"]["top1"]["count"] == int((pruned.argmax(1) == ys).sum())
    top5 = np.argsort(-pruned, 1)[:, :5]
    assert r["pruned"]["top5"]["count"] == int((top5 == ys[:, None]).any(1).sum())
    agree = int((dense.argmax(1) == pruned.argmax(1)).sum())
    assert r["agreement_top1"]["count"] == agree and 0 < agree < N_IMAGES   # the two models really differ
    lo, hi = r["agreement_top1"]["ci95"]
    assert lo < agree / N_IMAGES < hi


def test_unlabelled_folder_reports_agreement_only(setup, capsys):
    assert main(["eval", str(setup["out"]), "--images", str(setup["unlabelled"]), "--json",
                 str(setup["root"] / "r.json")]) == 0
    dense, pruned, _ = _expected(setup)
    r = json.loads((setup["root"] / "r.json").read_text())
    assert "pruned" not in r and r["agreement_top1"]["count"] == int((dense.argmax(1) == pruned.argmax(1)).sum())
    assert "top-1 agreement" in capsys.readouterr().out


def test_sorted_mapping_when_folders_are_not_labels(tmp_path):
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(toy.png_bytes(np.zeros((8, 8, 3), np.uint8)))
    s = scan_images(tmp_path, {0: "cat", 1: "dog"})
    assert s.label_mapping == "sorted" and s.class_names == ["a", "b"] and list(s.labels) == [0, 1]
    s = scan_images(tmp_path, {0: "b", 1: "a"})
    assert s.label_mapping == "id2label" and [p.parent.name for p in s.paths] == ["a", "b"] and list(s.labels) == [1, 0]


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokensieve eval: error: "), err
    for n in needles:
        assert n in err[0], err[0]


def test_corrupt_image(setup, tmp_path, capsys):
    d = tmp_path / "imgs" / "red-square"
    d.mkdir(parents=True)
    (d / "ok.png").write_bytes(toy.png_bytes(toy.make_images(1, 0)[0][0]))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _one_line_error(capsys, ["eval", str(setup["out"]), "--images", str(tmp_path / "imgs")], "broken.png")


def test_empty_folder(setup, tmp_path, capsys):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    _one_line_error(capsys, ["eval", str(setup["out"]), "--images", str(tmp_path / "empty")], "No images")


def test_missing_processor_config(setup, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model.onnx", "dense.onnx"):
        (out / name).write_bytes((setup["out"] / name).read_bytes())
    (out / "report.json").write_text(json.dumps({"schema": REPORT_SCHEMA, "model": "tiny"}))
    _one_line_error(capsys, ["eval", str(out), "--images", str(setup["unlabelled"])], "preprocessor_config.json",
                    "--processor")


def test_wrong_size(setup, tmp_path, capsys):
    proc = tmp_path / "proc"
    p = toy.image_processor()
    p.do_resize = False
    p.save_pretrained(proc)
    imgs = tmp_path / "small"
    imgs.mkdir()
    (imgs / "a.png").write_bytes(toy.png_bytes(np.zeros((32, 48, 3), np.uint8)))
    _one_line_error(capsys, ["eval", str(setup["out"]), "--images", str(imgs), "--processor", str(proc)],
                    "a.png", "48x32", "3x64x64")


def test_wilson_and_bootstrap():
    lo, hi = wilson(9, 10)   # Wilson (1927) 95 % for 9/10: [0.5958, 0.9821]
    assert abs(lo - 0.5958) < 1e-3 and abs(hi - 0.9821) < 1e-3
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    d = paired_drop(np.ones(50, bool), np.r_[np.ones(40, bool), np.zeros(10, bool)])
    assert d["value"] == pytest.approx(0.2) and d["ci95"][0] < 0.2 < d["ci95"][1]
