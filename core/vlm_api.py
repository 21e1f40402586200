"""The VLM API: LLaVA exported in parts with outer visual-token pruning, and its check against eager.

    result = export_llava(model, "out/llava", "cls-topk:0.25")      # FasterVLM: keep 25% of the patches
    report = verify_llava(result)                                   # ORT greedy ids == eager, keep_idx, logits

Recipe: `METHOD[(name=value,...)][@LAYER]:KEEP`, one stage after the CLIP layer LLaVA takes its features from
(`vision_feature_layer`; @LAYER, if given, must name that 0-based layer). KEEP is a ratio of the patches (1.0 =
all: the control that equals the unpruned model) or a count. Writes into out_dir, each file atomically:
vision_prune.onnx, lm_prefill.onnx, lm_decode.onnx, embed_tokens.npy (the pipeline's text embeddings) and
llava_parts.json (the manifest runtime.llava_pipeline reads).

Inner pruning: `export_llava(model, out, "cls-topk:1.0", inner="fastv@1:0.5")` adds FastV inside the LLM prefill
(exporter/vlm/fastv.py: drop image tokens after decoder layer 1 by the last prompt position's attention, keep R);
lm_prefill.onnx / lm_decode.onnx are then the FastV parts and verify_llava compares against the eager FastV
reference. `inner="fastv(debias=true)@1:8"` also needs `inner_bias=` (calibrate_fastv_bias).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from tokensieve.errors import ConfigError, ExportError
from tokensieve.exporter.vlm.export_part import export_part
from tokensieve.exporter.vlm.fastv import (FastvDecode, FastvPrefill, FastvSpec, fastv_decode_spec,
                                           fastv_prefill_spec, parse_fastv, reference_fastv_generate)
from tokensieve.exporter.vlm.llava import LlavaLayout, VisionPrune, llava_layout, vision_spec
from tokensieve.exporter.vlm.lm_parts import LmDecode, LmPrefill, decode_spec, prefill_spec
from tokensieve.fileio import atomic_path, ensure_writable_dir, write_bytes_atomic, write_json_atomic
from tokensieve.graph_passes.onnx.check_static import FORBIDDEN_OPS, check_static, op_census
from tokensieve.recipe import Recipe, Stage, parse_recipe
from tokensieve.runtime.llava_pipeline import MANIFEST, Generation, LlavaOrtPipeline

__all__ = ["export_llava", "LlavaExportResult", "verify_llava", "LlavaVerifyReport", "parse_outer_recipe",
           "llava_prompt", "reference_generate", "unpruned_generate"]

ARTIFACTS = {"vision": "vision_prune.onnx", "prefill": "lm_prefill.onnx", "decode": "lm_decode.onnx",
             "embed": "embed_tokens.npy"}


@dataclass
class LlavaExportResult:
    out_dir: Path
    paths: dict[str, Path]
    stage: Stage
    keep: int                       # K: patches kept
    num_patches: int
    num_image_tokens: int           # image tokens a prompt must carry (K, +1 with select strategy 'full')
    layout: LlavaLayout
    vision_ops: dict[str, int]      # op census of vision_prune.onnx
    sizes: dict[str, int]           # bytes per file
    seconds: dict[str, float]
    model: nn.Module = field(repr=False)
    vision: VisionPrune = field(repr=False)   # the eager reference of vision_prune.onnx
    inner: FastvSpec | None = None            # FastV inside the LLM prefill, if any
    prefill_ops: dict[str, int] | None = None  # op census of lm_prefill.onnx

    def summary(self) -> dict:
        out = {"recipe": _shorthand(self.stage), "keep": self.keep, "num_patches": self.num_patches,
               "num_image_tokens": self.num_image_tokens, "layout": asdict(self.layout),
               "files": {k: p.name for k, p in self.paths.items()}, "sizes": self.sizes, "seconds": self.seconds,
               "vision_ops": self.vision_ops}
        if self.inner is not None:
            out["inner"] = self.inner.to_dict()
        return out


def _shorthand(stage: Stage) -> str:
    return Recipe((stage,)).shorthand()


def parse_outer_recipe(text: str, layout: LlavaLayout) -> tuple[Stage, int]:
    """`cls-topk:0.25` / `divprune@22:144` -> (the stage after LLaVA's feature layer, static K)."""
    head, colon, keep = str(text).strip().rpartition(":")
    if colon and "@" not in head:
        text = f"{head}@{layout.feature_layer}:{keep}"
    stages = parse_recipe(text).stages
    if len(stages) != 1:
        raise ConfigError(f"LLaVA outer pruning takes exactly one stage, got {len(stages)} in {text!r}; "
                          "write METHOD:KEEP, e.g. cls-topk:0.25")
    stage = stages[0]
    if stage.after_block != layout.feature_layer:
        raise ConfigError(f"Outer pruning runs after CLIP layer {layout.feature_layer} (LLaVA's vision_feature_layer), "
                          f"not {stage.after_block}; write {stage.method}:{keep} or @{layout.feature_layer}")
    k = stage.keep.resolve(layout.num_patches)
    if k > layout.num_patches:
        raise ConfigError(f"keep={k} is out of range; the vision tower has {layout.num_patches} patch tokens, "
                          f"keep 1..{layout.num_patches} or a ratio")
    return stage, k


def export_llava(model: nn.Module, out_dir: str | Path, recipe: str = "cls-topk:0.25", *, inner: str | None = None,
                 inner_bias=None) -> LlavaExportResult:
    """Export `model` (LlavaForConditionalGeneration, eval mode is set) as three ONNX parts into `out_dir`;
    `inner="fastv@L:R"` adds FastV inside the LLM prefill (R of the image tokens the prompt carries)."""
    layout = llava_layout(model)
    stage, keep = parse_outer_recipe(recipe, layout)
    num_image_tokens = keep + int(layout.keep_cls)
    fastv = None if inner is None else parse_fastv(inner, layout.num_text_layers, num_image_tokens, inner_bias)
    model.eval()
    vision = VisionPrune(model, layout, stage.method, keep, stage.options()).eval()
    out = ensure_writable_dir(out_dir)
    paths = {k: out / name for k, name in ARTIFACTS.items()}
    seconds, sizes = {}, {}
    parts = {"vision": (vision, vision_spec(layout)), "prefill": (LmPrefill(model), prefill_spec(layout)),
             "decode": (LmDecode(model), decode_spec(layout))}
    if fastv is not None:
        parts |= {"prefill": (FastvPrefill(model, fastv).eval(), fastv_prefill_spec(layout, fastv)),
                  "decode": (FastvDecode(model, fastv).eval(), fastv_decode_spec(layout, fastv))}
    protos: dict[str, onnx.ModelProto] = {}
    for key, (module, spec) in parts.items():
        t0 = time.perf_counter()
        protos[key] = export_part(module, spec, what=ARTIFACTS[key])
        seconds[key] = time.perf_counter() - t0
    census = check_static(protos["vision"])["ops"]  # ExportError if a data-dependent op or size slipped in
    prefill_ops = dict(op_census(protos["prefill"]))  # its sequence axis is dynamic: the op census only
    bad = sorted(set(prefill_ops) & set(FORBIDDEN_OPS))
    if bad:
        raise ExportError(f"lm_prefill.onnx contains {bad[0]} ({FORBIDDEN_OPS[bad[0]]}); inner pruning must stay a "
                          "fixed-budget TopK + Gather")
    too_big = [ARTIFACTS[k] for k, proto in protos.items() if proto.ByteSize() >= 2**31 - 1]
    if too_big:  # checked before any write: all parts or none
        raise ExportError(f"{too_big[0]} is over 2 GB; external-data ONNX for VLM parts is not supported yet, "
                          "export a smaller language model")
    for key, proto in protos.items():
        write_bytes_atomic(paths[key], proto.SerializeToString())
        sizes[key] = paths[key].stat().st_size
    with atomic_path(paths["embed"]) as tmp, open(tmp, "wb") as f:
        np.save(f, model.model.language_model.embed_tokens.weight.detach().float().cpu().numpy())
    sizes["embed"] = paths["embed"].stat().st_size
    result = LlavaExportResult(out, paths, stage, keep, layout.num_patches, num_image_tokens, layout, census, sizes,
                               seconds, model, vision, fastv, prefill_ops)
    manifest = {**result.summary(), "image_token_id": layout.image_token_id,
                "num_text_layers": layout.num_text_layers}
    paths["manifest"] = write_json_atomic(out / MANIFEST, manifest)
    return result


# --------------------------------------------------------------------------- eager reference


def llava_prompt(layout: LlavaLayout, num_image_tokens: int, batch: int = 2, *, before: int = 4, after: int = 3,
                 seed: int = 0) -> torch.Tensor:
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
                       inner: FastvSpec | None = None) -> Generation:
    """Eager: `vision` (the same pruning in torch) gives the features, HF LLaVA places them and decodes greedily;
    with `inner`, the eager FastV reference (fastv.reference_fastv_generate) decodes instead."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    with torch.no_grad():
        features, keep_idx = vision(pixel_values)
    if inner is not None:
        ref = reference_fastv_generate(model, input_ids, features, inner, int(model.config.image_token_id),
                                       max_new_tokens, attention_mask)
        return Generation(ref.tokens.numpy(), ref.logits.numpy(), keep_idx.numpy(), features.numpy(),
                          ref.image_keep_idx.numpy())
    image = BaseModelOutputWithPooling(pooler_output=list(features))
    tokens, logits = _greedy(model, input_ids, max_new_tokens, attention_mask, mm_encoder_outputs={"image": image})
    return Generation(tokens.numpy(), logits.numpy(), keep_idx.numpy(), features.numpy())


def unpruned_generate(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor, max_new_tokens: int = 8,
                      attention_mask: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The plain HF LLaVA (every patch), greedy: (ids (B, steps), logits (steps, B, V)); the prompt needs N tokens."""
    tokens, logits = _greedy(model, input_ids, max_new_tokens, attention_mask, pixel_values=pixel_values)
    return tokens.numpy(), logits.numpy()


# --------------------------------------------------------------------------- verify


@dataclass
class LlavaVerifyReport:
    batch: int
    max_new_tokens: int
    atol: float
    tokens_match: bool
    keep_idx_match: bool
    max_abs_diff_logits: float
    max_abs_diff_features: float
    tokens: list[list[int]]
    seconds: float
    inner_keep_idx_match: bool | None = None   # FastV: the kept image tokens are the eager ones

    @property
    def passed(self) -> bool:
        return (self.tokens_match and self.keep_idx_match and self.max_abs_diff_logits <= self.atol
                and self.inner_keep_idx_match is not False)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def verify_llava(result: LlavaExportResult, input_ids: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, *, max_new_tokens: int = 8, batch: int = 2, seed: int = 0,
                 atol: float = 1e-4, threads: int | None = None) -> LlavaVerifyReport:
    """ORT pipeline vs eager reference on one batch (seeded random prompt/images unless given): greedy ids,
    keep_idx, and the logits every id was chosen from."""
    if batch < 1:
        raise ConfigError(f"batch={batch} must be >= 1")
    t0 = time.perf_counter()
    size = result.layout.image_size
    if pixel_values is None:
        pixel_values = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    if input_ids is None:
        input_ids = llava_prompt(result.layout, result.num_image_tokens, pixel_values.shape[0], seed=seed)
    with LlavaOrtPipeline(result.out_dir, threads=threads) as pipe:
        got = pipe.generate(input_ids.numpy(), pixel_values.numpy(), max_new_tokens)  # checks the prompt first
    want = reference_generate(result.model, result.vision, input_ids, pixel_values, max_new_tokens,
                              inner=result.inner)
    inner_match = None if result.inner is None else bool(np.array_equal(got.inner_keep_idx, want.inner_keep_idx))
    return LlavaVerifyReport(
        batch=int(pixel_values.shape[0]), max_new_tokens=max_new_tokens, atol=atol,
        tokens_match=bool(np.array_equal(got.tokens, want.tokens)),
        keep_idx_match=got.keep_idx.shape == want.keep_idx.shape and bool((got.keep_idx == want.keep_idx).all()),
        max_abs_diff_logits=float(np.abs(got.logits - want.logits).max()),
        max_abs_diff_features=float(np.abs(got.image_features - want.image_features).max()),
        tokens=got.tokens.tolist(), seconds=time.perf_counter() - t0, inner_keep_idx_match=inner_match)
