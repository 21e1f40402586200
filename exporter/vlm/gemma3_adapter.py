"""Gemma 3 (Gemma3ForConditionalGeneration) as a VLM adapter: the model-specific lines only.

    result = export_vlm(model, "out/gemma3", "attn-mean:0.5")   # K of the mm_tokens_per_image image tokens
    report = verify_vlm(result)                                # batch 2, ORT greedy == eager with the same pruning

vision part and prefill: exporter/vlm/gemma3.py (the outer stage after the projector's pooling; the prefill places
the features and builds the image-block bidirectional masks of the pruned prompt in the graph); decode: LLaVA's
lm_parts.LmDecode. Positions are 1-D: cumsum(attention_mask) - 1 over the pruned prompt, + 1 per generated token (as
LLaVA's). The prompt carries <start_of_image>, K image tokens, <end_of_image> among its text (the processor's layout
with K in place of mm_tokens_per_image). The eager reference is HF Gemma 3's own greedy decoding (llava_adapter's
HF loop) with the eager vision_prune's features as its image features and token_type_ids marking the K image tokens
on the first step, as HF's generate passes them. FastV inside (`inner="fastv@L:R"`): gemma3.Gemma3FastvPrefill /
Gemma3FastvDecode (the masks of layers L+1.. rebuilt on the kept sequence), against gemma3's independent eager
reference (FastV's algorithm on HF Gemma 3's layers and masks).
"""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import torch
from torch import Tensor, nn

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.adapter import VlmAdapter
from tokensieve.exporter.vlm.export_part import export_part
from tokensieve.exporter.vlm.fastv import fastv_decode_spec
from tokensieve.exporter.vlm.gemma3 import (FAMILY, Gemma3FastvDecode, Gemma3FastvPrefill, Gemma3Layout,
                                            Gemma3Prefill, Gemma3VisionPrune, check_gemma3_keep, fastv_prefill_spec,
                                            gemma3_layout, prefill_spec, reference_gemma3_fastv_generate,
                                            resolve_gemma3_method, vision_spec)
from tokensieve.exporter.vlm.llava_adapter import _greedy
from tokensieve.exporter.vlm.lm_parts import LmDecode, decode_spec
from tokensieve.recipe import Stage
from tokensieve.runtime.llava_pipeline import Generation, part_runners

PROMPT_TEXT = (4, 3)  # sample_prompt's text tokens before <start_of_image> / after <end_of_image>
MANIFEST = "manifest.json"
PART_FILES = {"vision": "vision_prune.onnx", "prefill": "lm_prefill.onnx", "decode": "lm_decode.onnx"}


class Gemma3Adapter(VlmAdapter):
    model_type = "gemma3"
    hf_class = "Gemma3ForConditionalGeneration"
    label = "Gemma 3 (Gemma3ForConditionalGeneration)"
    manifest_name = MANIFEST
    batched = True
    static_grid = False
    default_verify_batch = 2
    prompt_extra = sum(PROMPT_TEXT) + 2
    prompt_extra_what = f"{sum(PROMPT_TEXT)} text tokens + <start_of_image> + <end_of_image>"

    def layout(self, grid) -> Gemma3Layout:
        if grid is not None:
            raise ConfigError("grid is for Qwen2-VL; a Gemma 3's image size comes from its vision config, drop grid")
        return gemma3_layout(self.model)

    def outer_layer(self, layout: Gemma3Layout) -> None:
        return None  # after the projector's pooling (gemma3.py)

    def check_outer(self, layout: Gemma3Layout, stage: Stage) -> tuple[int, int, int]:
        resolve_gemma3_method(stage.method, stage.options())  # [CLS] / video / merging methods: one line
        keep = stage.keep.resolve(layout.num_image_tokens)
        check_gemma3_keep(layout, keep)
        return keep, layout.num_image_tokens, keep

    def vision_module(self, plan) -> Gemma3VisionPrune:
        return Gemma3VisionPrune(self.model, plan.layout, plan.stage.method, plan.keep, plan.stage.options()).eval()

    def sample_pixels(self, layout: Gemma3Layout, batch: int, seed: int) -> Tensor:
        size = layout.image_size
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def placeholder_id(self, layout: Gemma3Layout) -> int:
        return layout.image_token_id

    def sample_prompt(self, layout: Gemma3Layout, num_image_tokens: int, batch: int, seed: int) -> Tensor:
        return gemma3_prompt(self.model.config, layout, num_image_tokens, batch, seed=seed)

    def tokens_line(self, result) -> str:
        return (f"  image tokens    {result.num_tokens} pooled tokens -> {result.keep} kept "
                f"({result.num_image_tokens} image tokens per prompt)")

    def gather_positions(self, positions: Tensor, cols: Tensor) -> Tensor:
        return positions.gather(1, cols)                                        # (B, T) 1-D ids

    def part_modules(self, plan) -> dict[str, nn.Module]:
        if plan.inner is not None:
            return {"prefill": Gemma3FastvPrefill(self.model, plan.inner).eval(),
                    "decode": Gemma3FastvDecode(self.model, plan.inner).eval()}
        return {"prefill": Gemma3Prefill(self.model).eval(), "decode": LmDecode(self.model).eval()}

    def part_exporters(self, plan, vision: nn.Module) -> dict:
        mods, lay = self.part_modules(plan), plan.layout
        layers = self.lm_layout().num_text_layers
        if plan.inner is None:
            lm = {"prefill": prefill_spec(lay, plan.keep, layers), "decode": decode_spec(self.lm_layout())}
        else:
            lm = {"prefill": fastv_prefill_spec(lay, plan.inner, layers),
                  "decode": fastv_decode_spec(self.lm_layout(), plan.inner)}
        specs = {"vision": (vision, vision_spec(lay)), "prefill": (mods["prefill"], lm["prefill"]),
                 "decode": (mods["decode"], lm["decode"])}
        return {key: (lambda m=m, s=s, key=key: export_part(m, s, what=f"{FAMILY} {PART_FILES[key]}"))
                for key, (m, s) in specs.items()}

    def generate_parts(self, result, input_ids, pixel_values, steps, threads, backend) -> Generation:
        from tokensieve.manifest import read_vlm_manifest

        manifest = read_vlm_manifest(result.out_dir, MANIFEST)
        runners = part_runners(result.out_dir, manifest, backend, threads=threads, manifest_name=MANIFEST)
        with ExitStack() as active:
            vision, prefill, decode = (active.enter_context(runners[k]) for k in ("vision", "prefill", "decode"))
            return greedy_parts(vision, prefill, decode, input_ids.numpy(), pixel_values.numpy(), steps,
                                manifest.placeholder_token_id, inner=result.inner is not None)

    def generate_reference(self, result, input_ids, pixel_values, steps) -> Generation:
        return reference_generate(result.model, result.vision, input_ids, pixel_values, steps, inner=result.inner)

    def part_feeds(self, result, input_ids, pixel_values) -> dict[str, dict]:
        from tokensieve.runtime.onnxruntime_runner import OrtRunner

        ids, pixels = input_ids.numpy(), pixel_values.numpy()
        with OrtRunner(result.paths["vision"]) as vision:
            features = vision.infer({"pixel_values": pixels})["image_features"]
        prefill = prefill_feeds(ids, features, None)
        with OrtRunner(result.paths["prefill"]) as runner:
            out = runner.infer(prefill)
        t = ids.shape[1]
        decode = next_feeds(out, prefill["attention_mask"], np.full((ids.shape[0], 1), t - 1, np.int64))
        if result.inner is not None:
            decode["attention_mask_pruned"] = np.ones((ids.shape[0], out["keep_idx"].shape[1] + 1), np.int64)
        return {"vision": {"pixel_values": pixels}, "prefill": prefill, "decode": decode}


def gemma3_prompt(config, layout: Gemma3Layout, num_image_tokens: int, batch: int = 2, *,
                  before: int = PROMPT_TEXT[0], after: int = PROMPT_TEXT[1], seed: int = 0) -> Tensor:
    """(batch, before + 2 + num_image_tokens + after) int64 prompts: random text ids, then <start_of_image>, the image
    tokens, <end_of_image>, then text (the processor's layout); text ids avoid the image and special tokens."""
    tcfg = config.text_config
    special = {layout.image_token_id, layout.boi_token_id, layout.eoi_token_id,
               *(getattr(tcfg, f"{k}_token_id", None) for k in ("bos", "eos", "pad"))}
    allowed = torch.tensor([i for i in range(layout.vocab_size) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    text = allowed[torch.randint(0, len(allowed), (batch, before + after), generator=gen)]
    image = torch.cat([torch.full((batch, 1), layout.boi_token_id), torch.full((batch, num_image_tokens),
                       layout.image_token_id), torch.full((batch, 1), layout.eoi_token_id)], dim=1)
    return torch.cat([text[:, :before], image, text[:, before:]], dim=1)


def reference_generate(model: nn.Module, vision: Gemma3VisionPrune, input_ids: Tensor, pixel_values: Tensor,
                       max_new_tokens: int = 8, attention_mask: Tensor | None = None, *, inner=None) -> Generation:
    """Eager: `vision` (the same pruning in torch) gives the features; HF Gemma 3 places them at the K image tokens
    (its masked_scatter), builds the image-block mask from token_type_ids on the first step and decodes greedily.
    With `inner` (a FastvSpec), gemma3.reference_gemma3_fastv_generate decodes instead."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    with torch.no_grad():
        features, keep_idx = vision(pixel_values)
    if inner is not None:
        ref = reference_gemma3_fastv_generate(model, input_ids, features, inner, max_new_tokens, attention_mask)
        return Generation(ref.tokens.numpy(), ref.logits.numpy(), keep_idx.numpy(), features.numpy(),
                          ref.image_keep_idx.numpy(), ref.keep_idx.numpy())
    token_type_ids = (input_ids == int(model.config.image_token_id)).long()
    image = BaseModelOutputWithPooling(pooler_output=features)
    tokens, logits = _greedy(model, input_ids, max_new_tokens, attention_mask, token_type_ids=token_type_ids,
                             mm_encoder_outputs={"image": image})
    return Generation(tokens.numpy(), logits.numpy(), keep_idx.numpy(), features.numpy())


def prefill_feeds(input_ids: np.ndarray, features: np.ndarray, attention_mask: np.ndarray | None) -> dict:
    """lm_prefill's inputs: the prompt, the features, its mask (all ones if None), positions cumsum(mask) - 1."""
    mask = np.ones(input_ids.shape, np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
    if mask.shape != input_ids.shape:
        raise ConfigError(f"attention_mask {mask.shape} must have the shape of input_ids {input_ids.shape}")
    positions = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1).astype(np.int64)
    return {"input_ids": input_ids.astype(np.int64), "image_features": features, "attention_mask": mask,
            "position_ids": positions}


def next_feeds(out: dict, mask: np.ndarray, last_position: np.ndarray) -> dict:
    """lm_decode's inputs after a prefill / decode output `out`: its greedy token, the mask one longer, the next
    position, and its present K/V as the past."""
    token = out["logits"].argmax(-1).astype(np.int64)[:, None]
    feeds = {"input_ids": token, "attention_mask": np.concatenate([mask, np.ones_like(token)], axis=1),
             "position_ids": last_position + 1}
    return feeds | {name.replace("present.", "past."): v for name, v in out.items() if name.startswith("present.")}


def greedy_parts(vision, prefill, decode, input_ids: np.ndarray, pixel_values: np.ndarray, steps: int,
                 image_token_id: int, attention_mask: np.ndarray | None = None, inner: bool = False) -> Generation:
    """Greedy decoding with the three parts' runners (active): vision -> prefill of the prompt (each row holding
    exactly the K image tokens vision_prune gives) -> `steps` tokens, one decode step each. `inner`: FastV parts (the
    decode also takes attention_mask_pruned: the mask at the prefill's keep_idx, then one 1 per generated token)."""
    ids = np.asarray(input_ids, np.int64)
    out = vision.infer({"pixel_values": np.asarray(pixel_values, np.float32)})
    features, keep_idx = out["image_features"], out["keep_idx"]
    counts = (ids == image_token_id).sum(axis=1)
    if ids.shape[0] != features.shape[0] or (counts != features.shape[1]).any():
        raise ConfigError(f"the prompts hold {counts.tolist()} image tokens (id {image_token_id}) for "
                          f"{features.shape[0]} images; this export needs one image per prompt and exactly "
                          f"{features.shape[1]} image tokens per prompt (the kept K)")
    feeds = prefill_feeds(ids, features, attention_mask)
    out = first = prefill.infer(feeds)
    pruned = np.take_along_axis(feeds["attention_mask"], first["keep_idx"], axis=1) if inner else None
    tokens, logits = [], []
    for step in range(steps):
        logits.append(out["logits"])
        feeds = next_feeds(out, feeds["attention_mask"], feeds["position_ids"][:, -1:])
        if pruned is not None:
            pruned = np.concatenate([pruned, np.ones_like(feeds["input_ids"])], axis=1)
            feeds["attention_mask_pruned"] = pruned
        tokens.append(feeds["input_ids"])
        if step < steps - 1:
            out = decode.infer(feeds)
    inner_keep, prompt_keep = (first["image_keep_idx"], first["keep_idx"]) if inner else (None, None)
    return Generation(np.concatenate(tokens, axis=1), np.stack(logits), keep_idx, features, inner_keep, prompt_keep)
