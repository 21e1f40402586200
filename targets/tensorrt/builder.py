"""ONNX file -> serialized TensorRT engine + `<engine>.json`, for TensorRT-RTX (ahead of time) or local TensorRT.

The builder parses and builds; what the ONNX must become first (plugin substitution, TopK split, lint, fp16) is the
lowering pass list it is handed (targets/tensorrt/lowering.py), run here in order on the loaded onnx_ir.Model.
The `<engine>.json` it writes follows runtime/engine_metadata.py's schema (`engine_metadata`).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Protocol, runtime_checkable

import onnx_ir as ir
from onnx_ir.passes import PassBase

from tokensieve.errors import ConfigError, TargetError
from tokensieve.fileio import atomic_path, atomic_paths, ensure_writable_dir, locked_temp_dir, remove_stale_temp_dirs
from tokensieve.runtime.engine_metadata import (OFFSET_DIM, engine_metadata, metadata_path_for, network_io,
                                                sha256_file, tokensieve_version)
from tokensieve.runtime.tensorrt_flavors import FLAVOR_LABELS, RTX, import_flavor, local_compute_capability
from tokensieve.runtime.tensorrt_logger import collecting_logger
from tokensieve.runtime.tensorrt_plugins import loaded_plugin_library

from ..base import PIN_FP32_TAG, BuildSpec, EngineInfo, Precision
from .flavors import ensure_rtx_parser_link, is_strongly_typed, rtx_compute_capability_enum
from .plugins import load_plugins

PROTO_LIMIT = 2**31 - 1  # protobuf serializes no larger message: a model over it reaches the parser as a file
SCRATCH_PREFIX = ".tokensieve-build-"  # a build's scratch folder next to its engine (locked while it runs)


@runtime_checkable
class SubstitutionReport(Protocol):
    """A lowering pass that puts plugin nodes in reports them (`plugin_substitutions` in the engine metadata)."""

    def substitutions(self, model: ir.Model) -> list[dict]: ...


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, spec: BuildSpec,
                 lowering: Sequence[PassBase], extra_metadata: dict | None = None) -> EngineInfo:
    """Load `onnx_path`, run the `lowering` passes on it in order, parse, build for `spec.target`, and write the
    engine and `<engine>.json` atomically. `lowering` is what targets/tensorrt/lowering.py's `tensorrt_lowering`
    gives (tokensieve.targets.tensorrt.build_engine passes it)."""
    flavor, cc = spec.parsed_target
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    meta_path = metadata_path_for(engine_path)
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX file {str(onnx_path)!r} does not exist; pass the model written by `tokensieve export`")
    ensure_writable_dir(engine_path.parent)
    remove_stale_temp_dirs(engine_path.parent, SCRATCH_PREFIX)  # a killed build's scratch folder (nobody holds it)
    for path in (engine_path, meta_path):  # checked before minutes of building, not after
        if path.is_dir():
            raise ConfigError(f"Cannot write the engine to {str(path)!r}: that path is a folder; pass a file path "
                              "(-o/--output out/model.engine)")
    for flag, path in (("--timing-cache", spec.timing_cache), ("--layer-info", spec.layer_info)):
        if path is not None and Path(path).is_dir():
            raise ConfigError(f"{flag} {str(path)!r} is a folder; pass a file path")
        if path is not None:
            ensure_writable_dir(Path(path).parent)
    trt = import_flavor(flavor)
    label = FLAVOR_LABELS[flavor]
    plugin_lib = load_plugins(trt, spec.plugin_library) if spec.plugin_library else None  # before the parser runs
    if flavor == RTX:
        ensure_rtx_parser_link()
    else:
        cc = local_compute_capability()
        if cc is None:
            raise TargetError("--target local needs an NVIDIA GPU and driver, and none was found; "
                              "use --target rtx-sm86 (or another rtx-smXX) to build without a GPU")

    logger = collecting_logger(trt)
    plugin_log = _PluginLog(plugin_lib is not None or loaded_plugin_library(trt) is not None)
    with logger.capture(), plugin_log, ExitStack() as scratch:
        builder = trt.Builder(logger)
        if builder is None:
            raise TargetError(f"{label} could not create a builder: {logger.summary()}")
        network = builder.create_network(0)  # explicit batch is the default in 10.x; 11.x and RTX are strongly typed
        parser = trt.OnnxParser(network, logger)
        model = _load(onnx_path)
        substituted = []
        if model is None:  # unreadable as ONNX: let the parser say why
            parsed = parser.parse_from_file(str(onnx_path))
        else:
            run_lowering(lowering, model)
            substituted = [s for p in lowering if isinstance(p, SubstitutionReport) for s in p.substitutions(model)]
            parsed = _parse(parser, model, onnx_path, engine_path.parent, scratch)
        if not parsed:
            raise TargetError(_parser_error(label, onnx_path, parser, plugin_log.reasons(logger)))
        config = builder.create_builder_config()
        profile = _profile(builder, network, spec)
        if profile:
            config.add_optimization_profile(profile[0])
        if flavor == RTX:
            config.num_compute_capabilities = 1
            config.set_compute_capability(rtx_compute_capability_enum(trt, cc), 0)
        if spec.precision is Precision.FP16 and model is not None and not is_strongly_typed(trt, flavor):
            _fp16_flag_with_fp32_layers(trt, config, network, model)
        if spec.embed_plugins:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
            config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
            config.plugins_to_serialize = [str(plugin_lib)]
        if spec.workspace_mib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
        if spec.builder_optimization_level is not None:
            config.builder_optimization_level = spec.builder_optimization_level
        if spec.layer_info is not None:  # layer names, types, precisions, tactics in the inspector's JSON
            config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        cache = _load_timing_cache(config, spec)  # BuildSpec refuses a timing cache for TensorRT-RTX
        t0 = time.perf_counter()
        with _cancel_on_interrupt(trt, config):
            plan = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - t0
        if plan is None:
            reasons = plugin_log.reasons(logger)
            why = f"the plugin says: {reasons[0]}; fix that node's attributes or inputs" if reasons else logger.summary()
            raise TargetError(f"{label} failed to build {onnx_path.name} for {spec.target}: {why}")
        warnings = [m for sev, m in logger.messages if sev == "WARNING"]
        io = network_io(trt, network)
        layer_info = _layer_info(trt, logger, plan, label) if spec.layer_info is not None else None

    data = memoryview(plan)
    shapes, dims = (profile[1], profile[2]) if profile else ({}, {})
    options = {"opt_batch": spec.opt_batch, "workspace_mib": spec.workspace_mib,
               "builder_optimization_level": _optimization_level(config),
               "timing_cache": None if spec.timing_cache is None else Path(spec.timing_cache).name,
               "layer_info": None if spec.layer_info is None else Path(spec.layer_info).name}
    metadata = engine_metadata(
        {**(extra_metadata or {}), "build_options": options},
        tokensieve_version=tokensieve_version(),
        flavor=flavor,
        tensorrt_version=trt.__version__,
        target=spec.target,
        compute_capability=cc,
        precision=spec.precision.value,
        tf32=_tf32_enabled(trt, config),
        build_seconds=round(seconds, 3),
        engine_size_bytes=data.nbytes,
        engine_sha256=hashlib.sha256(data).hexdigest(),
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        onnx={"file": onnx_path.name, "sha256": sha256_file(onnx_path)},
        io_tensors=io,
        optimization_profile=shapes,
        dims=dims.get("dims", {}),
        input_dim_names=dims.get("input_dim_names", {}),
        build_warnings=warnings[:20],
        data_dependent_shapes=_data_dependent(model),
        plugins=[] if plugin_lib is None else [{"file": plugin_lib.name, "sha256": sha256_file(plugin_lib),
                                                "embedded": spec.embed_plugins}],
        plugin_substitutions=substituted,
    )

    # Both are written under temp names, then the old metadata goes, the engine is renamed, the metadata last: a run
    # killed in between leaves an engine without metadata (refused by readers), never new metadata beside an old
    # engine; a full disk or a file-size limit fails here with one line and leaves the old pair as it was.
    # The layer info, when asked for, is written first, with the pair: all three or (failing) none are new.
    extra = [Path(spec.layer_info)] if layer_info is not None else []
    with atomic_paths(*extra, engine_path, meta_path) as tmps:
        if layer_info is not None:
            tmps[0].write_bytes(layer_info)
        with open(tmps[-2], "wb") as f:
            f.write(data)
        tmps[-1].write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    if cache is not None:
        _save_timing_cache(config, cache, spec)
    return EngineInfo(engine_path, meta_path, metadata, seconds, data.nbytes)


@contextmanager
def _cancel_on_interrupt(trt: ModuleType, config):
    """Ctrl-C (SIGINT) cancels the build at its next step (TensorRT's progress monitor) instead of after it: the
    signal only sets a flag while the build runs (an exception raised inside TensorRT's callback would cross C++), and
    KeyboardInterrupt is raised once the canceled build returns. A no-op off the main thread or where TensorRT has no
    progress monitor."""
    monitor_base = getattr(trt, "IProgressMonitor", None)
    if monitor_base is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupted = []

    class Monitor(monitor_base):
        def __init__(self):
            monitor_base.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            pass

        def step_complete(self, phase_name, step):
            return not interrupted

        def phase_finish(self, phase_name):
            pass

    config.progress_monitor = monitor = Monitor()
    old = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.default_int_handler)
        with suppress(TypeError):
            config.progress_monitor = None
        del monitor
    if interrupted:
        raise KeyboardInterrupt


def run_lowering(lowering: Sequence[PassBase], model: ir.Model) -> bool:
    """Run the passes once, in order, on `model` (in place); whether any changed it. One round is enough: every
    pass is idempotent (tests/targets/tensorrt/test_lowering.py). Not onnx-ir's PassManager, which would wrap a pass's
    one-line TargetError into its own PassError."""
    modified = False
    for p in lowering:
        result = p(model)
        if result.model is not model:
            raise TypeError(f"lowering pass {type(p).__name__} returned a new model; lowering passes edit in place")
        modified |= result.modified
    return modified


def _tf32_enabled(trt: ModuleType, config) -> bool | None:
    """TF32 is on by default for fp32 math (about 1e-3 relative error); None where the flag does not exist."""
    flag = getattr(trt.BuilderFlag, "TF32", None)
    return None if flag is None else bool(config.get_flag(flag))


def _load(onnx_path: Path) -> ir.Model | None:
    """The model, its external weights left on disk (read when a pass needs them); None if it does not load."""
    try:
        return ir.load(str(onnx_path))
    except Exception:  # noqa: BLE001 - the parser reports corrupt files with its own message
        return None


def _data_dependent(model: ir.Model | None) -> bool:
    """Does the graph compute a size from data: adaptive(compact=true)'s cut (standard form or TokenCompact's
    data-dependent mode), or NonZero?"""
    if model is None:
        return False
    for n in model.graph:
        if n.op_type == "NonZero" or "tokensieve.compact_valid" in n.metadata_props.get("pkg.torch.onnx.fx_node", ""):
            return True
        if n.op_type == "TokenCompact" and n.attributes.get_int("dynamic", 0):
            return True
    return False


def _parse(parser, model: ir.Model, onnx_path: Path, scratch_dir: Path, scratch: ExitStack) -> bool:
    """Parse the lowered `model`; the path lets the parser find the weights still in `onnx_path`'s external data
    (model.onnx.data). A model whose in-memory weights put it over protobuf's limit (the fp16 conversion of a > 2 GB
    part) is saved with external data into a temporary folder in `scratch_dir` (deleted when `scratch` closes, after
    the build; a killed build's is removed by the next build in that folder) and parsed from there."""
    proto = ir.to_proto(model)
    if proto.ByteSize() < PROTO_LIMIT:
        return parser.parse(proto.SerializeToString(), str(onnx_path))
    del proto
    tmp = scratch.enter_context(locked_temp_dir(scratch_dir, SCRATCH_PREFIX))
    path = tmp / onnx_path.name
    ir.save(model, str(path), external_data=path.name + ".data")
    return parser.parse_from_file(str(path))


def _fp16_flag_with_fp32_layers(trt: ModuleType, config, network, model: ir.Model) -> int:
    """TensorRT 10.x (weakly typed): FP16 flag, and the layers of the nodes the lowering tagged fp32 (PIN_FP32_TAG,
    convert_to_fp16.MarkFp32NodesPass) pinned to fp32.

    Layers are matched by the names the ONNX parser gives them (the node's) and their output tensors (the
    values'); returns the number pinned.
    """
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    layers = fp32_layers(network, *pinned_fp32_names(model))
    for layer in layers:
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype == trt.float32:
                layer.set_output_type(j, trt.float32)
    return len(layers)


def pinned_fp32_names(model: ir.Model) -> tuple[set[str], set[str]]:
    """(node names, float output names) of the nodes the lowering tagged to stay fp32."""
    nodes = [n for n in model.graph if n.metadata_props.get(PIN_FP32_TAG) == "fp32"]
    floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
    return {n.name for n in nodes if n.name}, {v.name for n in nodes for v in n.outputs if v.dtype in floats and v.name}


def fp32_layers(network, node_names: set[str], value_names: set[str]) -> list:
    """The network's layers named after one of `node_names` or producing one of the tensors `value_names`."""
    layers = (network.get_layer(i) for i in range(network.num_layers))
    return [layer for layer in layers if layer.name in node_names
            or any(layer.get_output(j).name in value_names for j in range(layer.num_outputs))]


def _parser_error(label: str, onnx_path: Path, parser, plugin_reasons: list[str] = ()) -> str:
    """The first parser error as one line, naming the node and op (and the plugin's own reason, if it gave one)."""
    err, n = parser.get_error(0), parser.num_errors
    desc = " ".join(str(err.desc()).split())
    more = f" (+{n - 1} more)" if n > 1 else ""
    if err.node() < 0:  # file-level: unreadable, not ONNX, missing external data
        return f"{label} cannot read {str(onnx_path)!r}: {desc}{more}; check it loads with onnx.load"
    where = f"{label} cannot parse {onnx_path.name}: node {err.node_name()!r} (op {err.node_operator()})"
    if plugin_reasons:  # the parser only says "could not create the plugin"; the plugin said why
        return f"{where}: the plugin says: {plugin_reasons[0]}{more}; fix that node's attributes"
    return f"{where}: {desc}{more}; rewrite or remove this op before building"


_PLUGIN_PREFIX = "[tokensieve plugins]"


class _PluginLog:
    """While active (only when a plugin library is loaded), collects the tokensieve plugins' error lines.

    The plugins log through the logger TensorRT hands them via setLoggerFinder, and to stderr when there is none (the
    Python bindings give none), so file descriptor 2 is redirected to a temporary file for the parse and build; every
    line that is not the plugins' goes on to the real stderr unchanged."""

    def __init__(self, active: bool):
        self.active, self.lines = active, []

    def __enter__(self):
        if self.active:
            sys.stderr.flush()
            self._tmp = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        if not self.active:
            return False
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        text = self._captured()
        self._tmp.close()
        self.active = False
        for line in text.splitlines():
            if line.startswith(_PLUGIN_PREFIX):
                self.lines.append(line[len(_PLUGIN_PREFIX):].strip())
            else:
                sys.stderr.write(line + "\n")
        return False

    def _captured(self) -> str:
        fd = self._tmp.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")  # pread: fd 2's offset stays put

    def reasons(self, logger) -> list[str]:
        """The plugins' messages so far: from the TensorRT logger if it got them, else from the captured stderr."""
        if self.active:
            sys.stderr.flush()
            captured = [ln[len(_PLUGIN_PREFIX):].strip() for ln in self._captured().splitlines()
                        if ln.startswith(_PLUGIN_PREFIX)]
        else:
            captured = list(self.lines)
        logged = [m.split(_PLUGIN_PREFIX, 1)[1].strip() for _, m in logger.messages if _PLUGIN_PREFIX in m]
        return logged + captured


def _dim_names(t) -> list[str | None]:
    """The ONNX dim_param of each axis of a network input (the parser keeps them); None where unnamed or static."""
    get = getattr(t, "get_dimension_name", None)
    return [(get(j) or None) if get is not None and int(d) == -1 else None for j, d in enumerate(t.shape)]




def _dim_range(name: str, dims: Mapping[str, tuple[int, int, int]]) -> tuple[int, int, int] | None:
    """`dims[name]`, or for "NAME + K" (not given itself) NAME's range shifted by K; None if neither is given."""
    if name in dims:
        return dims[name]
    m = OFFSET_DIM.fullmatch(name)
    if m and m[1] in dims:
        return tuple(v + int(m[2]) for v in dims[m[1]])
    return None


def _profile(builder, network, spec: BuildSpec):
    """(profile, json, dims json) covering every dynamic input, or None when all inputs are static.

    Dim 0 (and any dim named like a dynamic dim 0) takes the batch range, every other dynamic dim its `spec.dims`
    range by name. The dims json is empty unless some input has a dynamic dim other than batch.
    """
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = {t.name: _dim_names(t) for t in inputs}
    batch_names = {names[t.name][0] for t in inputs if len(t.shape) and int(t.shape[0]) == -1} - {None}
    clash = sorted(batch_names & set(spec.dims))
    if clash:
        raise ConfigError(f"--dims {clash[0]}=...: {clash[0]!r} is the batch axis; set it with "
                          f"--max-batch (BuildSpec min_batch/opt_batch/max_batch)")
    batch = (spec.min_batch, spec.opt_batch, spec.max_batch)
    profile, shapes, used, missing = builder.create_optimization_profile(), {}, {}, {}
    for t in inputs:
        dims = [int(d) for d in t.shape]
        if -1 not in dims:
            continue
        mn, op, mx = list(dims), list(dims), list(dims)
        complete = True
        for j, (d, name) in enumerate(zip(dims, names[t.name])):
            if d != -1:
                continue
            if j == 0 or name in batch_names:
                rng = batch
            elif name is None:
                raise ConfigError(f"Input {t.name!r} has shape {dims}: axis {j} is dynamic but unnamed; re-export "
                                  f"with a named dynamic axis (dim_param) and give its range with --dims NAME=MIN:OPT:MAX")
            elif _dim_range(name, spec.dims) is not None:
                rng = used[name] = _dim_range(name, spec.dims)
            else:  # collected, so that one message names every missing dim ("past_sequence + 1": past_sequence)
                missing.setdefault(OFFSET_DIM.fullmatch(name)[1] if OFFSET_DIM.fullmatch(name) else name,
                                   (t.name, j, name))
                complete = False
                continue
            mn[j], op[j], mx[j] = rng
        if complete:
            try:
                profile.set_shape(t.name, mn, op, mx)
            except RuntimeError as e:
                raise TargetError(f"TensorRT rejected the profile min={mn} opt={op} max={mx} of input {t.name!r}: "
                                  f"{' '.join(str(e).split())}; fix --dims / --max-batch") from e
            shapes[t.name] = {"min": mn, "opt": op, "max": mx}
    if missing:
        (where, j, name), more = next(iter(missing.values())), list(missing)[1:]
        others = f" (and {', '.join(map(repr, more))})" if more else ""
        flag = ",".join(f"{n}=MIN:OPT:MAX" for n in missing)
        raise ConfigError(f"Input {where!r} axis {j} is the dynamic dim {name!r}{others} with no range; "
                          f"give {'them' if more else 'it'} with --dims {flag} (BuildSpec.dims)")
    if not shapes:
        return None
    extra = {} if not used else {
        "dims": {n: {"min": r[0], "opt": r[1], "max": r[2]} for n, r in sorted(used.items())},
        "input_dim_names": {t.name: names[t.name] for t in inputs if t.name in shapes}}
    return profile, shapes, extra


def _optimization_level(config) -> int | None:
    """The builder optimization level the build used (TensorRT's default where none was asked for)."""
    level = getattr(config, "builder_optimization_level", None)
    return None if level is None else int(level)


def _layer_info(trt: ModuleType, logger, plan, label: str) -> bytes:
    """The engine inspector's JSON (every layer: name, type, precisions, tactic) of the engine `plan`, which is
    deserialized here for it: that needs the GPU the engine is for (BuildSpec checks TensorRT-RTX targets up front)."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise TargetError(f"--layer-info: {label} cannot load the engine it built on this machine "
                          f"({logger.summary(160)}); drop --layer-info, or build on the GPU the engine is for")
    text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return (text if isinstance(text, str) else str(text)).encode()


_CACHE_FIX = "delete it or pass another --timing-cache"


def _load_timing_cache(config, spec: BuildSpec):
    """The cache in `spec.timing_cache` (an empty one if the file does not exist yet), set on `config`."""
    if spec.timing_cache is None:
        return None
    path = Path(spec.timing_cache)
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None:
        raise ConfigError(f"--timing-cache {str(path)!r} is not a TensorRT timing cache; {_CACHE_FIX}")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise ConfigError(f"--timing-cache {str(path)!r} was made by another TensorRT version or GPU; {_CACHE_FIX}")
    return cache


def _save_timing_cache(config, cache, spec: BuildSpec) -> None:
    """Write the build's cache back, atomically, merged with what another build saved to the file meanwhile."""
    path = Path(spec.timing_cache)
    if path.is_file():
        theirs = config.create_timing_cache(path.read_bytes())
        if theirs is not None:
            cache.combine(theirs, ignore_mismatch=False)
    with atomic_path(path) as tmp:
        tmp.write_bytes(memoryview(cache.serialize()))
