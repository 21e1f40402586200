"""ONNX nodes for tokensieve's TensorRT plugins and one-node test models (builds: target.build_plugin_engine).

The TensorRT ONNX parser maps a node in domain "tokensieve" with attributes plugin_version="1" and
plugin_namespace="tokensieve" onto the plugin creator of the same op name (a PLUGIN_V3 layer); the other
attributes become plugin fields. Ops (see plugin_src/*.h):
  TokenCompact(tokens [B,N,C] f32|f16, keep [B,N] int32|bool; capacity=K) -> compacted [B,K,C], count [B] int32
  TokenCompact(...; capacity=K, dynamic=1, opt_count, min_count) -> compacted [B,S,C], count [B] int32, size S
      (0-D int32 size tensor, S = max(max_b count_b, min_count) <= K, tuned for opt_count tokens)
  DiversitySelect(features [B,N,C] f32|f16[, importance [B,N] f32]; k, mode, lambda, num_prefix_tokens)
      -> indices [B,K] int32 ascending
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from tokensieve.errors import ConfigError

from .plugins import PLUGIN_NAMESPACE, PLUGIN_VERSION

PLUGIN_DOMAIN = "tokensieve"
_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int32": TensorProto.INT32,
           "bool": TensorProto.BOOL}


def token_compact_node(tokens: str, keep: str, compacted: str, count: str, capacity: int,
                       name: str | None = None, dynamic: bool = False, opt_count: int | None = None,
                       size: str | None = None, min_count: int = 0) -> onnx.NodeProto:
    """TokenCompact: the first `capacity` kept tokens in their original order (zero rows after), and their count.

    `dynamic=True` cuts the token axis to S = max(max_b count_b, min_count) and adds the size tensor output `size`
    (0-D int32); the builder tunes for `opt_count` tokens (default: capacity). The capped node has no such attributes.
    """
    if not dynamic:
        if size is not None or opt_count is not None or min_count:
            raise ConfigError("token_compact_node: size, opt_count and min_count need dynamic=True")
        return helper.make_node("TokenCompact", [tokens, keep], [compacted, count], name=name, domain=PLUGIN_DOMAIN,
                                plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE,
                                capacity=int(capacity))
    if not size:
        raise ConfigError("token_compact_node(dynamic=True) needs the name of its size output (size=...)")
    return helper.make_node("TokenCompact", [tokens, keep], [compacted, count, size], name=name, domain=PLUGIN_DOMAIN,
                            plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE, capacity=int(capacity),
                            dynamic=1, opt_count=int(capacity if opt_count is None else opt_count),
                            min_count=int(min_count))


def diversity_select_node(features: str, indices: str, k: int, mode: int = 0, lam: float = 0.5,
                          num_prefix_tokens: int = 0, importance: str | None = None,
                          name: str | None = None) -> onnx.NodeProto:
    """DiversitySelect: K token indices, ascending; mode 0 = DivPrune, 1 = MMR (needs `importance`, weight `lam`)."""
    inputs = [features] + ([importance] if importance else [])
    return helper.make_node("DiversitySelect", inputs, [indices], name=name, domain=PLUGIN_DOMAIN,
                            plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE, k=int(k), mode=int(mode),
                            num_prefix_tokens=int(num_prefix_tokens), **{"lambda": float(lam)})


def substituted_nodes(model: onnx.ModelProto | ir.Model, op_type: str, pass_tag: str, pass_name: str):
    """(node, metadata, attributes) of each `op_type` plugin node that the pass `pass_name` put into `model`
    (metadata `pass_tag` = `pass_name`), in graph order: what the passes' `plugin_substitutions` report."""
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    for node in model.graph:
        meta = dict(node.metadata_props)
        if node.op_type == op_type and node.domain == PLUGIN_DOMAIN and meta.get(pass_tag) == pass_name:
            yield node, meta, {name: attr.value for name, attr in node.attributes.items()}


def write_token_compact_onnx(path: str | os.PathLike, *, batch: int | None = 2, tokens: int = 17, channels: int = 8,
                             capacity: int = 6, dtype: str = "float32", mask_dtype: str = "int32",
                             dynamic: bool = False, opt_count: int | None = None, min_count: int = 0) -> Path:
    """A one-node model x [B,N,C], keep [B,N] -> y [B,K,C], count [B]; batch=None makes B dynamic.

    dynamic=True: y [B,S,C] (S a symbolic dim), count [B] and size (0-D int32 holding S).
    """
    b = batch if batch is not None else "batch"
    inputs = [_value("x", dtype, [b, tokens, channels]), _value("keep", mask_dtype, [b, tokens])]
    if not dynamic:
        node = token_compact_node("x", "keep", "y", "count", capacity)
        return _save(path, [node], inputs, [_value("y", dtype, [b, capacity, channels]), _value("count", "int32", [b])])
    node = token_compact_node("x", "keep", "y", "count", capacity, dynamic=True, opt_count=opt_count, size="size",
                              min_count=min_count)
    return _save(path, [node], inputs, [_value("y", dtype, [b, "S", channels]), _value("count", "int32", [b]),
                                        _value("size", "int32", [])])


def write_diversity_select_onnx(path: str | os.PathLike, *, batch: int | None = 2, tokens: int = 17,
                                channels: int = 8, k: int = 6, mode: int = 0, lam: float = 0.5,
                                num_prefix_tokens: int = 1, dtype: str = "float32",
                                with_importance: bool | None = None) -> Path:
    """A one-node model x [B,N,C] (+ importance [B,N] for MMR) -> idx [B,K]; batch=None makes B dynamic."""
    b = batch if batch is not None else "batch"
    with_importance = mode == 1 if with_importance is None else with_importance
    node = diversity_select_node("x", "idx", k, mode, lam, num_prefix_tokens, "importance" if with_importance else None)
    inputs = [_value("x", dtype, [b, tokens, channels])]
    if with_importance:
        inputs.append(_value("importance", "float32", [b, tokens]))
    return _save(path, [node], inputs, [_value("idx", "int32", [b, k])])


def _value(name: str, dtype: str, shape: list) -> onnx.ValueInfoProto:
    if dtype not in _DTYPES:
        raise ConfigError(f"Unsupported plugin tensor dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return helper.make_tensor_value_info(name, _DTYPES[dtype], shape)


def _save(path: str | os.PathLike, nodes, inputs, outputs) -> Path:
    graph = helper.make_graph(nodes, "tokensieve_plugin", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(PLUGIN_DOMAIN, 1)])
    onnx.save(model, str(path))
    return Path(path)
