"""int8 for ONNX Runtime: ORT's static QDQ quantization of a tokensieve ONNX, with each stage's score math in float.

    stats = quantize_int8("out/model.debug.onnx", "out/model.int8.debug.onnx", calibration_batches)

The weights of every MatMul / Gemm / Conv are int8 per channel and their activations int8 with ranges from the
calibration batches, except the nodes that only compute a stage's scores (the backward cone of each TopK's score
input, up to the tensors the model itself also uses: e.g. a [CLS] attention row recomputed from q and k). Softmax,
LayerNorm and TopK are never quantized (only MatMul / Gemm / Conv are). So the kept tokens can still move when q and
k themselves shift; the api reports kept-token overlap and output cosine against fp32 instead of exact equality.
"""
from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx

from tokensieve.errors import ConfigError, TargetError, first_line
from tokensieve.fileio import write_bytes_atomic

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")


def score_only_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes whose results only feed stage scores (TopK's score input), in graph order."""
    nodes = list(model.graph.node)
    producer = {out: n for n in nodes for out in n.output if out}
    consumers: dict[str, list] = defaultdict(list)
    for n in nodes:
        for name in n.input:
            consumers[name].append(n)
    outputs = {o.name for o in model.graph.output}
    topk = [n for n in nodes if n.op_type == "TopK"]
    ancestors, stack = set(), [producer[n.input[0]] for n in topk if n.input[0] in producer]
    while stack:  # everything upstream of a TopK's scores
        n = stack.pop()
        if id(n) in ancestors:
            continue
        ancestors.add(id(n))
        stack.extend(producer[i] for i in n.input if i in producer)
    only = {id(n) for n in topk}
    for n in reversed(nodes):  # consumers come later in a topologically sorted graph: decided before n
        if id(n) not in ancestors or id(n) in only or any(o in outputs for o in n.output):
            continue
        users = [u for o in n.output if o for u in consumers[o]]
        if users and all(id(u) in only for u in users):
            only.add(id(n))
    return [n.name for n in nodes if id(n) in only and n.op_type != "TopK"]


class _Batches:
    """ORT's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[Mapping[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, calibration: Iterable[Mapping[str, np.ndarray]],
                  *, per_channel: bool = True, symmetric: bool = False) -> dict:
    """Quantize `src` to int8 QDQ into `dst` (atomically) with `calibration` (feeds by input name) -> a summary:
    quantized / kept-float node counts and the score nodes kept in float. `symmetric`: activations too are
    quantized symmetrically (zero points 0), as TensorRT requires; else their ranges are asymmetric (ORT's CPU
    kernels' usual form)."""
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise TargetError(f"onnxruntime.quantization is not importable ({first_line(e)}); pip install onnxruntime") from e
    feeds = [dict(f) for f in calibration]
    if not feeds:
        raise ConfigError("int8 calibration needs at least one batch of inputs (--calib DIR with images)")
    with tempfile.TemporaryDirectory(prefix="tokensieve-int8-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_optimization=False)
            excluded = score_only_nodes(onnx.load(str(pre)))
            quantize_static(str(pre), str(out), _Batches(feeds), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANTIZED_OPS), per_channel=per_channel,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
        except (ConfigError, TargetError):
            raise
        except Exception as e:  # noqa: BLE001 - ORT's quantizer raises anything on a graph it cannot handle
            raise TargetError(f"int8 quantization of {str(src)!r} failed: {type(e).__name__}: {first_line(e)}") from e
        data = out.read_bytes()
    write_bytes_atomic(dst, data)
    model = onnx.load_from_string(data)
    ops = [n.op_type for n in model.graph.node]
    return {"quantize_linear": ops.count("QuantizeLinear"), "score_nodes_float": excluded,
            "calibration_batches": len(feeds)}
