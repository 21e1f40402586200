"""ONNX file -> serialized TensorRT engine + `<engine>.json`, for TensorRT-RTX (ahead of time) or local TensorRT."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx
import onnx_ir as ir

from tokensieve.errors import ConfigError, InternalError, TargetError
from tokensieve.fileio import atomic_path, ensure_writable_dir
from tokensieve.graph_passes.onnx.convert_to_fp16 import convert_to_fp16, fp32_names
from tokensieve.graph_passes.onnx.split_large_topk import split_large_topk

from .engine_metadata import SCHEMA, metadata_path_for, network_io, sha256_file, tokensieve_version
from .flavors import (FLAVOR_LABELS, RTX, ensure_rtx_parser_link, import_flavor, local_compute_capability,
                      parse_target, rtx_compute_capability_enum)
from .lint import lint_for_tensorrt, raise_on_lint
from .plugins import LIBRARY_NAME, PLUGIN_LIB_ENV, load_plugins
from .trt_logger import collecting_logger


PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class BuildSpec:
    """How to build one engine. The batch profile applies to inputs whose dim 0 is dynamic."""
    target: str = "rtx-sm86"        # rtx-sm75|80|86|89|120|121 (TensorRT-RTX, no GPU needed) or local (TensorRT, this GPU)
    precision: str = "fp32"          # fp32 | fp16 (weights/activations fp16; scores, TopK inputs, norms, softmax fp32)
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    timing_cache: str | None = None  # standard TensorRT only; TensorRT-RTX timing caches are no-ops
    workspace_mib: int | None = None
    plugin_library: str | None = None  # libtokensieve_plugins.so, registered before parsing (tokensieve plugin nodes)
    embed_plugins: bool = False        # serialize the library into the plan (VERSION_COMPATIBLE + EXCLUDE_LEAN_RUNTIME)

    def __post_init__(self) -> None:
        parse_target(self.target)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"Unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(f"Batch profile needs 1 <= min <= opt <= max, got min={self.min_batch} "
                              f"opt={self.opt_batch} max={self.max_batch}; fix --min/--opt/--max-batch")
        if self.embed_plugins and not self.plugin_library:
            raise ConfigError("embed_plugins needs plugin_library; pass --plugins /path/to/libtokensieve_plugins.so")
        if self.plugin_library and not Path(self.plugin_library).is_file():
            raise ConfigError(f"--plugins {self.plugin_library!r} does not exist; pass the {LIBRARY_NAME} that "
                              f"`python -m tokensieve.targets.tensorrt.plugins` builds and prints (the Python API "
                              f"also finds it through ${PLUGIN_LIB_ENV})")
        if self.workspace_mib is not None and self.workspace_mib <= 0:
            raise ConfigError(f"workspace_mib must be positive, got {self.workspace_mib}")


@dataclass(frozen=True)
class EngineInfo:
    engine_path: Path
    metadata_path: Path
    metadata: dict
    build_seconds: float
    size_bytes: int


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, spec: BuildSpec,
                 extra_metadata: dict | None = None) -> EngineInfo:
    """Parse `onnx_path`, build for `spec.target`, write the engine and `<engine>.json` atomically."""
    flavor, cc = parse_target(spec.target)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    meta_path = metadata_path_for(engine_path)
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX file {str(onnx_path)!r} does not exist; pass the model written by `tokensieve export`")
    extra = dict(extra_metadata or {})
    ensure_writable_dir(engine_path.parent)
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
    with logger.capture():
        builder = trt.Builder(logger)
        if builder is None:
            raise TargetError(f"{label} could not create a builder: {logger.summary()}")
        network = builder.create_network(0)  # explicit batch is the default in 10.x; 11.x and RTX are strongly typed
        parser = trt.OnnxParser(network, logger)
        model = _prepare_for_tensorrt(onnx_path, flavor, plugins=plugin_lib is not None)
        substituted = _plugin_substitutions(model) if plugin_lib is not None and model is not None else []
        weakly_typed = flavor != RTX and hasattr(trt.BuilderFlag, "FP16")  # TensorRT 10.x; 11.x and RTX: strong
        if spec.precision == "fp16" and model is not None and not weakly_typed:
            model = _convert_to_fp16(model, onnx_path)
        if model is None:  # unreadable as ONNX: let the parser say why
            parsed = parser.parse_from_file(str(onnx_path))
        else:  # the path lets the parser find external weights (model.onnx.data)
            parsed = parser.parse(model.SerializeToString(), str(onnx_path))
        if not parsed:
            raise TargetError(_parser_error(label, onnx_path, parser))
        config = builder.create_builder_config()
        profile = _batch_profile(builder, network, spec)
        if profile:
            config.add_optimization_profile(profile[0])
        if flavor == RTX:
            config.num_compute_capabilities = 1
            config.set_compute_capability(rtx_compute_capability_enum(trt, cc), 0)
        if spec.precision == "fp16" and model is not None and weakly_typed:
            _fp16_flag_with_fp32_layers(trt, config, network, model)
        if spec.embed_plugins:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
            config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
            config.plugins_to_serialize = [str(plugin_lib)]
        if spec.workspace_mib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
        cache = _load_timing_cache(config, spec) if flavor != RTX else None
        t0 = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - t0
        if plan is None:
            raise TargetError(f"{label} failed to build {onnx_path.name} for {spec.target}: {logger.summary()}")
        warnings = [m for sev, m in logger.messages if sev == "WARNING"]
        io = network_io(trt, network)

    data = memoryview(plan)
    metadata: dict[str, Any] = {
        "schema": SCHEMA,
        "tokensieve_version": tokensieve_version(),
        "flavor": flavor,
        "tensorrt_version": trt.__version__,
        "target": spec.target,
        "compute_capability": cc,
        "precision": spec.precision,
        "tf32": _tf32_enabled(trt, config),
        "build_seconds": round(seconds, 3),
        "engine_size_bytes": data.nbytes,
        "engine_sha256": hashlib.sha256(data).hexdigest(),  # TrtRunner refuses a file that differs
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "onnx": {"file": onnx_path.name, "sha256": sha256_file(onnx_path)},
        "io_tensors": io,
        "optimization_profile": profile[1] if profile else {},
        "build_warnings": warnings[:20],
        "data_dependent_shapes": _data_dependent(model),  # CUDA graphs cannot capture it (TrtRunner refuses)
    }
    if plugin_lib is not None:
        metadata["plugins"] = [{"file": plugin_lib.name, "sha256": sha256_file(plugin_lib), "embedded": spec.embed_plugins}]
        metadata["plugin_substitutions"] = substituted  # standard-op subgraphs the plugins replaced in this build
    clash = sorted(set(extra) & set(metadata))
    if clash:
        raise InternalError(f"extra_metadata keys {clash} collide with engine metadata keys")
    metadata.update(extra)

    # Both files appear together or not at all: the metadata rename happens just before the engine's.
    with atomic_path(engine_path) as tmp_engine, atomic_path(meta_path) as tmp_meta:
        with open(tmp_engine, "wb") as f:
            f.write(data)
        tmp_meta.write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    if cache is not None:
        _save_timing_cache(config, spec)
    return EngineInfo(engine_path, meta_path, metadata, seconds, data.nbytes)


def _tf32_enabled(trt: ModuleType, config) -> bool | None:
    """TF32 is on by default for fp32 math (about 1e-3 relative error); None where the flag does not exist."""
    flag = getattr(trt.BuilderFlag, "TF32", None)
    return None if flag is None else bool(config.get_flag(flag))


def _prepare_for_tensorrt(onnx_path: Path, flavor: str, plugins: bool = False):
    """With `plugins`, swap in plugin nodes (diversity_to_plugin, compact_to_plugin); split TopKs above TensorRT's K
    limit, then refuse (one line) any node the parser would reject.

    Returns the graph to parse (weights stay on disk), or None if the file does not load as ONNX.
    """
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - the parser reports corrupt files with its own message
        return None
    if plugins:
        from .diversity_to_plugin import diversity_to_plugin  # imports plugin_nodes, which imports this module
        from .compact_to_plugin import compact_to_plugin
        substituted = diversity_to_plugin(model)
        model = ir.to_proto(substituted.model) if substituted.modified else model
        compacted = compact_to_plugin(model)
        model = ir.to_proto(compacted.model) if compacted.modified else model
    if any(issue.op == "TopK" for issue in lint_for_tensorrt(model, flavor)):
        model = ir.to_proto(split_large_topk(model).model)
    raise_on_lint(lint_for_tensorrt(model, flavor))
    return model


def _data_dependent(model: onnx.ModelProto | None) -> bool:
    """Does the graph compute a size from data: adaptive(compact=true)'s cut (standard form or TokenCompact's
    data-dependent mode), or NonZero?"""
    if model is None:
        return False
    for n in model.graph.node:
        if n.op_type == "NonZero" or any(p.key == "pkg.torch.onnx.fx_node" and "tokensieve.compact_valid" in p.value
                                         for p in n.metadata_props):
            return True
        if n.op_type == "TokenCompact" and any(a.name == "dynamic" and a.i for a in n.attribute):
            return True
    return False


def _plugin_substitutions(model: onnx.ModelProto) -> list[dict]:
    from .compact_to_plugin import plugin_substitutions as compact_substitutions
    from .diversity_to_plugin import plugin_substitutions
    return plugin_substitutions(model) + compact_substitutions(model)


def _convert_to_fp16(model: onnx.ModelProto, onnx_path: Path) -> onnx.ModelProto:
    """Strongly typed flavors take precision from the ONNX: fp32 -> mixed fp16 (weights inline, fp16-sized)."""
    onnx.load_external_data_for_model(model, str(onnx_path.parent))  # no-op without external data
    converted = ir.to_proto(convert_to_fp16(model).model)
    if converted.ByteSize() >= 2**31:
        raise TargetError(f"{onnx_path.name} is over 2 GB even in fp16, too large to hand to the parser in memory; "
                          f"build it with --precision fp32")
    return converted


def _fp16_flag_with_fp32_layers(trt: ModuleType, config, network, model: onnx.ModelProto) -> int:
    """TensorRT 10.x (weakly typed): FP16 flag, and the layers convert_to_fp16 keeps fp32 pinned to fp32.

    Layers are matched by the names the ONNX parser gives them (the node's) and their output tensors (the
    values'); returns the number pinned.
    """
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    layers = fp32_layers(network, *fp32_names(ir.from_proto(model)))
    for layer in layers:
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype == trt.float32:
                layer.set_output_type(j, trt.float32)
    return len(layers)


def fp32_layers(network, node_names: set[str], value_names: set[str]) -> list:
    """The network's layers named after one of `node_names` or producing one of the tensors `value_names`."""
    layers = (network.get_layer(i) for i in range(network.num_layers))
    return [layer for layer in layers if layer.name in node_names
            or any(layer.get_output(j).name in value_names for j in range(layer.num_outputs))]


def _parser_error(label: str, onnx_path: Path, parser) -> str:
    """The first parser error as one line, naming the node and op."""
    err, n = parser.get_error(0), parser.num_errors
    desc = " ".join(str(err.desc()).split())
    more = f" (+{n - 1} more)" if n > 1 else ""
    if err.node() < 0:  # file-level: unreadable, not ONNX, missing external data
        return f"{label} cannot read {str(onnx_path)!r}: {desc}{more}; check it loads with onnx.load"
    return (f"{label} cannot parse {onnx_path.name}: node {err.node_name()!r} (op {err.node_operator()}): {desc}{more}; "
            f"rewrite or remove this op before building")


def _batch_profile(builder, network, spec: BuildSpec):
    """(profile, json) covering every input with a dynamic dim 0, or None when all inputs are static."""
    profile, shapes = builder.create_optimization_profile(), {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = [int(d) for d in t.shape]
        if not dims or dims[0] != -1:
            continue
        if -1 in dims[1:]:
            raise TargetError(f"Input {t.name!r} has shape {dims}: only the batch axis (0) may be dynamic; "
                              f"re-export with static token and channel sizes")
        rest = dims[1:]
        mn, op, mx = [spec.min_batch] + rest, [spec.opt_batch] + rest, [spec.max_batch] + rest
        profile.set_shape(t.name, mn, op, mx)
        shapes[t.name] = {"min": mn, "opt": op, "max": mx}
    return (profile, shapes) if shapes else None


def _load_timing_cache(config, spec: BuildSpec):
    if spec.timing_cache is None:
        return None
    path = Path(spec.timing_cache)
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(config, spec: BuildSpec) -> None:
    with atomic_path(spec.timing_cache) as tmp:
        tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
