"""Replace the exported `tokensieve::compact_valid` cut by one data-dependent TokenCompact plugin node (TensorRT only).

`adaptive(compact=true)` keeps a valid-first sequence and cuts it after the stage to S = the batch's largest valid
count (exporter/onnx_translations.py `compact_valid`), so the rest of the graph has a data-dependent token axis.
The standard form runs on ONNX Runtime, and TensorRT builds it too, but it cannot tell what S to tune for ("Was not
able to infer kOPT value(s) for tensor ... Using one(s)": every layer after the cut is tuned for one token). The
plugin declares S as a size tensor with an opt value and an upper bound (plugin_src/token_compact.h, dynamic=1):

    standard form                                              substituted
    count = ReduceSum(Cast(valid, INT64), [1], keepdims=0)     x_c, _, size = TokenCompact(x, valid; capacity=N,
    s = ReduceMax(count, keepdims=1) [Max(·, [m])]                 dynamic=1, opt_count=N, min_count=m)
    x_c = Slice(x, [0], s, [1])                                s = Unsqueeze(Cast(size, INT64), [0])
    valid_c = Slice(valid, [0], s, [1])                        valid_c = Slice(valid, [0], s, [1])

Equivalence: `valid` is valid-first (the op's contract: every valid slot of a sample precedes its invalid ones), so
the first count_b kept tokens the plugin compacts are exactly x[b, :count_b], and both forms have the same S.
Only rows count_b..S-1 of a sample differ (the invalid tokens in the standard form, zeros from the plugin), and
`valid_c`, which masks them downstream, is the same Slice in both. The substitution is only made when x is
[B, N, C] with static N, valid is [B, N] bool, Cast/ReduceSum/ReduceMax/Max/Slice have exactly the constants and
attributes above; anything else is declined with its reason (`MatchResult.fail`) and built as is.
opt_count = N: the plugin's default, the upper bound (adaptive's count is data-dependent, N is what the capped form
would have run). The pass edits an ir.Model in place (InPlacePass) and is idempotent (no standard-form cut remains).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnxscript.rewriter.pattern import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from .plugin_nodes import PLUGIN_DOMAIN, substituted_nodes
from .plugins import PLUGIN_NAMESPACE, PLUGIN_VERSION

OP_TYPE = "TokenCompact"
PASS_TAG = "tokensieve.pass"                     # the key diversity_to_plugin / split_large_topk use too
MATCHED_TAG = "tokensieve.token_compact.matched_nodes"
PASS_NAME = "compact_to_plugin"

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


class _NoMatch(Exception):
    """The matched nodes are not exactly the compact_valid cut; the message says what differs."""


def _label(value: ir.Value | None) -> str:
    return repr(value.name) if value is not None and value.name else "a value"


def _ints(value: ir.Value | None) -> list[int]:
    tensor = None
    try:
        tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    except Exception:  # noqa: BLE001 - unreadable external data: not a usable constant
        pass
    if tensor is None:
        raise _NoMatch(f"{_label(value)} must be a constant")
    return [int(v) for v in np.asarray(tensor.numpy()).reshape(-1)]


def _axis_one(value: ir.Value | None, rank: int, what: str) -> None:
    axes = _ints(value)
    if len(axes) != 1 or axes[0] % rank != 1:
        raise _NoMatch(f"{what} must work on axis [1] (the token axis), got {axes}")


def _static_shape(value: ir.Value, rank: int, what: str) -> ir.Shape:
    shape = value.shape
    if shape is None or len(shape) != rank:
        raise _NoMatch(f"{what} {_label(value)} must have a known rank-{rank} shape, got {shape}")
    if not isinstance(shape[1], int):
        raise _NoMatch(f"{what} {_label(value)} must have a static token axis, got {shape}")
    return shape


def _check(b: dict, with_min: bool) -> tuple[int, int]:
    """(N, min_count) when the bindings are exactly the compact_valid cut; _NoMatch otherwise."""
    x, valid = b["x"], b["valid"]
    xs, vs = _static_shape(x, 3, "tokens"), _static_shape(valid, 2, "validity")
    if x.dtype not in _FLOATS:
        raise _NoMatch(f"tokens {_label(x)} must be float32 or float16, got {x.dtype}")
    if valid.dtype != ir.DataType.BOOL:
        raise _NoMatch(f"validity {_label(valid)} must be bool, got {valid.dtype}")
    n = xs[1]
    if vs[1] != n:
        raise _NoMatch(f"tokens have {n} slots but the validity mask has {vs[1]}")
    if not isinstance(xs[2], int):
        raise _NoMatch(f"tokens {_label(x)} must have a static channel axis, got {xs}")

    cast = b["valid_i64"].producer()
    if cast.attributes.get_int("to") != ir.DataType.INT64:
        raise _NoMatch("the validity must be cast to int64 before it is counted")
    reduce_sum = b["count"].producer()
    _axis_one(b["sum_axes"], 2, f"ReduceSum {reduce_sum.name!r}")
    if reduce_sum.attributes.get_int("keepdims", 1) != 0:
        raise _NoMatch(f"ReduceSum {reduce_sum.name!r} must drop the token axis (keepdims=0)")
    reduce_max = b["largest"].producer()
    if len(reduce_max.inputs) > 1 and reduce_max.inputs[1] is not None:
        raise _NoMatch(f"ReduceMax {reduce_max.name!r} must reduce over all axes (no axes input)")
    if reduce_max.attributes.get_int("keepdims", 1) != 1 or reduce_max.attributes.get_int("noop_with_empty_axes", 0):
        raise _NoMatch(f"ReduceMax {reduce_max.name!r} must keep dims and reduce (noop_with_empty_axes=0)")
    min_count = 0
    if with_min:
        m = _ints(b["min_tokens"])
        if len(m) != 1 or not 0 <= m[0] <= n:
            raise _NoMatch(f"the minimum token count must be one constant in [0, {n}], got {m}")
        min_count = m[0]
    for name, rank in (("x", 3), ("valid", 2)):
        if _ints(b[f"starts_{name}"]) != [0]:
            raise _NoMatch(f"the cut of {_label(b[name])} must start at slot [0], got {_ints(b[f'starts_{name}'])}")
        _axis_one(b[f"axes_{name}"], rank, f"the cut of {_label(b[name])}")
    return n, min_count


class CompactValidToPlugin(RewriteRuleClassBase):
    """Slice(x), Slice(valid) to S = [Max(]ReduceMax(ReduceSum(Cast(valid)))[, m)] -> TokenCompact(dynamic=1)."""

    def __init__(self, with_min: bool) -> None:
        super().__init__(f"{type(self).__name__}{'+min' if with_min else ''}")
        self.with_min = with_min

    def pattern(self, op, x, valid, sum_axes, min_tokens, starts_x, axes_x, starts_valid, axes_valid):
        valid_i64 = op.Cast(valid, _outputs=["valid_i64"])
        count = op.ReduceSum(valid_i64, sum_axes, _outputs=["count"])
        s = op.ReduceMax(count, _outputs=["largest"])
        if self.with_min:
            s = op.Max(s, min_tokens)
        return (op.Slice(x, starts_x, s, axes_x, _outputs=["x_c"]),
                op.Slice(valid, starts_valid, s, axes_valid, _outputs=["valid_c"]))

    def check(self, context, **bindings) -> MatchResult:
        try:
            _check(bindings, self.with_min)
        except _NoMatch as e:
            return MatchResult().fail(f"{OP_TYPE} (compact_valid): {e}")
        return MatchResult()

    def rewrite(self, op, x, valid, starts_valid, axes_valid, **bindings):
        n, min_count = _check(dict(bindings, x=x, valid=valid, starts_valid=starts_valid, axes_valid=axes_valid),
                              self.with_min)
        name = bindings["count"].producer().name or "compact_valid"
        compacted, count, size = op.op(OP_TYPE, x, valid, _domain=PLUGIN_DOMAIN, _version=1, _outputs=3,
                                   _name=f"{name}/{OP_TYPE}", plugin_version=PLUGIN_VERSION,
                                   plugin_namespace=PLUGIN_NAMESPACE, capacity=n, dynamic=1, opt_count=n,
                                   min_count=min_count)
        node = compacted.producer()
        node.metadata_props.update({PASS_TAG: PASS_NAME, MATCHED_TAG: str(5 + self.with_min)})
        # The size tensor is a 0-D int32 (TensorRT's rule); the Slice wants a [1] int64 end.
        size_i64 = op.Cast(size, to=ir.DataType.INT64, _name=f"{name}/size_i64")
        zero = op.Constant(value_ints=[0], _name=f"{name}/zero")
        s = op.Unsqueeze(size_i64, zero, _name=f"{name}/size_1d")
        valid_c = op.Slice(valid, starts_valid, s, axes_valid, _name=f"{name}/valid_cut")
        # Keep the exporter's provenance (check_static and the builder find the cut by it).
        valid_c.producer().metadata_props.update(bindings["valid_c"].producer().metadata_props)
        # Type every new value (later passes, e.g. convert_to_fp16, need them); the cut outputs keep their shapes.
        batch = x.shape[0]
        for value, dtype, shape in ((compacted, x.dtype, bindings["x_c"].shape), (valid_c, valid.dtype,
                                    bindings["valid_c"].shape), (count, ir.DataType.INT32, [batch]),
                                   (size, ir.DataType.INT32, []), (size_i64, ir.DataType.INT64, []),
                                   (zero, ir.DataType.INT64, [1]), (s, ir.DataType.INT64, [1])):
            value.dtype = dtype
            value.shape = ir.Shape(shape) if shape is not None else None
        return compacted, valid_c


def compact_to_plugin_rules() -> RewriteRuleSet:
    """Rules replacing each compact_valid cut (with and without the Max(·, min_tokens)) by one TokenCompact node."""
    return RewriteRuleSet([CompactValidToPlugin.rule(with_min) for with_min in (True, False)])


class CompactToPluginPass(InPlacePass):
    """Apply compact_to_plugin_rules(). The rewriter removes the nodes it matched; nothing else is touched (no
    dead-node sweep: nodes that were already dead stay, so the rest of the graph is exactly as exported)."""

    def call(self, model: ir.Model) -> PassResult:
        count = compact_to_plugin_rules().apply_to_model(model)
        return PassResult(model, modified=count > 0)

    def substitutions(self, model: ir.Model) -> list[dict]:
        """What this pass put into `model`, for the engine metadata (builder.SubstitutionReport)."""
        return plugin_substitutions(model)


def compact_to_plugin(model: onnx.ModelProto | ir.Model) -> PassResult:
    """Substitute TokenCompact plugin nodes (see module docstring); a ModelProto is converted to an ir.Model first."""
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    return CompactToPluginPass()(model)


def plugin_substitutions(model: onnx.ModelProto | ir.Model) -> list[dict]:
    """The TokenCompact nodes this pass put into `model` (for the engine metadata), in graph order."""
    return [{"node": node.name, "op": f"{PLUGIN_DOMAIN}::{OP_TYPE}", "method": "adaptive", "form": "dynamic",
             "capacity": attrs["capacity"], "opt_count": attrs["opt_count"], "min_count": attrs["min_count"],
             "tokens": node.inputs[0].name, "size": node.outputs[2].name, "replaced_nodes": int(meta[MATCHED_TAG])}
            for node, meta, attrs in substituted_nodes(model, OP_TYPE, PASS_TAG, PASS_NAME)]
