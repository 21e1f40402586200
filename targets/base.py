"""What every target shares: the `Target` interface, the `BuildSpec` a build is asked for, its `Precision`, the
target names, and the build defaults, each written once here (STYLE.md section 4).

    target = TARGETS["tensorrt"]                       # tokensieve.targets.registry: the one name -> backend table
    info = target.build("out/model.onnx", BuildSpec(precision=Precision.FP16), "out/model.engine")
    with target.runner(info) as r:                     # a tokensieve.runtime Runner
        outputs = r.infer(feeds)

Strings become typed values at the edge (`Precision.parse`, `parse_target`, `parse_dims`: the CLI flags and the
api keywords), each with a one-line ConfigError saying how to fix it. This module imports only errors and the
runtime's flavor table (no onnx, no TensorRT), so the CLI reads the defaults without loading a backend.
"""
from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

from tokensieve.errors import ConfigError
from tokensieve.runtime.tensorrt_flavors import RTX, RTX_COMPUTE_CAPABILITIES, STANDARD, local_compute_capability
from tokensieve.runtime.tensorrt_plugins import LIBRARY_NAME, PLUGIN_LIB_ENV

if TYPE_CHECKING:
    from tokensieve.runtime.base import BaseRunner


class Precision(str, enum.Enum):
    """Engine precision; a new one (int8, fp8) is one line here plus what each target does with it."""

    FP32 = "fp32"   # TF32 math where the GPU has it (TensorRT's default)
    FP16 = "fp16"   # weights and activations fp16; scores, TopK inputs, norms and softmax stay fp32
    INT8 = "int8"   # from a Q/DQ ONNX (tokensieve quantize / export --precision int8): the MatMuls int8, the rest fp32

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: "Precision | str") -> "Precision":
        """'fp16' -> Precision.FP16; ConfigError naming the choices otherwise."""
        if isinstance(value, cls):
            return value
        for p in cls:
            if value == p.value:
                return p
        raise ConfigError(f"Unknown precision {value!r}; use one of {', '.join(PRECISIONS)}")


PRECISIONS = tuple(p.value for p in Precision)   # the --precision choices

# ONNX node metadata a lowering pass sets on a node that must stay fp32 in an fp16 build of a weakly typed
# TensorRT (10.x: FP16 flag + per-layer constraints); the builder pins those nodes' layers to fp32.
PIN_FP32_TAG = "tokensieve.precision"

# Target names: rtx-smXY builds ahead of time with TensorRT-RTX (no GPU needed); local builds with standard
# TensorRT for this machine's GPU.
VALID_TARGETS = tuple(f"rtx-{sm}" for sm in RTX_COMPUTE_CAPABILITIES) + ("local",)

# The build defaults, for the CLI flags, the api keywords and BuildSpec alike.
DEFAULT_TARGET = "rtx-sm86"
DEFAULT_PRECISION = Precision.FP32
DEFAULT_MAX_BATCH = 8


class ParsedTarget(NamedTuple):
    flavor: str                      # "tensorrt_rtx" | "tensorrt"
    compute_capability: str | None   # "8.6"; None means the local GPU (standard TensorRT)


def parse_target(s: str) -> ParsedTarget:
    """'rtx-sm86' -> ('tensorrt_rtx', '8.6'); 'local' -> ('tensorrt', None)."""
    key = str(s).strip().lower()
    if key == "local":
        return ParsedTarget(STANDARD, None)
    sm = key.removeprefix("rtx-")
    if key.startswith("rtx-") and sm in RTX_COMPUTE_CAPABILITIES:
        return ParsedTarget(RTX, RTX_COMPUTE_CAPABILITIES[sm])
    device = {"sm87": "Jetson Orin", "sm90": "H100/H200", "sm72": "Jetson Xavier"}.get(sm) if key.startswith("rtx-") else None
    why = f"; TensorRT-RTX cannot build for {sm} ({device}): use --target local on that device" if device else ""
    raise ConfigError(f"Unknown TensorRT target {s!r}; use one of {', '.join(VALID_TARGETS)}{why}")


@dataclass(frozen=True)
class BuildSpec:
    """How to build one engine. The batch profile applies to inputs whose dim 0 is dynamic (and to any other dim
    named like one of those, e.g. Qwen2-VL's position_ids [3, batch, sequence]); `dims` gives every other dynamic dim
    its (min, opt, max) by its ONNX dim_param name, e.g. {"sequence": (1, 64, 512), "past_sequence": (0, 64, 1024)}.
    Names no input uses are ignored, so one `dims` serves lm_prefill and lm_decode alike.
    `precision` takes a Precision (a string is parsed, as at the CLI)."""
    target: str = DEFAULT_TARGET     # one of VALID_TARGETS
    precision: Precision = DEFAULT_PRECISION
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = DEFAULT_MAX_BATCH
    timing_cache: str | None = None  # file reused across builds (created if missing); standard TensorRT only
    workspace_mib: int | None = None   # the builder's workspace pool limit (TensorRT's default: the GPU's memory)
    builder_optimization_level: int | None = None  # 0..5; TensorRT's default 3; higher searches longer for faster kernels
    layer_info: str | None = None      # write the engine inspector's per-layer JSON here (needs the engine's GPU)
    plugin_library: str | None = None  # libtokensieve_plugins.so, registered before parsing (tokensieve plugin nodes)
    embed_plugins: bool = False        # serialize the library into the plan (VERSION_COMPATIBLE + EXCLUDE_LEAN_RUNTIME)
    dims: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)  # dim_param -> (min, opt, max)

    def __post_init__(self) -> None:
        parse_target(self.target)
        object.__setattr__(self, "dims", _checked_dims(self.dims))
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(f"Batch profile needs 1 <= min <= opt <= max, got min={self.min_batch} "
                              f"opt={self.opt_batch} max={self.max_batch}; fix --min/--opt/--max-batch")
        if self.embed_plugins and not self.plugin_library:
            raise ConfigError("embed_plugins needs plugin_library; pass --plugins /path/to/libtokensieve_plugins.so")
        if self.plugin_library and not Path(self.plugin_library).is_file():
            raise ConfigError(f"--plugins {self.plugin_library!r} does not exist; pass the {LIBRARY_NAME} that "
                              f"`python -m tokensieve.targets.tensorrt.plugins` builds and prints (the Python API "
                              f"also finds it through ${PLUGIN_LIB_ENV})")
        if self.workspace_mib is not None and (not _is_int(self.workspace_mib) or self.workspace_mib <= 0):
            raise ConfigError(f"--workspace {self.workspace_mib!r} must be a positive number of MiB")
        level = self.builder_optimization_level
        if level is not None and (not _is_int(level) or not 0 <= level <= 5):
            raise ConfigError(f"--builder-opt-level {level!r} must be 0..5 (TensorRT's default is 3)")
        flavor, cc = self.parsed_target
        if self.timing_cache is not None and flavor == RTX:
            raise ConfigError(f"--timing-cache: TensorRT-RTX ({self.target}) keeps no timing cache (it picks kernels "
                              "on the GPU at run time); drop --timing-cache, or build with --target local")
        if self.layer_info is not None and flavor == RTX and local_compute_capability() != cc:
            raise ConfigError(f"--layer-info reads the built engine back (TensorRT's engine inspector), which needs a "
                              f"GPU of compute capability {cc} here; drop it, or build on such a GPU (or --target local)")

    @property
    def parsed_target(self) -> ParsedTarget:
        return parse_target(self.target)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _checked_dims(dims) -> dict[str, tuple[int, int, int]]:
    """{name: (min, opt, max)} with 0 <= min <= opt <= max (0: an empty past, which TensorRT accepts)."""
    if not isinstance(dims, Mapping):
        raise ConfigError(f"dims must map dim names to (min, opt, max), got {type(dims).__name__}; "
                          "e.g. --dims sequence=1:64:512")
    out = {}
    for name, rng in dims.items():
        try:
            mn, op, mx = (int(v) for v in rng)
            ok = isinstance(name, str) and bool(name) and all(not isinstance(v, bool) and int(v) == v for v in rng)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"dims[{name!r}] = {rng!r} is not three integers (min, opt, max); "
                              f"e.g. --dims {name}=1:64:512")
        if not 0 <= mn <= op <= mx or mx == 0:
            raise ConfigError(f"dim {name!r} needs 0 <= min <= opt <= max and max >= 1, got min={mn} opt={op} "
                              f"max={mx}; fix --dims {name}=MIN:OPT:MAX")
        out[name] = (mn, op, mx)
    return out


def parse_dims(text: str) -> dict[str, tuple[int, int, int]]:
    """`sequence=1:64:512,past_sequence=0:64:1024` -> {"sequence": (1, 64, 512), ...} (the --dims flag)."""
    dims: dict[str, tuple[int, int, int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, rng = item.partition("=")
        parts = rng.split(":")
        if not eq or not name.strip() or len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"--dims entry {item!r} is not NAME=MIN:OPT:MAX with non-negative integers; "
                              "e.g. --dims sequence=1:64:512,past_sequence=0:64:1024")
        if name.strip() in dims:
            raise ConfigError(f"--dims names {name.strip()!r} twice; give each dim once")
        dims[name.strip()] = tuple(int(p) for p in parts)
    if not dims:
        raise ConfigError(f"--dims {text!r} names no dim; e.g. --dims sequence=1:64:512")
    return _checked_dims(dims)


def engine_file_name(stem: str, target: str, precision: "Precision | str", compute_capability: str | None = None) -> str:
    """The engine's default file name, one per ONNX, target and precision, so builds for several GPUs or precisions
    sit side by side: ('model', 'rtx-sm89', 'fp16') -> 'model.rtx-sm89.fp16.engine'. For `local` the GPU's compute
    capability (8.7 on a Jetson Orin) names it: 'model.local-sm87.fp16.engine' ('model.local.fp16.engine' without
    one: that build fails anyway)."""
    target = parse_target(target)  # a bad name fails here, not in a file name
    name = f"rtx-sm{target.compute_capability.replace('.', '')}" if target.flavor == RTX else "local"
    if target.flavor == STANDARD and compute_capability:
        name += "-sm" + compute_capability.replace(".", "")
    return f"{stem}.{name}.{Precision.parse(precision).value}.engine"


def is_engine_file_name(name: str, stems) -> bool:
    """Is `name` what engine_file_name gives for one of `stems` (the files an export folder owns)?"""
    for stem in stems:
        rest = name[len(stem) + 1:] if name.startswith(stem + ".") else ""
        target, _, precision = rest.removesuffix(".engine").partition(".")
        if rest.endswith(".engine") and precision in PRECISIONS and (
                target == "local" or (target.startswith("local-sm") and target[8:].isdigit())
                or (target.startswith("rtx-sm") and target[6:] in {s[2:] for s in RTX_COMPUTE_CAPABILITIES})):
            return True
    return False


@dataclass(frozen=True)
class EngineInfo:
    """A built artifact: the engine, its `<engine>.json` (runtime/engine_metadata.py's schema) and build stats."""
    engine_path: Path
    metadata_path: Path
    metadata: dict
    build_seconds: float
    size_bytes: int


@runtime_checkable
class Target(Protocol):
    """A backend that turns an ONNX model into an artifact and runs it (STYLE.md section 4)."""

    def build(self, model: str | os.PathLike, spec: BuildSpec, out: str | os.PathLike,
              extra_metadata: dict | None = None) -> EngineInfo:
        """Lower and build the ONNX file `model` (its external weights beside it) as `spec` says; write the artifact
        to `out` (atomically, with its metadata)."""
        ...

    def runner(self, artifact: "EngineInfo | str | os.PathLike", **options) -> "BaseRunner":
        """A runtime Runner for a built artifact: `with target.runner(info) as r: r.infer(feeds)`."""
        ...
