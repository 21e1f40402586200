"""One VLM part (nn.Module with named tensor inputs/outputs) -> ONNX: torch.export (non-strict), then torch.onnx.

tokensieve's own ops go through exporter.onnx_translations.TRANSLATIONS. The parts never call LLaVA's
`get_placeholder_mask` (the pipeline places image features), so whole-LLaVA's `aten._is_all_true` never appears.
Symbolic dims get the names given in `dim_names` (`batch`, `sequence`, `past_sequence`, ...).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx
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


def export_part(module: nn.Module, spec: PartSpec, *, what: str) -> onnx.ModelProto:
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
    model = prog.model_proto
    _name_dims(model, spec.dim_names)
    return model


def _name_dims(model: onnx.ModelProto, dim_names: dict[str, dict[int, str]]) -> None:
    """Rename the exporter's symbols (s15, s15 + 1, ...) after what they are, in every input/output/value_info."""
    rename = {}
    for vi in model.graph.input:
        for axis, name in dim_names.get(vi.name, {}).items():
            symbol = vi.type.tensor_type.shape.dim[axis].dim_param
            if symbol and re.fullmatch(r"\w+", symbol):
                rename.setdefault(symbol, name)
    if not rename:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(rename, key=len, reverse=True))) + r")\b")
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: rename[m.group(1)], d.dim_param)
