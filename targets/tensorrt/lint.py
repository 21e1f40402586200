"""Name the ONNX nodes the TensorRT / TensorRT-RTX parser or builder will reject, before a build is attempted.

Each rule below was confirmed by building a one-node model with TensorRT-RTX 1.7 (tests/targets/tensorrt/test_lint.py):
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
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from tokensieve.errors import ConfigError, TargetError
from tokensieve.runtime.tensorrt_flavors import FLAVOR_LABELS, RTX

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


def _walk(graph: ir.Graph, prefix: str = "") -> Iterator[tuple[str, ir.Node]]:
    """(path, node) for every node, subgraphs included (a subgraph's nodes read outer constants as shared values)."""
    for node in graph:
        yield prefix + (node.name or ""), node
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                subs = [attr.as_graph()]
            elif attr.type == ir.AttributeType.GRAPHS:
                subs = list(attr.as_graphs())
            else:
                continue
            for sub in subs:
                yield from _walk(sub, f"{prefix}{node.name or ''}/{attr.name}/")


def _const_scalar(value: ir.Value | None) -> int | None:
    """The value's constant as one int; None if it is not a constant, not a scalar, or its data is external."""
    if value is None or isinstance(value.const_value, ir.ExternalTensor):  # not loaded: treat as unknown
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None or isinstance(tensor, ir.ExternalTensor):
        return None
    arr = np.asarray(tensor.numpy()).reshape(-1)
    return int(arr[0]) if arr.size == 1 else None


def lint_for_tensorrt(model: onnx.ModelProto | ir.Model, flavor: str = RTX) -> list[LintIssue]:
    """Every node of `model` that `flavor` ("tensorrt_rtx" or "tensorrt") will reject, errors first."""
    if flavor not in FLAVOR_LABELS:
        raise ConfigError(f"Unknown TensorRT flavor {flavor!r}; use one of {sorted(FLAVOR_LABELS)}")
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    label = FLAVOR_LABELS[flavor]
    issues: list[LintIssue] = []
    for path, node in _walk(model.graph):
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
            reduction = node.attributes.get_string("reduction")
            if reduction not in (None, "none"):
                issues.append(LintIssue(path, op, f"{label} does not support {op} with reduction={reduction!r}",
                                        "express the accumulation as a one-hot MatMul / ReduceSum, "
                                        "or scatter without a reduction"))
        elif op == "TopK" and len(node.inputs) > 1:
            k = _const_scalar(node.inputs[1])
            if k is not None and k > TOPK_MAX_K:
                issues.append(LintIssue(path, op, f"K={k} exceeds {label}'s TopK limit of {TOPK_MAX_K}",
                                        "run tokensieve.targets.tensorrt.split_large_topk.split_large_topk "
                                        "on the model first"))
        elif op == "Loop":
            trip = node.inputs[0] if node.inputs else None
            if trip is not None and _const_scalar(trip) is None:
                issues.append(LintIssue(path, op, "trip count is not a constant: a sequential, data-dependent loop",
                                        "re-export with static shapes so the loop unrolls", severity="warning"))
    return sorted(issues, key=lambda i: i.severity != "error")


def raise_on_lint(issues: list[LintIssue], include_warnings: bool = False) -> None:
    """Raise TargetError naming the first blocking issue (one line) and how many there are; return if none."""
    blocking = [i for i in issues if include_warnings or i.severity == "error"]
    if not blocking:
        return
    raise TargetError(f"{len(blocking)} node(s) TensorRT will reject; first: {blocking[0]}")


class LintForTensorRTPass(InPlacePass):
    """The lint as the last lowering check: raise (one line) on the first node `flavor` rejects; edits nothing."""

    def __init__(self, flavor: str = RTX) -> None:
        super().__init__()
        self.flavor = flavor

    def call(self, model: ir.Model) -> PassResult:
        raise_on_lint(lint_for_tensorrt(model, self.flavor))
        return PassResult(model, modified=False)
