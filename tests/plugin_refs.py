"""Shared references for the plugin tests: float64 / numpy mirrors of the CUDA kernels (TokenCompact,
DiversitySelect), written from the kernels' contract apart from tokensieve's own code, and a runner that executes a
built engine on the GPU with the plugin library loaded (skips without CUDA)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tokensieve.targets.tensorrt import plugins


def token_compact_reference(x: np.ndarray, keep: np.ndarray, capacity: int, dynamic: bool = False,
                            min_count: int = 0) -> tuple[np.ndarray, ...]:
    """TokenCompact as a stable sort: the kept rows of each sample move to the front in their original order (a
    stable argsort of ~keep), the first `capacity` of them are the output, the rest zero. Capped: (compacted [B,K,C],
    count [B]). Dynamic: (compacted [B,S,C], count, S as a 0-D int32), S = max(max_b count_b, min_count).
    Written apart from kernel_harness.token_compact_expected (a per-row loop) so the two check each other."""
    keep = keep.astype(bool)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :capacity]                    # kept rows first, in order
    count = np.minimum(keep.sum(axis=1), capacity).astype(np.int32)
    rows = np.take_along_axis(x, order[:, :, None], axis=1)
    out = np.where(np.arange(rows.shape[1])[None, :, None] < count[:, None, None], rows, 0).astype(x.dtype)
    if out.shape[1] < capacity:                                                       # fewer tokens than capacity
        out = np.concatenate([out, np.zeros((x.shape[0], capacity - out.shape[1], x.shape[2]), x.dtype)], axis=1)
    if not dynamic:
        return out, count
    size = max(int(count.max(initial=0)), min_count)
    return out[:, :size], count, np.array(size, np.int32)


def diversity_select_reference(x: np.ndarray, k: int, mode: int, lam: float, num_prefix_tokens: int,
                               importance: np.ndarray | None = None) -> np.ndarray:
    """DivPrune (mode 0) / MMR (mode 1) as in diversity_select.cu: greedy, ties to the lowest index, ascending."""
    out = []
    for b in range(x.shape[0]):
        f = x[b, num_prefix_tokens:].astype(np.float64)
        f /= np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
        sim = f @ f.T
        chosen: list[int] = []
        if mode == 0:
            score = np.where(np.eye(len(f), dtype=bool), np.inf, 1 - sim).min(axis=1)
        else:
            score = np.full(len(f), -np.inf)
        for step in range(k):
            imp = None if mode == 0 else importance[b, num_prefix_tokens:]
            # MMR's first pick is argmax importance for every lam (lam = 0 too), as IDPruner's first round
            v = score if mode == 0 else imp if step == 0 else lam * imp - (1 - lam) * score
            v = np.where(np.isin(np.arange(len(f)), chosen), -np.inf, v)
            s = int(np.argmax(v))
            chosen.append(s)
            if mode == 0:  # distance to the chosen set only: the first pick's nearest-neighbour score is dropped
                score = 1 - sim[s] if step == 0 else np.minimum(score, 1 - sim[s])
            else:
                score = np.maximum(score, sim[s])
        out.append(np.sort(np.array(chosen)) + num_prefix_tokens)
    return np.stack(out).astype(np.int32)


def run_engine(engine_path: Path, flavor: str, feeds: dict[str, np.ndarray], lib: Path) -> dict[str, np.ndarray]:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    trt = __import__(flavor)
    plugins.load_plugins(trt, lib)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    dtypes = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT64": torch.int64,
              "BOOL": torch.bool}

    class Allocator(trt.IOutputAllocator):
        """Outputs whose shape depends on the data (-1 until enqueue, e.g. TokenCompact dynamic=1): TensorRT asks
        for their memory and reports their shape during execute_async_v3."""

        def __init__(self):
            trt.IOutputAllocator.__init__(self)
            self.memory, self.shapes = {}, {}

        def reallocate_output(self, name, memory, size, alignment):
            self.memory[name] = torch.empty(max(int(size), 1), dtype=torch.uint8, device="cuda")
            return self.memory[name].data_ptr()

        def reallocate_output_async(self, name, memory, size, alignment, stream):
            return self.reallocate_output(name, memory, size, alignment)

        def notify_shape(self, name, shape):
            self.shapes[name] = tuple(shape)

    allocator, buffers = Allocator(), {}
    for name, value in feeds.items():
        buffers[name] = torch.from_numpy(value).cuda().contiguous()
        context.set_input_shape(name, value.shape)
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if name in buffers:
            context.set_tensor_address(name, buffers[name].data_ptr())
            continue
        shape = tuple(context.get_tensor_shape(name))
        if -1 in shape:
            assert context.set_output_allocator(name, allocator)
        else:
            buffers[name] = torch.empty(shape, dtype=dtypes[engine.get_tensor_dtype(name).name], device="cuda")
            context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    out = {n: t.cpu().numpy() for n, t in buffers.items() if n not in feeds}
    for name, shape in allocator.shapes.items():
        dtype = dtypes[engine.get_tensor_dtype(name).name]
        n = int(np.prod(shape))
        out[name] = allocator.memory[name].view(dtype)[:n].reshape(shape).cpu().numpy()
    return out
