"""Qwen2.5-VL with visual-token pruning: the Qwen2-VL adapter with Qwen2.5-VL's windowed vision tower, one image or
one video per prompt.

    result = export_vlm(model, "out/qwen25", "attn-mean:0.5", grid=(1, 28, 28))   # then verify_vlm(result)
    result = export_vlm(model, "out/q25v", "evs:0.5", grid=(4, 28, 28), second_per_grid=1.0)   # a video

Everything but the vision part and a video's time spacing is Qwen2-VL's (Qwen2VLAdapter,
exporter/vlm/qwen2_vl_adapter.py): the language model is the same decoder with the same M-RoPE, so the prompts, the
kept-column position bookkeeping, the LM prefill / decode parts and greedy generation (ONNX Runtime, TensorRT, eager)
are inherited. The vision part is Qwen25VLVisionPrune (exporter/vlm/qwen2_5_vl.py: window attention as batched
constant windows, per temporal step for a video).

A video (grid t > 1) also needs the seconds one temporal patch spans, `second_per_grid` (the processor's
second_per_grid_ts = temporal_patch_size / fps; --seconds-per-grid): HF's get_rope_index places temporal patch i at
time position s + floor(i x tokens_per_second x second_per_grid), where Qwen2-VL uses s + i, and a grid alone does not
give it. It is fixed at export (VideoLayout, recorded in the manifest's layout), and every M-RoPE position the
prompts, verification and generation use comes from it (prompt_mrope_positions passes it to HF as
second_per_grid_ts). The LM parts take positions as inputs, so they are the same as for Qwen2-VL.
"""
from __future__ import annotations

import math
from dataclasses import asdict

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.qwen2_5_vl import Qwen25VLVisionPrune, VideoLayout, check_score_block
from tokensieve.exporter.vlm.qwen2_vl import ImageLayout
from tokensieve.exporter.vlm.qwen2_vl_adapter import Qwen2VLAdapter
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.recipe import Stage

__all__ = ["Qwen25VLAdapter"]


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL, one image (grid t = 1) or one video (t > 1, with its second_per_grid) per prompt, batch 1:
    Qwen2VLAdapter with Qwen25VLVisionPrune and the video's time spacing."""

    model_type = "qwen2_5_vl"
    hf_class = "Qwen2_5_VLForConditionalGeneration"
    label = "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)"
    vision_class = Qwen25VLVisionPrune

    def timed_layout(self, layout: ImageLayout, second_per_grid: float | None) -> ImageLayout:
        """A video's VideoLayout with `second_per_grid` (> 0 seconds per temporal patch, required); an image takes
        none. One-line ConfigError otherwise."""
        grid = f"grid ({layout.t}, {layout.h}, {layout.w})"
        tps = self.model.config.vision_config.tokens_per_second
        if second_per_grid is None:
            if layout.is_video:
                raise ConfigError(f"{grid} is a video: {self.family} spaces its temporal patches tokens_per_second "
                                  f"({tps}) x the seconds per temporal patch apart in M-RoPE; pass second_per_grid=S "
                                  f"/ --seconds-per-grid S (temporal_patch_size / the processor's fps, e.g. 1.0 for "
                                  f"{self.model.config.vision_config.temporal_patch_size} frames per patch at 2 fps)")
            return layout
        if not layout.is_video:
            raise ConfigError(f"second_per_grid={second_per_grid!r} spaces a video's temporal patches, but {grid} is "
                              "an image (t = 1); drop second_per_grid / --seconds-per-grid or pass a video grid t > 1")
        if isinstance(second_per_grid, bool) or not isinstance(second_per_grid, (int, float)) \
                or not math.isfinite(second_per_grid) or second_per_grid <= 0:
            raise ConfigError(f"second_per_grid={second_per_grid!r} must be a finite number of seconds > 0 per "
                              "temporal patch (temporal_patch_size / fps)")
        return VideoLayout(**asdict(layout), second_per_grid=float(second_per_grid))

    def check_outer(self, layout: ImageLayout, stage: Stage) -> tuple[int, int, int]:
        out = super().check_outer(layout, stage)  # the method is known and CLS-free by now
        check_score_block(self.model.model.visual, METHODS[stage.method])
        return out

    def tokens_line(self, result) -> str:
        line = super().tokens_line(result)
        seconds = getattr(result.layout, "second_per_grid", None)
        if seconds is None:
            return line
        step = self.model.config.vision_config.tokens_per_second * seconds
        return f"{line} ({seconds:g} s per temporal patch: M-RoPE time step {step:g})"
