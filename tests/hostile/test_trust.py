"""Hostile inputs must never run code or read outside their folder (tokensieve.trust, README "Trust model").

Each CLI case runs `tokensieve.cli.main` in-process and checks: exit 2, one short last stderr line, no traceback,
nothing left in the output folder, and that the refusal came before anything else read the input: custom model code
would write a sentinel file, ONNX Runtime / TensorRT builders are replaced by tripwires, and the files outside the
folder hold sentinel bytes nobody may read. One case runs a subprocess with an open, silent stdin (a prompt hangs).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tokensieve.cli import main
from tokensieve.errors import ModelError, TargetError
from tokensieve.trust import ALLOW_HOST_CODE_ENV

SENTINEL = b"SENTINEL: never read me"


# ------------------------------------------------------------------------------------------------ helpers


def _refused(capsys, argv, *expect: str) -> str:
    """Run the CLI; assert exit 2, one short error line last, no traceback; return that line."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert lines and "Traceback" not in err, err
    last = lines[-1]
    assert last.startswith(f"tokensieve {argv[0]}: error: ") and len(last) <= 200, last
    for e in expect:
        assert e in last, last
    return last


def _empty_or_absent(folder: Path, keep=()) -> None:
    left = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert sorted(set(left) - set(keep)) == [], left


@pytest.fixture
def tripwires(monkeypatch):
    """ONNX Runtime sessions, the TensorRT builder and torch.load record a call and fail: nothing may get that far."""
    import onnxruntime
    import torch

    from tokensieve.targets.tensorrt import builder

    calls = []

    def trip(what):
        def f(*a, **k):
            calls.append(what)
            raise AssertionError(f"{what} was reached")
        return f

    monkeypatch.setattr(onnxruntime, "InferenceSession", trip("InferenceSession"))
    monkeypatch.setattr(builder, "build_engine", trip("TensorRT builder"))
    monkeypatch.setattr(torch, "load", trip("torch.load"))
    return calls


def _onnx(path: Path, location: str | None = None, *, where: str = "initializer") -> Path:
    """y = x + w, w (16 float32) as an initializer, or (where="subgraph") a Constant inside an If branch; with
    `location` the tensor's data is external at that location."""
    w = numpy_helper.from_array(np.zeros(16, np.float32), "w")
    if location is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", "0"), ("length", "64")):
            w.external_data.add(key=k, value=v)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])
    if where == "initializer":
        graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    else:
        branch = lambda n: helper.make_graph([helper.make_node("Constant", [], [n], value=w)], n, [],  # noqa: E731
                                             [helper.make_tensor_value_info(n, TensorProto.FLOAT, [16])])
        cond = numpy_helper.from_array(np.array(True), "c")
        graph = helper.make_graph([helper.make_node("If", ["c"], ["w_"], then_branch=branch("a"),
                                                    else_branch=branch("b")),
                                   helper.make_node("Add", ["x", "w_"], ["y"])], "g", [x], [y], [cond])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    """A file with sentinel bytes outside every folder the tests hand to tokensieve."""
    p = tmp_path / "secret.bin"
    p.write_bytes(SENTINEL * 4)
    return p


HOSTILE = {  # case -> external data location, relative to the ONNX file's folder (`outside` is ../secret.bin)
    "dotdot": "../secret.bin",
    "absolute": "{outside}",
    "symlink_out": "link.bin",
    "missing_outside": "../../nowhere/weights.bin",
    "fifo": "pipe.bin",
    "ort_memory_tag": "*/_ORT_MEM_ADDR_/*",
}


def _hostile_onnx(path: Path, case: str, outside: Path) -> Path:
    if case == "symlink_out":
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "link.bin").symlink_to(outside)
    if case == "fifo":
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path.parent / "pipe.bin")  # opening it to read would hang
    return _onnx(path, HOSTILE[case].format(outside=outside))


def _report(folder: Path) -> Path:
    """A report.json of an export of the built-in `tiny` ViT with no stages (what verify, bench, eval read)."""
    folder.mkdir(parents=True, exist_ok=True)
    report = {"schema": "tokensieve.export/1", "model": "tiny", "recipe_shorthand": "none", "input_shape": [1, 3, 64, 64],
              "block_paths": [f"vit.encoder.layer.{i}" for i in range(4)], "stages": [],
              "layout": {"num_prefix_tokens": 1, "grid": None}, "tokens_per_block": [65] * 4, "macs_dense": 1,
              "macs_pruned": 1, "ideal_speedup": 1.0, "verify": {"passed": True, "num_inputs": 1, "max_abs_diff": 0,
                                                                 "atol": 1e-4}, "engines": []}
    (folder / "report.json").write_text(json.dumps(report))
    return folder


# ------------------------------------------------------------------------------------- ONNX external data


@pytest.mark.parametrize("case", list(HOSTILE))
def test_build_refuses_external_data_outside_the_folder(case, tmp_path, outside, tripwires, capsys):
    onnx_path = _hostile_onnx(tmp_path / "m" / "model.onnx", case, outside)
    before = sorted(p.name for p in onnx_path.parent.iterdir())
    line = _refused(capsys, ["build", onnx_path, "--target", "rtx-sm86"], "tensor 'w'",
                    HOSTILE[case].format(outside=outside)[:20])
    assert "keep the .data file next to the .onnx" in line
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == before  # no engine, no metadata
    assert tripwires == []


def test_external_data_in_a_subgraph_constant_is_checked(tmp_path, outside, tripwires, capsys):
    onnx_path = _onnx(tmp_path / "m" / "model.onnx", "../secret.bin", where="subgraph")
    _refused(capsys, ["build", onnx_path, "--target", "rtx-sm86"], "'../secret.bin'", "climbs out")
    assert tripwires == []


def test_external_data_inside_the_folder_is_accepted(tmp_path):
    from tokensieve.runtime import OrtRunner

    onnx_path = _onnx(tmp_path / "m" / "model.onnx", "model.onnx.data")
    np.arange(16, dtype=np.float32).tofile(onnx_path.parent / "model.onnx.data")
    with OrtRunner(onnx_path) as r:
        assert r.infer({"x": np.ones(16, np.float32)})["y"][3] == 4.0


@pytest.mark.parametrize("case", ["dotdot", "symlink_out", "fifo"])
def test_verify_refuses_before_onnx_runtime(case, tmp_path, outside, tripwires, capsys):
    folder = _report(tmp_path / "out")
    _hostile_onnx(folder / "model.debug.onnx", case, outside)
    _refused(capsys, ["verify", folder], "model.debug.onnx: tensor 'w' reads external data from")
    assert tripwires == []


def test_bench_refuses_before_onnx_runtime(tmp_path, outside, tripwires, capsys):
    folder = _report(tmp_path / "out")
    _hostile_onnx(folder / "dense.onnx", "absolute", outside)
    _onnx(folder / "model.onnx")
    _refused(capsys, ["bench", folder, "--json", folder / "b.json"], "dense.onnx: tensor 'w'", "absolute path")
    assert not (folder / "b.json").exists() and tripwires == []


def _images(d: Path) -> Path:
    from PIL import Image

    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "a.png")
    return d


def test_eval_refuses_before_onnx_runtime(tmp_path, outside, tripwires, capsys):
    from tokensieve.toy import MODEL_DIR

    folder = _report(tmp_path / "out")
    _hostile_onnx(folder / "model.onnx", "dotdot", outside)
    _onnx(folder / "dense.onnx")
    _refused(capsys, ["eval", folder, "--images", _images(tmp_path / "img"), "--processor", MODEL_DIR,
                      "--json", folder / "e.json"], "model.onnx: tensor 'w'", "climbs out")
    assert not (folder / "e.json").exists() and tripwires == []


# ------------------------------------------------------------------------------------------ model folders


def _evil_module(folder: Path, sentinel: Path) -> None:
    """evil.py: importing it (what trust_remote_code=True does) writes `sentinel`."""
    (folder / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n"
                                    "from transformers import PretrainedConfig\n"
                                    "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")


def _custom_code_folder(folder: Path, sentinel: Path, config_file="config.json", nested=False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                "AutoImageProcessor": "evil.EvilProcessor"}
    config = {"model_type": "vit", "architectures": ["ViTForImageClassification"], "image_size": 32, "patch_size": 8,
              "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    if config_file == "config.json" and not nested:
        config |= {"model_type": "evil", "auto_map": auto_map}
    elif nested:
        config["vision_config"] = {"auto_map": auto_map}
    (folder / "config.json").write_text(json.dumps(config))
    if config_file != "config.json":
        (folder / config_file).write_text(json.dumps({"auto_map": auto_map, "image_processor_type": "Evil"}))
    _evil_module(folder, sentinel)
    return folder


@pytest.mark.parametrize("config_file,nested", [("config.json", False), ("config.json", True),
                                                ("preprocessor_config.json", False)])
def test_export_refuses_custom_code(config_file, nested, tmp_path, tripwires, capsys):
    sentinel = tmp_path / "ran"
    model = _custom_code_folder(tmp_path / "evil", sentinel, config_file, nested)
    out = tmp_path / "out"
    key = "vision_config.auto_map" if nested else "auto_map"
    _refused(capsys, ["export", "--model", model, "-o", out, "--no-build", "--no-bench"], config_file, key,
             "names custom code")
    assert not sentinel.exists() and not out.exists() and tripwires == []


def test_trust_remote_code_false_guards_without_the_config_check(tmp_path, monkeypatch):
    """Second line of defence: even past check_model_folder, transformers is told trust_remote_code=False, so it
    neither prompts on stdin nor imports the folder's module."""
    import builtins

    from tokensieve import models

    sentinel, asked = tmp_path / "ran", []
    model = _custom_code_folder(tmp_path / "evil", sentinel)
    monkeypatch.setattr(models, "check_model_folder", lambda *a, **k: None)
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "y")  # a prompt would be answered "yes"
    with pytest.raises(ModelError) as e:
        models.load_model(model)
    assert "\n" not in str(e.value) and asked == [] and not sentinel.exists()


def test_no_prompt_with_an_open_silent_stdin(tmp_path):
    """A real process whose stdin is an open pipe nobody writes to: a prompt would hang until the timeout."""
    sentinel = tmp_path / "ran"
    model = _custom_code_folder(tmp_path / "evil", sentinel)
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "tokensieve.cli", "export", "--model", str(model), "-o", str(out),
                             "--no-build", "--no-bench"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in err and "auto_map" in lines[-1] and len(lines[-1]) <= 200, err
    assert not sentinel.exists() and not out.exists()


def test_export_vlm_refuses_custom_code_in_the_tokenizer_config(tmp_path, tripwires, capsys):
    sentinel = tmp_path / "ran"
    model = tmp_path / "llava"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (model / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    _evil_module(model, sentinel)
    out = tmp_path / "out"
    _refused(capsys, ["export-vlm", model, "--prune", "cls-topk@1:4", "-o", out, "--no-build"],
             "tokenizer_config.json", "auto_map")
    assert not sentinel.exists() and not out.exists() and tripwires == []


def test_pickled_weights_are_never_loaded(tmp_path, tripwires, capsys):
    model = tmp_path / "vit"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": 32, "patch_size": 8}))
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle that would call os.system
    out = tmp_path / "out"
    _refused(capsys, ["export", "--model", model, "-o", out, "--no-build", "--no-bench"], "pytorch_model.bin",
             "safetensors")
    assert not out.exists() and tripwires == []


def test_inner_bias_object_array_is_not_unpickled(tmp_path, capsys):
    model = tmp_path / "llava"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llava"}))
    np.save(tmp_path / "bias.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    out = tmp_path / "out"
    _refused(capsys, ["export-vlm", model, "--prune", "cls-topk@1:4", "--inner", "fastv(debias=true)@1:0.5",
                      "--inner-bias", tmp_path / "bias.npy", "-o", out, "--no-build"], "--inner-bias", "allow_pickle")
    assert not out.exists()


def test_eval_refuses_a_custom_code_image_processor(tmp_path, tripwires, capsys):
    sentinel = tmp_path / "ran"
    folder = _report(tmp_path / "out")
    _onnx(folder / "model.onnx")
    _onnx(folder / "dense.onnx")
    proc = _custom_code_folder(tmp_path / "proc", sentinel, "preprocessor_config.json")
    _refused(capsys, ["eval", folder, "--images", _images(tmp_path / "img"), "--processor", proc],
             "preprocessor_config.json", "auto_map")
    assert not sentinel.exists() and tripwires == []


# ---------------------------------------------------------------------------- export folders and manifests


def test_report_folder_file_symlinked_out_is_refused(tmp_path, outside, tripwires, capsys):
    folder = _report(tmp_path / "out")
    _onnx(tmp_path / "elsewhere" / "model.onnx")
    (folder / "model.onnx").symlink_to(tmp_path / "elsewhere" / "model.onnx")
    _refused(capsys, ["inspect", folder], "out/ holds 'model.onnx'", "outside the folder")
    _refused(capsys, ["verify", folder], "'model.onnx'", "outside the folder")
    assert tripwires == []


def _manifest(folder: Path, **changes) -> Path:
    from tokensieve.manifest import VLM_MANIFEST_VERSION, VlmManifest

    folder.mkdir(parents=True, exist_ok=True)
    data = {f.name: None for f in fields(VlmManifest)} | {
        "version": VLM_MANIFEST_VERSION, "model_type": "llava", "modality": "image", "prune": "cls-topk@1:4",
        "method": "cls-topk", "options": {}, "keep": 4, "image_tokens": 16, "num_image_tokens": 4,
        "placeholder_token_id": 63, "num_text_layers": 1, "layout": {}, "sizes": {}, "seconds": {},
        "vision_ops": {}, "prefill_ops": {}, "engines": {},
        "files": {"vision": "vision.onnx", "prefill": "lm_prefill.onnx", "decode": "lm_decode.onnx",
                  "embed": "embed_tokens.npy"}}
    data.pop("inner")
    for k, v in changes.items():
        data[k] = data[k] | v if isinstance(data[k], dict) else v
    (folder / "llava_parts.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("change,expect", [
    ({"files": {"embed": "../secret.bin"}}, "files['embed'] names '../secret.bin', which climbs out"),
    ({"files": {"vision": "/etc/passwd"}}, "files['vision'] names '/etc/passwd', an absolute path"),
    ({"engines": {"vision": {"file": "../../x.engine", "metadata": "x.engine.json"}}}, "engines['vision']['file']"),
])
def test_vlm_manifest_paths_outside_the_folder_are_refused(change, expect, tmp_path, tripwires, capsys):
    folder = _manifest(tmp_path / "vlm", **change)
    _refused(capsys, ["inspect", folder], "llava_parts.json", expect)
    assert tripwires == []


def test_vlm_manifest_file_symlinked_out_is_refused(tmp_path, outside, monkeypatch):
    """The LLaVA pipeline never np.loads (or hands ORT) a file the manifest names through a symlink out."""
    from tokensieve.runtime.llava_pipeline import LlavaPipeline

    folder = _manifest(tmp_path / "vlm")
    (folder / "embed_tokens.npy").symlink_to(outside)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load was reached"))
    with pytest.raises(Exception) as e:
        LlavaPipeline(folder)
    assert "files['embed'] names 'embed_tokens.npy', a symlink that leads outside" in str(e.value)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- code: plugins and engines


def _engine_with_metadata(folder: Path, **meta) -> Path:
    from tokensieve.runtime import engine_metadata as em

    folder.mkdir(parents=True, exist_ok=True)
    engine = folder / "model.engine"
    engine.write_bytes(b"not really a plan")
    fields_ = {k: None for k in em.FIELDS[1:]} | {
        "flavor": "tensorrt_rtx", "tensorrt_version": "0", "target": "rtx-sm86", "precision": "fp32",
        "engine_size_bytes": engine.stat().st_size, "engine_sha256": hashlib.sha256(engine.read_bytes()).hexdigest(),
        "io_tensors": [], "optimization_profile": {}, "dims": {}, "input_dim_names": {}, "build_warnings": [],
        "data_dependent_shapes": False, "plugin_substitutions": [], **meta}
    em.metadata_path_for(engine).write_text(json.dumps(em.engine_metadata(**fields_)))
    return engine


def test_engine_metadata_cannot_allow_embedded_host_code(tmp_path, monkeypatch):
    from tokensieve.runtime import TrtRunner

    engine = _engine_with_metadata(tmp_path, plugins=[{"file": "/tmp/evil.so", "sha256": "0" * 64,
                                                       "embedded": True}])
    monkeypatch.delenv(ALLOW_HOST_CODE_ENV, raising=False)
    with pytest.raises(TargetError) as e:
        TrtRunner(engine)
    assert "embeds plugin code" in str(e.value) and ALLOW_HOST_CODE_ENV in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv(ALLOW_HOST_CODE_ENV, "1")  # the user's explicit choice: the next check (TensorRT version) runs
    with pytest.raises(TargetError) as e:
        TrtRunner(engine)
    assert "embeds plugin code" not in str(e.value)


def test_plugin_library_in_the_cache_is_never_loaded_implicitly(tmp_path, monkeypatch):
    from tokensieve.runtime.tensorrt_plugins import PLUGIN_LIB_ENV
    from tokensieve.targets.tensorrt import plugins

    monkeypatch.delenv(PLUGIN_LIB_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = plugins.default_build_dir() / plugins.LIBRARY_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\x7fELF planted")
    with pytest.raises(TargetError) as e:
        plugins.load_plugins(object())  # object(): a registry call would be an AttributeError, not this refusal
    assert f"--plugins {cached}" in str(e.value) and "never loaded" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv(PLUGIN_LIB_ENV, str(cached))  # an env var the user set is explicit
    assert plugins.plugin_library_path() == cached


def test_header_download_is_hash_pinned(tmp_path, monkeypatch):
    """ensure_headers asks pip for the one pinned wheel with --require-hashes, and checks the bytes itself."""
    from tokensieve.targets.tensorrt import plugins

    monkeypatch.delenv(plugins.HEADERS_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    seen = []

    def fake_pip(cmd, **kw):
        seen.append((cmd, Path(cmd[cmd.index("-r") + 1]).read_text()))
        wheel_dir = Path(cmd[cmd.index("-d") + 1])
        wheel_dir.mkdir(parents=True)
        (wheel_dir / "kernel_lens-2.0.1-py3-none-any.whl").write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(plugins.subprocess, "run", fake_pip)
    with pytest.raises(TargetError) as e:
        plugins.ensure_headers()
    assert "pinned sha256" in str(e.value) and "\n" not in str(e.value)
    cmd, pins = seen[0]
    assert "--require-hashes" in cmd and "-r" in cmd and "site-packages" not in " ".join(cmd)
    assert pins.strip() == f"{plugins.KERNEL_LENS} --hash=sha256:{plugins.KERNEL_LENS_SHA256}"
    assert not (tmp_path / "cache" / "tokensieve" / "kernel-lens-2.0.1" / "include" / "tensorrt").exists()
