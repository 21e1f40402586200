"""Name the ONNX nodes the TensorRT / TensorRT-RTX parser or builder will reject, before a build is attempted.

Each rule below was confirmed by building a one-node model with TensorRT-RTX 1.7 (tests/targets/test_tensorrt_lint.py):
- NonZero (RTX only): "NonZero plugin creator version 1 was not found" at parse time.
- ScatterND with reduction: "ScatterND with reduction is not supported" (parse). ScatterElements with reduction:
  the RTX parser fails with a file-level "Unsupported reduction type" that names no node, hence this lint.
- TopK with constant K > 3840: the builder fails ("K exceeds the maximum value allowed (3840)").
- Nodes in a domain other than the ONNX ones and "tokensieve" (our plugins): "Plugin not found".
- Loop whose trip count is not a constant: a warning only (TensorRT builds it, but it is sequential and usually a
  sign the export was not made static).
Not flagged: TopK on int64 inputs (RTX builds it), TopK over long axes (K=3840 of 8000 builds).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from tokensieve.errors import ConfigError, TargetError

from .flavors import FLAVOR_LABELS, RTX

TOPK_MAX_K = 3840
ONNX_DOMAINS = frozenset({"", "ai.onnx"})
PLUGIN_DOMAINS = frozenset({"tokensieve"})


@dataclass(frozen=True)
class LintIssue:
    node: str          # node name ("" if unnamed), with the enclosing subgraph path for nested nodes
    op: str            # op_type, prefixed by the domain for custom ops
    reason: str        # one line: what the parser/builder does with it
    fix: str           # one line: how to fix it
    severity: str = "error"  # "error": the build fails; "warning": it builds but is probably not what you want

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op}): {self.reason}; {self.fix}"


def _walk(graph: onnx.GraphProto, prefix: str = "") -> Iterator[tuple[str, onnx.NodeProto, dict]]:
    """(path, node, constants visible to it) for every node, subgraphs included."""
    consts = {t.name: t for t in graph.initializer}
    consts |= {n.output[0]: n.attribute[0].t for n in graph.node
               if n.op_type == "Constant" and n.domain in ONNX_DOMAINS and n.attribute
               and n.attribute[0].name == "value"}
    for node in graph.node:
        yield prefix + node.name, node, consts
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                for path, inner, inner_consts in _walk(sub, f"{prefix}{node.name}/{attr.name}/"):
                    yield path, inner, consts | inner_consts


def _const_scalar(name: str, consts: dict) -> int | None:
    t = consts.get(name)
    if t is None or t.data_location == onnx.TensorProto.EXTERNAL:  # not loaded: treat as unknown
        return None
    arr = np.asarray(numpy_helper.to_array(t)).reshape(-1)
    return int(arr[0]) if arr.size == 1 else None


def _attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def lint_for_tensorrt(model: onnx.ModelProto, flavor: str = RTX) -> list[LintIssue]:
    """Every node of `model` that `flavor` ("tensorrt_rtx" or "tensorrt") will reject, errors first."""
    if flavor not in FLAVOR_LABELS:
        raise ConfigError(f"Unknown TensorRT flavor {flavor!r}; use one of {sorted(FLAVOR_LABELS)}")
    label = FLAVOR_LABELS[flavor]
    issues: list[LintIssue] = []
    for path, node, consts in _walk(model.graph):
        op, domain = node.op_type, node.domain
        if domain not in ONNX_DOMAINS:
            if domain not in PLUGIN_DOMAINS:
                issues.append(LintIssue(path, f"{domain}::{op}",
                                        f"custom domain {domain!r} has no {label} plugin ('Plugin not found')",
                                        "replace it with standard ONNX ops or a tokensieve plugin node"))
            continue
        if op == "NonZero" and flavor == RTX:
            issues.append(LintIssue(path, op, f"{label} has no NonZero (data-dependent output size)",
                                    "use a fixed-budget TopK selection instead of a mask + NonZero"))
        elif op in ("ScatterND", "ScatterElements"):
            reduction = _attr(node, "reduction")
            reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
            if reduction not in (None, "none"):
                issues.append(LintIssue(path, op, f"{label} does not support {op} with reduction={reduction!r}",
                                        "express the accumulation as a one-hot MatMul / ReduceSum, "
                                        "or scatter without a reduction"))
        elif op == "TopK" and len(node.input) > 1:
            k = _const_scalar(node.input[1], consts)
            if k is not None and k > TOPK_MAX_K:
                issues.append(LintIssue(path, op, f"K={k} exceeds {label}'s TopK limit of {TOPK_MAX_K}",
                                        "run tokensieve.graph_passes.onnx.split_large_topk.split_large_topk "
                                        "on the model first"))
        elif op == "Loop":
            trip = node.input[0] if node.input else ""
            if trip and _const_scalar(trip, consts) is None:
                issues.append(LintIssue(path, op, "trip count is not a constant: a sequential, data-dependent loop",
                                        "re-export with static shapes so the loop unrolls", severity="warning"))
    return sorted(issues, key=lambda i: i.severity != "error")


def raise_on_lint(issues: list[LintIssue], include_warnings: bool = False) -> None:
    """Raise TargetError naming the first blocking issue (one line) and how many there are; return if none."""
    blocking = [i for i in issues if include_warnings or i.severity == "error"]
    if not blocking:
        return
    raise TargetError(f"{len(blocking)} node(s) TensorRT will reject; first: {blocking[0]}")
