"""One VLM part (nn.Module with named tensor inputs/outputs) -> ONNX: torch.export (non-strict), then torch.onnx.

tokensieve's own ops go through exporter.onnx_translations.TRANSLATIONS. The parts never call LLaVA's
`get_placeholder_mask` (the pipeline places image features), so whole-LLaVA's `aten._is_all_true` never appears.
Symbolic dims get the names given in `dim_names` (`batch`, `sequence`, `past_sequence`, ...).

The result is the exporter's onnx_ir.Model, not a ModelProto: its initializers still point at the module's torch
tensors (no copy), so a part over protobuf's 2 GB limit (a 7B LM) can be written with external data straight from
them (vlm_api writes it); `ONNXProgram.model_proto` would first copy every weight into one proto that cannot be
serialized. `ir.to_proto(model)` gives the proto of a small part.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx_ir as ir
import torch
from torch import nn

from tokensieve.errors import ExportError, first_line
from tokensieve.exporter.onnx_translations import TRANSLATIONS
from tokensieve.exporter.to_onnx import OPSET
from tokensieve.exporter.trace import quiet


@dataclass(frozen=True)
class PartSpec:
    """How to trace one part: example args, torch.export dynamic shapes, ONNX names, names of the dynamic dims."""

    args: tuple = field(repr=False)
    dynamic_shapes: tuple
    input_names: list[str]
    output_names: list[str]
    dim_names: dict[str, dict[int, str]]  # {input name: {axis: name}}; the same symbols are renamed everywhere


def export_part(module: nn.Module, spec: PartSpec, *, what: str) -> ir.Model:
    """torch.export `module(*spec.args)`, convert at opset 18 with the spec's names; ExportError (one line)."""
    module.eval()
    try:
        with torch.no_grad(), quiet():
            ep = torch.export.export(module, spec.args, dynamic_shapes=spec.dynamic_shapes, strict=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"torch.export of {what} failed: {type(e).__name__}: {first_line(e)}") from e
    try:
        with quiet():
            prog = torch.onnx.export(ep, dynamo=True, opset_version=OPSET, input_names=spec.input_names,
                                     output_names=spec.output_names, optimize=True, custom_translation_table=TRANSLATIONS,
                                     verbose=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"ONNX conversion of {what} failed: {type(e).__name__}: {first_line(e)}") from e
    model = prog.model
    _name_dims(model, spec.dim_names)
    return model


def initializer_bytes(model: ir.Model) -> int:
    """Bytes of every initializer (subgraphs included): what a proto of `model` would carry as weights."""
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values()
               if v.const_value is not None)


def _name_dims(model: ir.Model, dim_names: dict[str, dict[int, str]]) -> None:
    """Rename the exporter's symbols (s15, s15 + 1, ...) after what they are, in the shape of every value."""
    rename = {}
    for v in model.graph.inputs:
        for axis, name in dim_names.get(v.name, {}).items():
            symbol = v.shape[axis].value if v.shape is not None and isinstance(v.shape[axis], ir.SymbolicDim) else None
            if symbol and re.fullmatch(r"\w+", symbol):
                rename.setdefault(symbol, name)
    if not rename:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(rename, key=len, reverse=True))) + r")\b")
    values = [*model.graph.inputs, *model.graph.outputs,
              *(out for node in ir.traversal.RecursiveGraphIterator(model.graph) for out in node.outputs)]
    for v in {id(v): v for v in values}.values():  # once each: a graph output is also a node's output
        if v.shape is None or not any(isinstance(d, ir.SymbolicDim) and d.value for d in v.shape):
            continue
        v.shape = ir.Shape([ir.SymbolicDim(pattern.sub(lambda m: rename[m.group(1)], d.value))
                            if isinstance(d, ir.SymbolicDim) and d.value else d for d in v.shape])
