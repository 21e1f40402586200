"""`tokensieve export-vlm`: one command from a saved LLaVA / Qwen2-VL folder to the three ONNX parts, verified by
greedy decoding against eager, then one TensorRT-RTX engine per part (unless --no-build); bad input is one line with
exit code 2, before anything is written."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil

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


HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
PART_ENGINES = {f"{part}.engine{ext}" for part in ("vision_prune", "lm_prefill", "lm_decode") for ext in ("", ".json")}


@pytest.fixture(scope="module")
def llava_built(llava_dir, tmp_path_factory):
    """One `export-vlm` of the tiny LLaVA with engines (default target rtx-sm86) -> (folder, stdout, stderr)."""
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path_factory.mktemp("llava_built") / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["export-vlm", str(llava_dir), "--prune", "cls-topk:0.25", "-o", str(out), "--steps", "4",
                   "--max-batch", "2", "--max-sequence", "40"])
    assert rc == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


def test_llava_one_command(llava_built):
    """Export, verify, then engines (default target rtx-sm86) with the derived profiles, printed and in the manifest."""
    out, text, err = llava_built
    assert "removed" not in err  # a fresh folder: no engines of an earlier export; build_vlm's manifest lists its own
    assert "16 patches -> 4 kept" in text and "verify          PASS" in text and "4 greedy tokens identical" in text
    assert "keep_idx identical" in text
    engine_line = next(line for line in text.splitlines() if line.startswith("  engine "))
    assert "rtx-sm86 fp32: vision_prune " in engine_line and " MiB in " in engine_line and "lm_decode" in engine_line
    assert "profile         batch 1..2; lm_prefill sequence 1..40 (opt 11); lm_decode past_sequence 0..40 (opt 11)" \
        in text
    names = {p.name for p in out.iterdir()}
    assert {"vision_prune.onnx", "lm_prefill.onnx", "lm_decode.onnx"} <= names
    assert PART_ENGINES <= names
    engines = json.loads((out / "llava_parts.json").read_text())["engines"]
    assert engines["decode"]["dims"]["past_sequence"] == {"min": 0, "opt": 11, "max": 40}


def test_inspect_vlm_folder(llava_built, tmp_path, capsys):
    """`inspect OUT/` on an export-vlm folder: the parts, the outer stage, each engine checked (exit 0); a missing
    engine makes it exit 1 naming it."""
    out = llava_built[0]
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "llava image parts (llava_parts.json)" in text and "cls-topk" in text
    for part in ("vision_prune", "lm_prefill", "lm_decode"):
        assert f"{part}.onnx; engine {part}.engine: tensorrt_rtx" in text and "file OK (size, sha256 match)" in text
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "lm_decode.engine").unlink()
    assert main(["inspect", str(broken)]) == 1
    assert "lm_decode.engine: MISSING" in capsys.readouterr().out


def test_qwen2_vl_one_command(qwen_dir, tmp_path, capsys, request):
    """--no-build export into a folder that holds an earlier build's part engines and the user's files: the engines
    (+ .json), which the new manifest does not list, are deleted and named in one line; every other file stays.
    The engines are the tiny LLaVA's from llava_built (real TensorRT-RTX builds, under the names every VLM export's
    engines take), so the check costs no second export."""
    out = tmp_path / "out"
    out.mkdir()
    if HAVE_RTX:
        built = request.getfixturevalue("llava_built")[0]
        for name in PART_ENGINES:
            shutil.copy(built / name, out / name)
    (out / "notes.txt").write_text("mine")
    (out / "mine.engine").write_bytes(b"a user's engine")  # an engine name tokensieve does not write
    (out / "lm_decode.engine.d").mkdir()                    # nor a folder next to a part engine
    rc = main(["export-vlm", str(qwen_dir), "--prune", "attn-mean:6", "--grid", "1,8,8", "-o", str(out), "--steps", "4",
               "--no-build"])
    assert rc == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "16 merged tokens -> 6 kept" in text and "verify          PASS" in text and "  engine " not in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["keep"] == 6 and manifest["method"] == "attn-mean" and "engines" not in manifest
    names = {p.name for p in out.iterdir()}
    assert not PART_ENGINES & names and [p.name for p in out.glob("*.engine")] == ["mine.engine"], sorted(names)
    assert {"notes.txt", "lm_decode.engine.d", "vision_prune.onnx", "manifest.json"} <= names
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine.engine").read_bytes() == b"a user's engine"
    removed = [line for line in captured.err.splitlines() if "removed" in line]
    assert removed == (["      removed stale engines of an earlier export: vision_prune.engine, "
                        "vision_prune.engine.json, lm_prefill.engine, lm_prefill.engine.json, lm_decode.engine, "
                        "lm_decode.engine.json"]
                       if HAVE_RTX else []), captured.err


@pytest.mark.parametrize("args,match", [
    (["--prune", "attn-mean:6"], "needs the static image grid"),
    (["--prune", "attn-mean:6", "--grid", "1,x,8"], "three integers"),
    (["--prune", "cls-topk:6", "--grid", "1,8,8"], "[CLS]"),
    (["--prune", "attn-mean@3:6", "--grid", "1,8,8"], "METHOD[(options)]:KEEP"),
    (["--prune", "attn-mean:6", "--grid", "1,8,8", "--steps", "0"], "--steps"),
    (["--prune", "attn-mean:6", "--grid", "1,8,8", "--target", "rtx-sm90"], "Unknown TensorRT target 'rtx-sm90'"),
    (["--prune", "attn-mean:6", "--grid", "1,8,8", "--max-batch", "2"], "exported for batch 1"),
    (["--prune", "attn-mean:6", "--grid", "1,8,8", "--max-sequence", "14"], "shorter than the example prompt"),
    (["--prune", "attn-mean:6", "--grid", "1,8,8", "--max-sequence", "0"], "--max-sequence 0"),
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


def test_no_tensorrt_names_no_build(llava_dir, tmp_path, capsys, monkeypatch):
    """Without the TensorRT flavor the target needs, the command stops before loading anything: one line naming
    --no-build."""
    from tokensieve.errors import TargetError
    from tokensieve.runtime import tensorrt_flavors as flavors

    def not_installed(flavor):
        raise TargetError("TensorRT-RTX is not installed; pip install 'tokensieve[rtx]' (package tensorrt-rtx)")

    monkeypatch.setattr(flavors, "import_flavor", not_installed)
    out = tmp_path / "out"
    assert main(["export-vlm", str(llava_dir), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TensorRT-RTX is not installed" in err[0] and "--no-build" in err[0], err
    assert not out.exists()


# --------------------------------------------------------------------------- --inner-bias (fastv(debias=true))


DEBIAS = "fastv(debias=true)@0:0.5"
QWEN_ARGS = ["--prune", "attn-mean:6", "--grid", "1,8,8", "--no-build"]   # 6 image tokens reach the inner stage
LLAVA_ARGS = ["--prune", "cls-topk:4", "--no-build"]                       # 4 (tiny_llava has no 'full' [CLS] row)
N_INNER = {"llava": 4, "qwen2_vl": 6}


def _bias_file(tmp_path, name, content):
    """content: an array (np.save), bytes (written raw) or None (no file)."""
    import numpy as np

    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.save(path, content)
    return path


def _bad_bias_cases():
    import numpy as np

    return [
        ([DEBIAS], None, None, "needs the calibrated bias: pass --inner-bias FILE.npy"),
        ([], "bias.npy", np.zeros(6), "--inner-bias is the calibrated bias of --inner fastv(debias=true)@L:R, but no "
         "--inner is given"),
        (["fastv@0:0.5"], "bias.npy", np.zeros(6), "but --inner is 'fastv@0:0.5'; pass that --inner or drop"),
        ([DEBIAS], "missing.npy", None, "does not exist"),
        ([DEBIAS], "bias.txt", b"0 0 0 0 0 0", "is not a .npy file"),
        ([DEBIAS], "bias.npz", b"PK", "is not a .npy file"),
        ([DEBIAS], "broken.npy", b"not numpy at all", "cannot be read as .npy"),
        ([DEBIAS], "bias.npy", np.zeros((1, 6)), "holds float64 values of shape (1, 6); it must be a 1-D float"),
        ([DEBIAS], "bias.npy", np.arange(6), "holds int64 values of shape (6,)"),
        ([DEBIAS], "bias.npy", np.array([0.1, np.nan, 0.2, 0.0, 0.0, 0.0]), "holds 1 value(s) that are NaN, inf"),
        ([DEBIAS], "bias.npy", np.full(6, 1e39), "holds 6 value(s) that are NaN, inf or beyond float32"),
        ([DEBIAS], "bias.npy", np.zeros(5), "holds 5 values but the inner stage sees {n} image tokens"),
    ]


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("inner, name, content, match", _bad_bias_cases())
def test_bad_inner_bias_is_one_line(kind, inner, name, content, match, tmp_path, capsys, request):
    """Every bad --inner / --inner-bias pairing or file is one line (exit 2) before anything is written; the file
    checks run before the weights load, its length (N, the image tokens --prune leaves) once the model is known."""
    folder, n = request.getfixturevalue("llava_dir" if kind == "llava" else "qwen_dir"), N_INNER[kind]
    args = [*(LLAVA_ARGS if kind == "llava" else QWEN_ARGS), *(["--inner", inner[0]] if inner else [])]
    if name is not None:
        args += ["--inner-bias", str(_bias_file(tmp_path, name, content))]
    out = tmp_path / "out"
    capsys.readouterr()  # the checkpoint fixture's save_pretrained progress
    assert main(["export-vlm", str(folder), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokensieve export-vlm: error: "), err
    assert match.format(n=n) in err[0], err
    assert not out.exists()


class _Stop(Exception):
    """Raised by the stand-in export_vlm: the test stops where the real export would start."""


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_inner_bias_reaches_plan_and_export(kind, tmp_path, request, monkeypatch):
    """A valid --inner-bias (float32 on disk) passes plan_vlm and reaches export_vlm as inner_bias, the array of the
    file (float64), with the debias spec; the export itself is test_fastv's / test_qwen2_vl_fastv's (the Python API
    this calls)."""
    import numpy as np

    from tokensieve import vlm_api

    folder, n = request.getfixturevalue("llava_dir" if kind == "llava" else "qwen_dir"), N_INNER[kind]
    bias = np.linspace(0.01, 0.2, n).astype(np.float32)
    path = _bias_file(tmp_path, "bias.npy", bias)
    seen, real_plan = {}, vlm_api.plan_vlm

    def plan(*a, **kw):
        seen.setdefault("plans", []).append(real_plan(*a, **kw))
        return seen["plans"][-1]

    def export(model, out, prune, **kw):
        seen["export"] = kw
        raise _Stop

    monkeypatch.setattr(vlm_api, "plan_vlm", plan)
    monkeypatch.setattr(vlm_api, "export_vlm", export)
    with pytest.raises(_Stop):
        main(["export-vlm", str(folder), "-o", str(tmp_path / "out"), *(LLAVA_ARGS if kind == "llava" else QWEN_ARGS),
              "--inner", DEBIAS, "--inner-bias", str(path)])
    kw = seen["export"]
    assert kw["inner"] == DEBIAS and kw["inner_bias"].dtype == np.float64
    np.testing.assert_array_equal(kw["inner_bias"], bias.astype(np.float64))
    spec = seen["plans"][-1].inner
    assert spec.bias == tuple(bias.astype(np.float64).tolist()) and spec.num_image_tokens == n
    assert spec.shorthand() == f"fastv(debias=true)@0:{n // 2}"
    assert not (tmp_path / "out").exists()
