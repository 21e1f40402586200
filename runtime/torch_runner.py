"""TorchRunner: run the rewritten graph itself (a torch.export `.pt2`) on PyTorch, CUDA or CPU, with OrtRunner's life cycle.

    with TorchRunner("out/model.pt2", device="cuda", dtype="fp16", cuda_graph=True) as r:
        outputs = r.infer(r.make_random_feeds(batch=8))

`api.save(..., parts=("torch",))` writes OUT/model.pt2 and OUT/dense.pt2 with `write_program`: the same
ExportedPrograms the ONNX files are converted from (after every graph pass), plus a small `tokensieve.json` entry
naming the inputs and outputs. Loading imports tokensieve.graph_passes.methods.ops, which registers the custom ops
(`tokensieve::prune_topk`, ...) a pruned graph calls. This is the backend for a GPU without TensorRT.

Precision: fp32 runs the graph as traced. fp16 casts the weights to float16 and, since the graph was traced in
float32, casts the activation input of every op that reads a weight (linear, conv, layer norm, ...) to the weight's
dtype; the explicit float32 islands the methods trace (`x.float()` before cosine scores) stay float32, so scores
and kept indices are computed as in the fp32 graph. The `_assert_tensor_metadata` checks torch.export records for
trace-time dtypes are dropped in both modes (they would reject the fp16 activations).

`cuda_graph=True` captures one CUDA graph per input shape after warm-up and replays it; `compile=True` wraps the
module in torch.compile first. `measure_cuda_alternating` times zero-argument GPU callables with CUDA events in
the same alternating blocks as runtime/timing.py.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from ..errors import ConfigError, TargetError, first_line
from .base import BaseRunner, Dim, process_rss_bytes, trim_freed_heap
from .timing import LatencyStats, _check_count, block_order

META_ENTRY = "tokensieve.json"   # the extra file inside a .pt2 that names inputs and outputs
META_SCHEMA = "tokensieve.pt2/1"
DTYPES = ("fp32", "fp16")
DEVICES = ("cuda", "cpu")

# aten ops that read a weight: their floating activation arguments are cast to the weight dtype in fp16 mode.
_WEIGHT_OPS = ("linear", "addmm", "mm", "bmm", "matmul", "convolution", "conv2d", "conv1d", "conv3d", "layer_norm",
               "native_layer_norm", "group_norm", "batch_norm", "_native_batch_norm_legit_no_training", "embedding",
               "baddbmm", "addmv", "rms_norm", "add", "mul", "sub", "where", "cat")


def _torch():
    import torch

    import tokensieve.graph_passes.methods.ops  # noqa: F401  registers tokensieve::prune_topk & co. for loading
    return torch


def write_program(program, path: str | Path, output_names: list[str]) -> Path:
    """torch.export.save `program` to `path` (atomically) with the input/output names the runner reports."""
    from ..fileio import write_bytes_atomic

    torch = _torch()
    meta = {"schema": META_SCHEMA, "input_names": list(program.graph_signature.user_inputs),
            "output_names": list(output_names), "torch_version": torch.__version__}
    if len(meta["output_names"]) != len(program.graph_signature.user_outputs):
        raise ConfigError(f"write_program: {len(output_names)} output names for a program with "
                          f"{len(program.graph_signature.user_outputs)} outputs; name every output")
    buf = io.BytesIO()  # torch.export.save wants a buffer or a path ending in .pt2, not the atomic temp name
    torch.export.save(program, buf, extra_files={META_ENTRY: json.dumps(meta)})
    return write_bytes_atomic(path, buf.getvalue())


def check_program_archive(path: str | Path) -> None:
    """One-line TargetError unless the .pt2 at `path` loads without unpickling anything.

    torch.export.load (torch 2.13) unpickles with weights_only=False in three places: payloads whose config says
    `use_pickle`, custom / opaque object constants, and a `.pt` artifact (sample inputs, legacy weights) that fails
    to load with weights_only=True. A program tokensieve writes has none of them, so a .pt2 from an untrusted export
    folder is refused if its payload configs name one, and each of its `.pt` entries must load weights-only here
    first (then torch's own load takes its weights-only branch)."""
    import zipfile

    torch = _torch()

    def refuse(what: str) -> TargetError:
        return TargetError(f"{str(path)!r} holds {what}, which loading would unpickle (run code); tokensieve "
                           "loads only .pt2 files of plain tensors: re-export with `api.save(..., parts=('torch',))`")

    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename
                if name.endswith("_weights_config.json") or name.endswith("_constants_config.json"):
                    try:
                        config = json.loads(archive.read(info)).get("config", {})
                    except (ValueError, AttributeError):
                        raise refuse(f"an unreadable payload config {name!r}") from None
                    if not isinstance(config, dict):
                        raise refuse(f"a malformed payload config {name!r}")
                    for fqn, meta in config.items():
                        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
                            raise refuse(f"a pickled payload {str(fqn)[:80]!r}")
                        if name.endswith("_constants_config.json") and \
                                not str(meta.get("path_name", "")).startswith("tensor_"):
                            raise refuse(f"a custom-object constant {str(fqn)[:80]!r}")
                elif name.endswith(".pt"):
                    try:
                        torch.load(io.BytesIO(archive.read(info)), weights_only=True)
                    except Exception:  # noqa: BLE001 - anything a weights-only unpickler rejects
                        raise refuse(f"an object artifact {name!r}") from None
    except zipfile.BadZipFile:
        raise TargetError(f"cannot load {str(path)!r}: not a torch program archive (.pt2); re-export it") from None


def read_program(path: str | Path):
    """(ExportedProgram, metadata dict) of a .pt2 written by `write_program`; one-line TargetError otherwise."""
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise TargetError(f"torch program {str(path)!r} does not exist; write it with api.save(result, OUT, "
                          "parts=('torch',)) (`tokensieve export` writes only the ONNX files)")
    check_program_archive(path)  # before torch.export.load, whose fallbacks unpickle
    extra = {META_ENTRY: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad archive or a version skew
        raise TargetError(f"cannot load {str(path)!r} with torch {torch.__version__}: {first_line(e)}; "
                          "re-export it with this torch version") from e
    try:
        meta = json.loads(extra[META_ENTRY]) if extra[META_ENTRY] else {}
    except json.JSONDecodeError:
        meta = {}
    if meta.get("schema") != META_SCHEMA:
        n = len(program.graph_signature.user_outputs)
        meta = {"input_names": list(program.graph_signature.user_inputs),
                "output_names": [f"output_{i}" for i in range(n)]}
    return program, meta


def _drop_dtype_asserts(gm) -> int:
    """Remove torch.export's `_assert_tensor_metadata` nodes (checks of trace-time dtypes/devices)."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and "_assert_tensor_metadata" in str(node.target) and not node.users:
            gm.graph.erase_node(node)
            dropped += 1
    return dropped


def _is_weight(node) -> bool:
    return node.op == "get_attr"


def _float_value(node) -> bool:
    """The node produces one floating tensor (by its traced meta value; unknown counts as floating)."""
    val = node.meta.get("val") if hasattr(node, "meta") else None
    if val is None:
        return node.op != "get_attr"
    dtype = getattr(val, "dtype", None)
    return dtype is not None and dtype.is_floating_point


def cast_weight_inputs(gm, dtype) -> int:
    """In `gm` (weights already `dtype`), cast the floating activation arguments of every op in _WEIGHT_OPS that reads
    a weight to `dtype` (a no-op where they already are); returns how many casts were inserted."""
    torch = _torch()
    inserted = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target.__name__.split(".")[0] not in _WEIGHT_OPS:
            continue
        inputs = node.all_input_nodes
        if not any(_is_weight(a) for a in inputs):
            continue
        for arg in inputs:
            if _is_weight(arg) or not _float_value(arg):
                continue
            with gm.graph.inserting_before(node):
                cast = gm.graph.call_function(torch.ops.aten.to.dtype, (arg, dtype))
            node.replace_input_with(arg, cast)
            inserted += 1
    return inserted


def program_module(program, device: str, dtype: str = "fp32"):
    """The runnable GraphModule of `program` on `device` ("cuda", "cpu"; "meta" in tests) in `dtype`.

    torch.export's move_to_device_pass, not Module.to: the graph creates tensors with the trace-time device baked in
    (`arange(..., device=cpu)` in DivPrune's one-hot, ToMe's assignment matrices), which Module.to does not change.
    """
    torch = _torch()
    from torch.export.passes import move_to_device_pass

    _check_option("dtype", dtype, DTYPES)
    module = move_to_device_pass(program, device).module()
    _drop_dtype_asserts(module)
    if dtype == "fp16":
        # new half Parameters instead of casting the shared ones in place: the program (whose weights the module
        # shares when nothing had to move) stays float32 for its next use
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            module = module.half()
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        cast_weight_inputs(module, torch.float16)
    module.graph.lint()
    module.recompile()
    return module  # an unlifted ExportedProgram module is always in eval mode


def _numpy_dtype(torch, dtype) -> np.dtype:
    """torch dtype -> numpy dtype (via an empty tensor: numpy and torch share these layouts)."""
    return torch.empty(0, dtype=dtype).numpy().dtype


def _check_option(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


class TorchRunner(BaseRunner):
    """Runs one .pt2 written by `write_program`; `activate()` loads it onto the device, `deactivate()` frees it."""

    artifact_suffix = ".pt2"  # bench looks for OUT/dense.pt2 and OUT/model.pt2

    def __init__(self, model_path: str | Path, *, device: str | None = None, dtype: str | None = None,
                 cuda_graph: bool = False, compile: bool = False, threads: int | None = None,
                 name: str | None = None, program: tuple | None = None) -> None:
        """`program`: (ExportedProgram, metadata) read_program(model_path) already returned, to build several runners
        (fp32 and fp16) from one load; it is not modified."""
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise TargetError(f"torch program {str(self.model_path)!r} does not exist; write it with "
                              "api.save(result, OUT, parts=('torch',)) (`tokensieve export` writes only the ONNX files)")
        dtype = dtype or "fp32"
        _check_option("dtype", dtype, DTYPES)
        if device is not None:
            _check_option("device", device, DEVICES)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"threads={threads!r} must be a positive integer or None (torch's default)")
        torch = _torch()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device='cuda' but torch {torch.__version__} sees no CUDA GPU; use --device cpu")
        if cuda_graph and self.device != "cuda":
            raise ConfigError("cuda_graph (--cuda-graph) needs --device cuda")
        self.dtype, self.cuda_graph, self.compile, self.threads = dtype, bool(cuda_graph), bool(compile), threads
        self.name = name if name is not None else f"torch:{self.model_path.name}"
        self.inference_time: float | None = None
        self._loaded = program
        self._program = None
        self._meta: dict = {}
        self._module = None
        self._graphs: dict = {}      # input shapes -> (CUDAGraph, static inputs, static outputs)
        self._mem_before: int | None = None

    # ---- life cycle ----
    @property
    def is_active(self) -> bool:
        return self._module is not None

    def activate_impl(self) -> None:
        torch = _torch()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._mem_before = torch.cuda.memory_allocated()
        else:
            trim_freed_heap()
            self._mem_before = process_rss_bytes()
        program, self._meta = self._loaded if self._loaded is not None else read_program(self.model_path)
        module = program_module(program, self.device, self.dtype)
        self._program = program
        self._module = torch.compile(module, dynamic=False) if self.compile else module

    def deactivate_impl(self) -> None:
        self._module = self._program = None
        self._graphs = {}
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _mod(self):
        return self._module if self._module is not None else self.activate()._module

    # ---- metadata ----
    @property
    def input_specs(self) -> list[tuple[str, tuple[Dim, ...], np.dtype]]:
        """[(name, shape, dtype)]; the dynamic batch dim is its symbol's name (str)."""
        torch = _torch()
        self._mod()
        placeholders = [n for n in self._program.graph.nodes if n.op == "placeholder"]
        by_name = {n.name: n for n in placeholders}
        specs = []
        for name in self._meta["input_names"]:
            val = by_name[name].meta["val"]
            shape = tuple(int(d) if isinstance(d, int) or str(d).isdigit() else str(d) for d in val.shape)
            specs.append((name, shape, _numpy_dtype(torch, val.dtype)))
        return specs

    @property
    def output_names(self) -> list[str]:
        self._mod()
        return list(self._meta["output_names"])

    @property
    def device_label(self) -> str:
        torch = _torch()
        where = torch.cuda.get_device_name() if self.device == "cuda" else "CPU"
        extras = [self.dtype] + (["CUDA graph"] if self.cuda_graph else []) + (["torch.compile"] if self.compile else [])
        return f"torch {torch.__version__} on {where} ({', '.join(extras)})"

    def memory_usage(self) -> dict:
        """CUDA: peak allocated bytes above what was allocated before activate(); CPU: process RSS growth."""
        if self._module is None:
            raise ConfigError(f"{self.name} is not active; call memory_usage() inside `with runner:` after infer()")
        if self.device == "cuda":
            import torch

            return {"kind": "cuda_peak_allocated", "peak_bytes": torch.cuda.max_memory_allocated() - (self._mem_before or 0)}
        now = process_rss_bytes()
        peak = None if now is None or self._mem_before is None else max(0, now - self._mem_before)
        return {"kind": "host_rss_delta", "peak_bytes": peak}

    # ---- inference ----
    def run(self, *inputs):
        """Run on device tensors (already on self.device), no copies and no synchronization; a tuple of tensors.
        With cuda_graph, the first call per input shape warms up and captures, later calls replay."""
        torch = _torch()
        module = self._mod()
        if not self.cuda_graph:
            with torch.inference_mode():
                out = module(*inputs)
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)
        key = tuple(tuple(t.shape) for t in inputs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(torch, module, inputs)
            self._graphs[key] = entry
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, inputs):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        graph.replay()
        return static_out

    def _capture(self, torch, module, inputs):
        static_in = [t.clone() for t in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.inference_mode(), torch.cuda.stream(stream):
                for _ in range(3):  # warm-up (cuBLAS handles, torch.compile) off the capture
                    module(*static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                out = module(*static_in)
        except Exception as e:  # noqa: BLE001 - capture fails on host syncs (data-dependent token counts)
            raise TargetError(f"{self.name}: cannot capture a CUDA graph: {first_line(e)}; run without --cuda-graph "
                              "(a data-dependent token axis, adaptive(compact=true), syncs with the host)") from e
        out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return graph, static_in, out

    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy checked `feeds` (numpy) to the device, run, copy the outputs back (BaseRunner.infer checks and
        times)."""
        torch = _torch()
        inputs = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n, _, _ in self.input_specs]
        try:
            outs = self.run(*inputs)
            outs = [o.cpu().numpy() for o in outs]
        except TargetError:
            raise
        except Exception as e:  # noqa: BLE001
            raise TargetError(f"torch failed to run {self.name}: {first_line(e)}") from e
        return dict(zip(self.output_names, outs))

    def __repr__(self) -> str:
        return (f"TorchRunner({str(self.model_path)!r}, device={self.device!r}, dtype={self.dtype!r}, "
                f"cuda_graph={self.cuda_graph}, compile={self.compile})")


def measure_cuda_alternating(cases: dict[str, Callable[[], object]], *, blocks: int = 4, iters: int = 20,
                             warmup: int = 5, before_block: Callable[[str], None] | None = None) -> dict[str, LatencyStats]:
    """runtime/timing.measure_alternating for GPU work: each call is timed with a pair of CUDA events on the current
    stream (no host sync inside a block; one at its end), blocks alternate A B B A ..."""
    _check_count("blocks", blocks, 1)
    _check_count("iters", iters, 1)
    _check_count("warmup", warmup, 0)
    if not cases:
        raise ConfigError("measure_cuda_alternating needs at least one case to time")
    import torch

    samples: dict[str, list[float]] = {n: [] for n in cases}
    for order in block_order(list(cases), blocks):
        for name in order:
            if before_block is not None:
                before_block(name)
            fn = cases[name]
            for _ in range(warmup):
                fn()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            samples[name].extend(s.elapsed_time(e) for s, e in events)
    return {n: LatencyStats(n, tuple(v)) for n, v in samples.items()}
