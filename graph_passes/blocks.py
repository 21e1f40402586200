"""Find the repeated transformer blocks on the token path of a traced model.

Works from `nn_module_stack` metadata only, with no per-architecture table: the blocks are the
largest group of sibling modules `<prefix>.0 … <prefix>.L-1` of one class that each contain an
attention op and map a (B, N, C) token tensor to a (B, N, C) token tensor.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx

from tokensieve.errors import ModelError

STAGE_TAG = "tokensieve_stage"  # meta key on every node a tokensieve pass inserted
SDPA_TARGETS = (torch.ops.aten.scaled_dot_product_attention.default,)
_CONV_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.conv2d.padding, torch.ops.aten.convolution.default)
_INDEX_RE = re.compile(r"\[(\d+)\]")


@dataclass
class Block:
    """One transformer block: its nodes, token input/output and attention ops."""

    index: int
    path: str
    type_name: str
    nodes: list[fx.Node] = field(repr=False)
    input: fx.Node = field(repr=False)
    output: fx.Node = field(repr=False)
    attention: list[fx.Node] = field(repr=False)


@dataclass(frozen=True)
class TokenLayout:
    """Token sequence entering the first block: num_prefix_tokens + num_patches = num_tokens."""

    num_tokens: int
    num_prefix_tokens: int
    num_patches: int
    grid: tuple[int, int] | None
    hidden_size: int


def _norm_path(path: str) -> str:
    path = _INDEX_RE.sub(r".\1", path)
    return path.replace("L['self'].", "").replace("L__self__.", "")


def _stack_paths(node: fx.Node) -> list[tuple[str, str]]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, type_ in stack.values():
        type_name = type_ if isinstance(type_, str) else getattr(type_, "__qualname__", str(type_))
        out.append((_norm_path(str(path)), type_name.rsplit(".", 1)[-1]))
    return out


def traced_shape(node) -> tuple | None:
    """The shape the trace recorded (for a pruning stage's output: that of the tensor it replaced)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    return node.meta.get(STAGE_TAG, {}).get("replaced_shape")


_shape = traced_shape


def _static(d) -> int | None:
    return d if isinstance(d, int) else None


def discover_blocks(gm: fx.GraphModule) -> list[Block]:
    """Return the transformer blocks of `gm` in execution order; ModelError if there are none."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    members: dict[str, dict[int, list[fx.Node]]] = defaultdict(lambda: defaultdict(list))
    types: dict[tuple[str, int], str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or STAGE_TAG in node.meta:
            continue  # inserted stages sit after a block, they are not part of it
        for path, type_name in _stack_paths(node):
            prefix, _, last = path.rpartition(".")
            if last.isdigit() and prefix:
                members[prefix][int(last)].append(node)
                types[(prefix, int(last))] = type_name

    candidates = []
    for prefix, by_index in members.items():
        indices = sorted(by_index)
        if indices != list(range(len(indices))):
            continue
        type_names = {types[(prefix, i)] for i in indices}
        if len(type_names) != 1:
            continue
        blocks = [_make_block(prefix, i, types[(prefix, i)], by_index[i], order) for i in indices]
        if all(b is not None and b.attention for b in blocks):
            candidates.append(blocks)
    if not candidates:
        raise ModelError(
            "No repeated transformer blocks with attention found in the traced model; tokensieve needs a "
            "ModuleList of blocks that call scaled_dot_product_attention (use attn_implementation='sdpa')"
        )
    # The token path is the longest stack of blocks; ties go to the first one executed.
    return max(candidates, key=lambda bs: (len(bs), -order[bs[0].nodes[0]]))


def _make_block(prefix: str, index: int, type_name: str, nodes: list[fx.Node], order) -> Block | None:
    nodes = sorted(set(nodes), key=order.__getitem__)
    inside = set(nodes)
    outputs = [n for n in nodes if len(_shape(n) or ()) == 3 and any(u not in inside for u in n.users)]
    inputs = [
        a for n in nodes for a in n.all_input_nodes
        if a not in inside and a.op == "call_function" and len(_shape(a) or ()) == 3
    ]
    if not outputs or not inputs:
        return None
    out = max(outputs, key=order.__getitem__)
    inp = min(inputs, key=order.__getitem__)
    if _shape(out)[1:] != _shape(inp)[1:]:
        return None
    attention = [n for n in nodes if n.target in SDPA_TARGETS]
    return Block(index, f"{prefix}.{index}", type_name, nodes, inp, out, attention)


def token_layout(gm: fx.GraphModule, blocks: list[Block], num_prefix_tokens: int | None = None) -> TokenLayout:
    """Count the tokens entering block 0 and split them into prefix tokens and patch tokens.

    The patch count comes from the last conv before the first block (its output grid h·w); the
    remaining tokens ([CLS], distillation, registers) are prefix tokens, always kept by pruning.
    """
    shape = _shape(blocks[0].input)
    n, c = _static(shape[1]), _static(shape[2])
    if n is None or c is None:
        raise ModelError("The token axis of the first block is not static; export with a fixed image size")
    first = blocks[0].nodes[0]
    grid = None
    for node in gm.graph.nodes:
        if node is first:
            break
        if node.op == "call_function" and node.target in _CONV_OPS:
            s = _shape(node)
            if s and len(s) == 4 and _static(s[2]) and _static(s[3]):
                grid = (s[2], s[3])
    if num_prefix_tokens is None:
        if grid is None:
            raise ModelError(
                "Cannot tell prefix tokens from patch tokens (no conv patch embedding before the first block); "
                "pass num_prefix_tokens explicitly"
            )
        num_prefix_tokens = n - grid[0] * grid[1]
    if not 0 <= num_prefix_tokens < n:
        raise ModelError(f"num_prefix_tokens={num_prefix_tokens} is outside [0, {n}) for a {n}-token sequence")
    return TokenLayout(n, num_prefix_tokens, n - num_prefix_tokens, grid, c)
