"""A stand-in for standard TensorRT 10.x (JetPack 6's 10.3 on a Jetson Orin, sm87) with just what the builder calls,
so the `--target local` path runs on a CPU machine: the parser reads the ONNX's inputs, outputs and nodes (layers),
the builder records what it was asked for in `log`, and a plan deserializes to an engine whose inspector answers JSON.

    trt = fake_tensorrt.module()      # install as sys.modules["tensorrt"] (see install())
"""
from __future__ import annotations

import enum
import json
import sys
import types

import onnx


class _DType:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"DataType.{self.name}"


FLOAT, HALF, INT32, INT64 = _DType("FLOAT"), _DType("HALF"), _DType("INT32"), _DType("INT64")
_ONNX_DTYPES = {onnx.TensorProto.FLOAT: FLOAT, onnx.TensorProto.FLOAT16: HALF, onnx.TensorProto.INT32: INT32,
                onnx.TensorProto.INT64: INT64}


class _Tensor:
    def __init__(self, name, shape=(), dtype=FLOAT, dim_names=()):
        self.name, self.shape, self.dtype, self._dim_names = name, tuple(shape), dtype, list(dim_names)

    def get_dimension_name(self, j):
        return self._dim_names[j] if j < len(self._dim_names) else None


class _Layer:
    def __init__(self, node: onnx.NodeProto, dtypes: dict):
        self.name, self.type, self.precision = node.name, node.op_type, FLOAT
        self._outputs = [_Tensor(o, dtype=dtypes.get(o, FLOAT)) for o in node.output]
        self.output_types = {}

    @property
    def num_outputs(self):
        return len(self._outputs)

    def get_output(self, j):
        return self._outputs[j]

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype


class _Network:
    def __init__(self):
        self.inputs, self.outputs, self.layers = [], [], []

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))
    num_layers = property(lambda self: len(self.layers))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]

    def get_layer(self, i):
        return self.layers[i]


def _value(v: onnx.ValueInfoProto) -> _Tensor:
    dims = v.type.tensor_type.shape.dim
    return _Tensor(v.name, [d.dim_value if d.HasField("dim_value") else -1 for d in dims],
                   _ONNX_DTYPES.get(v.type.tensor_type.elem_type, FLOAT),
                   [d.dim_param or None for d in dims])


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.num_errors = network, 0

    def parse(self, data: bytes, path: str = "") -> bool:
        model = onnx.load_from_string(data)
        g = model.graph
        self.network.inputs = [_value(v) for v in g.input if v.name not in {i.name for i in g.initializer}]
        self.network.outputs = [_value(v) for v in g.output]
        dtypes = {v.name: _value(v).dtype for v in [*g.value_info, *g.output]}
        self.network.layers = [_Layer(n, dtypes) for n in g.node]
        return True

    def parse_from_file(self, path: str) -> bool:
        with open(path, "rb") as f:
            return self.parse(f.read(), path)


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, mn, op, mx):
        self.shapes[name] = (list(mn), list(op), list(mx))


class _TimingCache:
    """A cache file is JSON {"device": "8.7", "entries": [...]}: a build adds one entry per layer it 'timed'."""

    def __init__(self, entries=(), device="8.7"):
        self.entries, self.device = list(entries), device

    def serialize(self):
        return json.dumps({"device": self.device, "entries": self.entries}).encode()

    def combine(self, other, ignore_mismatch):
        self.entries += [e for e in other.entries if e not in self.entries]
        return True


class _Config:
    def __init__(self):
        self.flags, self.pools, self.profiles = set(), {}, []
        self.builder_optimization_level, self.profiling_verbosity = 3, ProfilingVerbosity.LAYER_NAMES_ONLY
        self.cache = None

    def set_flag(self, flag):
        self.flags.add(flag)

    def get_flag(self, flag):
        return flag in self.flags

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def create_timing_cache(self, blob: bytes):
        if not blob:
            return _TimingCache()
        try:
            data = json.loads(blob)
            return _TimingCache(data["entries"], data["device"])
        except (ValueError, KeyError, TypeError):
            return None  # TensorRT logs an error and returns no cache

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.device != "8.7" and not ignore_mismatch:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


log: list[dict] = []   # one entry per build_serialized_network call


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags):
        return _Network()

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        keys = [f"{layer.type}:{layer.name}" for layer in network.layers]
        hits = sum(k in config.cache.entries for k in keys) if config.cache is not None else 0
        if config.cache is not None:
            config.cache.entries += [k for k in keys if k not in config.cache.entries]
        pinned = [layer.name for layer in network.layers if layer.precision is FLOAT and layer.output_types]
        log.append({"flags": sorted(f.name for f in config.flags), "pools": dict(config.pools),
                    "level": config.builder_optimization_level, "verbosity": config.profiling_verbosity,
                    "profile": config.profiles[0].shapes if config.profiles else {}, "cache_hits": hits,
                    "pinned_fp32": pinned})
        half = BuilderFlag.FP16 in config.flags
        layers = [{"Name": layer.name, "LayerType": layer.type,
                   "Precision": "FP32" if layer.output_types or not half else "FP16"} for layer in network.layers]
        return json.dumps({"fake_plan": True, "Layers": layers}).encode()


class _Inspector:
    def __init__(self, plan):
        self.plan = plan

    def get_engine_information(self, fmt):
        assert fmt is LayerInformationFormat.JSON
        return json.dumps({"Layers": json.loads(self.plan)["Layers"], "Bindings": []})


class _Engine:
    def __init__(self, plan):
        self.plan = bytes(plan)

    def create_engine_inspector(self):
        return _Inspector(self.plan)


class Runtime:
    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, plan):
        return _Engine(plan)


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self):
        pass


BuilderFlag = enum.Enum("BuilderFlag", "FP16 OBEY_PRECISION_CONSTRAINTS TF32 VERSION_COMPATIBLE EXCLUDE_LEAN_RUNTIME")
MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
ProfilingVerbosity = enum.Enum("ProfilingVerbosity", "LAYER_NAMES_ONLY DETAILED NONE")
LayerInformationFormat = enum.Enum("LayerInformationFormat", "ONELINE JSON")


def module(version: str = "10.3.0") -> types.ModuleType:
    """This file's API as a fresh module named `tensorrt` (TensorRT `version`)."""
    mod = types.ModuleType("tensorrt")
    me = sys.modules[__name__]
    for name in ("OnnxParser", "Builder", "Runtime", "ILogger", "BuilderFlag", "MemoryPoolType", "ProfilingVerbosity",
                 "LayerInformationFormat"):
        setattr(mod, name, getattr(me, name))
    mod.float32, mod.float16, mod.__version__ = FLOAT, HALF, version
    return mod


def install(monkeypatch, compute_capability: str = "8.7") -> types.ModuleType:
    """Make `import tensorrt` give the fake and the local GPU report `compute_capability`, for this test."""
    from tokensieve.runtime import tensorrt_flavors
    from tokensieve.targets.tensorrt import builder

    trt = module()
    log.clear()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    tensorrt_flavors._try_import.cache_clear()
    monkeypatch.setattr(tensorrt_flavors, "local_compute_capability", lambda: compute_capability)
    monkeypatch.setattr(builder, "local_compute_capability", lambda: compute_capability)
    monkeypatch.setattr("tokensieve.targets.base.local_compute_capability", lambda: compute_capability)
    return trt
