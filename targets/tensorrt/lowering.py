"""The ONNX lowering every TensorRT build runs before parsing, written out in one place (torch-tensorrt's
`ATEN_POST_LOWERING_PASSES`). The builder receives the list; it imports none of these passes itself.

Each entry is an onnx-ir pass (ir.Model -> PassResult, editing in place) and idempotent: a second run of the list
changes nothing (tests/targets/tensorrt/test_lowering.py, and each pass's own test_idempotent).
"""
from __future__ import annotations

import logging

from onnx_ir.passes import PassBase

from ..base import BuildSpec, Precision
from .check_quantization import CheckQuantizationPass
from .compact_to_plugin import CompactToPluginPass
from .convert_to_fp16 import ConvertToFp16Pass, MarkFp32NodesPass
from .diversity_to_plugin import DiversityToPluginPass
from .lint import LintForTensorRTPass
from .split_large_topk import SplitLargeTopKPass


def tensorrt_lowering(spec: BuildSpec, *, strongly_typed: bool, source: str = "the ONNX") -> list[PassBase]:
    """The passes for one build, in order. `strongly_typed`: the flavor takes precision from the ONNX (TensorRT-RTX,
    TensorRT 11; targets/tensorrt/flavors.is_strongly_typed) rather than from an FP16 builder flag (TensorRT 10.x).
    `source`: the file's name, for messages."""
    passes: list[PassBase] = [CheckQuantizationPass(spec.precision, source)]  # int8 <=> a (symmetric) Q/DQ graph
    if spec.plugin_library:  # only a build that loads the plugin library can parse plugin nodes
        passes += [DiversityToPluginPass(),   # greedy DivPrune / MMR selection -> DiversitySelect
                   CompactToPluginPass()]     # adaptive(compact=true)'s cut -> TokenCompact(dynamic=1)
    passes.append(SplitLargeTopKPass(log_level=logging.DEBUG))  # TopK(K > 3840) -> exact rounds of TopK(<= 3840)
    passes.append(LintForTensorRTPass(spec.parsed_target.flavor))  # a node the parser rejects: one-line TargetError
    if spec.precision is Precision.FP16:
        passes.append(ConvertToFp16Pass() if strongly_typed  # fp32 -> mixed fp16, scores and norms kept fp32
                      else MarkFp32NodesPass())               # the same fp32 nodes tagged for layer constraints
    return passes
