"""ExportedProgram -> ONNX (torch.onnx dynamo exporter, then onnxscript's optimizer)."""
from __future__ import annotations

import re

import onnx
import torch

from tokensieve.errors import ExportError, first_line
from tokensieve.exporter.trace import quiet
from tokensieve.exporter.onnx_translations import TRANSLATIONS

OPSET = 18  # opset 23 turns SDPA into one Attention op; keep 18 until the TensorRT parsers take it


def to_onnx(ep: torch.export.ExportedProgram, output_names: list[str], opset: int = OPSET) -> onnx.ModelProto:
    """Convert to ONNX (tokensieve ops via TRANSLATIONS) with a named dynamic batch axis, fold constants."""
    try:
        with quiet():
            prog = torch.onnx.export(
                ep,
                dynamo=True,
                opset_version=opset,
                input_names=["pixel_values"],
                output_names=output_names,
                optimize=True,
                custom_translation_table=TRANSLATIONS,
                verbose=False,
            )
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"ONNX conversion failed: {type(e).__name__}: {first_line(e)}") from e
    model = prog.model_proto
    _rename_batch_dim(model)
    return model


def _rename_batch_dim(model: onnx.ModelProto) -> None:
    """Call the symbolic batch axis `batch` everywhere (inputs, outputs, value_info)."""
    symbols = {
        vi.type.tensor_type.shape.dim[0].dim_param
        for vi in model.graph.input
        if vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].dim_param
    }
    if not symbols:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(symbols))) + r")\b")
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub("batch", d.dim_param)
