"""OrtRunner: run an ONNX file on ONNX Runtime with Polygraphy's BaseRunner life cycle.

    with OrtRunner("vit_s.pruned.onnx", threads=2) as r:
        outputs = r.infer(r.make_random_feeds(batch=1))
        print(r.inference_time)

Inputs are checked (names, dtypes, static dims; BaseRunner.infer) before ONNX Runtime sees them, so a wrong feed is a
one-line ConfigError instead of an ORT traceback. A model that cannot be loaded or run is a one-line TargetError.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import ConfigError, TargetError
from ..trust import check_onnx_external_data
from .base import BaseRunner, Dim, process_rss_bytes, trim_freed_heap

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


def default_providers() -> list[str]:
    """CUDA EP first when this onnxruntime build has it, then CPU."""
    available = ort.get_available_providers()
    return [_CUDA_EP, _CPU_EP] if _CUDA_EP in available else [_CPU_EP]


class OrtRunner(BaseRunner):
    """Runs one ONNX model on ONNX Runtime; `activate()` builds the session and `deactivate()` frees it.

    Like Polygraphy's OnnxrtRunner, but the session is also built on first use (`input_specs`, `infer`, ...)
    when the runner is not used as a context manager.
    """

    artifact_suffix = ".onnx"  # bench looks for OUT/dense.onnx and OUT/model.onnx

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
        check_onnx_external_data(self.model_path)  # before ONNX Runtime opens it: weights only from next to it
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
        self._rss_before: int | None = None  # process RSS before activate(), for memory_usage()

    # ---- life cycle (Polygraphy BaseRunner) ----
    @property
    def is_active(self) -> bool:
        return self._session is not None

    def activate_impl(self) -> None:
        """Load the model into an InferenceSession."""
        trim_freed_heap()  # else this session reuses pages the previous one freed and its RSS delta undercounts
        self._rss_before = process_rss_bytes()
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

    def deactivate_impl(self) -> None:
        """Free the session; the runner can be activated again."""
        self._session = None

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

    @property
    def device_label(self) -> str:
        return "onnxruntime:" + ",".join(self.active_providers)

    def memory_usage(self) -> dict:
        """Host memory: growth of the process RSS since `activate()` (weights + ORT's arena, which keeps what it
        allocated, so after the calls of interest this is their peak); peak_bytes is None where RSS is unreadable."""
        if self._session is None:
            raise ConfigError(f"{self.name} is not active; call memory_usage() inside `with runner:` after infer()")
        now = process_rss_bytes()
        peak = None if now is None or self._rss_before is None else max(0, now - self._rss_before)
        return {"kind": "host_rss_delta", "peak_bytes": peak}

    # ---- inference ----
    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on checked `feeds` (BaseRunner.infer checks and times)."""
        try:
            outs = self._sess().run(None, dict(feeds))
        except Exception as e:
            raise TargetError(f"ONNX Runtime failed to run {self.name}: {_first_line(e)}") from e
        return dict(zip(self.output_names, outs))

    def __repr__(self) -> str:
        return f"OrtRunner({str(self.model_path)!r}, threads={self.threads}, providers={self.providers}, spinning={self.spinning})"
