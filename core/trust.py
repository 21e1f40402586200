"""What tokensieve trusts in its inputs, checked in one place before anything else reads them.

Code runs only from paths the user gave: a TensorRT plugin library (`--plugins`, or $TOKENSIEVE_PLUGIN_LIB which the
user set) and the plugin code an engine embeds (only with TrtRunner(allow_host_code=True) or $ALLOW_HOST_CODE_ENV=1,
never because the engine's metadata says so). Everything else is data, and data never runs or reaches out:

- a model folder whose config asks for custom code (`auto_map`) is refused by `check_model_folder`, before
  transformers sees it (which would otherwise ask on stdin); every from_pretrained also passes trust_remote_code=False;
- an ONNX file's external data must be regular files inside the ONNX file's own folder (`check_onnx_external_data`,
  before ONNX Runtime or TensorRT open the file): no `..`, no absolute path, no symlink out, no FIFO or device;
- a file an export folder's manifest or report names must stay inside that folder (`inside_folder`).

Each refusal is one line naming the offending key, tensor or path. Base layer: no tokensieve imports but errors.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath

from .errors import ConfigError, ModelError

ALLOW_HOST_CODE_ENV = "TOKENSIEVE_ALLOW_ENGINE_HOST_CODE"   # "1": run plugin code embedded in engines (you trust them)
CUSTOM_CODE_KEYS = ("auto_map",)  # what makes transformers import a module from the model folder (or the hub)
# The JSON files of a model folder that transformers reads for a model or its image processor / tokenizer.
MODEL_CONFIG_FILES = ("config.json", "preprocessor_config.json", "processor_config.json",
                      "video_preprocessor_config.json", "tokenizer_config.json", "generation_config.json")
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # torch.save / pickle files
MAX_CONFIG_BYTES = 16 << 20


def _short(value: object, limit: int = 44) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def inside_folder(folder: str | os.PathLike, name: object, what: str, fix: str,
                  error: type[Exception] = ConfigError) -> Path:
    """`folder / name` if `name` is a relative path that stays inside `folder`, symlinks resolved; else a one-line
    `error` "<what> <name>, which ...; <fix>" (`what` e.g. "manifest.json files['vision'] names"). Reads nothing."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"{what} {_short(name)}, which is not a file name; {fix}")
    if os.path.isabs(name) or name.startswith("\\"):
        raise error(f"{what} {_short(name)}, an absolute path outside the folder; {fix}")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise error(f"{what} {_short(name)}, which climbs out of the folder ('..'); {fix}")
    base = os.path.realpath(folder)
    real = os.path.realpath(os.path.join(base, name))
    if os.path.commonpath([base, real]) != base:
        raise error(f"{what} {_short(name)}, a symlink that leads outside the folder; {fix}")
    return Path(folder) / name


def check_files_inside(folder: str | os.PathLike, names: Mapping[str, object], what: str, fix: str,
                       error: type[Exception] = ConfigError) -> None:
    """inside_folder for every value of `names` (key -> file name), e.g. a manifest's "files"."""
    for key, name in names.items():
        inside_folder(folder, name, f"{what}[{key!r}] names", fix, error)


def _companions(name: str) -> list[str]:
    """A file and the files read with it: model.onnx -> + model.onnx.data; model.engine -> + model.engine.json."""
    return [name, *([name + ".data"] if name.endswith(".onnx") else []),
            *([name + ".json"] if name.endswith(".engine") else [])]


def check_folder_files(folder: str | os.PathLike, names, fix: str, error: type[Exception] = ConfigError) -> None:
    """Each of `names` (and its companions: .onnx.data, .engine.json) that `folder` holds resolves inside `folder`: an
    export folder's files are never symlinks to elsewhere. Reads nothing."""
    for name in dict.fromkeys(c for n in names for c in _companions(n)):
        inside_folder(folder, name, f"{Path(folder).name}/ holds", fix, error)


def check_manifest_files(folder: str | os.PathLike, files: object, engines: object, where: str, fix: str,
                         error: type[Exception] = ConfigError) -> None:
    """A VLM manifest's "files" (part -> name) and "engines" (part -> {"file", "metadata"}; None: none) name files
    inside `folder` (and are no symlinks out, with their companions); `where` is the manifest's file name."""
    engines = {} if engines is None else engines
    for key, value in (("files", files), ("engines", engines)):
        if not isinstance(value, Mapping):
            raise error(f"{where} {key} is {type(value).__name__}, not an object; {fix}")
    for key, name in files.items():
        inside_folder(folder, name, f"{where} files[{key!r}] names", fix, error)
    for part, entry in engines.items():
        for key in ("file", "metadata"):
            if isinstance(entry, dict) and key in entry:
                inside_folder(folder, entry[key], f"{where} engines[{part!r}][{key!r}] names", fix, error)
    names = [*files.values(), *(e.get("file") for e in engines.values() if isinstance(e, dict) and "file" in e)]
    check_folder_files(folder, names, fix, error)


# ----------------------------------------------------------------------------------------------- model folders


@contextlib.contextmanager
def _open_regular(path: Path, error: type[Exception], what: str, fix: str) -> Iterator[tuple[int, os.stat_result]]:
    """(fd, stat) of a regular file, closed on exit; a FIFO or device is refused without reading from it (opened
    non-blocking, so a FIFO without a writer cannot hang). FileNotFoundError passes through."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"Cannot open {what}{str(path)!r}: {e.strerror}; {fix}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what}{str(path)!r} is not a regular file; {fix}")
        yield fd, st
    finally:
        os.close(fd)


def _read_small(path: Path, error: type[Exception], fix: str) -> bytes | None:
    """The bytes of a regular file of at most MAX_CONFIG_BYTES; None if it does not exist."""
    try:
        with _open_regular(path, error, "", fix) as (fd, st):
            if st.st_size > MAX_CONFIG_BYTES:
                raise error(f"{str(path)!r} is {st.st_size >> 20} MiB, too large for a config file; {fix}")
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None


def check_model_folder(folder: str | os.PathLike, error: type[Exception] = ModelError, *, weights: bool = True) -> None:
    """Refuse (one line naming the file and key) a Hugging Face folder whose configs ask transformers to run code from
    the folder or the hub (`auto_map`, at the top level or in a sub-config), or (`weights`) whose only weights are
    pickles (pytorch_model.bin, .pt, .pth, .ckpt: unpickling runs code). Unreadable JSON is left to transformers."""
    import json

    folder = Path(folder)
    if weights and not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_WEIGHTS) if folder.is_dir() else []
        if pickled:
            raise error(f"Model folder {folder.name!r} holds its weights as a pickle ({pickled[0]}), which "
                        "tokensieve never loads (it runs code); save them as model.safetensors")
    fix = "tokensieve never runs a model folder's own code"
    for name in MODEL_CONFIG_FILES:
        raw = _read_small(Path(folder) / name, error, fix)
        if raw is None:
            continue
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            continue  # transformers reports the syntax error (one line, by the caller)
        todo, seen = [((), data)], 0
        while todo and seen < 10_000:
            where, item = todo.pop()
            seen += 1
            if not isinstance(item, dict):
                continue
            for key, value in item.items():
                if key in CUSTOM_CODE_KEYS:
                    dotted = ".".join([*where, key])
                    raise error(f"{folder.name}/{name} names custom code ({dotted} = {_short(value, 30)}); {fix}")
                if isinstance(value, dict) and len(where) < 3:
                    todo.append(((*where, str(key)), value))


# ----------------------------------------------------------------------------------------------- ONNX files


def _tensors(model) -> Iterator[tuple[str, object]]:
    """(name, TensorProto) of every tensor an ONNX model can hold: initializers, sparse initializers, tensor attributes,
    in the graph, its subgraphs, its functions and its training info."""
    graphs = [model.graph]
    nodes = [n for f in model.functions for n in f.node]
    for info in model.training_info:
        graphs += [info.initialization, info.algorithm]
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            yield from ((t.name, t) for t in g.initializer)
            for s in g.sparse_initializer:
                yield s.values.name, s.values
                yield s.values.name, s.indices
            nodes += g.node
            continue
        node = nodes.pop()
        for a in node.attribute:
            label = f"{node.name or node.op_type}.{a.name}"
            if a.HasField("t"):
                yield a.t.name or label, a.t
            yield from ((t.name or label, t) for t in a.tensors)
            for s in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                yield label, s.values
                yield label, s.indices
            if a.HasField("g"):
                graphs.append(a.g)
            graphs += a.graphs


def check_onnx_external_data(onnx_path: str | os.PathLike, error: type[Exception] = ConfigError) -> None:
    """Refuse, in one line naming the tensor and its location, an ONNX file whose external data is not a regular file
    inside the ONNX file's own folder (`..`, an absolute path, a symlink out, a FIFO or device, a missing file).

    Reads the .onnx only (never a byte of external data): a file without the protobuf key "location" has no external
    data and is not parsed; otherwise its proto is parsed without loading external data."""
    import onnx

    path = Path(onnx_path)
    fix = "keep the .data file next to the .onnx"
    try:
        with _open_regular(path, error, "ONNX file ", "pass the .onnx file itself") as (fd, st):
            if st.st_size == 0:
                return  # the loader reports an empty file
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mm:
                if mm.find(b"location") < 0:
                    return
                raw = mm[:]
    except FileNotFoundError as e:
        raise error(f"Cannot open ONNX file {str(path)!r}: {e.strerror}") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(raw)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise error(f"{str(path)!r} is not a readable ONNX file ({type(e).__name__}); re-export it") from None
    checked: set[str] = set()
    for name, tensor in _tensors(model):
        for entry in tensor.external_data:
            if entry.key != "location" or entry.value in checked:
                continue
            what = f"{_short(path.name, 30)[1:-1]}: tensor {_short(name, 30)} reads external data from"
            target = inside_folder(path.parent, entry.value, what, fix, error)
            try:
                mode = os.stat(target).st_mode
            except OSError:
                raise error(f"{what} {_short(entry.value)}, which does not exist; {fix}") from None
            if not stat.S_ISREG(mode):
                raise error(f"{what} {_short(entry.value)}, which is not a regular file; {fix}")
            checked.add(entry.value)
