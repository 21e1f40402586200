"""ONNX Runtime's transformer optimizer on a tokensieve ONNX (`tokensieve export --optimize`, api.optimize_folder).

The pruned model fuses like the dense one because its stages gather with GatherElements (ORT's symbolic shape
inference follows it) and `hoist_token_gathers` keeps each residual add directly in front of its LayerNorm. The
optimizer runs its Python fusions only (opt_level 0), so the result holds ORT contrib ops (SkipLayerNormalization,
BiasGelu, ...) but no provider-specific rewrites: it runs on any ORT execution provider, not on TensorRT.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

from tokensieve.errors import TargetError, first_line
from tokensieve.fileio import write_bytes_atomic

MAX_PROTO_BYTES = 2**31 - 1  # one protobuf file; larger models keep external data, which the optimizer rewrites


@contextlib.contextmanager
def _quiet():
    """The optimizer prints advice on stdout and logs every fusion; keep the CLI's output ours."""
    loggers = [logging.getLogger(n) for n in ("onnxruntime.transformers", "fusion", "onnx_model", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def optimize_onnx(src: str | os.PathLike, dst: str | os.PathLike, *, model_type: str = "vit", num_heads: int = 0,
                  hidden_size: int = 0) -> dict[str, int]:
    """Run ORT's transformer optimizer on `src`, write `dst` atomically -> {fused op: count} (non-zero only).

    num_heads / hidden_size 0: the optimizer detects them from the graph (what it does for dense and pruned alike)."""
    try:
        from onnxruntime.transformers import optimizer
    except ImportError as e:
        raise TargetError(f"ONNX Runtime's transformer optimizer is not importable ({first_line(e)}); "
                          "pip install onnxruntime (it ships onnxruntime.transformers)") from e
    try:
        with _quiet():
            model = optimizer.optimize_model(str(src), model_type=model_type, num_heads=num_heads,
                                             hidden_size=hidden_size, opt_level=0)
            stats = model.get_fused_operator_statistics()
    except Exception as e:  # noqa: BLE001 - the optimizer raises anything on a graph it cannot follow
        raise TargetError(f"ONNX Runtime's transformer optimizer failed on {str(src)!r}: {type(e).__name__}: "
                          f"{first_line(e)}; export without --optimize") from e
    proto = model.model
    if proto.ByteSize() > MAX_PROTO_BYTES:
        raise TargetError(f"the optimized {Path(src).name} is over 2 GiB in one protobuf; --optimize supports models "
                          "below that size")
    write_bytes_atomic(dst, proto.SerializeToString())
    return {k: int(v) for k, v in stats.items() if v}
