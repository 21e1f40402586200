"""InternVL (InternVLForConditionalGeneration, InternVL3 / 2.5 "-hf" checkpoints) as a VLM adapter: LLaVA's adapter
with InternVL's vision part and static tiles.

    result = export_vlm(model, "out/internvl", "cls-topk:0.25", tiles=7)   # 7 tiles, each keeps 25% of its tokens
    report = verify_vlm(result)                                            # batch 1: one image of 7 tiles

vision part: exporter/vlm/internvl.py (InternViT up to the feature layer, the stage on the pixel-shuffled tokens,
per tile). Everything after it is LLaVA's (LlavaAdapter): the language model (Qwen2 in InternVL3) takes
inputs_embeds with 1-D positions cumsum(mask) - 1, so the LM parts (exporter/vlm/lm_parts.py), FastV
(fastv.FastvPrefill / FastvDecode), the numpy pipeline (runtime.llava_pipeline, text embeddings from
embed_tokens.npy) and the eager reference (HF's own greedy decoding with the pruned features placed at the image
tokens) are inherited. The parts are batch 1 (one image of T tiles per prompt: pixel_values (T, 3, S, S) and one
prompt whose T·K image tokens take the tiles' kept features in order); the LM parts keep LLaVA's batch axis.
The prompt's image tokens are `image_token_id` (<IMG_CONTEXT>); the processor's <img> / </img> around them are
ordinary text tokens of the prompt.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.export_part import export_part
from tokensieve.exporter.vlm.internvl import InternVLLayout, InternVLVisionPrune, internvl_layout, vision_spec
from tokensieve.exporter.vlm.llava_adapter import LlavaAdapter, reference_generate
from tokensieve.recipe import Stage
from tokensieve.runtime.llava_pipeline import Generation

__all__ = ["InternVLAdapter"]


class InternVLAdapter(LlavaAdapter):
    """InternVL, one image of `tiles` static tiles per prompt, batch 1."""

    model_type = "internvl"
    hf_class = "InternVLForConditionalGeneration"
    label = "InternVL (InternVLForConditionalGeneration)"
    manifest_name = "manifest.json"
    batched = False
    tiled = True
    default_verify_batch = 1

    def layout(self, grid) -> InternVLLayout:
        return self.tiled_layout(grid, 1)

    def tiled_layout(self, grid, tiles: int) -> InternVLLayout:
        if grid is not None:
            raise ConfigError("grid is for Qwen2-VL; InternVL takes a static tile count: tiles=N (--tiles N), the "
                              "tile size comes from its vision config")
        return internvl_layout(self.model, tiles)

    def outer_layer(self, layout: InternVLLayout) -> None:
        return None  # after the pixel shuffle and projector (the scores are read from the feature layer)

    def check_outer(self, layout: InternVLLayout, stage: Stage) -> tuple[int, int, int]:
        from tokensieve.exporter.vlm.internvl import check_internvl_method

        keep = stage.keep.resolve(layout.tokens_per_tile)
        check_internvl_method(stage.method, stage.options(), layout, keep)
        n, limit = layout.tiles * keep, getattr(self.text_config, "max_position_embeddings", None)
        if isinstance(limit, int) and n + self.prompt_extra > limit:
            raise ConfigError(f"tiles={layout.tiles} x {keep} kept = {n} image tokens + {self.prompt_extra_what} "
                              f"exceed the language model's max_position_embeddings {limit}; lower tiles or keep")
        return keep, layout.tokens_per_tile, n

    def vision_module(self, plan) -> InternVLVisionPrune:
        return InternVLVisionPrune(self.model, plan.layout, plan.stage.method, plan.keep, plan.stage.options()).eval()

    def sample_pixels(self, layout: InternVLLayout, batch: int, seed: int) -> Tensor:
        size = layout.image_size
        return torch.randn(layout.tiles, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def tokens_line(self, result) -> str:
        lay = result.layout
        return (f"  image tokens    {lay.tiles} tile(s) x {result.num_tokens} tokens -> {result.keep} kept per tile "
                f"({result.num_image_tokens} image tokens per prompt)")

    def part_exporters(self, plan, vision: nn.Module) -> dict:
        parts = super().part_exporters(plan, vision)  # the LM parts are LLaVA's
        parts["vision"] = lambda: export_part(vision, vision_spec(plan.layout), what="vision_prune.onnx")
        return parts

    def generate_reference(self, result, input_ids, pixel_values, steps) -> Generation:
        # InternVL's forward takes the (1, T·K, H) features as one tensor
        return reference_generate(result.model, result.vision, input_ids, pixel_values, steps, inner=result.inner,
                                  pooler=lambda features: features)
