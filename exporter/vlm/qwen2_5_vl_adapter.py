"""Qwen2.5-VL with visual-token pruning: the Qwen2-VL adapter with Qwen2.5-VL's windowed vision tower, one image per
prompt.

    result = export_vlm(model, "out/qwen25", "attn-mean:0.5", grid=(1, 28, 28))   # then verify_vlm(result)

Everything but the vision part is Qwen2-VL's (Qwen2VLAdapter, exporter/vlm/qwen2_vl_adapter.py): the language model
is the same decoder with the same M-RoPE, and for an image HF's get_rope_index is the same too, so the prompts, the
kept-column position bookkeeping, the LM prefill / decode parts and greedy generation (ONNX Runtime, TensorRT, eager)
are inherited. The vision part is Qwen25VLVisionPrune (exporter/vlm/qwen2_5_vl.py: window attention as batched
constant windows).

Videos are refused for now: Qwen2.5-VL spaces a video's temporal positions by tokens_per_second x the seconds per
temporal patch (the processor's fps), which a grid alone does not give.
"""
from __future__ import annotations

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.qwen2_5_vl import Qwen25VLVisionPrune, check_score_block
from tokensieve.exporter.vlm.qwen2_vl import ImageLayout
from tokensieve.exporter.vlm.qwen2_vl_adapter import Qwen2VLAdapter
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.recipe import Stage

__all__ = ["Qwen25VLAdapter"]


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL, one image (grid t = 1) per prompt, batch 1: Qwen2VLAdapter with Qwen25VLVisionPrune."""

    model_type = "qwen2_5_vl"
    hf_class = "Qwen2_5_VLForConditionalGeneration"
    label = "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)"
    vision_class = Qwen25VLVisionPrune

    def layout(self, grid) -> ImageLayout:
        layout = super().layout(grid)
        if layout.is_video:
            raise ConfigError(f"grid ({layout.t}, {layout.h}, {layout.w}) is a video (t > 1); tokensieve exports "
                              f"{self.family} images only so far: pass an image grid (1, h, w)")
        return layout

    def check_outer(self, layout: ImageLayout, stage: Stage) -> tuple[int, int, int]:
        out = super().check_outer(layout, stage)  # the method is known and CLS-free by now
        check_score_block(self.model.model.visual, METHODS[stage.method])
        return out
