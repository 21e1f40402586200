"""targets/base.py: Precision, BuildSpec, the defaults and target names written once, TARGETS, the Target interface."""
from __future__ import annotations

import json

import pytest

from tokensieve.errors import ConfigError
from tokensieve.targets import TARGETS, get_target
from tokensieve.targets.base import (DEFAULT_MAX_BATCH, DEFAULT_PRECISION, DEFAULT_TARGET, PRECISIONS, VALID_TARGETS,
                                     BuildSpec, EngineInfo, Precision, Target, parse_target)


def test_precision_parses_strings_once_and_prints_its_value():
    assert Precision.parse("fp16") is Precision.FP16 and Precision.parse(Precision.FP32) is Precision.FP32
    assert PRECISIONS == ("fp32", "fp16", "int8") and DEFAULT_PRECISION is Precision.FP32
    assert f"{Precision.FP16}" == str(Precision.FP16) == "fp16" and json.dumps(Precision.FP16) == '"fp16"'
    for bad in ("FP16", "fp8", "", None):
        with pytest.raises(ConfigError) as e:
            Precision.parse(bad)
        assert str(e.value) == f"Unknown precision {bad!r}; use one of fp32, fp16, int8"


def test_buildspec_defaults_and_typed_precision():
    spec = BuildSpec()
    assert (spec.target, spec.precision, spec.max_batch) == (DEFAULT_TARGET, DEFAULT_PRECISION, DEFAULT_MAX_BATCH)
    assert BuildSpec(precision="fp16").precision is Precision.FP16  # the Python API's string, parsed once
    assert spec.parsed_target == parse_target(DEFAULT_TARGET) == ("tensorrt_rtx", "8.6")
    assert DEFAULT_TARGET in VALID_TARGETS and "local" in VALID_TARGETS
    with pytest.raises(ConfigError, match="Unknown precision 'int4'"):
        BuildSpec(precision="int4")
    with pytest.raises(ConfigError, match="Unknown TensorRT target 'rtx-sm90'; use one of rtx-sm75"):
        BuildSpec(target="rtx-sm90")


def test_targets_table_is_the_one_backend_name():
    assert list(TARGETS) == ["tensorrt"] and get_target("tensorrt") is TARGETS["tensorrt"]
    assert isinstance(TARGETS["tensorrt"], Target)
    with pytest.raises(ConfigError, match="Unknown target backend 'tvm'; use one of tensorrt"):
        get_target("tvm")


def test_tensorrt_target_runner_takes_the_artifact(tmp_path):
    """runner(EngineInfo) opens its engine: here one without metadata, refused in TrtRunner's own words."""
    from tokensieve.errors import TargetError

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    info = EngineInfo(engine, tmp_path / "m.engine.json", {}, 0.0, 4)
    with pytest.raises(TargetError, match="No engine metadata"):
        TARGETS["tensorrt"].runner(info)


def test_defaults_written_once():
    """The CLI flags and the api keywords take their defaults from targets/base.py."""
    import inspect

    from tokensieve import api
    from tokensieve.cli import build_parser

    sig = inspect.signature(api.build).parameters
    assert (sig["target"].default, sig["precision"].default, sig["max_batch"].default) == (
        DEFAULT_TARGET, DEFAULT_PRECISION, DEFAULT_MAX_BATCH)
    args = build_parser().parse_args(["build", "m.onnx"])
    assert (args.target, args.precision, args.max_batch) == (DEFAULT_TARGET, DEFAULT_PRECISION.value, DEFAULT_MAX_BATCH)
