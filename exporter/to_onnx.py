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
    relative_stack_traces(model)
    return model


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"   # node metadata the torch exporter fills with `File "/abs/path", ...`
_FILE = re.compile(r'File "([^"]+)"')


def relative_stack_traces(model: onnx.ModelProto) -> int:
    """Shorten the file names in the nodes' stack traces (and drop node doc strings) so that no absolute path of the
    exporting machine stays in the ONNX: `.../site-packages/transformers/models/vit/modeling_vit.py` ->
    `transformers/models/vit/modeling_vit.py`, any other file -> `<its folder>/<its name>`. Returns the number of
    nodes changed (edits `model` in place, functions and subgraphs included)."""
    changed = 0
    for node in _all_nodes(model):
        edited = bool(node.doc_string)
        node.doc_string = ""
        for prop in node.metadata_props:
            if prop.key == STACK_TRACE_KEY:
                short = _FILE.sub(lambda m: f'File "{_short_path(m.group(1))}"', prop.value)
                edited |= short != prop.value
                prop.value = short
        changed += edited
    return changed


def _short_path(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(marker):])
    return "/".join(parts[-2:]) if len(parts) > 1 else path


def _all_nodes(model: onnx.ModelProto):
    def walk(graph):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                for g in attr.graphs:
                    yield from walk(g)
    yield from walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            yield node


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
