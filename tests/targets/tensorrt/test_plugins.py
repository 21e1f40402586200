"""The plugin library (targets/tensorrt/plugins) compiles without a GPU, exports only its TensorRT entry points, and
its TokenCompact / DiversitySelect ONNX nodes build into TensorRT-RTX SM86 engines. Kernel numerics need a GPU."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tokensieve.errors import TargetError
from tokensieve.runtime.tensorrt_flavors import RTX_COMPUTE_CAPABILITIES, available_flavors, local_compute_capability
from tokensieve.targets.tensorrt import BuildSpec, plugin_nodes, plugins
from tokensieve.targets.tensorrt.target import build_plugin_engine
from plugin_refs import diversity_select_reference, run_engine, token_compact_reference

COMPILE_BUDGET_S = 90
requires_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file(),
                                   reason="nvcc (CUDA toolkit) is not installed")
requires_rtx = pytest.mark.skipif(available_flavors()["tensorrt_rtx"] is None, reason="tensorrt-rtx is not installed")


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


@requires_nvcc
def test_library_compiles_for_sm86_within_budget(plugin_build):
    lib, seconds = plugin_build
    assert lib.name == "libtokensieve_plugins.so" and lib.stat().st_size > 100_000
    assert seconds < COMPILE_BUDGET_S, f"plugin compile took {seconds:.1f}s"
    assert b"sm_86" in lib.read_bytes()  # the fatbin names its SASS target


@requires_nvcc
@pytest.mark.skipif(shutil.which("nm") is None or shutil.which("readelf") is None, reason="binutils missing")
def test_exports_only_the_tensorrt_entry_points(plugin_lib):
    nm = subprocess.run(["nm", "-D", "--defined-only", str(plugin_lib)], capture_output=True, text=True, check=True)
    text_symbols = {line.split()[-1] for line in nm.stdout.splitlines() if line.split()[1:2] == ["T"]}
    assert text_symbols == {"getCreators", "setLoggerFinder"}
    needed = subprocess.run(["readelf", "-d", str(plugin_lib)], capture_output=True, text=True, check=True).stdout
    assert "libcudart" not in needed  # cudart is static
    assert "libnvinfer" not in needed and "libtensorrt" not in needed  # no TensorRT link dependency


@requires_nvcc
def test_build_log_kept_and_nvcc_fallback_compiles(plugin_lib, tmp_path, monkeypatch):
    """Without CMake the same sources build with one nvcc command (sm_86 SASS only, to stay quick)."""
    assert (plugin_lib.parent / "build.log").is_file()
    real_which = shutil.which
    monkeypatch.setattr(plugins.shutil, "which", lambda name, *a, **k: None if name == "cmake" else real_which(name, *a, **k))
    lib = plugins.build_plugin_library(tmp_path, archs=("86-real",))
    assert "cmake" not in (tmp_path / "build.log").read_text().split("\n")[0]
    assert lib.stat().st_size > 100_000


def test_plugin_library_path_env_override(tmp_path, monkeypatch):
    lib = tmp_path / "libtokensieve_plugins.so"
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setenv(plugins.PLUGIN_LIB_ENV, str(lib))
    assert plugins.plugin_library_path() == lib


def test_missing_library_is_one_line_target_error(tmp_path, monkeypatch):
    monkeypatch.setenv(plugins.PLUGIN_LIB_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(TargetError) as e:
        plugins.plugin_library_path()
    assert plugins.PLUGIN_LIB_ENV in _one_line(e)
    with pytest.raises(TargetError) as e:
        plugins.load_plugins(object(), tmp_path / "nope.so")  # fails before touching TensorRT
    assert "does not exist" in _one_line(e) and plugins.PLUGIN_LIB_ENV in str(e.value)


def test_unbuilt_library_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(plugins.PLUGIN_LIB_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(plugins, "SOURCE_BUILD_DIR", tmp_path / "no-build")
    with pytest.raises(TargetError) as e:
        plugins.plugin_library_path()
    assert "build_plugin_library" in _one_line(e) and plugins.PLUGIN_LIB_ENV in str(e.value)


def test_bad_header_dir_and_missing_nvcc_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(plugins.HEADERS_ENV, str(tmp_path))
    with pytest.raises(TargetError) as e:
        plugins.ensure_headers()
    assert plugins.HEADERS_ENV in _one_line(e)
    monkeypatch.delenv("CUDACXX", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(plugins, "DEFAULT_CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(plugins.shutil, "which", lambda *a, **k: None)
    with pytest.raises(TargetError) as e:
        plugins.find_nvcc()
    assert "CUDACXX" in _one_line(e)


@requires_nvcc
def test_compile_error_is_one_line_with_log(tmp_path, monkeypatch):
    monkeypatch.setattr(plugins, "ensure_headers", lambda: tmp_path)  # no NvInferRuntime.h there: the compile fails
    real_which = shutil.which
    monkeypatch.setattr(plugins.shutil, "which", lambda name, *a, **k: None if name == "cmake" else real_which(name, *a, **k))
    with pytest.raises(TargetError) as e:
        plugins.build_plugin_library(tmp_path / "out", archs=("86-real",))
    msg = _one_line(e)
    assert "NvInferRuntime.h" in msg and "build.log" in msg


# --- TensorRT-RTX engines (ahead of time, no GPU) ---------------------------------------------------------------

@requires_rtx
@requires_nvcc
@pytest.mark.parametrize("dtype,mask_dtype,batch", [("float32", "int32", 2), ("float16", "bool", None)])
def test_token_compact_engine_builds_rtx_sm86(plugin_lib, tmp_path, dtype, mask_dtype, batch):
    onnx_path = plugin_nodes.write_token_compact_onnx(tmp_path / "tc.onnx", batch=batch, tokens=17, channels=8,
                                                      capacity=6, dtype=dtype, mask_dtype=mask_dtype)
    info = build_plugin_engine(onnx_path, tmp_path / "tc.engine", BuildSpec(target="rtx-sm86"), plugin_lib)
    io = {t["name"]: (t["shape"], t["dtype"]) for t in info.metadata["io_tensors"]}
    b = -1 if batch is None else batch
    assert io == {"x": ([b, 17, 8], dtype), "keep": ([b, 17], mask_dtype), "y": ([b, 6, 8], dtype),
                  "count": ([b], "int32")}
    assert info.metadata["plugins"][0]["file"] == plugin_lib.name and info.engine_path.stat().st_size > 0


@requires_rtx
@requires_nvcc
@pytest.mark.parametrize("dtype,mask_dtype,batch", [("float32", "bool", 2), ("float32", "int32", None),
                                                    ("float16", "bool", 2), ("float16", "bool", None)])
def test_dynamic_token_compact_engine_builds_rtx_sm86(plugin_lib, tmp_path, dtype, mask_dtype, batch):
    """dynamic=1: the token axis of y is the size tensor (-1 in the engine), size is a 0-D int32 output."""
    onnx_path = plugin_nodes.write_token_compact_onnx(tmp_path / "tc.onnx", batch=batch, tokens=17, channels=8,
                                                      capacity=6, dtype=dtype, mask_dtype=mask_dtype, dynamic=True,
                                                      opt_count=4, min_count=2)
    info = build_plugin_engine(onnx_path, tmp_path / "tc.engine", BuildSpec(target="rtx-sm86"), plugin_lib)
    io = {t["name"]: (t["shape"], t["dtype"]) for t in info.metadata["io_tensors"]}
    b = -1 if batch is None else batch
    assert io == {"x": ([b, 17, 8], dtype), "keep": ([b, 17], mask_dtype), "y": ([b, -1, 8], dtype),
                  "count": ([b], "int32"), "size": ([], "int32")}
    assert not any("kOPT" in w for w in info.metadata["build_warnings"])


@requires_rtx
@requires_nvcc
@pytest.mark.parametrize("attrs, reason", [
    ({"capacity": 0}, "attribute 'capacity' must be >= 1, got 0"),
    ({"dynamic": 2}, "attribute 'dynamic' must be 0 (capped) or 1"),
    ({"opt_count": 7}, "attribute 'opt_count' must be in [0, capacity=6]"),
    ({"opt_count": -1}, "attribute 'opt_count' must be in [0, capacity=6]"),
    ({"min_count": 7}, "attribute 'min_count' must be in [0, capacity=6]"),
    ({"capacity": 20, "min_count": 18}, "min_count=18 exceeds the 17"),
], ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()) if isinstance(a, dict) else "")
def test_invalid_token_compact_attributes_fail_the_build(plugin_lib, tmp_path, attrs, reason):
    """capacity 6 unless changed, N = 17 tokens; min_count=18 > N is only caught once the shapes are known. The
    one-line error carries the plugin's own reason (it logs to stderr; the parser only says it could not create it)."""
    import onnx
    path = plugin_nodes.write_token_compact_onnx(tmp_path / "tc.onnx", tokens=17, capacity=6, dynamic=True)
    model = onnx.load(str(path))
    for attr in model.graph.node[0].attribute:
        if attr.name in attrs:
            attr.i = attrs[attr.name]
    onnx.save(model, str(path))
    with pytest.raises(TargetError) as e:
        build_plugin_engine(path, tmp_path / "tc.engine", BuildSpec(target="rtx-sm86"), plugin_lib)
    assert "the plugin says: TokenCompact" in _one_line(e) and reason in str(e.value), str(e.value)


def test_token_compact_node_needs_dynamic_for_its_options():
    from tokensieve.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        plugin_nodes.token_compact_node("x", "keep", "y", "count", 6, opt_count=3)
    assert "dynamic=True" in _one_line(e)
    with pytest.raises(ConfigError) as e:
        plugin_nodes.token_compact_node("x", "keep", "y", "count", 6, dynamic=True)
    assert "size=" in _one_line(e)
    capped = plugin_nodes.token_compact_node("x", "keep", "y", "count", 6)
    assert [a.name for a in capped.attribute] == ["capacity", "plugin_namespace", "plugin_version"]


@requires_rtx
@requires_nvcc
@pytest.mark.parametrize("mode,dtype", [(0, "float32"), (1, "float16")])
def test_diversity_select_engine_builds_rtx_sm86(plugin_lib, tmp_path, mode, dtype):
    onnx_path = plugin_nodes.write_diversity_select_onnx(tmp_path / "ds.onnx", batch=None, tokens=17, channels=8, k=6,
                                                         mode=mode, lam=0.7, num_prefix_tokens=1, dtype=dtype)
    info = build_plugin_engine(onnx_path, tmp_path / "ds.engine", BuildSpec(target="rtx-sm86"), plugin_lib)
    outputs = [t for t in info.metadata["io_tensors"] if t["mode"] == "output"]
    assert outputs == [{"name": "idx", "shape": [-1, 6], "dtype": "int32", "mode": "output"}]


@requires_rtx
@requires_nvcc
@pytest.mark.parametrize("change,reason", [
    ({"lambda": 1.5}, "cannot parse ds.onnx: node '' (op DiversitySelect): the plugin says: DiversitySelect node "
                      "'node_of_idx': attribute 'lambda' must be in [0, 1], got 1.5"),
    ({"k": 17}, "failed to build ds.onnx for rtx-sm86: the plugin says: DiversitySelect: k=17 exceeds the 16 "
                "candidate tokens (N=17 minus num_prefix_tokens=1)"),
    ({"mode": 1}, "the plugin says: DiversitySelect mode 1 (MMR) needs a second input, importance [B,N]"),
])
def test_invalid_plugin_attributes_fail_the_build(plugin_lib, tmp_path, change, reason):
    import onnx
    path = plugin_nodes.write_diversity_select_onnx(tmp_path / "ds.onnx", tokens=17, k=6, mode=0, num_prefix_tokens=1)
    model = onnx.load(str(path))
    for attr in model.graph.node[0].attribute:
        if attr.name in change:
            if attr.type == onnx.AttributeProto.FLOAT:
                attr.f = change[attr.name]
            else:
                attr.i = change[attr.name]
    onnx.save(model, str(path))
    with pytest.raises(TargetError) as e:
        build_plugin_engine(path, tmp_path / "ds.engine", BuildSpec(target="rtx-sm86"), plugin_lib)
    assert reason in _one_line(e), str(e.value)


@requires_rtx
@requires_nvcc
def test_second_library_copy_is_refused(plugin_lib, tmp_path):
    import tensorrt_rtx as trt
    plugins.load_plugins(trt, plugin_lib)
    assert plugins.load_plugins(trt, plugin_lib) == plugin_lib.resolve()  # idempotent
    other = tmp_path / "libtokensieve_plugins.so"
    shutil.copy(plugin_lib, other)
    with pytest.raises(TargetError) as e:
        plugins.load_plugins(trt, other)
    assert "already holds" in _one_line(e)


# --- GPU: plugin outputs against numpy references (tests/plugin_refs.py) ----------------------------------

@pytest.mark.gpu
@requires_nvcc
def test_plugin_outputs_match_numpy_on_gpu(plugin_lib, tmp_path):
    cc = local_compute_capability()
    if cc is None:
        pytest.skip("needs an NVIDIA GPU")
    sm = "sm" + cc.replace(".", "")
    flavor = "tensorrt" if available_flavors()["tensorrt"] else "tensorrt_rtx"
    target = "local" if flavor == "tensorrt" else f"rtx-{sm}"
    if flavor == "tensorrt_rtx" and sm not in RTX_COMPUTE_CAPABILITIES:
        pytest.skip(f"TensorRT-RTX cannot target {sm} and standard TensorRT is not installed")
    lib = plugin_lib  # sm_86 code + compute_86 PTX: newer GPUs JIT the PTX
    rng = np.random.default_rng(0)
    B, N, C, K = 3, 65, 48, 20

    x = rng.standard_normal((B, N, C)).astype(np.float32)
    keep = (rng.random((B, N)) < 0.3).astype(np.int32)
    keep[0] = 1  # more kept than capacity
    onnx_path = plugin_nodes.write_token_compact_onnx(tmp_path / "tc.onnx", batch=B, tokens=N, channels=C, capacity=K)
    build_plugin_engine(onnx_path, tmp_path / "tc.engine", BuildSpec(target=target), lib)
    got = run_engine(tmp_path / "tc.engine", flavor, {"x": x, "keep": keep}, lib)
    want_y, want_count = token_compact_reference(x, keep, K)
    np.testing.assert_array_equal(got["y"], want_y)
    np.testing.assert_array_equal(got["count"], want_count)

    # dynamic=1: S below the capacity and counts that differ per sample (zero rows after each count), then
    # min_count above every count (zero-only rows up to S); fp16 tokens and a bool mask on the second engine
    sparse = rng.random((B, N)) < 0.15
    sparse[:, 0], sparse[1, 1:] = True, False
    for dtype, mask_dtype, min_count in (("float32", "int32", 0), ("float16", "bool", K - 1)):
        xd, kd = x.astype(dtype), sparse.astype(mask_dtype)
        onnx_path = plugin_nodes.write_token_compact_onnx(tmp_path / "tcd.onnx", batch=None, tokens=N, channels=C,
                                                          capacity=K, dtype=dtype, mask_dtype=mask_dtype,
                                                          dynamic=True, opt_count=K // 2, min_count=min_count)
        build_plugin_engine(onnx_path, tmp_path / "tcd.engine", BuildSpec(target=target), lib)
        got = run_engine(tmp_path / "tcd.engine", flavor, {"x": xd, "keep": kd}, lib)
        want_y, want_count, want_size = token_compact_reference(xd, kd, K, dynamic=True, min_count=min_count)
        assert int(want_size) < K and len(set(want_count.tolist())) > 1  # the case this loop is for
        assert got["size"].shape == () and int(got["size"]) == int(want_size)
        np.testing.assert_array_equal(got["count"], want_count)
        np.testing.assert_array_equal(got["y"], want_y)

    importance = rng.random((B, N)).astype(np.float32)
    for mode in (0, 1):
        onnx_path = plugin_nodes.write_diversity_select_onnx(tmp_path / f"ds{mode}.onnx", batch=B, tokens=N,
                                                             channels=C, k=K, mode=mode, lam=0.6, num_prefix_tokens=1)
        build_plugin_engine(onnx_path, tmp_path / f"ds{mode}.engine", BuildSpec(target=target), lib)
        feeds = {"x": x} | ({"importance": importance} if mode == 1 else {})
        got = run_engine(tmp_path / f"ds{mode}.engine", flavor, feeds, lib)
        np.testing.assert_array_equal(got["idx"], diversity_select_reference(x, K, mode, 0.6, 1, importance))
