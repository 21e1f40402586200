"""OrtRunner: run an ONNX file on ONNX Runtime with Polygraphy's BaseRunner life cycle.

    with OrtRunner("vit_s.pruned.onnx", threads=2) as r:
        outputs = r.infer(r.make_random_feeds(batch=1))
        print(r.inference_time)

Inputs are checked (names, dtypes, static dims) before ONNX Runtime sees them, so a wrong feed is a one-line
ConfigError instead of an ORT traceback. A model that cannot be loaded or run is a one-line TargetError.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import numpy as np
import onnxruntime as ort

from ..errors import ConfigError, TargetError

Dim = Union[int, str, None]

# ONNX Runtime's type strings -> numpy dtypes (onnxruntime/python/onnxruntime_pybind_mlvalue.cc).
_ORT_TO_NUMPY: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}

_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"


def _first_line(e: BaseException) -> str:
    """ORT messages carry multi-line stack dumps; keep the first non-empty line."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


def _fmt_shape(shape: tuple) -> str:
    """(1, 3, 224, 224) / (batch, 3, 224, 224) / (?, 3); a 1-d shape keeps its comma like a tuple."""
    parts = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def default_providers() -> list[str]:
    """CUDA EP first when this onnxruntime build has it, then CPU."""
    available = ort.get_available_providers()
    return [_CUDA_EP, _CPU_EP] if _CUDA_EP in available else [_CPU_EP]


class OrtRunner:
    """Runs one ONNX model on ONNX Runtime; `activate()` builds the session and `deactivate()` frees it.

    Like Polygraphy's OnnxrtRunner, but the session is also built on first use (`input_specs`, `infer`, ...)
    when the runner is not used as a context manager.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
        spinning: bool = True,
        name: str | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise TargetError(f"ONNX model {str(self.model_path)!r} does not exist; check the path or re-run `tokensieve export`")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"threads={threads!r} must be a positive integer or None (ONNX Runtime's default)")
        if providers is not None:
            available = ort.get_available_providers()
            missing = [p for p in providers if p not in available]
            if not providers or missing:
                raise ConfigError(
                    f"execution providers {missing or providers} are not available in this onnxruntime build; "
                    f"choose from {available}"
                )
        self.threads = threads
        self.providers = list(providers) if providers is not None else default_providers()
        self.spinning = spinning
        self.name = name if name is not None else f"onnxruntime:{self.model_path.name}"
        self.inference_time: float | None = None  # seconds taken by the last infer(), as in Polygraphy
        self._session: ort.InferenceSession | None = None

    # ---- life cycle (Polygraphy BaseRunner) ----
    @property
    def is_active(self) -> bool:
        return self._session is not None

    def activate(self) -> "OrtRunner":
        """Load the model into an InferenceSession; a no-op if already active."""
        if self._session is not None:
            return self
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: keep ORT's warnings out of benchmark output
        if self.threads is not None:
            opts.intra_op_num_threads = self.threads
        if not self.spinning:
            # Idle worker threads otherwise busy-wait after each run and steal cores from other sessions.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=self.providers)
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types, none exported stably
            raise TargetError(
                f"ONNX Runtime cannot load {str(self.model_path)!r}: {_first_line(e)}; "
                "check that the file is a complete ONNX model (and its .data file sits next to it)"
            ) from e
        return self

    def deactivate(self) -> None:
        """Free the session; the runner can be activated again."""
        self._session = None

    def __enter__(self) -> "OrtRunner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def _sess(self) -> ort.InferenceSession:
        return self._session if self._session is not None else self.activate()._session  # type: ignore[return-value]

    # ---- metadata ----
    @property
    def input_specs(self) -> list[tuple[str, tuple[Dim, ...], np.dtype]]:
        """[(name, shape, dtype)]; a dynamic dim is its symbolic name (str) or None when unnamed."""
        specs = []
        for i in self._sess().get_inputs():
            if i.type not in _ORT_TO_NUMPY:
                raise TargetError(f"input {i.name!r} has type {i.type}, which OrtRunner cannot feed; export a plain tensor input")
            specs.append((i.name, tuple(i.shape), _ORT_TO_NUMPY[i.type]))
        return specs

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._sess().get_outputs()]

    @property
    def active_providers(self) -> list[str]:
        """Providers the session really uses (a CUDA EP without a GPU falls back to CPU)."""
        return list(self._sess().get_providers())

    # ---- inference ----
    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        specs = self.input_specs
        expected = [n for n, _, _ in specs]
        unknown = [n for n in feeds if n not in expected]
        if unknown:
            raise ConfigError(f"unknown input(s) {unknown} for {self.name}; the model's inputs are {expected}")
        missing = [n for n in expected if n not in feeds]
        if missing:
            raise ConfigError(f"missing input(s) {missing} for {self.name}; the model's inputs are {expected}")
        for name, shape, dtype in specs:
            arr = feeds[name]
            if not isinstance(arr, np.ndarray):
                raise ConfigError(f"input {name!r} is a {type(arr).__name__}, not a numpy array; pass np.asarray(..., dtype={dtype.name})")
            if arr.dtype != dtype:
                raise ConfigError(f"input {name!r} has dtype {arr.dtype.name} but the model expects {dtype.name}; cast it with .astype(np.{dtype.name})")
            bad_rank = arr.ndim != len(shape)
            bad_dim = not bad_rank and any(isinstance(d, int) and d != a for d, a in zip(shape, arr.shape))
            if bad_rank or bad_dim:
                raise ConfigError(
                    f"input {name!r} has shape {_fmt_shape(arr.shape)} but the model expects {_fmt_shape(shape)}; resize your input"
                )

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check `feeds`, run the model, return {output name: array}; sets `inference_time` (s)."""
        sess = self._sess()
        self._check_feeds(feeds)
        start = time.perf_counter()
        try:
            outs = sess.run(None, dict(feeds))
        except Exception as e:
            raise TargetError(f"ONNX Runtime failed to run {self.name}: {_first_line(e)}") from e
        self.inference_time = time.perf_counter() - start
        return dict(zip(self.output_names, outs))

    def last_inference_time(self) -> float | None:
        """Polygraphy spelling of `inference_time`."""
        return self.inference_time

    def make_random_feeds(self, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        """One random array per input; every dynamic dim becomes `batch`. Floats ~ N(0, 1), ints in [0, 10)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch={batch!r} must be a positive integer")
        rng = np.random.default_rng(seed)
        feeds = {}
        for name, shape, dtype in self.input_specs:
            dims = tuple(d if isinstance(d, int) and d >= 0 else batch for d in shape)
            if dtype.kind == "f":
                arr = rng.standard_normal(dims).astype(dtype)
            elif dtype.kind == "b":
                arr = rng.integers(0, 2, dims).astype(dtype)
            else:
                arr = rng.integers(0, 10, dims).astype(dtype)
            feeds[name] = arr
        return feeds

    def __repr__(self) -> str:
        return f"OrtRunner({str(self.model_path)!r}, threads={self.threads}, providers={self.providers}, spinning={self.spinning})"
