"""Replace the exported DivPrune / MMR greedy selection by one DiversitySelect plugin node (TensorRT targets only).

The `divprune` / `mmr` methods export as standard ops (graph_passes/methods/diversity.py), so the same ONNX runs
on ONNX Runtime. For TensorRT, when the build has the plugin library, this rule set swaps each selection for
`DiversitySelect` (plugin_src/diversity_select.h), which runs all K greedy steps in one CUDA block per sample:

    standard form                                                      substituted
    S = [(1-λ) ·] sym(cos(features))[:, p:, p:]
    pick_0 = argmin max_{j≠i} S[i, j]     (mmr: argmax imp, λ > 0)     idx = DiversitySelect(features[, imp];
    state = where(one_hot(pick), +inf, max(state, S[pick]))  × K-1           k=K, mode, lambda=λ,
    pick_t = argmin state                 (mmr: argmax λ·imp - state)        num_prefix_tokens=p)
    TopK(Concat(picks), K, ascending) [+ p]                            Cast(idx, int64) [+ p]

Indices: the plugin returns [B, K] int32, ascending, positions into its features' token axis, never below
num_prefix_tokens. DivPrune compares the full tokens and slices S[:, p:, p:], so the plugin reads the same
tokens with num_prefix_tokens=p and its output replaces the `TopK + p` sum (one Cast). MMR compares the patch
tokens x[:, p:] (S is not sliced), so the plugin reads them with num_prefix_tokens=0 and the exporter's `+ p`
stays. The importance input is the min-max normalized [CLS] attention (what the standard form multiplies by λ).

Why pattern rules with a structural walk in `check`, and not a function-call design: the pattern is the fixed
tail every selection ends in, Concat(picks) → Squeeze → TopK(ascending) [→ Add(p)]; `check` then walks back
from it and verifies the whole K-step chain link by link (each step's state, one-hot, row gather, the similarity
and the first pick), by op types, constants and value identity, never by node names. A fixed pattern cannot spell
a chain whose length is K, and a walk is exact and cheap. Emitting the selection as an ONNX local function from
the exporter would need a torch custom op around the greedy loop and a second (onnxscript) copy of its math, so
the method would no longer be defined once. Anything that does not verify is declined with its reason
(`MatchResult.fail`), and the standard form is built as is.

Two forms: `loop=false` (K unrolled steps) and `loop=true` (first step, then one ONNX Loop whose body is the same
step plus a one-hot write of slot i, then an identity GatherElements). Each form has a rule with and without the
trailing `Add(p)` (a model without prefix tokens exports no Add). The pass edits an ir.Model in place
(InPlacePass), removes the nodes the substitution leaves dead, and is idempotent (a second run finds no chain).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter.pattern import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from .plugin_nodes import PLUGIN_DOMAIN, substituted_nodes
from .plugins import PLUGIN_NAMESPACE, PLUGIN_VERSION

OP_TYPE = "DiversitySelect"
MODES = {0: "divprune", 1: "mmr"}
PASS_TAG = "tokensieve.pass"                    # the key split_large_topk uses too
FORM_TAG = "tokensieve.diversity_select.form"
MATCHED_TAG = "tokensieve.diversity_select.matched_nodes"
PASS_NAME = "diversity_to_plugin"

_ONNX_DOMAINS = ("", "ai.onnx")
_OPEN_END = 2**31 - 1      # a Slice end at least this large means "to the end"
_CLAMP_MAX = 1e-6          # the norm clamp (1e-12 in cosine_similarity) must be a tiny positive number
_RTOL = 1e-6


class _NoMatch(Exception):
    """The walk found something that is not the greedy selection; the message says what."""


@dataclass
class _Selection:
    """What one DiversitySelect node needs, found by walking back from the selection's tail."""

    mode: int
    k: int
    lam: float
    features: ir.Value
    importance: ir.Value | None
    num_prefix_tokens: int
    form: str
    nodes: set               # the standard-form nodes walked: what the substitution replaces


# --------------------------------------------------------------------------------------------- small matchers


def _label(value: ir.Value | None) -> str:
    return repr(value.name) if value is not None and value.name else "a value"


def _producer(value: ir.Value | None, op_type: str, walked: set) -> ir.Node:
    """The standard-domain `op_type` node producing `value` (added to `walked`)."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in _ONNX_DOMAINS:
        found = "a graph input or initializer" if node is None else f"{node.domain}::{node.op_type}".lstrip(":")
        raise _NoMatch(f"expected {op_type} to produce {_label(value)}, found {found}")
    walked.add(node)
    return node


def _const(value: ir.Value | None) -> np.ndarray:
    try:
        tensor = ir.convenience.get_const_tensor(value) if value is not None else None
        if tensor is not None:
            return tensor.numpy()
    except Exception:  # noqa: BLE001 - e.g. external data that cannot be read: not a usable constant
        pass
    raise _NoMatch(f"{_label(value)} must be a constant")


def _scalar(value: ir.Value | None) -> float:
    arr = _const(value)
    if arr.size != 1:
        raise _NoMatch(f"{_label(value)} must be a scalar constant, has shape {list(arr.shape)}")
    return float(arr.reshape(-1)[0])


def _maybe_scalar(value: ir.Value | None) -> float | None:
    try:
        return _scalar(value)
    except _NoMatch:
        return None


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if i < len(node.inputs) else None


def _axis(node: ir.Node, rank: int, want: int, default: int = 0) -> None:
    """Attribute `axis` of `node` must name axis `want` of a rank-`rank` tensor."""
    axis = node.attributes.get_int("axis", default)
    if axis % rank != want:
        raise _NoMatch(f"{node.op_type} {node.name!r} works on axis {axis}, expected {want}")


def _axes_input(node: ir.Node, rank: int, want: int) -> None:
    """Input 1 of a Reduce*/Unsqueeze/Squeeze node must be the single axis `want` of a rank-`rank` tensor."""
    axes = _const(_input(node, 1)).reshape(-1)
    if axes.size != 1 or int(axes[0]) % rank != want:
        raise _NoMatch(f"{node.op_type} {node.name!r} works on axes {axes.tolist()}, expected [{want}]")


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a binary node one of whose inputs is `value` (None if neither is)."""
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value else a if b is value else None


def _arg_extreme(pick: ir.Value, op_type: str, walked: set) -> ir.Node:
    """pick = ArgMin/ArgMax over the last axis of a (B, 1, n) tensor, keepdims, ties to the lowest position."""
    node = _producer(pick, op_type, walked)
    _axis(node, 3, 2)
    if node.attributes.get_int("keepdims", 1) != 1 or node.attributes.get_int("select_last_index", 0) != 0:
        raise _NoMatch(f"{op_type} {node.name!r} must keep dims and take the first extremum")
    return node


def _is_arange(value: ir.Value | None, start: int, stop: int | None) -> bool:
    """`value` is the constant [start, start + 1, ..., stop - 1] (of any length when `stop` is None)."""
    try:
        arr = _const(value).reshape(-1)
    except _NoMatch:
        return False
    stop = start + arr.size if stop is None else stop
    return arr.size == stop - start and bool((arr == np.arange(start, stop)).all())


def _zeros(value: ir.Value | None, walked: set) -> None:
    """`value` is all zeros: a constant, or a constant broadcast by Expand / Unsqueeze (zeros_like)."""
    node = value.producer() if value is not None else None
    while node is not None and node.op_type in ("Expand", "Unsqueeze", "Reshape", "Identity") \
            and node.domain in _ONNX_DOMAINS:
        walked.add(node)
        value = node.inputs[0]
        node = value.producer() if value is not None else None
    if not (_const(value) == 0).all():
        raise _NoMatch(f"{_label(value)} must be all zeros")


# --------------------------------------------------------------------------------------------- the selection


@dataclass
class _Similarity:
    value: ir.Value          # S, what every greedy step gathers rows of
    features: ir.Value       # the (B, N, C) tokens S compares
    prefix: int              # S = cos(features)[:, p:, p:]
    scale: float             # S = scale · cos(...): 1 for DivPrune, 1 - λ for MMR


def _similarity(s: ir.Value, walked: set) -> _Similarity:
    """S = scale · ((M + Mᵀ) / 2)[:, p:, p:],  M = f̂ f̂ᵀ,  f̂ = f / max(‖f‖, ε): cosine_similarity, sliced, scaled."""
    value, factor, starts = s, 1.0, {}
    while (node := value.producer()) is not None and node.domain in _ONNX_DOMAINS:
        if node.op_type == "Mul" and (c := _maybe_scalar(node.inputs[1])) is not None:
            factor, value = factor * c, node.inputs[0]
        elif node.op_type == "Mul" and (c := _maybe_scalar(node.inputs[0])) is not None:
            factor, value = factor * c, node.inputs[1]
        elif node.op_type == "Slice":
            starts.update(_slice_starts(node))
            value = node.inputs[0]
        else:
            break
        walked.add(node)
    add = _producer(value, "Add", walked)
    m = next((v for v in add.inputs if _is_transpose_of(_other(add, v), v, walked)), None)
    if m is None:
        raise _NoMatch(f"Add {add.name!r} must add a similarity matrix to its transpose")
    matmul = _producer(m, "MatMul", walked)
    normed = matmul.inputs[0]
    if not _is_transpose_of(matmul.inputs[1], normed, walked):
        raise _NoMatch(f"MatMul {matmul.name!r} must multiply the normalized tokens by their transpose")
    div = _producer(normed, "Div", walked)
    features = div.inputs[0]
    clip = _producer(div.inputs[1], "Clip", walked)
    eps = _scalar(_input(clip, 1))
    if not 0 < eps <= _CLAMP_MAX or _input(clip, 2) is not None:
        raise _NoMatch(f"Clip {clip.name!r} must only clamp the norm at a tiny positive minimum")
    norm = _producer(clip.inputs[0], "ReduceL2", walked)
    if norm.inputs[0] is not features or norm.attributes.get_int("keepdims", 1) != 1:
        raise _NoMatch(f"ReduceL2 {norm.name!r} must be the norm (keepdims) of the tokens Div normalizes")
    _axes_input(norm, 3, 2)
    if starts and (set(starts) != {1, 2} or starts[1] != starts[2]):
        raise _NoMatch(f"the similarities must be sliced equally on both token axes, got starts {starts}")
    return _Similarity(s, features, starts.get(1, 0), factor * 2.0)


def _is_transpose_of(value: ir.Value | None, of: ir.Value, walked: set) -> bool:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Transpose" or node.inputs[0] is not of:
        return False
    if list(node.attributes.get_ints("perm", [])) != [0, 2, 1]:
        return False
    walked.add(node)
    return True


def _slice_starts(node: ir.Node) -> dict[int, int]:
    """{axis: start} of a Slice of a (B, N, N) tensor that runs each sliced axis to its end with step 1."""
    starts, ends = _const(_input(node, 1)).reshape(-1), _const(_input(node, 2)).reshape(-1)
    axes = _const(_input(node, 3)).reshape(-1) if _input(node, 3) is not None else np.arange(starts.size)
    steps = _const(_input(node, 4)).reshape(-1) if _input(node, 4) is not None else np.ones(starts.size)
    dims = node.inputs[0].shape
    out = {}
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % 3
        size = dims[axis] if dims is not None and len(dims) == 3 and isinstance(dims[axis], int) else None
        if step != 1 or start < 0 or (end < _OPEN_END and (size is None or end < size)):
            raise _NoMatch(f"Slice {node.name!r} must drop leading tokens only (start >= 0, to the end, step 1)")
        out[axis] = int(start)
    return out


def _check_state(state: ir.Value, prev: ir.Value | None, pick: ir.Value | None, sim: ir.Value, n: int | None,
                 walked: set) -> ir.Value:
    """state = where(positions == pick, +inf, S[pick] if prev is None else max(prev, S[pick])); returns pick."""
    where = _producer(state, "Where", walked)
    eq = _producer(where.inputs[0], "Equal", walked)
    positions = next((v for v in eq.inputs if _is_arange(v, 0, n)), None)
    if positions is None:
        raise _NoMatch(f"Equal {eq.name!r} must compare the picked position with arange({n or 'n'})")
    found = _other(eq, positions)
    if pick is not None and found is not pick:
        raise _NoMatch(f"Equal {eq.name!r} must one-hot the previous pick {_label(pick)}")
    if _scalar(where.inputs[1]) != math.inf:
        raise _NoMatch(f"Where {where.name!r} must mark chosen tokens with +inf")
    row = where.inputs[2]
    if prev is not None:
        row = _other(_producer(row, "Max", walked), prev)
        if row is None:
            raise _NoMatch(f"the state after {_label(found)} must be the max of the previous state and a row of S")
    gather = _producer(row, "GatherElements", walked)
    _axis(gather, 3, 1)
    expand = _producer(gather.inputs[1], "Expand", walked)
    if gather.inputs[0] is not sim or expand.inputs[0] is not found:
        raise _NoMatch(f"GatherElements {gather.name!r} must read row S[{_label(found)}] of the similarities")
    return found


def _state_of(pick: ir.Value, gain: ir.Value | None, walked: set) -> ir.Value:
    """The state a pick was taken from: pick = argmin(state) (DivPrune), or argmax(gain - state) (MMR)."""
    if gain is None:
        return _arg_extreme(pick, "ArgMin", walked).inputs[0]
    sub = _producer(_arg_extreme(pick, "ArgMax", walked).inputs[0], "Sub", walked)
    if sub.inputs[0] is not gain:
        raise _NoMatch(f"Sub {sub.name!r} must subtract the state from the MMR gain")
    return sub.inputs[1]


def _first_pick(pick0: ir.Value, walked: set) -> tuple[int, ir.Value | None, float, ir.Value | None, ir.Value | None]:
    """(mode, gain (B,1,n) or None, λ, importance or None, S for DivPrune's first pick or None)."""
    node = pick0.producer()
    if node is not None and node.op_type == "ArgMin":  # DivPrune: argmin_i max_{j != i} S[i, j]
        unsq = _producer(_arg_extreme(pick0, "ArgMin", walked).inputs[0], "Unsqueeze", walked)
        _axes_input(unsq, 3, 1)
        rmax = _producer(unsq.inputs[0], "ReduceMax", walked)
        _axes_input(rmax, 3, 2)
        if rmax.attributes.get_int("keepdims", 1) != 0:
            raise _NoMatch(f"ReduceMax {rmax.name!r} must drop the reduced axis")
        where = _producer(rmax.inputs[0], "Where", walked)
        eye = _const(where.inputs[0])
        if eye.ndim != 2 or eye.shape[0] != eye.shape[1] or not (eye.astype(bool) == np.eye(eye.shape[0], dtype=bool)).all():
            raise _NoMatch(f"Where {where.name!r} must mask the diagonal of S")
        if _scalar(where.inputs[1]) != -math.inf:
            raise _NoMatch(f"Where {where.name!r} must set the diagonal of S to -inf")
        return 0, None, 0.0, None, where.inputs[2]
    argmax = _arg_extreme(pick0, "ArgMax", walked)
    first = argmax.inputs[0].producer()
    if first is not None and first.op_type == "Unsqueeze" and first.domain in _ONNX_DOMAINS:
        # MMR as IDPruner's loop (methods/diversity.mmr_select): argmax(importance) (B, 1, n) whatever λ; the gain
        # and λ are read from the second pick (_gain_of_second_pick)
        walked.add(first)
        _axes_input(first, 3, 1)
        importance, gain, lam = first.inputs[0], None, math.nan
    else:  # MMR, earlier export: argmax(gain - 0), gain = λ · importance (B, 1, n)
        sub = _producer(argmax.inputs[0], "Sub", walked)
        _zeros(sub.inputs[1], walked)
        gain = sub.inputs[0]
        importance, lam = _gain_parts(gain, walked)
    if importance.dtype not in (None, ir.DataType.FLOAT):
        raise _NoMatch(f"the MMR importance {_label(importance)} must be float32 (the plugin reads fp32 scores)")
    return 1, gain, lam, importance, None


def _gain_parts(gain: ir.Value, walked: set) -> tuple[ir.Value, float]:
    """gain = Unsqueeze(λ · importance, [1]) -> (importance, λ); λ in [0, 1]."""
    unsq = _producer(gain, "Unsqueeze", walked)
    _axes_input(unsq, 3, 1)
    importance, lam = unsq.inputs[0], 1.0  # λ = 1 may have been folded away
    mul = importance.producer()
    if mul is not None and mul.op_type == "Mul" and mul.domain in _ONNX_DOMAINS:
        for i in (0, 1):
            if (c := _maybe_scalar(mul.inputs[1 - i])) is not None:
                importance, lam = mul.inputs[i], c
                walked.add(mul)
                break
    if not 0.0 <= lam <= 1.0:
        raise _NoMatch(f"the MMR weight λ={lam} must be in [0, 1]")
    return importance, lam


def _gain_of_second_pick(concat: ir.Node, form: str, importance: ir.Value, walked: set) -> tuple[ir.Value, float]:
    """(gain, λ) of an MMR selection whose first pick is argmax(importance): the second pick is
    argmax(gain - state) (unrolled: picks[1]; loop: the body's pick), gain = λ · the same importance.

    The plugin's first pick is argmax(λ · importance): the same token for λ > 0 (first maximum on ties), token 0
    for λ = 0, so λ = 0 is declined."""
    if form == "loop":
        state_in = _loop_of(concat, walked).attributes["body"].as_graph().inputs[3]
        subs = [u.node for u in state_in.uses() if u.node.op_type == "Sub" and u.idx == 1]
        if len(subs) != 1:
            raise _NoMatch("the Loop body must take its pick from gain - state")
        sub = subs[0]
        walked.add(sub)
    else:
        sub = _producer(_arg_extreme(concat.inputs[1], "ArgMax", walked).inputs[0], "Sub", walked)
    gain = sub.inputs[0]
    weighted, lam = _gain_parts(gain, walked)
    if weighted is not importance:
        raise _NoMatch("the MMR gain must weight the importance the first pick is taken from")
    if lam == 0.0:
        raise _NoMatch("λ = 0: the method's first pick is the most important token, the plugin's is token 0")
    return gain, lam


def _later_picks_unrolled(concat: ir.Node, k: int, gain, sim_value, n: int | None, walked: set) -> None:
    picks = list(concat.inputs)
    if len(picks) != k:
        raise _NoMatch(f"Concat {concat.name!r} joins {len(picks)} picks, the TopK sorts {k}")
    prev = None
    for i in range(1, k):
        state = _state_of(picks[i], gain, walked)
        _check_state(state, prev, picks[i - 1], sim_value, n, walked)
        prev = state


def _first_state(concat: ir.Node, gain, form: str, walked: set) -> ir.Value:
    """State 1, the state the second pick is taken from (unrolled: picks[1]'s input; loop: the Loop's carried input)."""
    if form == "loop":
        return _loop_of(concat, walked).inputs[3]
    return _state_of(concat.inputs[1], gain, walked)


def _loop_of(concat: ir.Node, walked: set) -> ir.Node:
    gather = _producer(concat.inputs[1], "GatherElements", walked)
    carried = gather.inputs[0]
    loop = _producer(carried, "Loop", walked)
    if len(loop.inputs) != 5 or len(loop.outputs) != 3 or carried is not loop.outputs[2]:
        raise _NoMatch(f"Loop {loop.name!r} must carry (i, state, picks) and give its picks to the Concat")
    return loop


def _later_picks_loop(concat: ir.Node, k: int, gain, sim_value, n: int | None, walked: set) -> None:
    """picks = Concat(pick_0, GatherElements(Loop(...)[2], arange(K-1))), the Loop running steps 2..K."""
    if len(concat.inputs) != 2:
        raise _NoMatch(f"Concat {concat.name!r} must join the first pick and the Loop's picks")
    gather = _producer(concat.inputs[1], "GatherElements", walked)
    _axis(gather, 3, 2)
    index = gather.inputs[1]
    if (node := index.producer()) is not None and node.op_type == "Expand":
        walked.add(node)
        index = node.inputs[0]
    if not _is_arange(index, 0, k - 1):
        raise _NoMatch(f"GatherElements {gather.name!r} must read the Loop's {k - 1} picks in order")
    loop = _loop_of(concat, walked)
    _, cond, i0, state1, picks0 = loop.inputs
    if loop.inputs[0] is not None or not bool(_scalar(cond)) or _scalar(i0) != 1:
        raise _NoMatch(f"Loop {loop.name!r} must start at i = 1 with cond = true and no trip count")
    _zeros(picks0, walked)
    _check_state(state1, None, concat.inputs[0], sim_value, n, walked)

    body = loop.attributes["body"].as_graph()
    if len(body.inputs) != 5 or len(body.outputs) != 4:
        raise _NoMatch(f"Loop {loop.name!r} body must map (iter, cond, i, state, picks) to (cond, i, state, picks)")
    _, _, i_in, state_in, picks_in = body.inputs
    cond_out, i_out, state_out, picks_out = body.outputs
    pick = _check_state(state_out, state_in, None, sim_value, n, walked)
    if _state_of(pick, gain, walked) is not state_in:
        raise _NoMatch(f"Loop {loop.name!r} must pick from its carried state")
    inc = _producer(i_out, "Add", walked)
    less = _producer(cond_out, "Less", walked)
    if _other(inc, i_in) is None or _scalar(_other(inc, i_in)) != 1 or less.inputs[0] is not i_out \
            or _scalar(less.inputs[1]) != k:
        raise _NoMatch(f"Loop {loop.name!r} must count i = 1 .. {k - 1}")
    add = _producer(picks_out, "Add", walked)
    write = _other(add, picks_in)
    mul = _producer(write, "Mul", walked)
    onehot = _other(mul, pick)
    if onehot is None:
        raise _NoMatch(f"Loop {loop.name!r} must write its pick into the picks it carries")
    eq = _producer(_producer(onehot, "Cast", walked).inputs[0], "Equal", walked)
    slots = _other(eq, i_in)
    if slots is None or not _is_arange(slots, 1, k):
        raise _NoMatch(f"Loop {loop.name!r} must write pick i into slot i of arange(1, {k})")


def _find_selection(values: ir.Value, offset: ir.Value | None, form: str) -> _Selection:
    """Verify that TopK `values` sorts the picks of one greedy DivPrune/MMR selection; what the plugin needs."""
    walked: set = set()
    topk = _producer(values, "TopK", walked)
    squeeze = _producer(topk.inputs[0], "Squeeze", walked)
    concat = _producer(squeeze.inputs[0], "Concat", walked)
    _axis(topk, 2, 1, default=-1)
    if topk.attributes.get_int("largest", 1) != 0 or topk.attributes.get_int("sorted", 1) != 1:
        raise _NoMatch(f"TopK {topk.name!r} must sort the picks ascending")
    _axes_input(squeeze, 3, 1)
    _axis(concat, 3, 2)
    k = int(_scalar(topk.inputs[1]))
    pick0 = concat.inputs[0]

    mode, gain, lam, importance, first_sim = _first_pick(pick0, walked)
    if k == 1 and first_sim is None:
        raise _NoMatch("a one-token MMR selection is a plain ArgMax of the importance; nothing to substitute")
    if mode == 1 and gain is None:
        gain, lam = _gain_of_second_pick(concat, form, importance, walked)
    sim_value = first_sim if first_sim is not None else _first_state_row(_first_state(concat, gain, form, walked), walked)
    sim = _similarity(sim_value, walked)
    shape = sim.features.shape  # n, the candidate count, when the token axis is static (else any arange is taken)
    n = shape[1] - sim.prefix if shape is not None and len(shape) == 3 and isinstance(shape[1], int) else None
    if mode == 1:
        if abs(sim.scale - (1.0 - lam)) > _RTOL:
            raise _NoMatch(f"MMR similarities are scaled by {sim.scale:g}, expected 1 - λ = {1.0 - lam:g}")
        if sim.prefix:
            raise _NoMatch("MMR importance covers the candidate tokens only, so S must not be sliced")
    elif abs(sim.scale - 1.0) > _RTOL:
        raise _NoMatch(f"DivPrune similarities must not be scaled, found a factor {sim.scale:g}")
    if k > 1:
        (_later_picks_loop if form == "loop" else _later_picks_unrolled)(concat, k, gain, sim_value, n, walked)

    shift = 0 if offset is None else _scalar(offset)
    if shift != sim.prefix:
        raise _NoMatch(f"the kept positions are shifted by {shift:g} but the plugin's prefix is {sim.prefix}; "
                       f"the rule that includes the following Add substitutes this selection")
    if offset is not None:
        walked.add(next(u.node for u in values.uses()))
    return _Selection(mode, k, lam, sim.features, importance, sim.prefix, form, walked)


def _first_state_row(state1: ir.Value, walked: set) -> ir.Value:
    """S from state 1 = where(one_hot(pick_0), +inf, S[pick_0])."""
    where = _producer(state1, "Where", walked)
    return _producer(where.inputs[2], "GatherElements", walked).inputs[0]


# --------------------------------------------------------------------------------------------- rules


class _GreedySelectionToPlugin(RewriteRuleClassBase):
    """Concat(picks) → Squeeze → TopK(ascending) [→ Add(p)] of a verified greedy chain → Cast(DiversitySelect)."""

    form = ""

    def __init__(self, with_offset: bool) -> None:
        super().__init__(f"{type(self).__name__}{'+offset' if with_offset else ''}")
        self.with_offset = with_offset

    def pattern(self, op, first_pick, squeeze_axes, k, offset):
        picks = op.Concat(first_pick, _allow_other_inputs=True)
        values, _ = op.TopK(op.Squeeze(picks, squeeze_axes), k, _outputs=["values", "indices"])
        return op.Add(values, offset) if self.with_offset else values

    def _selection(self, bindings: dict) -> _Selection:
        out = bindings.get("values")
        return _find_selection(out, bindings.get("offset") if self.with_offset else None, self.form)

    def check(self, context, **bindings) -> MatchResult:
        try:
            self._selection(bindings)
        except _NoMatch as e:
            return MatchResult().fail(f"{self.form} {OP_TYPE}: {e}")
        return MatchResult()

    def rewrite(self, op, **bindings):
        sel = self._selection(bindings)
        inputs = [sel.features] + ([sel.importance] if sel.importance is not None else [])
        topk = bindings["values"].producer()
        idx = op.op(OP_TYPE, *inputs, _domain=PLUGIN_DOMAIN, _version=1, _name=f"{topk.name}/{OP_TYPE}",
                    plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE, k=sel.k, mode=sel.mode,
                    num_prefix_tokens=sel.num_prefix_tokens, **{"lambda": sel.lam})
        node = idx.producer()
        node.metadata_props.update({PASS_TAG: PASS_NAME, FORM_TAG: sel.form, MATCHED_TAG: str(len(sel.nodes))})
        return op.Cast(idx, to=ir.DataType.INT64, _name=f"{topk.name}/{OP_TYPE}/cast")


class UnrolledDiversitySelect(_GreedySelectionToPlugin):
    """loop=false: the K greedy steps unrolled, picks concatenated in the order they were chosen."""

    form = "unrolled"


class LoopDiversitySelect(_GreedySelectionToPlugin):
    """loop=true: the first step, then steps 2..K in one ONNX Loop, picks read back by an identity GatherElements."""

    form = "loop"


def diversity_to_plugin_rules() -> RewriteRuleSet:
    """Rules replacing each greedy DivPrune / MMR selection (both export forms) by one DiversitySelect node."""
    return RewriteRuleSet([cls.rule(with_offset) for cls in (UnrolledDiversitySelect, LoopDiversitySelect)
                           for with_offset in (True, False)])


class DiversityToPluginPass(InPlacePass):
    """Apply diversity_to_plugin_rules(), then remove the standard-form nodes the substitutions leave dead."""

    def call(self, model: ir.Model) -> PassResult:
        count = diversity_to_plugin_rules().apply_to_model(model)
        if count:
            _detach_dead_subgraphs(model.graph)
            RemoveUnusedNodesPass()(model)
        return PassResult(model, modified=count > 0)

    def substitutions(self, model: ir.Model) -> list[dict]:
        """What this pass put into `model`, for the engine metadata (builder.SubstitutionReport)."""
        return plugin_substitutions(model)


def _detach_dead_subgraphs(graph: ir.Graph) -> None:
    """Make the bodies of nodes no output depends on (the replaced Loops) stop using outer values.

    onnx-ir's RemoveUnusedNodesPass removes a dead Loop but counts its body's reads of outer values (S, the gain)
    as uses, so their producers would stay behind, dead.
    """
    live, todo = set(), list(graph.outputs)
    while todo:
        node = todo.pop().producer()
        if node is None or node in live:
            continue
        live.add(node)
        todo += [v for v in node.inputs if v is not None]
        todo += [v for inner in _subgraph_nodes(node) for v in inner.inputs if v is not None]
    for node in graph:
        if node not in live:
            for inner in _subgraph_nodes(node):
                for i in range(len(inner.inputs)):
                    inner.replace_input_with(i, None)


def _subgraph_nodes(node: ir.Node):
    """Every node in the subgraphs (Loop/If/Scan bodies, nested) of `node`."""
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield from ir.traversal.RecursiveGraphIterator(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            for sub in attr.as_graphs():
                yield from ir.traversal.RecursiveGraphIterator(sub)


def diversity_to_plugin(model: onnx.ModelProto | ir.Model) -> PassResult:
    """Substitute DiversitySelect plugin nodes (see module docstring); a ModelProto is converted to an ir.Model first."""
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    return DiversityToPluginPass()(model)


def plugin_substitutions(model: onnx.ModelProto | ir.Model) -> list[dict]:
    """The DiversitySelect nodes this pass put into `model` (for the engine metadata), in graph order."""
    out = []
    for node, meta, attrs in substituted_nodes(model, OP_TYPE, PASS_TAG, PASS_NAME):
        entry = {"node": node.name, "op": f"{PLUGIN_DOMAIN}::{OP_TYPE}", "method": MODES.get(attrs["mode"]),
                 "form": meta[FORM_TAG], "k": attrs["k"], "num_prefix_tokens": attrs["num_prefix_tokens"],
                 "features": node.inputs[0].name, "replaced_nodes": int(meta[MATCHED_TAG])}
        if attrs["mode"] == 1:
            entry |= {"lambda": round(float(attrs["lambda"]), 7), "importance": node.inputs[1].name}
        out.append(entry)
    return out
