"""Convert an fp32 ONNX model to mixed fp16 for strongly typed TensorRT (TensorRT-RTX, TensorRT >= 11).

Weights and activations become fp16; the graph's inputs and outputs keep their types (Casts are inserted at the
boundary). These nodes stay fp32, found by structure, never by name (`fp32_nodes`):

- `KEEP_FP32_OPS`: ops whose fp16 range or precision is a known problem: Softmax / LogSoftmax, LayerNormalization
  and the other normalizations, the reductions behind ReduceMean-based norms (ReduceMean, ReduceSum, ReduceL2, ...),
  Pow / Exp / Log (x**3 in tanh-GELU overflows fp16 above |x| = 40); ops without an fp16 schema (custom domains such
  as tokensieve's plugin nodes, whose formats the plugin decides) and nodes holding subgraphs (Loop, If).
- The score subgraph of every pruning stage: the selection ops (TopK's data input, ArgMax, ArgMin, comparisons) and
  every node whose outputs feed nothing but that selection logic. fp16 scores create ties that change the kept
  indices (FACTS.md); the scores' inputs (the block's q, k or hidden states) are shared with the fp16 main path and
  are cast up where the score subgraph reads them.
- Elementwise ops (`FOLLOW_FP32_OPS`) whose float inputs all come from fp32 nodes or constants, so that the tail
  of a ReduceMean-based norm (var + eps, Sqrt) is not squeezed through fp16 between two fp32 ops.

Constants (initializers, Constant nodes) used only by fp16 nodes are converted in place, finite values clipped to
fp16's range (so float32-min mask fills stay finite) and nonzero values below fp16's smallest subnormal kept
nonzero; constants also read by fp32 nodes stay fp32 and get a Cast. Casts the pass inserts carry the metadata
`tokensieve.pass = convert_to_fp16` and are ignored on later runs, so the pass is idempotent: a second run finds
no fp32 value feeding an fp16 node and changes nothing. It edits the main graph of an ir.Model in place
(InPlacePass); a ModelProto given to `convert_to_fp16` is converted to a new ir.Model first.

Weakly typed TensorRT (10.x) keeps the ONNX fp32 and builds with its FP16 flag instead: `MarkFp32NodesPass` tags
the same fp32 nodes (`PIN_FP32_TAG`, targets/base.py) and the builder pins their layers to fp32.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.passes.common import ShapeInferencePass

from tokensieve.errors import PassError

from ..base import PIN_FP32_TAG

FLOAT, HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16
_TAG, _NAME = "tokensieve.pass", "convert_to_fp16"
_FP16_MAX, _FP16_TINY = float(np.finfo(np.float16).max), float(np.finfo(np.float16).smallest_subnormal)

KEEP_FP32_OPS = frozenset({
    "Softmax", "LogSoftmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceProd", "Pow", "Exp", "Log", "CumSum",
    # output dtype set by an attribute this pass does not rewrite
    "EyeLike", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
})
# op -> the inputs whose values decide a selection (TopK's K and the comparisons' integer uses do not matter)
SELECTION_INPUTS = {"TopK": (0,), "ArgMax": (0,), "ArgMin": (0,), "Greater": (0, 1), "Less": (0, 1),
                    "GreaterOrEqual": (0, 1), "LessOrEqual": (0, 1), "Equal": (0, 1)}
FOLLOW_FP32_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Neg", "Abs", "Max", "Min", "Clip"})
_SHAPE_ONLY = frozenset({"Shape", "Size"})  # read no values: their uses never make a producer "main path"
_ANY_INPUT = _SHAPE_ONLY | {"Cast"}         # take any input dtype: never cast what they read


def _is_ours(node: ir.Node) -> bool:
    return node.metadata_props.get(_TAG) == _NAME


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in (FLOAT, HALF)


def _subgraph_nodes(node: ir.Node) -> list[ir.Node]:
    """Every node inside the subgraphs of `node` (Loop / If / Scan bodies), recursively."""
    graphs = [g for a in node.attributes.values() if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
              for g in (a.as_graphs() if a.type == ir.AttributeType.GRAPHS else [a.as_graph()])]
    return [n for g in graphs for n in ir.traversal.RecursiveGraphIterator(g)]


def _is_const(value: ir.Value) -> bool:
    producer = value.producer()
    return value.is_initializer() or (producer is not None and producer.op_type == "Constant")


@functools.cache
def _allows_half(op_type: str, domain: str, opset: int, index: int, is_input: bool) -> bool:
    """Whether the schema lets input/output `index` of this op be float16 (False for unknown ops)."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return False
    params = schema.inputs if is_input else schema.outputs
    if not params:
        return False
    param = params[min(index, len(params) - 1)]  # a variadic last parameter covers the rest
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}.get(param.type_str,
                                                                                           [param.type_str])
    return "tensor(float16)" in allowed


def _half_ok(node: ir.Node, index: int, opset: int, is_input: bool = True) -> bool:
    domain = "" if node.domain == "ai.onnx" else node.domain
    return _allows_half(node.op_type, domain, opset, index, is_input)


def fp32_nodes(graph: ir.Graph, opset: int) -> set[ir.Node]:
    """The main-graph nodes that stay fp32 under `convert_to_fp16` (see the module docstring)."""
    nodes = [n for n in graph if not _is_ours(n)]
    owner = {inner: n for n in nodes for inner in _subgraph_nodes(n)}  # a body's reads count as its Loop's
    keep = {n for n in nodes if n.op_type in KEEP_FP32_OPS or n in owner.values()
            or any(_is_float(v) and not _half_ok(n, i, opset, is_input=False) for i, v in enumerate(n.outputs))}
    score: set[ir.Node] = set()
    for node in reversed(nodes):  # consumers before producers
        if node.op_type in SELECTION_INPUTS or _feeds_only_selection(node, score, owner):
            score.add(node)
    keep |= score
    for node in nodes:  # producers before consumers
        floats = [v for v in node.inputs if _is_float(v) and not _is_const(v)]
        if node.op_type in FOLLOW_FP32_OPS and floats and all(v.producer() in keep for v in floats):
            keep.add(node)
    return keep


def _feeds_only_selection(node: ir.Node, score: set[ir.Node], owner: dict[ir.Node, ir.Node]) -> bool:
    uses = [(owner.get(n, n), i) for out in node.outputs for n, i in out.uses() if n.op_type not in _SHAPE_ONLY]
    if not uses or any(out.is_graph_output() for out in node.outputs):
        return False
    return all(n in score and i in SELECTION_INPUTS.get(n.op_type, (i,)) for n, i in uses)


def _pinned_nodes(model: ir.Model) -> list[ir.Node]:
    """The fp32 nodes that read or write floats: the ones whose TensorRT layers need a precision constraint."""
    return [n for n in fp32_nodes(_typed(model).graph, _opset(model))
            if n.op_type not in _SHAPE_ONLY and any(_is_float(v) for v in [*n.inputs, *n.outputs])]


def fp32_names(model: ir.Model) -> tuple[set[str], set[str]]:
    """(node names, value names) of the fp32 nodes that read or write floats, and of their float outputs.

    For TensorRT 10.x layer precision constraints: its ONNX parser names a node's main layer after the node and
    the node's output tensors after the values.
    """
    keep = _pinned_nodes(model)
    return {n.name for n in keep if n.name}, {v.name for n in keep for v in n.outputs if _is_float(v) and v.name}


def _typed(model: ir.Model) -> ir.Model:
    """`model`, with ONNX shape inference run first when some node output has no type."""
    if any(v.dtype is None for n in model.graph for v in n.outputs):
        ShapeInferencePass()(model)
        untyped = [v.name for n in model.graph for v in n.outputs if v.dtype is None]
        if untyped:
            raise PassError(f"convert_to_fp16 needs every value's type, but {untyped[0]!r} has none after shape "
                            f"inference; export the model with value types (torch.onnx.export does)")
    return model


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", onnx.defs.onnx_opset_version()))


def _half_tensor(array: np.ndarray, name: str | None) -> ir.Tensor:
    a = np.asarray(array, dtype=np.float32)
    finite, tiny = np.isfinite(a), (a != 0) & (np.abs(a) < _FP16_TINY)
    a = np.where(finite, np.clip(a, -_FP16_MAX, _FP16_MAX), a)
    a = np.where(tiny, np.copysign(_FP16_TINY, a), a)
    return ir.tensor(a.astype(np.float16), name=name)


class ConvertToFp16Pass(InPlacePass):
    """fp32 -> mixed fp16 with I/O types kept; the fp32 nodes of `fp32_nodes` read fp32 through Casts."""

    def call(self, model: ir.Model) -> PassResult:
        graph, opset = _typed(model).graph, _opset(model)
        keep = fp32_nodes(graph, opset)
        half: set[ir.Value] = set()  # values this run turns into fp16
        for node in graph:
            if node in keep or _is_ours(node) or node.op_type == "Constant":
                continue
            for i, out in enumerate(node.outputs):
                if out.dtype == FLOAT and _half_ok(node, i, opset, is_input=False):
                    out.dtype = HALF
                    half.add(out)
            if node.op_type == "Cast" and node.attributes["to"].as_int() == FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", HALF)
            if node.op_type == "ConstantOfShape" and node.outputs[0] in half:
                value = node.attributes.get("value")
                fill = value.as_tensor().numpy() if value is not None else np.zeros(1, np.float32)
                node.attributes["value"] = ir.AttrTensor("value", _half_tensor(fill, None))
        changes = len(half)
        values = [*graph.inputs, *graph.initializers.values(), *(v for n in list(graph) for v in n.outputs)]
        for value in values:
            changes += self._fix_uses(graph, value, keep, half, opset)
        for i, out in enumerate(list(graph.outputs)):
            if out in half:  # keep the output's name and fp32 type; the fp16 value gets a new name
                name, out.name = out.name, f"{out.name}.fp16"
                graph.outputs[i] = self._cast(graph, out, FLOAT, name)
                changes += 1
        return PassResult(model, modified=changes > 0)

    def _fix_uses(self, graph: ir.Graph, value: ir.Value, keep: set[ir.Node], half: set[ir.Value], opset: int) -> int:
        """Give every consumer of `value` the dtype it computes in; return the number of edits."""
        want: dict[ir.DataType, list[ir.Usage]] = {HALF: [], FLOAT: []}
        if not _is_float(value):
            return 0
        for use in value.uses():
            node, i = use
            if _is_ours(node) or node.op_type in _ANY_INPUT:
                continue
            fp16_node = node.graph is graph and node not in keep and _half_ok(node, i, opset)
            if fp16_node and value.dtype == FLOAT:
                want[HALF].append(use)
            elif not fp16_node and value in half:
                want[FLOAT].append(use)
        only_half = want[HALF] and len(want[HALF]) == len(value.uses())
        if only_half and _is_const(value) and not (value.is_graph_input() or value.is_graph_output()):
            self._convert_const(value)
            return 1
        for dtype, uses in want.items():
            if uses:
                cast = self._cast(graph, value, dtype)
                for node, i in uses:
                    node.replace_input_with(i, cast)
        return len(want[HALF]) + len(want[FLOAT])

    @staticmethod
    def _convert_const(value: ir.Value) -> None:
        producer = value.producer()
        if producer is None:  # initializer
            value.const_value = _half_tensor(value.const_value.numpy(), value.name)
        else:  # Constant: value / value_float / value_floats -> one fp16 `value`
            tensor = _half_tensor(ir.convenience.get_const_tensor(value).numpy(), None)
            producer.attributes.clear()
            producer.attributes["value"] = ir.AttrTensor("value", tensor)
        value.dtype = HALF

    @staticmethod
    def _cast(graph: ir.Graph, value: ir.Value, dtype: ir.DataType, name: str | None = None) -> ir.Value:
        suffix = "fp16" if dtype == HALF else "fp32"
        out = ir.Value(name=name or f"{value.name}.{suffix}", type=ir.TensorType(dtype), shape=value.shape)
        node = ir.node("Cast", [value], {"to": dtype}, outputs=[out], name=f"{value.name}/cast_{suffix}",
                       metadata_props={_TAG: _NAME})
        producer = value.producer()
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, node)
        else:  # graph input, initializer or outer value: before every node
            graph.insert_before(next(iter(graph)), node)
        return out


class MarkFp32NodesPass(InPlacePass):
    """Tag (PIN_FP32_TAG = "fp32") the nodes ConvertToFp16Pass would keep fp32 and that read or write floats, for a
    weakly typed fp16 build; the graph itself is not changed. Idempotent: a tagged node is not tagged again."""

    def call(self, model: ir.Model) -> PassResult:
        tagged = 0
        for node in _pinned_nodes(model):
            if node.metadata_props.get(PIN_FP32_TAG) != "fp32":
                node.metadata_props[PIN_FP32_TAG] = "fp32"
                tagged += 1
        return PassResult(model, modified=tagged > 0)


def convert_to_fp16(model: onnx.ModelProto | ir.Model) -> PassResult:
    """fp32 -> mixed fp16 ONNX for strongly typed TensorRT, scores and norms kept fp32 (see module docstring)."""
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    return ConvertToFp16Pass()(model)
