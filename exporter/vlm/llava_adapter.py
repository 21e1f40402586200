"""LLaVA (LlavaForConditionalGeneration with a CLIP tower) as a VLM adapter: the model-specific lines only.

vision part: exporter/vlm/llava.py (CLIP layers up to the feature layer + the outer stage + projector); LM parts:
exporter/vlm/lm_parts.py (inputs_embeds in, 1-D positions, attention mask, batch axis); FastV: fastv.FastvPrefill /
FastvDecode. The pipeline that runs the parts is runtime.llava_pipeline (numpy: text embeddings from
embed_tokens.npy, positions cumsum(mask) - 1). The eager reference is HF LLaVA's own greedy decoding with the
features of the eager vision_prune placed at the image tokens (`reference_generate`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.adapter import VlmAdapter
from tokensieve.exporter.vlm.export_part import export_part
from tokensieve.exporter.vlm.fastv import (FastvDecode, FastvPrefill, FastvSpec, fastv_decode_spec,
                                           fastv_prefill_spec, reference_fastv_generate)
from tokensieve.exporter.vlm.llava import LlavaLayout, VisionPrune, check_outer_method, llava_layout, vision_spec
from tokensieve.exporter.vlm.lm_parts import LmDecode, LmPrefill, decode_spec, prefill_spec
from tokensieve.fileio import atomic_path
from tokensieve.recipe import Stage
from tokensieve.runtime.llava_pipeline import Generation, LlavaPipeline
from tokensieve.runtime.onnxruntime_runner import OrtRunner

PROMPT_TEXT = (4, 3)  # llava_prompt's text tokens before / after the image tokens: verify_vlm's prompt
EMBED_FILE = "embed_tokens.npy"


class LlavaAdapter(VlmAdapter):
    model_type = "llava"
    hf_class = "LlavaForConditionalGeneration"
    label = "LLaVA (LlavaForConditionalGeneration)"
    manifest_name = "llava_parts.json"
    batched = True
    static_grid = False
    default_verify_batch = 2
    prompt_extra = sum(PROMPT_TEXT)
    prompt_extra_what = f"{sum(PROMPT_TEXT)} text tokens"

    def layout(self, grid) -> LlavaLayout:
        if grid is not None:
            raise ConfigError("grid is for Qwen2-VL; a LLaVA's image size comes from its vision config, drop grid")
        return llava_layout(self.model)

    def outer_layer(self, layout: LlavaLayout) -> int:
        return layout.feature_layer

    def check_outer(self, layout: LlavaLayout, stage: Stage) -> tuple[int, int, int]:
        keep = stage.keep.resolve(layout.num_patches)
        check_outer_method(stage.method, stage.options(), layout.num_patches, keep)
        return keep, layout.num_patches, keep + int(layout.keep_cls)

    def vision_module(self, plan) -> VisionPrune:
        return VisionPrune(self.model, plan.layout, plan.stage.method, plan.keep, plan.stage.options()).eval()

    def sample_pixels(self, layout: LlavaLayout, batch: int, seed: int) -> Tensor:
        size = layout.image_size
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def placeholder_id(self, layout: LlavaLayout) -> int:
        return layout.image_token_id

    def sample_prompt(self, layout: LlavaLayout, num_image_tokens: int, batch: int, seed: int) -> Tensor:
        return llava_prompt(layout, num_image_tokens, batch, seed=seed)

    def tokens_line(self, result) -> str:
        return (f"  image tokens    {result.num_tokens} patches -> {result.keep} kept "
                f"({result.num_image_tokens} image tokens per prompt)")

    def gather_positions(self, positions: Tensor, cols: Tensor) -> Tensor:
        return positions.gather(1, cols)                                        # (B, T) 1-D ids

    def part_modules(self, plan) -> dict[str, nn.Module]:
        if plan.inner is None:
            return {"prefill": LmPrefill(self.model), "decode": LmDecode(self.model)}
        return {"prefill": FastvPrefill(self.model, plan.inner, self.gather_positions).eval(),
                "decode": FastvDecode(self.model, plan.inner).eval()}

    def part_exporters(self, plan, vision: nn.Module) -> dict:
        mods, lay, inner = self.part_modules(plan), plan.layout, plan.inner
        specs = {"vision": (vision, vision_spec(lay)),
                 "prefill": (mods["prefill"], prefill_spec(lay) if inner is None else fastv_prefill_spec(lay, inner)),
                 "decode": (mods["decode"], decode_spec(lay) if inner is None else fastv_decode_spec(lay, inner))}
        names = {"vision": "vision_prune.onnx", "prefill": "lm_prefill.onnx", "decode": "lm_decode.onnx"}
        return {key: (lambda m=m, s=s, key=key: export_part(m, s, what=names[key])) for key, (m, s) in specs.items()}

    def extra_files(self, out: Path) -> dict[str, Path]:
        path = out / EMBED_FILE  # runtime.llava_pipeline embeds the prompt's text tokens itself (numpy)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, self.model.model.language_model.embed_tokens.weight.detach().float().cpu().numpy())
        return {"embed": path}

    def generate_parts(self, result, input_ids, pixel_values, steps, threads, backend) -> Generation:
        with LlavaPipeline(result.out_dir, backend=backend, threads=threads, manifest_name=self.manifest_name) as pipe:
            return pipe.generate(input_ids.numpy(), pixel_values.numpy(), steps)  # checks the prompt first

    def generate_reference(self, result, input_ids, pixel_values, steps) -> Generation:
        return reference_generate(result.model, result.vision, input_ids, pixel_values, steps, inner=result.inner)

    def part_feeds(self, result, input_ids, pixel_values) -> dict[str, dict]:
        lay, ids, pixels = result.layout, input_ids.numpy(), pixel_values.numpy()
        batch, t = ids.shape
        with OrtRunner(result.paths["vision"]) as vision:
            features = vision.infer({"pixel_values": pixels})["image_features"]
        embeds = np.load(result.paths["embed"])[ids].astype(np.float32)
        embeds[ids == lay.image_token_id] = features.reshape(-1, features.shape[-1])
        prefill = {"inputs_embeds": embeds, "attention_mask": np.ones((batch, t), np.int64),
                   "position_ids": np.tile(np.arange(t), (batch, 1))}
        if result.inner is not None:
            prefill["image_positions"] = np.nonzero(ids == lay.image_token_id)[1].reshape(batch, -1).astype(np.int64)
        with OrtRunner(result.paths["prefill"]) as runner:
            out = runner.infer(prefill)
        decode = {"input_ids": out["logits"].argmax(-1).astype(np.int64)[:, None],
                  "attention_mask": np.ones((batch, t + 1), np.int64), "position_ids": np.full((batch, 1), t, np.int64)}
        decode |= {name.replace("present.", "past."): v for name, v in out.items() if name.startswith("present.")}
        if result.inner is not None:
            decode["attention_mask_pruned"] = np.ones((batch, out["keep_idx"].shape[1] + 1), np.int64)
        return {"vision": {"pixel_values": pixels}, "prefill": prefill, "decode": decode}


def llava_prompt(layout: LlavaLayout, num_image_tokens: int, batch: int = 2, *, before: int = PROMPT_TEXT[0],
                 after: int = PROMPT_TEXT[1], seed: int = 0) -> torch.Tensor:
    """(batch, before + num_image_tokens + after) int64 prompts: random text ids around a block of image tokens."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, layout.vocab_size - 1, (batch, before + after), generator=gen)
    text = text + (text >= layout.image_token_id).long()  # never the image token itself
    image = torch.full((batch, num_image_tokens), layout.image_token_id)
    return torch.cat([text[:, :before], image, text[:, before:]], dim=1)


def _greedy(model: nn.Module, input_ids: torch.Tensor, steps: int, attention_mask: torch.Tensor | None,
            **image) -> tuple[torch.Tensor, torch.Tensor]:
    """HF LLaVA greedy decoding with its own cache; (ids (B, steps), logits (steps, B, V))."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    tokens, logits = [], []
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **image)
        for step in range(steps):
            step_logits = out.logits[:, -1].float()
            token = step_logits.argmax(-1, keepdim=True)
            tokens.append(token)
            logits.append(step_logits)
            if step == steps - 1:
                break
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values,
                        use_cache=True)
    return torch.cat(tokens, dim=1), torch.stack(logits)


def reference_generate(model: nn.Module, vision: VisionPrune, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                       max_new_tokens: int = 8, attention_mask: torch.Tensor | None = None, *,
                       inner: FastvSpec | None = None, pooler=list) -> Generation:
    """Eager: `vision` (the same pruning in torch) gives the features, HF LLaVA places them and decodes greedily;
    with `inner`, the eager FastV reference (fastv.reference_fastv_generate) decodes instead. `pooler`: the features
    as the family's HF forward takes them in mm_encoder_outputs (LLaVA: a list, one (K, H) per image; InternVL: the
    tensor itself)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    with torch.no_grad():
        features, keep_idx = vision(pixel_values)
    if inner is not None:
        ref = reference_fastv_generate(model, input_ids, features, inner, int(model.config.image_token_id),
                                       max_new_tokens, attention_mask)
        return Generation(ref.tokens.numpy(), ref.logits.numpy(), keep_idx.numpy(), features.numpy(),
                          ref.image_keep_idx.numpy(), ref.keep_idx.numpy())
    image = BaseModelOutputWithPooling(pooler_output=pooler(features))
    tokens, logits = _greedy(model, input_ids, max_new_tokens, attention_mask, mm_encoder_outputs={"image": image})
    return Generation(tokens.numpy(), logits.numpy(), keep_idx.numpy(), features.numpy())


def unpruned_generate(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor, max_new_tokens: int = 8,
                      attention_mask: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The plain HF LLaVA (every patch), greedy: (ids (B, steps), logits (steps, B, V)); the prompt needs N tokens."""
    tokens, logits = _greedy(model, input_ids, max_new_tokens, attention_mask, pixel_values=pixel_values)
    return tokens.numpy(), logits.numpy()
