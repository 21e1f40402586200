"""Writing ONNX files atomically, inline or with external data (models over protobuf's 2 GB limit), and several
ONNX files of one model sharing one weights file (`save_shared`: an export's model / debug / dense graphs hold the
same weights, so they are written once).

    with ExitStack() as staged:
        proto = stage_onnx(ir_model, Path("out/model.onnx"), external=True, staged=staged)
        ...  # check `proto` (external weights not loaded); an exception here leaves nothing on disk
    # on a clean exit: the old out/model.onnx goes, out/model.onnx.data, then out/model.onnx are renamed into place

The weights are streamed from the model's tensors by onnx_ir (no 2 GB proto is ever built), written under a
temporary name, and the .onnx then points at the data file's FINAL name. The pair is one fileio.atomic_paths group
with the .onnx as its commit marker: a run killed between the renames leaves the new .data without any .onnx, never
a new .onnx beside an old or missing .data, nor an old .onnx beside the new .data.
"""
from __future__ import annotations

import hashlib
from contextlib import ExitStack
from pathlib import Path

import onnx
import onnx_ir as ir

from tokensieve.fileio import atomic_path, atomic_paths

ALIGN = 64  # each shared tensor starts at a multiple of this offset (mmap-friendly)

EXTERNAL_TENSOR_MIN_BYTES = 1024  # smaller initializers (shape constants) stay inline, where shape inference reads them
PROTO_LIMIT = 2**31 - 1            # protobuf refuses to serialize a message this large


def data_path(onnx_path: Path) -> Path:
    """Where the external weights of `onnx_path` go: `<name>.onnx.data` next to it."""
    return onnx_path.with_name(onnx_path.name + ".data")


def stage_onnx(model: ir.Model, path: Path, external: bool, staged: ExitStack) -> onnx.ModelProto:
    """Write `model` under temporary names next to `path`, renamed into place when `staged` closes (deleted if it
    closes on an error). Inline, or with every initializer of EXTERNAL_TENSOR_MIN_BYTES or more in `<path>.data`,
    streamed from the tensors by onnx_ir. Returns the proto as written (external weights not loaded)."""
    if not external:
        tmp = staged.enter_context(atomic_path(path))
        proto = ir.to_proto(model)
        tmp.write_bytes(proto.SerializeToString())
        return proto
    data = data_path(path)
    # one group, the .onnx its marker: the old .onnx is removed first, then the .data and the .onnx are renamed in
    tmp_data, tmp = staged.enter_context(atomic_paths(data, path))
    ir.save(model, tmp, format="protobuf", external_data=tmp_data.name, size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES)
    proto = onnx.load(str(tmp), load_external_data=False)
    for tensor in _initializers(proto.graph):  # the data file's final name, not the temporary one it was written as
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data.name
    tmp.write_bytes(proto.SerializeToString())
    return proto


def save_onnx(proto: onnx.ModelProto, path: Path) -> Path:
    """Write `proto` to `path` atomically; over the protobuf limit, with its weights in `<path>.data` (the proto in
    memory is not changed). A stale `.data` of an earlier, larger model is removed when the model is written inline."""
    external = proto.ByteSize() >= PROTO_LIMIT
    with ExitStack() as staged:
        stage_onnx(ir.from_proto(proto), path, external, staged)
    if not external:
        data_path(path).unlink(missing_ok=True)
    return path


def save_shared(protos: dict[Path, onnx.ModelProto], weights: Path) -> None:
    """Write each ONNX of `protos` (path -> proto, one folder) with every initializer of EXTERNAL_TENSOR_MIN_BYTES or
    more in the one file `weights`, each distinct tensor (type, shape, bytes) stored once, at a 64-byte aligned
    offset. The protos in memory are not changed. One fileio.atomic_paths group: `weights` first, the .onnx files
    after it, the last of them the commit marker; a stale `<name>.onnx.data` of an earlier, larger model goes."""
    paths = list(protos)
    index: dict[tuple, tuple[int, int]] = {}
    with ExitStack() as staged:
        tmp_weights, *tmps = staged.enter_context(atomic_paths(weights, *paths))
        with open(tmp_weights, "wb") as data:
            for tmp, proto in zip(tmps, protos.values()):
                copy = onnx.ModelProto()
                copy.CopyFrom(proto)
                for tensor in _initializers(copy.graph):
                    _share(tensor, data, index, weights.name)
                tmp.write_bytes(copy.SerializeToString())
                del copy
    for path in paths:
        data_path(path).unlink(missing_ok=True)


def _share(tensor: onnx.TensorProto, data, index: dict, location: str) -> None:
    """Point `tensor` at its bytes in the shared file `data` (appended the first time they are seen)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
        return
    raw = tensor.raw_data
    if len(raw) < EXTERNAL_TENSOR_MIN_BYTES:
        return
    key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).digest())
    if key not in index:
        data.write(b"\0" * (-data.tell() % ALIGN))
        index[key] = (data.tell(), len(raw))
        data.write(raw)
    offset, length = index[key]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v


def _initializers(graph: onnx.GraphProto):
    """Every initializer of `graph` and of its subgraphs (where onnx_ir puts external data)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                yield from _initializers(sub)
