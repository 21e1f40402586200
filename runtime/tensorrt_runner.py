"""TrtRunner: run a TensorRT or TensorRT-RTX engine with OrtRunner's life cycle (Polygraphy BaseRunner).

    with TrtRunner("out/model.engine", cuda_graph=True) as r:
        outputs = r.infer(r.make_random_feeds(batch=8))
        print(r.inference_time, r.memory_usage())

The engine's `<engine>.json` (written by `tokensieve build`) names the flavor (`tensorrt` 10.x/11.x or `tensorrt_rtx`)
and the I/O tensors. The runner refuses, before deserializing and with one line saying how to fix it, an engine whose
metadata does not match the installed TensorRT flavor/version or the local GPU's compute capability, whose file size
or sha256 differs from the metadata, or that needs a plugin library which was not given (`--plugins`).
An engine is code: plugin code embedded in it (`build --embed-plugins`) runs only when the user allows it
(`allow_host_code=True` or $TOKENSIEVE_ALLOW_ENGINE_HOST_CODE=1), never because the engine's metadata says so.

Engines built with `--dims` (VLM lm_prefill / lm_decode) also take feeds whose other dynamic dims (sequence,
past_sequence, ...) vary within the profile; a feed outside it, or two inputs that disagree on a named dim, is refused
in one line before the engine is touched.

Buffers are torch.cuda tensors sized for the profile's largest input shapes (outputs: the shapes TensorRT infers at
those inputs, grown on demand if a smaller input gives a larger output), with pinned host staging buffers; each call
sets the inputs' shapes from the feeds (within the profile), reads the output shapes back from the context, copies
inputs in on the runner's own stream, enqueues with `execute_async_v3`, copies outputs out and synchronizes.
`cuda_graph=True` replays one CUDA graph per set of input shapes: standard TensorRT captures `execute_async_v3` with
torch.cuda.graph after one warm-up call;
TensorRT-RTX uses its built-in whole-graph capture (IRuntimeConfig.cuda_graph_strategy), since capturing an RTX
engine's stream from outside needs an engine built with user-managed allocations.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, TargetError, first_line
from ..trust import ALLOW_HOST_CODE_ENV
from .base import BaseRunner, Dim, check_batch, random_array
from .engine_metadata import (OFFSET_DIM, check_engine_compatible, check_engine_file, read_engine_metadata,
                              rebuild_hint)
from .tensorrt_flavors import FLAVOR_LABELS, RTX, import_flavor
from .tensorrt_logger import collecting_logger
from .tensorrt_plugins import register_plugin_library


_PLUGIN_HINT = ("pass --plugins /path/to/libtokensieve_plugins.so (build it with "
                "`python -m tokensieve.targets.tensorrt.plugins`)")


# Metadata dtype names (engine_metadata.dtype_name) that numpy and torch share a layout for.
_DTYPES = {n: np.dtype(n) for n in ("float32", "float16", "int8", "uint8", "int32", "int64", "bool")}


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]   # -1 = dynamic
    dtype: np.dtype
    is_input: bool


def _io_from_metadata(meta: dict, path: Path) -> list[_Tensor]:
    fix = rebuild_hint(meta)
    rows = meta["io_tensors"]
    if not isinstance(rows, list) or not rows:
        raise TargetError(f"Engine metadata of {str(path)!r} lists no io_tensors, so its inputs cannot be bound; {fix}")
    tensors = []
    for row in rows:
        try:
            name, shape, dtype, mode = row["name"], tuple(int(d) for d in row["shape"]), row["dtype"], row["mode"]
        except (KeyError, TypeError, ValueError) as e:
            raise TargetError(f"Engine metadata of {str(path)!r} has a malformed io_tensors entry {row!r}; {fix}") from e
        if dtype not in _DTYPES:
            raise TargetError(f"Tensor {name!r} of {str(path)!r} has dtype {dtype}, which TrtRunner cannot exchange "
                              f"with numpy; re-export the model with {'/'.join(_DTYPES)} I/O and rebuild with `tokensieve build`")
        tensors.append(_Tensor(name, shape, _DTYPES[dtype], mode == "input"))
    return tensors


class TrtRunner(BaseRunner):
    """Runs one serialized engine; `activate()` deserializes it and allocates buffers, `deactivate()` frees them."""

    artifact_suffix = ".engine"  # bench pairs report.json's model engine with dense.<target>.<precision>.engine

    def __init__(self, engine_path: str | Path, plugins: str | Path | None = None, *, cuda_graph: bool = False,
                 name: str | None = None, allow_host_code: bool | None = None) -> None:
        """`allow_host_code`: run plugin code the engine embeds (None: $TOKENSIEVE_ALLOW_ENGINE_HOST_CODE=1)."""
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise TargetError(f"TensorRT engine {str(self.engine_path)!r} does not exist; build it with "
                              "`tokensieve build OUT/model.onnx --target rtx-smXX` (or --target local)")
        self.metadata = read_engine_metadata(self.engine_path)
        self.allow_host_code = bool(allow_host_code) if allow_host_code is not None else \
            os.environ.get(ALLOW_HOST_CODE_ENV) == "1"
        embeds = any(isinstance(p, dict) and p.get("embedded") for p in self.metadata["plugins"])
        if embeds and not self.allow_host_code:
            raise TargetError(f"Engine {self.engine_path.name!r} embeds plugin code, which would run on load; if you "
                              f"trust it, set {ALLOW_HOST_CODE_ENV}=1 (Python: allow_host_code=True)")
        # Refuse here, before anything is deserialized: a mismatching plan can crash TensorRT instead of failing.
        check_engine_compatible(self.metadata)
        check_engine_file(self.engine_path, self.metadata)
        self.flavor: str = self.metadata["flavor"]
        self.plugins = Path(plugins) if plugins is not None else None
        needed = [p for p in self.metadata["plugins"] if not p["embedded"]]
        if self.plugins is None and needed:
            raise TargetError(f"Engine {str(self.engine_path)!r} uses the plugin library {needed[0]['file']} "
                              f"(not embedded in the plan); {_PLUGIN_HINT}")
        if self.plugins is not None and not self.plugins.is_file():
            raise TargetError(f"Plugin library {str(self.plugins)!r} does not exist; {_PLUGIN_HINT}")
        if cuda_graph and self.metadata["data_dependent_shapes"] and self.flavor != RTX:
            raise TargetError(f"Engine {str(self.engine_path)!r} has a data-dependent token axis (adaptive "
                              "compact=true), which a CUDA graph cannot capture; run it without --cuda-graph")
        self.cuda_graph = bool(cuda_graph)
        self.name = name if name is not None else f"{self.flavor}:{self.engine_path.name}"
        self.inference_time: float | None = None
        self._io = _io_from_metadata(self.metadata, self.engine_path)
        self._profile: dict = self.metadata["optimization_profile"]
        self._dim_names: dict = self.metadata["input_dim_names"]  # engines built with --dims; else {}
        self._trt = None
        self._runtime = self._engine = self._context = self._stream = None
        self._device: dict = {}       # name -> flat torch.cuda tensor, sized for the profile's largest shapes
        self._host: dict = {}         # name -> flat pinned host tensor of the same size
        self._shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}  # input shapes -> every tensor's shape
        self._set: tuple | None = None  # input shapes the context is set to
        self._graphs: dict = {}       # input shapes -> torch.cuda.CUDAGraph (standard TensorRT with cuda_graph)
        self._free_before: int | None = None  # free device memory before activate(), for memory_usage()

    # ---- life cycle ----
    @property
    def is_active(self) -> bool:
        return self._context is not None

    def activate_impl(self) -> None:
        """Deserialize the engine, create a context and a stream, allocate buffers."""
        torch = _cuda_torch()
        trt = import_flavor(self.flavor)
        label = FLAVOR_LABELS[self.flavor]
        logger = collecting_logger(trt)
        fix = rebuild_hint(self.metadata)
        torch.cuda.synchronize()
        self._free_before = torch.cuda.mem_get_info()[0]
        with logger.capture():
            if self.plugins is not None:  # creators must be registered before the plan that uses them is read
                register_plugin_library(trt, self.plugins, _PLUGIN_HINT)
            runtime = trt.Runtime(logger)
            if self.allow_host_code:  # the user's choice only: never the engine's own metadata
                runtime.engine_host_code_allowed = True  # version-compatible plans that carry plugin code
            try:
                engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            except Exception as e:  # noqa: BLE001 - some bindings raise instead of returning None
                engine, cause = None, first_line(e)
            else:
                cause = logger.summary()
            if engine is None:
                raise TargetError(f"{label} {trt.__version__} could not deserialize {str(self.engine_path)!r}: "
                                  f"{cause}; {fix}")
            names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
            if names != {t.name for t in self._io}:
                raise TargetError(f"Engine {str(self.engine_path)!r} has tensors {sorted(names)} but its metadata lists "
                                  f"{sorted(t.name for t in self._io)}; {fix}")
            if self.cuda_graph and self.flavor == RTX:
                config = engine.create_runtime_config()
                config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
                context = engine.create_execution_context(config)
            else:
                context = engine.create_execution_context()
            if context is None:
                raise TargetError(f"{label} could not create an execution context for {self.engine_path.name}: "
                                  f"{logger.summary()}")
        self._trt, self._runtime, self._engine, self._context = trt, runtime, engine, context
        self._stream = torch.cuda.Stream()
        try:
            self._allocate(torch)
        except BaseException:
            self.deactivate_impl()
            raise

    def deactivate_impl(self) -> None:
        """Free graphs, buffers, context and engine (in that order); the runner can be activated again."""
        self._graphs.clear()
        self._device.clear()
        self._host.clear()
        self._shapes.clear()
        self._set = None
        self._context = self._engine = self._runtime = self._stream = None
        if self._trt is not None:
            import torch

            torch.cuda.empty_cache()  # so the next runner's memory_usage() sees only its own allocations
        self._trt = None

    def _ctx(self):
        return self._context if self._context is not None else self.activate()._context

    def _allocate(self, torch) -> None:
        """One flat device buffer + pinned host buffer per tensor, sized for the profile's largest input shapes."""
        largest = self._shapes_for(self._max_input_shapes(), strict=False)
        for t in self._io:
            shape = largest[t.name]  # -1s: an output TensorRT cannot size at the profile max grows on first use
            self._reserve(torch, t, 1 if any(d < 0 for d in shape) else int(np.prod(shape, dtype=np.int64)))

    def _reserve(self, torch, t: _Tensor, numel: int) -> None:
        """Make tensor `t`'s buffers hold `numel` elements (reallocating, and dropping captured graphs, if smaller)."""
        have = self._device.get(t.name)
        if have is not None and have.numel() >= numel:
            return
        dtype = _torch_dtype(torch, t.dtype)
        self._device[t.name] = torch.empty(max(numel, 1), dtype=dtype, device="cuda")
        self._host[t.name] = torch.empty(max(numel, 1), dtype=dtype, pin_memory=True)
        self._graphs.clear()  # they recorded the old addresses
        if not self._context.set_tensor_address(t.name, self._device[t.name].data_ptr()):
            raise TargetError(f"TensorRT refused the buffer of tensor {t.name!r} in {self.engine_path.name}")

    def _max_input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each input's largest shape: the profile's max, or its static shape."""
        return {t.name: tuple(self._profile[t.name]["max"]) if t.name in self._profile else t.shape
                for t in self._io if t.is_input}

    # ---- metadata ----
    @property
    def input_specs(self) -> list[tuple[str, tuple[Dim, ...], np.dtype]]:
        """[(name, shape, dtype)] from the engine metadata; a dynamic dim is None."""
        return [(t.name, tuple(None if d < 0 else d for d in t.shape), t.dtype) for t in self._io if t.is_input]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self._io if not t.is_input]

    @property
    def batch_range(self) -> tuple[int, int]:
        """(min, max) batch of the engine's optimization profile; (B, B) for a static engine."""
        dynamic = [self._profile[t.name] for t in self._io
                   if t.is_input and t.shape and t.shape[0] < 0 and t.name in self._profile]
        if not dynamic:
            static = [t.shape[0] for t in self._io if t.is_input and t.shape]
            return (static[0], static[0]) if static else (1, 1)
        return max(p["min"][0] for p in dynamic), min(p["max"][0] for p in dynamic)

    @property
    def dim_ranges(self) -> dict[str, tuple[int, int, int]]:
        """{dim name: (min, opt, max)} of the dynamic dims other than batch (engines built with --dims); else {}."""
        return {name: (r["min"], r["opt"], r["max"]) for name, r in self.metadata["dims"].items()}

    @property
    def max_batch(self) -> int:
        return self.batch_range[1]

    @property
    def device_label(self) -> str:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        return f"{self.flavor} {self.metadata['tensorrt_version']} on {gpu}" + (" (CUDA graph)" if self.cuda_graph else "")

    def memory_usage(self) -> dict:
        """Device memory: the context's activation memory, the I/O buffers, the plan size, and `peak_bytes`, the
        measured total (drop in free device memory since before `activate()`; TensorRT keeps what it allocated, so
        after the calls of interest this is their peak)."""
        engine = self._engine
        if engine is None:
            raise ConfigError(f"{self.name} is not active; call memory_usage() inside `with runner:` after infer()")
        import torch

        torch.cuda.synchronize()
        used = self._free_before - torch.cuda.mem_get_info()[0]
        context_bytes = getattr(engine, "device_memory_size_v2", None)
        if context_bytes is None:  # TensorRT < 10.1
            context_bytes = engine.device_memory_size
        io_bytes = sum(b.numel() * b.element_size() for b in self._device.values())
        return {"kind": "device", "peak_bytes": int(used), "context_bytes": int(context_bytes),
                "io_bytes": int(io_bytes), "engine_bytes": self.engine_path.stat().st_size}

    # ---- inference ----
    def _shapes_for(self, inputs: Mapping[str, tuple[int, ...]], strict: bool = True) -> dict[str, tuple[int, ...]]:
        """Set the inputs' shapes on the context (if they changed); every tensor's shape at those inputs.

        Not `strict` (sizing buffers at the profile max): an output TensorRT cannot size comes back with -1s.
        """
        ctx = self._context
        key = tuple(tuple(inputs[t.name]) for t in self._io if t.is_input)
        if key != self._set:
            for t in self._io:
                if t.is_input and not ctx.set_input_shape(t.name, list(inputs[t.name])):
                    p = self._profile.get(t.name, {})
                    raise ConfigError(f"TensorRT rejected shape {tuple(inputs[t.name])} for input {t.name!r} of "
                                      f"{self.name} (profile {p.get('min')}..{p.get('max')}); rebuild with "
                                      f"`tokensieve build` and a --max-batch/--dims profile that covers it")
            self._set = key
        if key not in self._shapes:
            shapes = {t.name: tuple(ctx.get_tensor_shape(t.name)) for t in self._io}
            dynamic = [n for n, s in shapes.items() if any(d < 0 for d in s)]
            if dynamic and not strict:
                return shapes
            if dynamic:
                raise TargetError(f"Output(s) {dynamic} of {self.name} have data-dependent shapes, which TrtRunner "
                                  "does not support; export fixed-budget outputs")
            if len(self._shapes) >= 256:  # decode steps each bring a new past length: keep the cache bounded
                self._shapes.clear()
            self._shapes[key] = shapes
        return self._shapes[key]

    def _feed_batch(self, feeds: Mapping[str, np.ndarray]) -> int:
        batches = {int(feeds[t.name].shape[0]) for t in self._io if t.is_input and t.shape and t.shape[0] < 0}
        if len(batches) > 1:
            raise ConfigError(f"inputs of {self.name} have different batch sizes {sorted(batches)}; give them one batch")
        batch = batches.pop() if batches else self.batch_range[0]
        lo, hi = self.batch_range
        if not lo <= batch <= hi:
            raise ConfigError(f"batch {batch} is outside the engine's profile {lo}..{hi} for {self.name}; rebuild with "
                              f"`tokensieve build --max-batch {batch}` (or export with --max-batch)")
        return batch

    def _check_dims(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Every dynamic dim other than axis 0 (batch, `_feed_batch`) lies in the input's profile, and inputs that
        share a dim name agree on its size."""
        seen: dict[str, tuple[str, int]] = {}  # dim name -> (first input with it, its size)
        batch_names = {n[0] for n in self._dim_names.values() if n and n[0]}  # e.g. Qwen2-VL position_ids [3, batch, T]
        for t in self._io:
            if not t.is_input or t.name not in self._profile:
                continue
            p, names = self._profile[t.name], self._dim_names.get(t.name) or [None] * len(t.shape)
            for j, d in enumerate(t.shape):
                if d >= 0:
                    continue
                size, name = int(feeds[t.name].shape[j]), names[j] if j < len(names) else None
                label = repr(name) if name else f"axis {j}"
                if name in seen and seen[name][1] != size:
                    raise ConfigError(f"inputs of {self.name} disagree on dim {label}: {seen[name][0]!r} has "
                                      f"{seen[name][1]}, {t.name!r} has {size}; give them one {name} length")
                if name:
                    seen.setdefault(name, (t.name, size))
                lo, opt, hi = p["min"][j], p["opt"][j], p["max"][j]
                if j > 0 and not lo <= size <= hi:  # axis 0: _feed_batch
                    base, k = (m[1], int(m[2])) if name and (m := OFFSET_DIM.fullmatch(name)) else (name, 0)
                    fix = (f"--max-batch {size}" if name in batch_names
                           else f"--dims {base}={min(lo, size) - k}:{opt - k}:{max(hi, size) - k}" if name
                           else f"a --dims range for axis {j}")
                    raise ConfigError(f"input {t.name!r} has {label} = {size}, outside the engine's profile {lo}..{hi} "
                                      f"for {self.name}; rebuild with `tokensieve build {fix}`")

    def make_random_feeds(self, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        """As BaseRunner's (dynamic dims become `batch`), except that dims other than batch take the profile's opt."""
        if not self._dim_names:
            return super().make_random_feeds(batch, seed)
        check_batch(batch)
        rng = np.random.default_rng(seed)
        feeds = {}
        for t in self._io:
            if t.is_input:
                opt = self._profile.get(t.name, {}).get("opt", t.shape)
                dims = tuple(d if d >= 0 else batch if j == 0 else int(opt[j]) for j, d in enumerate(t.shape))
                feeds[t.name] = random_array(rng, dims, t.dtype)
        return feeds

    def _enqueue(self, key: tuple, torch) -> None:
        stream = self._stream
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise TargetError(f"TensorRT failed to run {self.name}: {collecting_logger(self._trt).summary()}")
        if self.cuda_graph and self.flavor != RTX:  # the call above was the warm-up: capture the next one
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=stream):
                    self._context.execute_async_v3(stream.cuda_stream)
            except RuntimeError as e:
                raise TargetError(f"CUDA graph capture of {self.name} failed ({first_line(e)}); run without "
                                  "cuda_graph (--cuda-graph)") from e
            self._graphs[key] = graph

    def check_feeds_impl(self, feeds: Mapping[str, np.ndarray]) -> None:
        """The batch and every other dynamic dim within the engine's profile (from the metadata: before the engine
        is touched)."""
        self._feed_batch(feeds)
        self._check_dims(feeds)

    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy checked `feeds` in, run the engine, copy the outputs out (BaseRunner.infer checks and times)."""
        self._ctx()
        shapes = self._shapes_for({t.name: tuple(feeds[t.name].shape) for t in self._io if t.is_input})
        import torch

        for t in self._io:  # an output can outgrow what its shape at the profile max needed
            if not t.is_input:
                self._reserve(torch, t, int(np.prod(shapes[t.name], dtype=np.int64)))

        with torch.cuda.stream(self._stream):
            for t in self._io:
                if t.is_input:
                    n = int(np.prod(shapes[t.name], dtype=np.int64))
                    host = self._host[t.name][:n]
                    host.copy_(torch.from_numpy(np.ascontiguousarray(feeds[t.name]).reshape(-1)))
                    self._device[t.name][:n].copy_(host, non_blocking=True)
            self._enqueue(self._set, torch)
            for t in self._io:
                if not t.is_input:
                    n = int(np.prod(shapes[t.name], dtype=np.int64))
                    self._host[t.name][:n].copy_(self._device[t.name][:n], non_blocking=True)
        self._stream.synchronize()
        outputs = {}
        for t in self._io:
            if not t.is_input:
                n = int(np.prod(shapes[t.name], dtype=np.int64))
                outputs[t.name] = self._host[t.name][:n].numpy().reshape(shapes[t.name]).copy()
        return outputs

    def __repr__(self) -> str:
        return f"TrtRunner({str(self.engine_path)!r}, plugins={self.plugins}, cuda_graph={self.cuda_graph})"


def _cuda_torch():
    """torch, once it is known to see a GPU (the engine needs one to deserialize)."""
    import torch

    if not torch.cuda.is_available():
        raise TargetError("TrtRunner needs an NVIDIA GPU and a CUDA build of torch (torch.cuda.is_available() is "
                          "False here); run on the GPU machine, or use --backend onnxruntime")
    return torch


def _torch_dtype(torch, dtype: np.dtype):
    """numpy dtype -> torch dtype (the two share a memory layout for every dtype TrtRunner feeds)."""
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
