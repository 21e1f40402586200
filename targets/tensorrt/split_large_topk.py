"""Rewrite every TopK whose constant K exceeds TensorRT's limit (3840) into rounds of TopK(K <= max_k).

Scheme (exact). With K = q * max_k + r, the TopK is replaced by q (+1 if r) extraction rounds over the full axis::

    x_0 = X
    round j:   v_j, i_j = TopK(x_j, k_j, axis, largest, sorted=1)          k_j = max_k, ..., max_k, r
               x_{j+1} = ScatterElements(x_j, i_j, Expand(sentinel, Shape(i_j)), axis)   # no reduction
    Values  = Concat(v_0, v_1, ..., axis)      Indices = Concat(i_0, i_1, ..., axis)

`sentinel` is the worst possible value (-inf / dtype min for largest=1, +inf / dtype max for largest=0), so an
element taken in one round cannot be taken again. Every op used (TopK with K <= max_k, ScatterElements without a
reduction, Expand, Shape, Concat) is accepted by the TensorRT and TensorRT-RTX ONNX parsers; the axis length is
not limited (TopK(3840) over 8000 elements builds with TensorRT-RTX 1.7).

Guarantees:
- Rounds are taken in (value, index) order, so the result equals one TopK(K, sorted=1) whose ties go to the lowest
  index first (as ONNX Runtime's does; TensorRT's per-round tie order is whatever its TopK does). The output is
  always sorted, which is a valid output for sorted=0 as well (sorted=0 leaves the order unspecified; compare as
  sets there). This covers the exporter's two uses: selection (largest=1, sorted=0) and the ascending sort of
  int64 indices (largest=0, sorted=1).
- Exactness needs the input not to contain the sentinel itself (-inf for largest=1, +inf for largest=0, the int
  dtype's min/max) nor NaN: such elements would tie with already-taken ones. Token scores and indices never do.
- Cost: ceil(K / max_k) TopKs and scatters over the full axis (2 for K=5000).

A TopK whose K is not a constant, or whose input dtype is unknown, is left alone and reported (logged at WARNING
and listed in `SplitLargeTopKPass.skipped`), never raised. The pass edits an ir.Model in place (InPlacePass); a
ModelProto given to `split_large_topk` is converted to a new ir.Model first. Idempotent: after one run every TopK
it could rewrite has K <= max_k, so a second run changes nothing.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from .lint import TOPK_MAX_K   # TensorRT's K limit (3840)

log = logging.getLogger(__name__)

_TAG = "tokensieve.pass"


def _sentinel(dtype: ir.DataType, largest: bool) -> np.ndarray:
    np_dtype = dtype.numpy()
    if np.issubdtype(np_dtype, np.floating):
        return np.array(-np.inf if largest else np.inf, dtype=np_dtype)
    info = np.iinfo(np_dtype)
    return np.array(info.min if largest else info.max, dtype=np_dtype)


def _const_k(value: ir.Value | None) -> int | None:
    try:  # an external-data K whose file cannot be read counts as unknown
        tensor = ir.convenience.get_const_tensor(value) if value is not None else None
        arr = None if tensor is None else tensor.numpy().reshape(-1)
    except Exception:  # noqa: BLE001
        return None
    if arr is None:
        return None
    return int(arr[0]) if arr.size == 1 else None


class SplitLargeTopKPass(InPlacePass):
    """Replace TopK(K > max_k) by ceil(K / max_k) rounds of TopK(<= max_k) + ScatterElements masking."""

    def __init__(self, max_k: int = TOPK_MAX_K, log_level: int = logging.WARNING) -> None:
        super().__init__()
        if max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {max_k}")
        self.max_k = max_k
        self.log_level = log_level   # of the skipped-TopK reports (the lowering lints a large constant K instead)
        self.skipped: list[str] = []

    def call(self, model: ir.Model) -> PassResult:
        self.skipped = []
        rewritten = 0
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.op_type != "TopK" or node.domain not in ("", "ai.onnx"):
                continue
            k = _const_k(node.inputs[1] if len(node.inputs) > 1 else None)
            label = f"TopK {node.name!r}"
            if k is None:
                self._skip(f"{label}: K is not a constant; re-export with a fixed budget to let it be split")
                continue
            if k <= self.max_k:
                continue
            dtype = node.inputs[0].dtype or node.outputs[0].dtype  # Values has X's dtype
            if dtype is None:
                self._skip(f"{label}: input dtype unknown; run shape inference first")
                continue
            self._rewrite(node, k, dtype)
            rewritten += 1
        return PassResult(model, modified=rewritten > 0)

    def _skip(self, reason: str) -> None:
        self.skipped.append(reason)
        log.log(self.log_level, "split_large_topk: %s", reason)

    def _rewrite(self, node: ir.Node, k: int, dtype: ir.DataType) -> None:
        attrs = node.attributes
        axis = attrs["axis"].as_int() if "axis" in attrs else -1
        largest = attrs["largest"].as_int() if "largest" in attrs else 1
        base = node.name or "TopK"
        tape = ir.tape.Tape()
        x = node.inputs[0]
        sentinel = tape.op("Constant", [], {"value": ir.tensor(_sentinel(dtype, bool(largest)))},
                           name=f"{base}/split/sentinel")
        sizes = [self.max_k] * (k // self.max_k) + ([k % self.max_k] if k % self.max_k else [])
        values, indices = [], []
        for j, kj in enumerate(sizes):
            kc = tape.op("Constant", [], {"value": ir.tensor(np.array([kj], dtype=np.int64))},
                         name=f"{base}/split/k{j}")
            v, i = tape.op_multi_out("TopK", [x, kc], {"axis": axis, "largest": largest, "sorted": 1},
                                     num_outputs=2, name=f"{base}/split/topk{j}")
            values.append(v)
            indices.append(i)
            if j + 1 < len(sizes):
                shape = tape.op("Shape", [i], name=f"{base}/split/shape{j}")
                fill = tape.op("Expand", [sentinel, shape], name=f"{base}/split/fill{j}")
                x = tape.op("ScatterElements", [x, i, fill], {"axis": axis}, name=f"{base}/split/mask{j}")
        v_all = tape.op("Concat", values, {"axis": axis}, name=f"{base}/split/values")
        i_all = tape.op("Concat", indices, {"axis": axis}, name=f"{base}/split/indices")
        for new in tape.nodes:
            new.metadata_props[_TAG] = "split_large_topk"
        old_outputs = list(node.outputs)
        for old, new in zip(old_outputs, (v_all, i_all)):
            new.type, new.shape = old.type, old.shape
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], list(tape.nodes), old_outputs,
                                                [v_all, i_all])


def split_large_topk(model: onnx.ModelProto | ir.Model, max_k: int = TOPK_MAX_K) -> PassResult:
    """Split every TopK with constant K > max_k into exact rounds of TopK(K <= max_k) (see module docstring)."""
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    return SplitLargeTopKPass(max_k)(model)
