"""The build precision must match the ONNX: an int8 engine is built from a Q/DQ graph, and a Q/DQ graph only as int8.

TensorRT takes int8 from explicit QuantizeLinear / DequantizeLinear pairs (explicit quantization; TensorRT-RTX and
TensorRT 11 are strongly typed and have no implicit int8), so `--precision int8` of a float graph would build an
fp32 engine under an int8 name, and fp16 conversion of a Q/DQ graph would retype its scales. TensorRT also takes only
symmetric quantization (zero points 0): a graph quantized with asymmetric activations is refused here with the fix,
not by the parser with a node name.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from tokensieve.errors import ConfigError

from ..base import Precision

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def quantize_nodes(model: ir.Model) -> list[ir.Node]:
    """The QuantizeLinear / DequantizeLinear nodes of the main graph."""
    return [n for n in model.graph if n.op_type in _QDQ and n.domain in ("", "ai.onnx")]


def _nonzero_zero_point(node: ir.Node) -> bool:
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    value = None if zp is None else (zp.const_value if zp.const_value is not None else
                                     ir.convenience.get_const_tensor(zp))
    return value is not None and bool(np.any(value.numpy() != 0))


class CheckQuantizationPass(InPlacePass):
    """One-line ConfigError when `precision` and the graph's Q/DQ nodes disagree; edits nothing."""

    def __init__(self, precision: Precision, name: str = "the ONNX") -> None:
        super().__init__()
        self.precision, self.name = precision, name

    def call(self, model: ir.Model) -> PassResult:
        qdq = quantize_nodes(model)
        if self.precision is Precision.INT8 and not qdq:
            raise ConfigError(f"--precision int8 builds from a Q/DQ graph and {self.name} has none; run `tokensieve "
                              "quantize OUT --calib DIR` and build OUT/model.int8.onnx, or export with --precision int8")
        if self.precision is not Precision.INT8 and qdq:
            raise ConfigError(f"{self.name} is quantized ({len(qdq)} Q/DQ nodes); build it with --precision int8")
        asymmetric = [n for n in qdq if _nonzero_zero_point(n)]
        if asymmetric:
            raise ConfigError(f"{self.name} has {len(asymmetric)} Q/DQ nodes with nonzero zero points, which TensorRT "
                              "does not take (symmetric only); quantize for TensorRT with `tokensieve quantize OUT "
                              "--symmetric` or export with --precision int8")
        return PassResult(model, modified=False)
