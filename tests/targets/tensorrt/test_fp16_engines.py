"""fp16 engines: convert_to_fp16 on exported pruned ViTs (census, ONNX Runtime vs fp32) and TensorRT-RTX fp16 builds."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ir = pytest.importorskip("onnx_ir")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from tiny_models import build  # noqa: E402
from gpu_target import engine_target  # noqa: E402
from tokensieve import api  # noqa: E402
from tokensieve.cli import main  # noqa: E402
from tokensieve.errors import ConfigError  # noqa: E402
from tokensieve.graph_passes.methods.diversity import cosine_similarity, divprune  # noqa: E402
from tokensieve.targets.tensorrt.convert_to_fp16 import convert_to_fp16  # noqa: E402
from tokensieve.targets.tensorrt import BuildSpec  # noqa: E402

FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
METHODS = ["cls-topk", "ttv", "tome", "divprune", "random"]  # one per family
INPUTS, BATCH = 6, 2
_CACHE: dict[str, api.ExportResult] = {}


def _exported(method: str) -> api.ExportResult:
    if method not in _CACHE:
        _CACHE[method] = api.export(*build("vit"), f"{method}@1:0.5")
    return _CACHE[method]


def _fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    return ir.to_proto(convert_to_fp16(proto).model)


def _session(proto: onnx.ModelProto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _inputs(shape) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((BATCH, *shape[1:])).astype(np.float32) for _ in range(INPUTS)]


def _elem_types(proto: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    return types | {t.name: t.data_type for t in g.initializer}


def _io(proto: onnx.ModelProto) -> list[tuple[str, int]]:
    return [(v.name, v.type.tensor_type.elem_type) for v in [*proto.graph.input, *proto.graph.output]]


@pytest.mark.parametrize("method", METHODS)
def test_vit_census(method):
    dbg = _exported(method).debug_onnx
    half = _fp16(dbg)
    onnx.checker.check_model(half)
    assert _io(half) == _io(dbg)  # pixel_values / logits fp32, kept_idx int64
    types = _elem_types(half)
    out = lambda op: [types[n.output[0]] for n in half.graph.node if n.op_type == op]  # noqa: E731
    assert set(out("LayerNormalization")) == set(out("Softmax")) == {FLOAT}
    assert set(out("Conv")) == set(out("Gemm")) == set(out("Erf")) == {HALF}
    matmuls = out("MatMul")
    assert matmuls.count(HALF) >= 6 * 4  # every block's q/k/v/attn/proj/mlp products; scores may keep a few fp32
    topk_data = {types[n.input[0]] for n in half.graph.node if n.op_type == "TopK"}
    assert HALF not in topk_data  # scores (float) and the ascending index sort (int64) never go through fp16
    weights = lambda m: sum(t.data_type == FLOAT and np.prod(t.dims) for t in m.graph.initializer)  # noqa: E731
    halves = sum(np.prod(t.dims) for t in half.graph.initializer if t.data_type == HALF)
    assert halves > 0.9 * weights(dbg)  # nearly every float weight is fp16 (norm scales and score constants stay fp32)


@pytest.mark.parametrize("method", METHODS)
def test_vit_fp16_matches_fp32_on_onnxruntime(method):
    """Outputs agree (cosine >= 0.999) and kept indices are identical on every input and row.

    DivPrune is the exception: its K greedy argmin steps over cosine similarities have decision margins down to
    ~1e-5 on this random model, below the ~5e-4 relative change fp16 blocks make to the hidden state the stage
    reads. There the fp16 model must pick exactly what fp32 DivPrune picks on *its own* stage input (so the score
    math is exact and only the fp16 main path differs), and rows that pick the same tokens must agree in output.
    """
    result = _exported(method)
    dbg, half = result.debug_onnx, _fp16(result.debug_onnx)
    s32, s16 = _session(dbg), _session(half)
    rows = same = 0
    for x in _inputs(result.input_shape):
        (y32, *k32), (y16, *k16) = s32.run(None, {"pixel_values": x}), s16.run(None, {"pixel_values": x})
        assert y16.dtype == np.float32
        match = np.all([(a == b).all(-1) for a, b in zip(k32, k16)], axis=0)  # (B,): all stages equal
        rows, same = rows + match.size, same + int(match.sum())
        assert (_cosine(y32, y16)[match] >= 0.999).all()
    print(f"{method}: kept indices identical to fp32 on {same}/{rows} rows")
    if method != "divprune":
        assert same == rows
    else:
        _assert_divprune_exact_on_own_input(result, half)


def _assert_divprune_exact_on_own_input(result: api.ExportResult, half: onnx.ModelProto) -> None:
    (norm,) = [n for n in half.graph.node if n.op_type == "ReduceL2"]  # cosine similarity's norm of the stage input
    exposed = onnx.ModelProto()
    exposed.CopyFrom(half)
    exposed.graph.output.append(onnx.helper.make_tensor_value_info(norm.input[0], FLOAT, None))
    session = _session(exposed)
    stage = result.stages[0]
    for x in _inputs(result.input_shape):
        _, kept, tokens = session.run(None, {"pixel_values": x})
        t = torch.from_numpy(tokens)
        _, want = divprune(t, cosine_similarity(t), stage.keep, stage.num_prefix_tokens)
        np.testing.assert_array_equal(kept, want.numpy())


@pytest.fixture(scope="module")
def rtx():
    return pytest.importorskip("tensorrt_rtx")


def _save(proto: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.mark.parametrize("method", METHODS)
def test_rtx_builds_fp16_engine(rtx, method, tmp_path):
    onnx_path = _save(_exported(method).onnx_model, tmp_path / "model.onnx")
    fp32 = api.build(onnx_path, tmp_path / "fp32.engine", precision="fp32", max_batch=4)
    fp16 = api.build(onnx_path, tmp_path / "fp16.engine", precision="fp16", max_batch=4)
    meta = json.loads(fp16.metadata_path.read_text())
    assert meta["precision"] == "fp16" and fp32.metadata["precision"] == "fp32"
    assert meta["io_tensors"] == fp32.metadata["io_tensors"]  # I/O stays float32
    assert meta["onnx"]["sha256"] == fp32.metadata["onnx"]["sha256"]  # the file on disk is not rewritten
    assert 0 < fp16.size_bytes < fp32.size_bytes
    print(f"{method}: fp32 {fp32.size_bytes} B in {fp32.build_seconds:.2f} s, fp16 {fp16.size_bytes} B in "
          f"{fp16.build_seconds:.2f} s")


def test_tensorrt10_fp32_layers_found_in_parsed_network(rtx):
    """The layers TensorRT 10.x (FP16 flag) pins to fp32 are found by name in a real parser's network.

    Setting `layer.precision` needs standard TensorRT 10.x (TensorRT-RTX is strongly typed and has no such
    property), so only the ONNX-node -> layer mapping is checked here, on TensorRT-RTX's parser.
    """
    from tokensieve.targets.tensorrt.builder import fp32_layers, pinned_fp32_names
    from tokensieve.targets.tensorrt.convert_to_fp16 import MarkFp32NodesPass, fp32_names

    proto = _exported("cls-topk").onnx_model
    logger = rtx.Logger(rtx.Logger.ERROR)
    builder = rtx.Builder(logger)
    network = builder.create_network(0)
    assert rtx.OnnxParser(network, logger).parse(proto.SerializeToString())
    marked = ir.from_proto(proto)  # the weakly typed lowering tags the nodes, the builder reads the tags back
    assert MarkFp32NodesPass()(marked).modified and not MarkFp32NodesPass()(marked).modified
    assert pinned_fp32_names(marked) == fp32_names(ir.from_proto(proto))
    types = Counter(layer.type for layer in fp32_layers(network, *pinned_fp32_names(marked)))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert types[rtx.LayerType.NORMALIZATION] == ops["LayerNormalization"]
    assert types[rtx.LayerType.SOFTMAX] == ops["Softmax"]
    assert types[rtx.LayerType.TOPK] == 1  # the score TopK; the index sort reads int64
    assert types[rtx.LayerType.MATRIX_MULTIPLY] == 1 and types[rtx.LayerType.CONVOLUTION] == 0  # score q·kᵀ only


@pytest.fixture(scope="module")
def default_vit_s() -> api.ExportResult:
    """The bundled ViT-S with the docs' recipe, exported once for the engine-size test and its GPU twin (~15 s)."""
    import tokensieve

    model, shape = tokensieve.load_model("default")
    return api.export(model, torch.randn(*shape, generator=torch.Generator().manual_seed(0)), "cls-topk@3,6,9:0.7")


@pytest.mark.slow
def test_default_vit_s_fp16_engine_is_half_size(rtx, default_vit_s, tmp_path):
    onnx_path = _save(default_vit_s.onnx_model, tmp_path / "model.onnx")
    fp32 = api.build(onnx_path, tmp_path / "fp32.engine", precision="fp32")
    fp16 = api.build(onnx_path, tmp_path / "fp16.engine", precision="fp16")
    ratio = fp16.size_bytes / fp32.size_bytes
    print(f"ViT-S cls-topk@3,6,9:0.7 rtx-sm86: fp32 {fp32.size_bytes / 2**20:.1f} MiB in {fp32.build_seconds:.2f} s, "
          f"fp16 {fp16.size_bytes / 2**20:.1f} MiB in {fp16.build_seconds:.2f} s (ratio {ratio:.3f})")
    assert 0.45 <= ratio <= 0.6  # weights dominate: fp16 halves them (measured 0.54)


def test_cli_build_and_export_fp16(rtx, tmp_path, capsys):
    onnx_path = _save(_exported("cls-topk").onnx_model, tmp_path / "model.onnx")
    assert main(["build", str(onnx_path), "--precision", "fp16", "--max-batch", "2"]) == 0
    assert "(fp16)" in capsys.readouterr().out
    assert json.loads((tmp_path / "model.rtx-sm86.fp16.engine.json").read_text())["precision"] == "fp16"
    out = tmp_path / "out"
    assert main(["export", "--model", "tiny", "--prune", "cls-topk@1:0.5", "-o", str(out), "--precision", "fp16",
                 "--no-bench", "--verify-inputs", "1", "--max-batch", "2"]) == 0
    assert " fp16: " in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["build"]["precision"] == "fp16"
    assert json.loads((out / "model.rtx-sm86.fp16.engine.json").read_text())["precision"] == "fp16"


def test_unknown_precision_is_one_line(tmp_path):
    for call in (lambda: BuildSpec(precision="bf16"),
                 lambda: api.build(_save(_exported("random").onnx_model, tmp_path / "m.onnx"), precision="fp8")):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "Unknown precision" in msg and "fp32, fp16, int8" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# ------------------------------------------------------------------------------------------ GPU


def _engine_vs_onnxruntime_fp32(result: api.ExportResult, tmp_path: Path, inputs: int) -> float:
    """Lowest per-row cosine of the fp16 engine's output vs ONNX Runtime fp32 over seeded inputs."""
    from tokensieve.runtime import OrtRunner, TrtRunner

    onnx_path = _save(result.onnx_model, tmp_path / "model.onnx")
    info = api.build(onnx_path, tmp_path / "fp16.engine", target=engine_target(), precision="fp16", max_batch=4)
    worst = 1.0
    with OrtRunner(onnx_path) as fp32, TrtRunner(info.engine_path) as engine:
        for seed in range(inputs):
            feeds = fp32.make_random_feeds(batch=BATCH, seed=seed)
            (want,), (got,) = fp32.infer(feeds).values(), engine.infer(feeds).values()
            worst = min(worst, float(_cosine(want, got).min()))
    return worst


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["cls-topk", "tome"])
def test_fp16_engine_matches_onnxruntime_fp32(method, tmp_path):
    assert _engine_vs_onnxruntime_fp32(_exported(method), tmp_path, inputs=4) >= 0.999


@pytest.mark.gpu
@pytest.mark.slow
def test_default_vit_s_fp16_engine_matches_onnxruntime_fp32(default_vit_s, tmp_path):
    assert _engine_vs_onnxruntime_fp32(default_vit_s, tmp_path, inputs=4) >= 0.999
