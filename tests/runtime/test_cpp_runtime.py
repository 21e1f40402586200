"""The C++ runtime (runtime/cpp, `tokensieve-run`) builds from TensorRT headers alone, and every argument/file check
runs without a GPU or TensorRT: each failure is exit code 2 with exactly one line on stderr, in a fixed order.

Headers: $TENSORRT_INCLUDE_DIR if it holds NvInferRuntime.h, else the TensorRT 10.14 headers vendored in PyPI
`kernel-lens==2.0.1` (fetched before the tests by tests/assets.py; never imported). Running a real engine needs a GPU,
standard TensorRT (Python `tensorrt` to build, libnvinfer to run): `test_runs_a_real_engine_on_gpu`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from assets import require

from tokensieve.runtime import engine_metadata

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "runtime" / "cpp"
SCHEMA = engine_metadata.SCHEMA  # what the builder writes now (the C++ reader takes version 1 too)


@dataclass(frozen=True)
class Build:
    exe: Path
    seconds: float


def _tensorrt_headers() -> Path:
    """A folder with NvInferRuntime.h: $TENSORRT_INCLUDE_DIR or the kernel-lens headers tests/assets.py fetched."""
    return require("tensorrt-headers")


def _cuda_root() -> Path | None:
    for cand in (os.environ.get("CUDAToolkit_ROOT"), os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                 "/usr/local/cuda"):
        if cand and (Path(cand) / "include" / "cuda_runtime_api.h").is_file():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def runtime_build(tmp_path_factory) -> Build:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    cuda = _cuda_root()
    if cuda is None:
        pytest.skip("CUDA headers (cuda_runtime_api.h) not found; set CUDAToolkit_ROOT")
    headers = _tensorrt_headers()
    build = tmp_path_factory.mktemp("runtime_cpp_build")
    t0 = time.perf_counter()
    for cmd in (["cmake", "-S", str(SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DTENSORRT_INCLUDE_DIR={headers}", f"-DCUDAToolkit_ROOT={cuda}"],
                ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)]):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    exe = build / "tokensieve-run"
    assert exe.is_file() and (build / "tokensieve-runtime-selftest").is_file()
    return Build(exe, time.perf_counter() - t0)


def _env(**extra: str) -> dict[str, str]:
    """The caller's environment without TensorRT locations, so CI settings cannot change which check fires."""
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENSIEVE_TENSORRT_LIB", "TENSORRT_LIB_DIR")}
    env.update(extra)
    return env


def _run(build: Build, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(build.exe), *map(str, args)], capture_output=True, text=True, timeout=60,
                          env=env if env is not None else _env())


def _error_line(p: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no crash, nothing on stdout, exactly one line on stderr that contains every needle."""
    assert p.returncode == 2, f"rc={p.returncode}\nstdout={p.stdout!r}\nstderr={p.stderr!r}"
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("tokensieve-run: error: "), lines[0]
    assert len(lines[0]) <= 200, f"{len(lines[0])} characters: {lines[0]}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def _has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=30).returncode == 0
    except (subprocess.SubprocessError, OSError):
        return False


def _engine(tmp_path: Path, *, size: int = 4096, recorded: int | None = None, flavor: str = "tensorrt",
            tensorrt_version: str = "10.14.1.48", name: str = "model.engine", **meta) -> Path:
    """Random bytes + metadata shaped like targets/tensorrt/builder.py writes (dynamic batch 1..8)."""
    engine = tmp_path / name
    engine.write_bytes(os.urandom(size))
    doc = {
        "schema": SCHEMA, "tokensieve_version": "0.1.0", "flavor": flavor, "tensorrt_version": tensorrt_version,
        "target": "rtx-sm86" if flavor == "tensorrt_rtx" else "local", "compute_capability": "8.6",
        "precision": "fp32", "engine_size_bytes": size if recorded is None else recorded,
        "io_tensors": [{"name": "pixel_values", "shape": [-1, 3, 224, 224], "dtype": "float32", "mode": "input"},
                       {"name": "logits", "shape": [-1, 1000], "dtype": "float32", "mode": "output"}],
        "optimization_profile": {"pixel_values": {"min": [1, 3, 224, 224], "opt": [1, 3, 224, 224],
                                                  "max": [8, 3, 224, 224]}},
        "build_warnings": ["a \"quoted\" \u00e9 warning\nwith a newline"],
    }
    doc.update(meta)
    Path(str(engine) + ".json").write_text(json.dumps(doc, indent=2))
    return engine


def _shared_lib(tmp_path: Path, name: str, source: str) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / (name + ".cpp")
    src.write_text(source)
    out = tmp_path / name
    subprocess.run([cxx, "-shared", "-fPIC", "-o", str(out), str(src)], check=True, capture_output=True, timeout=120)
    return out


def _stub_nvinfer(tmp_path: Path, version: int) -> Path:
    """Exports the three entry points tokensieve-run looks up; enough to pass checks 6-7 without TensorRT."""
    (tmp_path / "stub").mkdir(exist_ok=True)
    return _shared_lib(tmp_path / "stub", "libnvinfer.so.10", f"""
#include <cstdint>
extern "C" {{
int32_t getInferLibVersion() noexcept {{ return {version}; }}
void* createInferRuntime_INTERNAL(void*, int32_t) noexcept {{ return nullptr; }}
void* getPluginRegistry() noexcept {{ return nullptr; }}
}}
""")


# ---- build and --help --------------------------------------------------------------------------------------------

def test_builds_in_under_a_minute(runtime_build):
    assert runtime_build.seconds < 60, f"configure + build took {runtime_build.seconds:.1f} s"


def test_help(runtime_build):
    p = _run(runtime_build, "--help")
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout.startswith("usage: tokensieve-run MODEL.engine")
    for flag in ("--plugins", "--iters", "--warmup", "--batch", "--dim NAME=VALUE", "--shape INPUT=D0xD1x...",
                 "--json", "TOKENSIEVE_TENSORRT_LIB"):
        assert flag in p.stdout
    assert "The batch reported (and throughput = batch x iterations / s) is the one the run used" in p.stdout


# ---- GPU-free parts of the library (tokensieve-runtime-selftest) -------------------------------------------------

def _selftest(build: Build, *args) -> str:
    p = subprocess.run([str(build.exe.parent / "tokensieve-runtime-selftest"), *map(str, args)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.mark.parametrize("values", [[5.0], [3.0, 1.0], [0.5, 0.25, 4.0, 1.0, 2.0], [float(i % 7) for i in range(200)],
                                    [1.0 + ((i * 7919) % 1000) / 997 for i in range(1001)]])
def test_latency_percentiles_match_numpy(runtime_build, values):
    np = pytest.importorskip("numpy")
    got = json.loads(_selftest(runtime_build, "stats", *[repr(v) for v in values]))
    a = np.array(values)
    want = {"count": len(values), "mean": a.mean(), "median": np.percentile(a, 50), "p90": np.percentile(a, 90),
            "p99": np.percentile(a, 99), "min": a.min(), "max": a.max()}
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_top_k(runtime_build):
    assert json.loads(_selftest(runtime_build, "topk", 3, 0.5, 2, 2, -1, 7)) == [4, 1, 2]  # ties: lower index first
    assert json.loads(_selftest(runtime_build, "topk", 5, 1, "nan", 3)) == [2, 0, 1]       # NaN last; k > n
    assert json.loads(_selftest(runtime_build, "topk", 5)) == []


@pytest.mark.parametrize("doc", [
    '{"a": [1, -2.5, 3e2, 0.001, -0, true, false, null], "b": {"c": "d\\"e\\n\\u00e9\\ud83d\\ude00"}}',
    '  [ ]  ', '{}', '"\\/\\b\\f\\r\\t"', '12345678901', '{"a": 1, "a": 2}',
])
def test_json_reader_agrees_with_python(runtime_build, tmp_path, doc):
    f = tmp_path / "doc.json"
    f.write_text(doc, encoding="utf-8")
    assert json.loads(_selftest(runtime_build, "parse", f)) == json.loads(doc)


@pytest.mark.parametrize("doc", ['{"a": 1,}', "[1 2]", '{"a" 1}', "01", "1.", "-", '"\\x"', "tru", '{"a": 1} x',
                                 "[" * 1000 + "]" * 1000, '"tab\there"', ""])
def test_json_reader_rejects(runtime_build, tmp_path, doc):
    f = tmp_path / "doc.json"
    f.write_text(doc)
    p = subprocess.run([str(runtime_build.exe.parent / "tokensieve-runtime-selftest"), "parse", str(f)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stdout.startswith("error: ") and " at line " in p.stdout, p.stdout


def test_report_is_json(runtime_build):
    r = json.loads(_selftest(runtime_build, "report"))
    assert r["engine"] == 'dir/"quoted".engine' and r["plugins"] is None
    assert r["latency_ms"] == {"mean": 2, "median": 2, "p90": 2.8, "p99": 2.98, "min": 1, "max": 3}
    assert r["device"] == {"index": 0, "name": "Orin", "compute_capability": "8.7"}
    assert r["io_tensors"][0] == {"name": "pixel_values", "shape": [2, 3, 224, 224], "dtype": "float16", "mode": "input"}
    assert r["top5"] == [{"index": 7, "value": 1.5}, {"index": 3, "value": -0.25}]
    assert r["dims"] == {"past_sequence": 128, "sequence": 1} and r["shapes"] == {"position_ids": [3, 2, 7]}
    assert r["batch"] == 2  # the run's batch (from that --shape), not the --batch 1 the options hold


def test_reads_metadata_written_by_the_rtx_builder(runtime_build, tmp_path):
    """The Python builder's real `<engine>.json` parses in C++ to the same fields; the RTX engine is then refused."""
    pytest.importorskip("tensorrt_rtx")
    np = pytest.importorskip("numpy")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from tokensieve.targets.tensorrt import BuildSpec, build_engine

    w = np.ones((16, 32), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 32])], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "tiny.onnx"))
    info = build_engine(tmp_path / "tiny.onnx", tmp_path / "tiny.engine", BuildSpec(target="rtx-sm86", max_batch=4))
    got = json.loads(_selftest(runtime_build, "metadata", info.engine_path))
    assert got == {k: info.metadata[k] for k in got}
    _error_line(_run(runtime_build, info.engine_path), "TensorRT-RTX", "rtx-sm86")
    _error_line(_run(runtime_build, info.engine_path, "--batch", "5"), "TensorRT-RTX")  # flavor before batch


# ---- argument errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    ((), "missing MODEL.engine"),
    (("a.engine", "b.engine"), "unexpected argument 'b.engine'"),
    (("a.engine", "--frobnicate"), "unknown option '--frobnicate'"),
    (("a.engine", "--iters"), "--iters needs a value"),
    (("a.engine", "--iters", "ten"), "--iters expects an integer"),
    (("a.engine", "--iters=0"), "--iters must be >= 1"),
    (("a.engine", "--warmup", "-1"), "--warmup must be >= 0"),
    (("a.engine", "--json", "/no/such/folder/out.json"), "--json"),
])
def test_bad_arguments(runtime_build, tmp_path, args, needle):
    _error_line(_run(runtime_build, *args), needle)


# ---- checks 1-2: the engine file and its metadata, before TensorRT -----------------------------------------------

def test_missing_engine(runtime_build, tmp_path):
    _error_line(_run(runtime_build, tmp_path / "nope.engine"), "nope.engine", "does not exist")


def test_empty_engine(runtime_build, tmp_path):
    engine = _engine(tmp_path, size=0, recorded=0)
    _error_line(_run(runtime_build, engine), "is empty")


def test_garbage_engine_without_metadata(runtime_build, tmp_path):
    engine = tmp_path / "garbage.engine"
    engine.write_bytes(os.urandom(1000))
    _error_line(_run(runtime_build, engine), "No engine metadata", "garbage.engine.json", "tokensieve build")


def test_metadata_that_is_not_json(runtime_build, tmp_path):
    engine = _engine(tmp_path)
    Path(str(engine) + ".json").write_bytes(b'{"schema": "tokensieve.tensorrt-engine/1", \x00')
    _error_line(_run(runtime_build, engine), "not valid JSON", "line 1")


def test_metadata_without_required_fields(runtime_build, tmp_path):
    engine = _engine(tmp_path)
    Path(str(engine) + ".json").write_text(json.dumps({"schema": SCHEMA, "flavor": "tensorrt"}))
    _error_line(_run(runtime_build, engine), "not tokensieve engine metadata", "tensorrt_version")


@pytest.mark.parametrize("kind, needle", [("ZERO", "is a device, not a regular file"),
                                           ("FIFO", "is a FIFO, not a regular file"),
                                           ("DIR", "is a folder, not a regular file"),
                                           ("HUGE", "is more than 16 MiB")])
def test_metadata_that_is_not_a_small_regular_file(runtime_build, tmp_path, kind, needle):
    """/dev/zero, a FIFO without a writer, a folder or a 17 MiB file as `<engine>.json`: one line at once, never
    bad_alloc or a hang (the reader opens it non-blocking and reads at most 16 MiB + 1 byte)."""
    engine = _engine(tmp_path)
    meta = Path(str(engine) + ".json")
    meta.unlink()
    if kind == "ZERO":
        meta.symlink_to("/dev/zero")
    elif kind == "FIFO":
        os.mkfifo(meta)
    elif kind == "DIR":
        meta.mkdir()
    else:
        with open(meta, "wb") as f:
            f.truncate(17 << 20)  # sparse
    _error_line(_run(runtime_build, engine), "model.engine.json", needle, "tokensieve build")


def test_long_paths_and_values_keep_the_line_short(runtime_build, tmp_path):
    """A 180-character folder name and a 600-byte non-ASCII value are quoted cut in the middle: the line stays within
    200 characters, valid UTF-8, and still names the file and the fix."""
    folder = tmp_path / ("d" * 180)
    folder.mkdir()
    engine = folder / "garbage.engine"
    engine.write_bytes(os.urandom(100))
    line = _error_line(_run(runtime_build, engine), "No engine metadata", "garbage.engine.json'", "tokensieve build")
    assert "..." in line
    _error_line(_run(runtime_build, engine, "--iters", "\u00e9" * 300), "--iters expects an integer", "...")


def test_truncated_engine(runtime_build, tmp_path):
    engine = _engine(tmp_path, size=4096, recorded=101910316)
    _error_line(_run(runtime_build, engine), "4096 bytes", "engine_size_bytes=101910316", "truncated")


# ---- check 3: plugins ----------------------------------------------------------------------------------------------

def test_missing_plugin_library(runtime_build, tmp_path):
    engine = _engine(tmp_path)
    _error_line(_run(runtime_build, engine, "--plugins", tmp_path / "libtokensieve_plugins.so"),
                "--plugins", "libtokensieve_plugins.so", "does not exist")


def test_plugin_library_that_is_not_a_library(runtime_build, tmp_path):
    engine, lib = _engine(tmp_path), tmp_path / "libtokensieve_plugins.so"
    lib.write_bytes(b"\x7fELF not really")
    _error_line(_run(runtime_build, engine, "--plugins", lib), "--plugins", "cannot be loaded")


def test_plugin_library_without_get_creators(runtime_build, tmp_path):
    engine = _engine(tmp_path)
    lib = _shared_lib(tmp_path, "libnot_plugins.so", 'extern "C" int something_else() { return 1; }\n')
    _error_line(_run(runtime_build, engine, "--plugins", lib), "--plugins", "getCreators")


def test_plugin_library_with_get_creators_passes(runtime_build, tmp_path):
    """A library exporting getCreators passes check 3: the next check (flavor) is the one that fires."""
    engine = _engine(tmp_path, flavor="tensorrt_rtx")
    lib = _shared_lib(tmp_path, "libtokensieve_plugins.so",
                      'extern "C" void* const* getCreators(int& n) { n = 0; return nullptr; }\n'
                      'extern "C" void setLoggerFinder(void*) {}\n')
    _error_line(_run(runtime_build, engine, "--plugins", lib), "TensorRT-RTX")
    # A bare file name means ./name (as a path), not a search on the loader path.
    p = subprocess.run([str(runtime_build.exe), engine.name, "--plugins", lib.name], capture_output=True,
                       text=True, timeout=60, env=_env(), cwd=tmp_path)
    _error_line(p, "TensorRT-RTX")


def test_file_checks_come_before_plugin_checks(runtime_build, tmp_path):
    engine = tmp_path / "garbage.engine"
    engine.write_bytes(os.urandom(100))
    _error_line(_run(runtime_build, engine, "--plugins", tmp_path / "missing.so"), "No engine metadata")


# ---- checks 4-5: flavor and batch -------------------------------------------------------------------------------

def test_rtx_engine_is_refused(runtime_build, tmp_path):
    engine = _engine(tmp_path, flavor="tensorrt_rtx", tensorrt_version="1.7.1.116")
    line = _error_line(_run(runtime_build, engine), "TensorRT-RTX", "standard TensorRT")
    assert "model.engine'" in line and "--target local" in line


def test_plugin_check_comes_before_flavor_check(runtime_build, tmp_path):
    engine = _engine(tmp_path, flavor="tensorrt_rtx")
    _error_line(_run(runtime_build, engine, "--plugins", tmp_path / "missing.so"), "--plugins")


def test_unknown_flavor(runtime_build, tmp_path):
    _error_line(_run(runtime_build, _engine(tmp_path, flavor="onnxruntime")), "unknown TensorRT flavor")


@pytest.mark.parametrize("batch, needle", [("9", "batch 1..8"), ("0", "--batch must be >= 1")])
def test_batch_outside_profile(runtime_build, tmp_path, batch, needle):
    _error_line(_run(runtime_build, _engine(tmp_path), "--batch", batch), needle)


def test_batch_against_static_input(runtime_build, tmp_path):
    engine = _engine(tmp_path, io_tensors=[
        {"name": "x", "shape": [2, 8], "dtype": "float32", "mode": "input"},
        {"name": "y", "shape": [2, 8], "dtype": "float32", "mode": "output"}], optimization_profile={})
    _error_line(_run(runtime_build, engine, "--batch", "1"), "static shape [2, 8]", "--batch 2")


# ---- check 5b: input shapes from --batch, --dim, --shape ---------------------------------------------------------

C = 8


def _decode_engine(tmp_path: Path) -> Path:
    """Metadata shaped like an LM decode part built with `--max-batch 4 --dims past_sequence=0:16:64,sequence=1:8:32`
    (`test_reads_dims_written_by_the_rtx_builder` proves the builder writes exactly these keys)."""
    return _engine(tmp_path, name="decode.engine", io_tensors=[
        {"name": "past", "shape": [-1, -1, C], "dtype": "float32", "mode": "input"},
        {"name": "mask", "shape": [-1, -1], "dtype": "int64", "mode": "input"},
        {"name": "position_ids", "shape": [3, -1, -1], "dtype": "int64", "mode": "input"},
        {"name": "xs", "shape": [-1, C], "dtype": "float32", "mode": "output"},
        {"name": "ms", "shape": [-1], "dtype": "float32", "mode": "output"},
        {"name": "ps", "shape": [3, -1], "dtype": "float32", "mode": "output"}],
        optimization_profile={"past": {"min": [1, 0, C], "opt": [1, 16, C], "max": [4, 64, C]},
                              "mask": {"min": [1, 1], "opt": [1, 17], "max": [4, 65]},
                              "position_ids": {"min": [3, 1, 1], "opt": [3, 1, 8], "max": [3, 4, 32]}},
        dims={"past_sequence": {"min": 0, "opt": 16, "max": 64}, "past_sequence + 1": {"min": 1, "opt": 17, "max": 65},
              "sequence": {"min": 1, "opt": 8, "max": 32}},
        input_dim_names={"past": ["batch", "past_sequence", None], "mask": ["batch", "past_sequence + 1"],
                         "position_ids": [None, "batch", "sequence"]})


def _resolve(build: Build, engine: Path, *args: str) -> tuple[int, str]:
    p = subprocess.run([str(build.exe.parent / "tokensieve-runtime-selftest"), "resolve", str(engine), *args],
                       capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout.strip()


@pytest.mark.parametrize("texts, want", [
    (["past_sequence=16", " sequence =3"], {"past_sequence": 16, "sequence": 3}),
    (["x=0", "y=2147483647"], {"x": 0, "y": 2147483647}),
])
def test_dim_option_parses(runtime_build, texts, want):
    assert json.loads(_selftest(runtime_build, "dim", *texts)) == want


@pytest.mark.parametrize("texts, want", [
    (["past.0.key=1x2x16x8", "x=3"], {"past.0.key": [1, 2, 16, 8], "x": [3]}),
    (["a=b=1x0"], {"a=b": [1, 0]}),  # the last '=' splits: a shape never holds one
])
def test_shape_option_parses(runtime_build, texts, want):
    assert json.loads(_selftest(runtime_build, "shape", *texts)) == want


@pytest.mark.parametrize("kind, texts, needles", [
    ("dim", ["abc"], ["--dim 'abc' is not NAME=VALUE"]),
    ("dim", ["=3"], ["--dim '=3' is not NAME=VALUE"]),
    ("dim", ["a=-1"], ["--dim 'a=-1'", "VALUE must be an integer in 0..2147483647"]),
    ("dim", ["a=1.5"], ["VALUE must be an integer"]),
    ("dim", ["a="], ["VALUE must be an integer"]),
    ("dim", ["a=2147483648"], ["VALUE must be an integer in 0..2147483647"]),
    ("dim", ["a=1", "a=2"], ["--dim a is given twice (1 and 2)"]),
    ("shape", ["x"], ["--shape 'x' is not INPUT=D0xD1x..."]),
    ("shape", ["x="], ["is not INPUT=D0xD1x..."]),
    ("shape", ["=3"], ["is not INPUT=D0xD1x..."]),
    ("shape", ["x=1x"], ["--shape x=1x: '' is not a dimension"]),
    ("shape", ["x=1X2"], ["'1X2' is not a dimension", "joined by 'x'"]),
    ("shape", ["x=1x-2"], ["'-2' is not a dimension"]),
    ("shape", ["x=1", "x=2"], ["--shape 'x' is given twice (1 and 2)"]),
])
def test_malformed_dim_and_shape_are_refused(runtime_build, kind, texts, needles):
    p = subprocess.run([str(runtime_build.exe.parent / "tokensieve-runtime-selftest"), kind, *texts],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stdout.startswith("error: ") and len(p.stdout.splitlines()) == 1, p.stdout
    for needle in needles:
        assert needle in p.stdout, p.stdout


@pytest.mark.parametrize("args, want", [
    # Nothing given: batch 1, every other dynamic axis at the profile's opt; position_ids' static 3 is not the batch.
    ((), {"past": [1, 16, C], "mask": [1, 17], "position_ids": [3, 1, 8]}),
    (("--batch", "4"), {"past": [4, 16, C], "mask": [4, 17], "position_ids": [3, 4, 8]}),
    # The decode mask "past_sequence + 1" follows past_sequence; the axis named "batch" follows --batch.
    (("--batch", "2", "--dim", "past_sequence=40"), {"past": [2, 40, C], "mask": [2, 41], "position_ids": [3, 2, 8]}),
    (("--dim", "past_sequence=0", "--dim", "sequence=32"), {"past": [1, 0, C], "mask": [1, 1], "position_ids": [3, 1, 32]}),
    (("--dim", "past_sequence=64"), {"past": [1, 64, C], "mask": [1, 65], "position_ids": [3, 1, 8]}),
    # --shape overrides --batch and --dim for its input only (and takes it out of the --batch check).
    (("--batch", "2", "--dim", "past_sequence=5", "--shape", "position_ids=3x2x9"),
     {"past": [2, 5, C], "mask": [2, 6], "position_ids": [3, 2, 9]}),
    (("--batch", "9", "--shape", "past=1x2x8", "--shape", "mask=1x3", "--shape", "position_ids=3x1x3"),
     {"past": [1, 2, C], "mask": [1, 3], "position_ids": [3, 1, 3]}),
])
def test_resolve_input_shapes(runtime_build, tmp_path, args, want):
    rc, out = _resolve(runtime_build, _decode_engine(tmp_path), *args)
    assert rc == 0, out
    assert json.loads(out) == want


@pytest.mark.parametrize("args, needles", [
    (("--dim", "foo=3"), ["--dim foo=3: the engine has no input axis named 'foo'",
                          "named axes: past_sequence (0..64), sequence (1..32)", "the batch is --batch"]),
    (("--dim", "batch=3"), ["'batch' is the batch axis; set it with --batch 3"]),
    (("--dim", "past_sequence + 1=9"), ["the axis 'past_sequence + 1' follows 'past_sequence'",
                                        "set --dim past_sequence=N instead"]),
    (("--dim", "past_sequence=65"), ["--dim past_sequence=65 is outside the engine's profile",
                                     "input 'past' axis 1 (past_sequence) allows 0..64",
                                     "rebuild with a wider `tokensieve build --dims past_sequence=MIN:OPT:MAX`"]),
    (("--dim", "sequence=0"), ["input 'position_ids' axis 2 (sequence) allows 1..32"]),
    (("--batch", "5"), ["--batch 5 is outside the engine's profile", "batch 1..4", "--max-batch"]),
    (("--shape", "foo=3"), ["--shape foo=3: the engine has no input 'foo' (inputs: past, mask, position_ids)"]),
    (("--shape", "mask=1x2x3"), ["input 'mask' has rank 2 (shape [-1, -1]), not 3"]),
    (("--shape", "past=1x2x9"), ["axis 2 of input 'past' is static 8", "not 9"]),
    (("--shape", "position_ids=2x1x1"), ["axis 0 of input 'position_ids' is static 3"]),
    (("--shape", "past=1x65x8"), ["--shape past=1x65x8 is outside the engine's profile",
                                  "axis 1 (past_sequence) allows 0..64", "--dims past_sequence=MIN:OPT:MAX"]),
    (("--shape", "past=5x6x8"), ["axis 0 (batch) allows 1..4", "`tokensieve build --max-batch`"]),
    (("--shape", "mask=1x0"), ["axis 1 (past_sequence + 1) allows 1..65", "--dims past_sequence=MIN:OPT:MAX"]),
    # One batch per run: a --shape whose batch axis differs from --batch (or from another --shape) is refused.
    (("--batch", "2", "--shape", "position_ids=3x1x9"),
     ["The inputs' batch axes disagree: input 'past' at batch 2 (axis 0, from --batch 2) but input 'position_ids' at "
      "batch 1 (axis 1, from --shape position_ids=3x1x9)", "make --batch and every --shape agree"]),
    (("--shape", "past=2x4x8", "--shape", "mask=3x5", "--shape", "position_ids=3x2x1"),
     ["input 'past' at batch 2 (axis 0, from --shape past=2x4x8) but input 'mask' at batch 3 (axis 0, from --shape "
      "mask=3x5)"]),
])
def test_resolve_input_shapes_refuses(runtime_build, tmp_path, args, needles):
    rc, out = _resolve(runtime_build, _decode_engine(tmp_path), *args)
    assert rc == 1 and out.startswith("error: ") and "\n" not in out, out
    for needle in needles:
        assert needle in out, out


def _static_batch_engine(tmp_path: Path) -> Path:
    """A Qwen2-VL-like decode part built for batch 1 only: no dynamic batch axis, named axes besides, and position_ids
    [3, 1, T] first, whose dim 0 is not the batch."""
    return _engine(tmp_path, name="static.engine", io_tensors=[
        {"name": "position_ids", "shape": [3, 1, -1], "dtype": "int64", "mode": "input"},
        {"name": "input_ids", "shape": [1, -1], "dtype": "int64", "mode": "input"},
        {"name": "past", "shape": [1, -1, C], "dtype": "float32", "mode": "input"},
        {"name": "xs", "shape": [1, C], "dtype": "float32", "mode": "output"}],
        optimization_profile={"position_ids": {"min": [3, 1, 1], "opt": [3, 1, 8], "max": [3, 1, 32]},
                              "input_ids": {"min": [1, 1], "opt": [1, 8], "max": [1, 32]},
                              "past": {"min": [1, 0, C], "opt": [1, 16, C], "max": [1, 64, C]}},
        dims={"past_sequence": {"min": 0, "opt": 16, "max": 64}, "sequence": {"min": 1, "opt": 8, "max": 32}},
        input_dim_names={"position_ids": [None, None, "sequence"], "input_ids": [None, "sequence"],
                         "past": [None, "past_sequence", None]})


def _static_engine(tmp_path: Path) -> Path:
    return _engine(tmp_path, io_tensors=[{"name": "x", "shape": [2, 8], "dtype": "float32", "mode": "input"},
                                         {"name": "y", "shape": [2, 8], "dtype": "float32", "mode": "output"}],
                   optimization_profile={})


@pytest.mark.parametrize("make, args, batch", [
    # --shape sets the batch of every input: the run is batch 1 whatever --batch says (the old report: 9, 45/s).
    (_decode_engine, ("--batch", "9", "--shape", "past=1x2x8", "--shape", "mask=1x3", "--shape", "position_ids=3x1x3"),
     1),
    # ... or batch 3 at the default --batch 1, through position_ids' named batch axis (axis 1) too.
    (_decode_engine, ("--shape", "past=3x2x8", "--shape", "mask=3x3", "--shape", "position_ids=3x3x3"), 3),
    (_decode_engine, ("--batch", "4", "--shape", "mask=4x9"), 4),  # a --shape that agrees with --batch
    (_decode_engine, ("--batch", "4"), 4),
    (_engine, ("--shape", "pixel_values=8x3x224x224"), 8),
    (_engine, ("--batch", "5"), 5),
    # No dynamic batch axis: the static batch (check_batch holds --batch to it when no dim names are recorded).
    (_static_engine, ("--batch", "2"), 2),
    # With dim names check_batch leaves --batch unchecked on static inputs: the run is still batch 1, the dim 0 most
    # inputs share (not position_ids' 3, though it comes first; not the --batch 4 the old report used).
    (_static_batch_engine, ("--batch", "4"), 1),
    # Metadata listing no tensors: every dynamic dim 0 runs at --batch.
    (lambda t: _engine(t, io_tensors=[], optimization_profile={}), ("--batch", "3"), 3),
])
def test_reported_batch_is_the_run_batch(runtime_build, tmp_path, make, args, batch):
    """tokensieve-run reports (and counts throughput by) the batch its inputs run at, not --batch as given."""
    p = subprocess.run([str(runtime_build.exe.parent / "tokensieve-runtime-selftest"), "batch", str(make(tmp_path)),
                        *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout
    assert json.loads(p.stdout) == {"batch": batch, "samples_per_s": batch * 10 / 2.0}


def test_offset_axis_range_is_given_for_its_base(runtime_build, tmp_path):
    """An axis named only "past + 1" (no input has "past" itself) is set by --dim past; its range is told in past's terms."""
    engine = _engine(tmp_path, io_tensors=[{"name": "m", "shape": [-1, -1], "dtype": "int64", "mode": "input"},
                                           {"name": "s", "shape": [-1], "dtype": "int64", "mode": "output"}],
                     optimization_profile={"m": {"min": [1, 1], "opt": [1, 5], "max": [2, 17]}},
                     dims={"past + 1": {"min": 1, "opt": 5, "max": 17}}, input_dim_names={"m": ["batch", "past + 1"]})
    assert _resolve(runtime_build, engine, "--dim", "past=16") == (0, '{"m":[1,17]}')
    rc, out = _resolve(runtime_build, engine, "--dim", "past=17")
    assert rc == 1 and "input 'm' axis 1 (past + 1) allows 1..17, so past allows 0..16" in out, out


def test_engines_without_named_axes_resolve_as_before(runtime_build, tmp_path):
    engine = _engine(tmp_path)  # pixel_values [-1, 3, 224, 224], batch 1..8, no input_dim_names
    assert json.loads(_resolve(runtime_build, engine)[1]) == {"pixel_values": [1, 3, 224, 224]}
    assert json.loads(_resolve(runtime_build, engine, "--batch", "8")[1]) == {"pixel_values": [8, 3, 224, 224]}
    rc, out = _resolve(runtime_build, engine, "--dim", "sequence=4")
    assert rc == 1 and "no named dynamic axes besides the batch" in out and "`tokensieve build --dims`" in out, out


def test_metadata_with_bad_dim_names_is_refused(runtime_build, tmp_path):
    engine = _engine(tmp_path, input_dim_names={"pixel_values": ["batch", None]})
    _error_line(_run(runtime_build, engine), "is malformed", "input_dim_names 'pixel_values' names 2 axes",
                "[-1, 3, 224, 224]", "tokensieve build")


@pytest.mark.parametrize("args, needle", [
    (("--dim", "past_sequence"), "--dim 'past_sequence' is not NAME=VALUE"),
    (("--dim", "past_sequence=1e3"), "VALUE must be an integer"),
    (("--dim",), "--dim needs a value"),
    (("--shape", "past=1,2,8"), "'1,2,8' is not a dimension"),
    (("--dims", "past_sequence=0:16:64"), "is for `tokensieve build`; here use --dim NAME=VALUE"),
])
def test_malformed_dim_is_refused_before_the_engine_is_read(runtime_build, tmp_path, args, needle):
    _error_line(_run(runtime_build, tmp_path / "missing.engine", *args), needle)


@pytest.mark.parametrize("args, needle", [
    (("--dim", "past_seq=16"), "named axes: past_sequence (0..64), sequence (1..32)"),
    (("--dim", "past_sequence=100"), "allows 0..64"),
    (("--shape", "mask=1x2x3"), "has rank 2"),
    (("--batch", "2", "--shape", "position_ids=3x1x9"), "batch axes disagree"),
])
def test_dim_errors_come_before_tensorrt(runtime_build, tmp_path, args, needle):
    """Check 5b fires before libnvinfer is looked for (check 6), with a TOKENSIEVE_TENSORRT_LIB that would fail."""
    env = _env(TOKENSIEVE_TENSORRT_LIB=str(tmp_path / "nowhere.so"))
    _error_line(_run(runtime_build, _decode_engine(tmp_path), *args, env=env), needle)


def test_dims_in_range_pass_to_the_tensorrt_checks(runtime_build, tmp_path):
    env = _env(TOKENSIEVE_TENSORRT_LIB=str(tmp_path / "nowhere.so"))
    _error_line(_run(runtime_build, _decode_engine(tmp_path), "--batch", "4", "--dim", "past_sequence=64", "--dim",
                     "sequence=1", "--shape", "mask=4x65", env=env), "libnvinfer not found")


def _decode_onnx(path: Path) -> Path:
    """past [batch, past_sequence, C], mask [batch, past_sequence + 1], position_ids [3, batch, sequence] -> sums."""
    np = pytest.importorskip("numpy")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    ins = [helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch", "past_sequence", C]),
           helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "past_sequence + 1"]),
           helper.make_tensor_value_info("position_ids", TensorProto.INT64, [3, "batch", "sequence"])]
    outs = [helper.make_tensor_value_info("xs", TensorProto.FLOAT, ["batch", C]),
            helper.make_tensor_value_info("ms", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("ps", TensorProto.FLOAT, [3, "batch"])]
    axes = [numpy_helper.from_array(np.array([1], np.int64), "a1"), numpy_helper.from_array(np.array([2], np.int64), "a2")]
    nodes = [helper.make_node("ReduceSum", ["past", "a1"], ["xs"], keepdims=0),  # int64 inputs: reduced as float
             helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["mf", "a1"], ["ms"], keepdims=0),
             helper.make_node("Cast", ["position_ids"], ["pf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["pf", "a2"], ["ps"], keepdims=0)]
    model = helper.make_model(helper.make_graph(nodes, "decode", ins, outs, initializer=axes),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


DECODE_DIMS = {"past_sequence": (0, 16, 64), "sequence": (1, 8, 32)}


def test_reads_dims_written_by_the_rtx_builder(runtime_build, tmp_path):
    """The builder's real "dims"/"input_dim_names" parse in C++ as written and resolve like _decode_engine's."""
    pytest.importorskip("tensorrt_rtx")
    from tokensieve.targets.tensorrt import BuildSpec, build_engine

    info = build_engine(_decode_onnx(tmp_path / "decode.onnx"), tmp_path / "decode.engine",
                        BuildSpec(target="rtx-sm86", max_batch=4, dims=DECODE_DIMS))
    got = json.loads(_selftest(runtime_build, "metadata", info.engine_path))
    assert got["dims"] == info.metadata["dims"] and got["input_dim_names"] == info.metadata["input_dim_names"]
    (tmp_path / "fake").mkdir()
    fake = json.loads(Path(str(_decode_engine(tmp_path / "fake")) + ".json").read_text())
    for key in ("io_tensors", "optimization_profile", "dims", "input_dim_names"):
        assert fake[key] == info.metadata[key], key
    rc, out = _resolve(runtime_build, info.engine_path, "--batch", "2", "--dim", "past_sequence=40")
    assert rc == 0 and json.loads(out) == {"past": [2, 40, C], "mask": [2, 41], "position_ids": [3, 2, 8]}, out


# ---- checks 6-8: libnvinfer and the GPU ---------------------------------------------------------------------------

def test_libnvinfer_not_found(runtime_build, tmp_path):
    engine = _engine(tmp_path)
    nowhere = tmp_path / "nowhere" / "libnvinfer.so.10"
    _error_line(_run(runtime_build, engine, env=_env(TOKENSIEVE_TENSORRT_LIB=str(nowhere))),
                "libnvinfer not found", "TOKENSIEVE_TENSORRT_LIB", "nowhere/libnvinfer.so.10'")  # quoted short


def test_libnvinfer_dir_not_found(runtime_build, tmp_path):
    _error_line(_run(runtime_build, _engine(tmp_path), env=_env(TENSORRT_LIB_DIR=str(tmp_path))),
                "libnvinfer not found", "TENSORRT_LIB_DIR")


def test_tensorrt_rtx_library_is_refused(runtime_build, tmp_path):
    lib = tmp_path / "libtensorrt_rtx.so.1"
    lib.write_bytes(b"")
    _error_line(_run(runtime_build, _engine(tmp_path), env=_env(TOKENSIEVE_TENSORRT_LIB=str(lib))),
                "libnvinfer not found", "TensorRT-RTX")


def test_libnvinfer_version_mismatch(runtime_build, tmp_path):
    stub = _stub_nvinfer(tmp_path, 100300)
    engine = _engine(tmp_path, tensorrt_version="10.14.1.48")
    _error_line(_run(runtime_build, engine, env=_env(TOKENSIEVE_TENSORRT_LIB=str(stub))),
                "built with TensorRT 10.14.1.48", "is TensorRT 10.3.0")


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU")
def test_no_cuda_device(runtime_build, tmp_path):
    stub = _stub_nvinfer(tmp_path, 101401)
    engine = _engine(tmp_path, tensorrt_version="10.14.1.48")
    # A folder works as TOKENSIEVE_TENSORRT_LIB too.
    for env in (_env(TOKENSIEVE_TENSORRT_LIB=str(stub)), _env(TOKENSIEVE_TENSORRT_LIB=str(stub.parent)),
                _env(TENSORRT_LIB_DIR=str(stub.parent))):
        _error_line(_run(runtime_build, engine, env=env), "No CUDA device")


# ---- on a GPU with standard TensorRT -------------------------------------------------------------------------------

def _lcg_inputs(count: int, seed: int) -> list[float]:
    """tokensieve-run's deterministic float inputs (engine_runner.cpp make_input), reproduced bit for bit."""
    a, c, m = 6364136223846793005, 1442695040888963407, (1 << 64) - 1
    s, out = (seed * a + c) & m, []
    for _ in range(count):
        s = (s * a + c) & m
        out.append(float(((s >> 40) & 0xFFFFFF) / 8388608.0 - 1.0))
    return out


def _tensorrt_env(trt) -> dict[str, str]:
    """Point tokensieve-run at the pip `tensorrt` wheel's libnvinfer (or the caller's / the system's)."""
    lib_dir = Path(trt.__file__).resolve().parent.parent / "tensorrt_libs"
    env = _env(TOKENSIEVE_TENSORRT_LIB=os.environ.get("TOKENSIEVE_TENSORRT_LIB", str(lib_dir)))
    if not lib_dir.is_dir() and "TOKENSIEVE_TENSORRT_LIB" not in os.environ:
        env.pop("TOKENSIEVE_TENSORRT_LIB")  # system TensorRT: the loader path finds it
    return env


@pytest.mark.gpu
def test_runs_a_real_engine_on_gpu(runtime_build, tmp_path):
    if not _has_gpu():
        pytest.skip("needs an NVIDIA GPU")
    trt = pytest.importorskip("tensorrt")
    np = pytest.importorskip("numpy")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from tokensieve.targets.tensorrt import BuildSpec, build_engine

    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((16, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 32])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx_path = tmp_path / "tiny.onnx"
    onnx.save(model, str(onnx_path))
    info = build_engine(onnx_path, tmp_path / "tiny.engine", BuildSpec(target="local", max_batch=4))

    env = _tensorrt_env(trt)
    report = tmp_path / "run.json"
    p = _run(runtime_build, info.engine_path, "--iters", "50", "--warmup", "5", "--batch", "2", "--json", report,
             env=env)
    assert p.returncode == 0, p.stderr
    assert "latency" in p.stdout and "top-5 of 'y'" in p.stdout
    r = json.loads(report.read_text())
    lat = r["latency_ms"]
    assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert r["iters"] == 50 and r["batch"] == 2
    assert r["throughput_samples_per_s"] == pytest.approx(2 * 50 / r["wall_seconds"], rel=1e-4)
    # --shape sets the batch the run uses: reported (and counted in the throughput) as 3, not --batch 2.
    p = _run(runtime_build, info.engine_path, "--iters", "20", "--warmup", "2", "--batch", "2", "--shape", "x=3x16",
             "--json", report, env=env)
    assert p.returncode == 0, p.stderr
    assert "batch 3, warm-up 2, iterations 20" in p.stdout
    r = json.loads(report.read_text())
    assert r["batch"] == 3 and r["io_tensors"][0]["shape"] == [3, 16]
    assert r["throughput_samples_per_s"] == pytest.approx(3 * 20 / r["wall_seconds"], rel=1e-4)
    assert [t["shape"] for t in r["io_tensors"]] == [[2, 16], [2, 32]]

    x = np.array(_lcg_inputs(2 * 16, seed=1), dtype=np.float32).reshape(2, 16)
    want = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0][0]
    top = np.argsort(-want, kind="stable")[:5]
    assert [t["index"] for t in r["top5"]] == top.tolist()
    np.testing.assert_allclose([t["value"] for t in r["top5"]], want[top], rtol=1e-2, atol=1e-2)  # TF32


@pytest.mark.gpu
def test_runs_a_decode_engine_at_a_chosen_cache_length_on_gpu(runtime_build, tmp_path):
    """--dim past_sequence=40 runs the cache axes at 40 and the "past_sequence + 1" mask at 41; --shape sets one input."""
    if not _has_gpu():
        pytest.skip("needs an NVIDIA GPU")
    trt = pytest.importorskip("tensorrt")
    np = pytest.importorskip("numpy")
    from tokensieve.targets.tensorrt import BuildSpec, build_engine

    info = build_engine(_decode_onnx(tmp_path / "decode.onnx"), tmp_path / "decode.engine",
                        BuildSpec(target="local", max_batch=4, dims=DECODE_DIMS))
    env = _tensorrt_env(trt)
    report = tmp_path / "run.json"
    p = _run(runtime_build, info.engine_path, "--iters", "5", "--warmup", "1", "--batch", "2", "--dim",
             "past_sequence=40", "--shape", "position_ids=3x2x5", "--json", report, env=env)
    assert p.returncode == 0, p.stderr
    assert "inputs   past[2x40x8] mask[2x41] position_ids[3x2x5]" in p.stdout, p.stdout
    r = json.loads(report.read_text())
    assert {t["name"]: t["shape"] for t in r["io_tensors"]} == {
        "past": [2, 40, C], "mask": [2, 41], "position_ids": [3, 2, 5], "xs": [2, C], "ms": [2], "ps": [3, 2]}
    assert r["dims"] == {"past_sequence": 40} and r["shapes"] == {"position_ids": [3, 2, 5]}

    # xs = past summed over its 40 cache rows, from tokensieve-run's deterministic input (seed = tensor index + 1).
    assert r["first_output"] == "xs"
    seed = [t["name"] for t in r["io_tensors"]].index("past") + 1
    want = np.array(_lcg_inputs(2 * 40 * C, seed=seed), dtype=np.float32).reshape(2, 40, C)[0].sum(0)
    top = np.argsort(-want, kind="stable")[:5]
    assert [t["index"] for t in r["top5"]] == top.tolist()
    np.testing.assert_allclose([t["value"] for t in r["top5"]], want[top], rtol=1e-4, atol=1e-4)

    _error_line(_run(runtime_build, info.engine_path, "--dim", "past_sequence=65", env=env), "allows 0..64")
