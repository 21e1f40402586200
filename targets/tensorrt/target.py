"""The TensorRT target: `build_engine` = the lowering list for the spec + the builder; `TensorRTTarget` puts it and
TrtRunner behind targets/base.py's `Target` interface."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from tokensieve.runtime import tensorrt_flavors
from tokensieve.runtime.tensorrt_flavors import STANDARD, import_flavor
from tokensieve.runtime.tensorrt_runner import TrtRunner
from tokensieve.trust import check_onnx_external_data

from ..base import BuildSpec, EngineInfo, engine_file_name
from . import builder
from .flavors import is_strongly_typed
from .lowering import tensorrt_lowering
from .plugins import load_plugins


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, spec: BuildSpec,
                 extra_metadata: dict | None = None) -> EngineInfo:
    """Lower `onnx_path` for `spec` (tensorrt_lowering), build it for `spec.target`, and write the engine and
    `<engine>.json` atomically."""
    check_onnx_external_data(onnx_path)  # before the builder reads it: weights only from next to the .onnx
    trt = import_flavor(spec.parsed_target.flavor)
    lowering = tensorrt_lowering(spec, strongly_typed=is_strongly_typed(trt, spec.parsed_target.flavor),
                                 source=Path(onnx_path).name)
    return builder.build_engine(onnx_path, engine_path, spec, lowering, extra_metadata)


def build_plugin_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, spec: BuildSpec,
                        library: str | os.PathLike | None = None) -> EngineInfo:
    """build_engine for a model with tokensieve plugin nodes: the plugin library (default: $TOKENSIEVE_PLUGIN_LIB via
    plugins.plugin_library_path; never a library found in the cache) registered first and recorded in the metadata.

    The engine does not embed the library: whoever runs it loads the same library (Python `load_plugins`,
    `tokensieve-run --plugins`, `trtexec --dynamicPlugins`).
    """
    lib = load_plugins(import_flavor(spec.parsed_target.flavor), library)
    return build_engine(onnx_path, engine_path, dataclasses.replace(spec, plugin_library=str(lib), embed_plugins=False))


class TensorRTTarget:
    """TensorRT-RTX (rtx-smXY, ahead of time) and standard TensorRT (local) engines, run by TrtRunner."""

    name = "tensorrt"

    def build(self, model: str | os.PathLike, spec: BuildSpec, out: str | os.PathLike | None = None,
              extra_metadata: dict | None = None) -> EngineInfo:
        """model.onnx -> `out` (default: next to it, named per target and precision: model.rtx-sm86.fp32.engine)
        + `<out>.json`."""
        if out is None:
            cc = tensorrt_flavors.local_compute_capability() if spec.parsed_target.flavor == STANDARD else None
            out = Path(model).with_name(engine_file_name(Path(model).name.removesuffix(".onnx"), spec.target,
                                                         spec.precision, cc))
        return build_engine(model, out, spec, extra_metadata)

    def runner(self, artifact: EngineInfo | str | os.PathLike, **options) -> TrtRunner:
        """TrtRunner for a built engine; `options` are TrtRunner's (plugins=, cuda_graph=, name=)."""
        path = artifact.engine_path if isinstance(artifact, EngineInfo) else artifact
        return TrtRunner(path, **options)
