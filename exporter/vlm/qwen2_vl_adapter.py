"""Qwen2-VL with visual-token pruning: M-RoPE bookkeeping and greedy generation (eager or ORT) of its parts, for
one image or one video per prompt.

Export and verify go through tokensieve.vlm_api (export_vlm(model, out, "attn-mean:0.5", grid=(1, 28, 28)); a video:
grid=(t, h, w) with t > 1 temporal patches, verify_vlm); this module is what they run for Qwen2-VL:

    pixel_values -> vision_prune -> (image_features (K, H), keep_idx (K,))
    prompt (unpruned) -> get_rope_index -> position_ids (3, B, T) -> keep text columns + kept image columns
    -> lm_prefill(pruned input_ids, image_features, pruned position_ids) -> lm_decode x steps

M-RoPE: positions come from the *unpruned* prompt, so every kept image token keeps its original (t, h, w)
position and the text after the image keeps its original position too; then the pruned prompt has
T' = T - N_img + K tokens and the next decoded token (cache length L) gets position L + (max(pos) + 1 - T'),
the same rope delta rule HF's generate uses (which is what breaks if positions are recomputed after pruning).

Inner pruning (FastV, exporter/vlm/qwen2_vl_fastv.py): lm_prefill also drops K - R image tokens after decoder layer L
(fastv(merge=true): merges them into the kept ones, HoliTom's inner step) and returns keep_idx (T',) and
image_keep_idx (R,); lm_decode takes caches of two lengths. Positions do not change:
the decode position is still delta + T (T the outer-pruned prompt, the full-length layers' cache length).
greedy_eager(inner=spec) runs the torch FastV parts, greedy_fastv_reference the independent eager reference,
greedy_onnx detects a FastV prefill by its outputs (inner_out= receives them and every step's logits).

Videos: the prompt carries `video_token_id` placeholders (<vision_start> + video_token x N + <vision_end>,
video_prompt) and get_rope_index gets `video_grid_thw` with mm_token_type_ids 2 on them (1 for an image). Qwen2-VL's
time axis: the video token of temporal step i, merged row r, column c sits at (s + i, s + r, s + c), s the position
after the text before it (time_interval 1; Qwen2.5-VL's seconds-per-grid spacing does not apply), and the text after
it continues at s + max(h, w) / merge, not past the time axis: for t > max(h, w) / merge the time positions run past
the following text's, as HF does. The decode delta takes max(pos) over all of them, as HF's rope_deltas does.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.adapter import VlmAdapter
from tokensieve.exporter.vlm.fastv import FastvReference, FastvSpec, image_score_rows, place_features
from tokensieve.exporter.vlm.qwen2_vl import (ImageLayout, Qwen2VLDecode, Qwen2VLPrefill, Qwen2VLVisionPrune,
                                              placeholder_token_id)
from tokensieve.exporter.vlm.qwen2_vl import (check_keep, export_lm_decode, export_lm_prefill, export_vision_prune,
                                              image_layout, resolve_method)
from tokensieve.exporter.vlm.qwen2_vl_fastv import (Qwen2VLFastvDecode, Qwen2VLFastvPrefill, check_fastv_prompt,
                                                    export_fastv_decode, export_fastv_prefill, gather_mrope,
                                                    reference_qwen2_fastv_generate)
from tokensieve.recipe import Stage
from tokensieve.runtime.llava_pipeline import Generation

PROMPT_LEN = 16    # only sizes the example the LM parts are traced with (their axes are dynamic)
PROMPT_EXTRA = 9   # sample_prompt: 7 text tokens + <vision_start> + <vision_end> around the image

__all__ = ["Qwen2VLAdapter", "calibrate_qwen2_fastv_bias", "image_prompt", "video_prompt", "vision_prompt",
           "sample_prompt", "prompt_mrope_positions", "kept_columns",
           "pruned_mrope_positions", "decode_position_ids", "greedy_eager", "greedy_onnx", "greedy_fastv_reference"]


class Qwen2VLAdapter(VlmAdapter):
    """Qwen2-VL, one image (grid t = 1) or one video (t > 1) per prompt, batch 1: the M-RoPE bookkeeping below, the
    parts of exporter/vlm/qwen2_vl.py (FastV: qwen2_vl_fastv.py)."""

    model_type = "qwen2_vl"
    hf_class = "Qwen2VLForConditionalGeneration"
    label = "Qwen2-VL (Qwen2VLForConditionalGeneration)"
    manifest_name = "manifest.json"
    batched = False
    static_grid = True
    default_verify_batch = 1
    prompt_extra = PROMPT_EXTRA
    prompt_extra_what = f"{PROMPT_EXTRA} text and vision-marker tokens"
    vision_class: ClassVar[type[Qwen2VLVisionPrune]] = Qwen2VLVisionPrune  # the family's vision_prune

    @property
    def family(self) -> str:
        """What messages call the family: "Qwen2-VL"."""
        return self.label.split(" (")[0]

    def layout(self, grid) -> ImageLayout:
        if grid is None:
            raise ConfigError(f"{self.family} needs the static image grid: pass grid=(t, h, w) in patches, e.g. "
                              "(1, 28, 28) for a 392 px image, (2, 28, 28) for a 4-frame video")
        if not hasattr(self.model, "lm_head") or not hasattr(getattr(self.model, "model", None), "visual"):
            raise ConfigError(f"{type(self.model).__name__} is not a {self.hf_class}; load one with transformers' "
                              f"{self.hf_class}")
        return image_layout(self.model.config.vision_config, grid)

    def outer_layer(self, layout: ImageLayout) -> None:
        return None  # after the merger

    def check_outer(self, layout: ImageLayout, stage: Stage) -> tuple[int, int, int]:
        spec, options = resolve_method(stage.method, stage.options(), layout, self.family)  # [CLS] (a video: feather)
        keep = stage.keep.resolve(layout.num_merged)
        check_keep(layout, keep, spec, options)
        return keep, layout.num_merged, keep

    def vision_module(self, plan) -> Qwen2VLVisionPrune:
        return self.vision_class(self.model.model.visual, plan.layout, plan.stage.method, plan.keep,
                                 plan.stage.options()).eval()

    def sample_pixels(self, layout: ImageLayout, batch: int, seed: int) -> Tensor:
        return torch.randn(layout.num_patches, layout.patch_dim, generator=torch.Generator().manual_seed(seed))

    def placeholder_id(self, layout: ImageLayout) -> int:
        return placeholder_token_id(self.model.config, layout)

    def sample_prompt(self, layout: ImageLayout, num_image_tokens: int, batch: int, seed: int) -> Tensor:
        return sample_prompt(self.model.config, layout)

    def manifest_fields(self, layout: ImageLayout) -> dict:
        return {"modality": layout.modality, "grid_thw": [layout.t, layout.h, layout.w]}

    def tokens_line(self, result) -> str:
        return f"  {f'{result.layout.modality} tokens':<15} {result.num_tokens} merged tokens -> {result.keep} kept"

    def gather_positions(self, positions: Tensor, cols: Tensor) -> Tensor:
        return gather_mrope(positions, cols)

    def part_modules(self, plan) -> dict[str, nn.Module]:
        video = plan.layout.is_video
        if plan.inner is None:
            return {"prefill": Qwen2VLPrefill(self.model, video), "decode": Qwen2VLDecode(self.model)}
        return {"prefill": Qwen2VLFastvPrefill(self.model, plan.inner, video, self.gather_positions).eval(),
                "decode": Qwen2VLFastvDecode(self.model, plan.inner).eval()}

    def part_exporters(self, plan, vision: nn.Module) -> dict:
        model, video, n = self.model, plan.layout.is_video, max(PROMPT_LEN, plan.keep + 2)
        if plan.inner is None:
            return {"vision": lambda: export_vision_prune(vision),
                    "prefill": lambda: export_lm_prefill(model, plan.keep, n, video),
                    "decode": lambda: export_lm_decode(model, n)}
        modules = self.part_modules(plan)  # FastV's prefill carries this adapter's position hook
        return {"vision": lambda: export_vision_prune(vision),
                "prefill": lambda: export_fastv_prefill(model, plan.inner, n, video, modules["prefill"]),
                "decode": lambda: export_fastv_decode(model, plan.inner)}

    def generate_parts(self, result, input_ids, pixel_values, steps, threads, backend) -> Generation:
        vision, inner = {}, {}
        tokens, first = greedy_onnx(self.model, result.paths, result.layout, pixel_values, input_ids, steps, threads,
                                    backend=backend, vision_out=vision, inner_out=inner)
        fastv = result.inner is not None
        return Generation(np.array([tokens]), inner["logits"], vision["keep_idx"], vision["image_features"],
                          inner.get("image_keep_idx") if fastv else None, inner.get("keep_idx") if fastv else None)

    def generate_reference(self, result, input_ids, pixel_values, steps) -> Generation:
        with torch.no_grad():
            features, keep_idx = result.vision(pixel_values)  # the eager vision_prune on the same image
        if result.inner is None:
            logits = []
            tokens, _ = greedy_eager(self.model, result.vision, pixel_values, input_ids, steps, logits_out=logits)
            return Generation(np.array([tokens]), torch.stack(logits).numpy(), keep_idx.numpy(), features.numpy())
        ref = greedy_fastv_reference(self.model, result.vision, pixel_values, input_ids, result.inner, steps)
        return Generation(ref.tokens.numpy(), ref.logits.numpy(), keep_idx.numpy(), features.numpy(),
                          ref.image_keep_idx[0].numpy(), ref.keep_idx[0].numpy())

    def part_feeds(self, result, input_ids, pixel_values) -> dict[str, dict]:
        from tokensieve.runtime.onnxruntime_runner import OrtRunner

        pixels = pixel_values.numpy()
        with OrtRunner(result.paths["vision"]) as vision:
            out = vision.infer({"pixel_values": pixels})
        positions = prompt_mrope_positions(self.model, input_ids, result.layout)
        mask = input_ids == self.placeholder_id(result.layout)
        pos, cols, delta = pruned_mrope_positions(positions, mask, torch.from_numpy(out["keep_idx"]))
        pruned = input_ids.gather(1, cols)
        prefill = {"input_ids": pruned.numpy(), "image_features": out["image_features"],
                   "position_ids": pos.contiguous().numpy()}
        with OrtRunner(result.paths["prefill"]) as runner:
            pre = runner.infer(prefill)
        decode = {"input_ids": pre["logits"].argmax(-1).astype(np.int64)[:, None],
                  "position_ids": decode_position_ids(delta, pruned.shape[1]).contiguous().numpy()}
        decode |= {name.replace("present.", "past."): v for name, v in pre.items() if name.startswith("present.")}
        return {"vision": {"pixel_values": pixels}, "prefill": prefill, "decode": decode}


# --------------------------------------------------------------------------- prompts and M-RoPE


def vision_prompt(config, layout: ImageLayout, before: list[int], after: list[int]) -> Tensor:
    """(1, T) input_ids: before + <vision_start> + placeholder x N + <vision_end> + after (the processor's layout); the
    placeholder is image_token_id for an image, video_token_id for a video (layout.t > 1)."""
    ids = [*before, config.vision_start_token_id, *[placeholder_token_id(config, layout)] * layout.num_merged,
           config.vision_end_token_id, *after]
    return torch.tensor([ids], dtype=torch.long)


def image_prompt(config, layout: ImageLayout, before: list[int], after: list[int]) -> Tensor:
    """(1, T) input_ids: before + <vision_start> + image_token x N_img + <vision_end> + after (the processor's layout)."""
    if layout.is_video:
        raise ConfigError(f"grid ({layout.t}, {layout.h}, {layout.w}) is a video (t > 1); build its prompt with "
                          "video_prompt()")
    return vision_prompt(config, layout, before, after)


def video_prompt(config, layout: ImageLayout, before: list[int], after: list[int]) -> Tensor:
    """(1, T) input_ids: before + <vision_start> + video_token x N + <vision_end> + after (the processor's layout)."""
    if not layout.is_video:
        raise ConfigError(f"grid ({layout.t}, {layout.h}, {layout.w}) is an image (t = 1); build its prompt with "
                          "image_prompt()")
    return vision_prompt(config, layout, before, after)


def sample_prompt(config, layout: ImageLayout, num_text: int = 7) -> Tensor:
    """(1, T) prompt for checks: the first `num_text` ids from 3 that are no special token (3 before the image or
    video, whose placeholders the layout decides)."""
    special = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id,
               *(getattr(config.text_config, f"{k}_token_id", None) for k in ("bos", "eos", "pad"))}
    text = [i for i in range(3, config.text_config.vocab_size) if i not in special][:num_text]
    return vision_prompt(config, layout, text[:3], text[3:])


def prompt_mrope_positions(model: nn.Module, input_ids: Tensor, layout: ImageLayout) -> Tensor:
    """HF's M-RoPE positions (3, B, T) of the unpruned prompt (one image or video per row, `layout`'s grid; a
    Qwen2.5-VL video's layout also gives its second_per_grid, HF's second_per_grid_ts)."""
    cfg, kind = model.config, layout.modality
    token = placeholder_token_id(cfg, layout)
    other = cfg.image_token_id if layout.is_video else cfg.video_token_id
    n = (input_ids == token).sum(dim=1)
    build = f"{kind}_prompt()"
    if not bool((n == layout.num_merged).all()):
        raise ConfigError(f"the prompt holds {n.tolist()} {kind} tokens per row but grid "
                          f"({layout.t}, {layout.h}, {layout.w}) gives {layout.num_merged}; build it with {build}")
    if bool((input_ids == other).any()):
        raise ConfigError(f"the prompt holds {'image' if layout.is_video else 'video'} tokens (id {other}) but this "
                          f"grid ({layout.t}, {layout.h}, {layout.w}) is one {kind}; build it with {build}")
    mm_token_type_ids = (input_ids == token).int() * (2 if layout.is_video else 1)  # HF: text 0, image 1, video 2
    grid = {f"{kind}_grid_thw": layout.grid_thw.expand(input_ids.shape[0], 3)}
    seconds = getattr(layout, "second_per_grid", None)  # a Qwen2.5-VL video's time spacing (qwen2_5_vl.VideoLayout)
    if seconds is not None:
        grid["second_per_grid_ts"] = torch.tensor([seconds] * input_ids.shape[0])
    position_ids, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                                 attention_mask=torch.ones_like(input_ids), **grid)
    return position_ids


def kept_columns(image_mask: Tensor, keep_idx: Tensor) -> Tensor:
    """(B, T) image-token mask, keep_idx (K,) or (B, K) -> (B, T - N_img + K) prompt columns to keep, ascending.

    Text columns all stay; image column j (the j-th image token of the row) stays iff j is in keep_idx.
    """
    if keep_idx.dim() == 1:
        keep_idx = keep_idx.unsqueeze(0).expand(image_mask.shape[0], -1)
    n_img = image_mask.sum(dim=1)
    if not bool((n_img == n_img[0]).all()):
        raise ConfigError(f"rows hold different image token counts {n_img.tolist()}; prune one layout per batch")
    n = int(n_img[0])
    if keep_idx.numel() and (int(keep_idx.min()) < 0 or int(keep_idx.max()) >= n):
        raise ConfigError(f"keep_idx values must lie in [0, {n}) image tokens, got [{int(keep_idx.min())}, "
                          f"{int(keep_idx.max())}]; pass the keep_idx that vision_prune returned")
    if keep_idx.shape[1] > 1 and not bool((keep_idx[:, 1:] > keep_idx[:, :-1]).all()):
        raise ConfigError("keep_idx must be strictly ascending (no duplicates); pass the keep_idx that vision_prune returned")
    rows = []
    for mask, keep in zip(image_mask, keep_idx):
        image_cols = mask.nonzero().squeeze(1)
        keep_col = torch.zeros_like(mask)
        keep_col[image_cols[keep]] = True
        rows.append((~mask | keep_col).nonzero().squeeze(1))
    return torch.stack(rows)


def pruned_mrope_positions(position_ids: Tensor, image_mask: Tensor, keep_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unpruned M-RoPE positions (3, B, T) -> (pruned positions (3, B, T'), kept columns (B, T'), rope delta (B, 1)).

    The kept columns are gathered with the same keep_idx as the image features; text positions are untouched.
    rope delta = max(pos) + 1 - T': the token decoded at cache length L gets position L + delta.
    """
    if position_ids.dim() != 3 or position_ids.shape[0] != 3 or position_ids.shape[1:] != image_mask.shape:
        raise ConfigError(f"position_ids must be (3, B, T) matching the (B, T) image mask {tuple(image_mask.shape)}, "
                          f"got {tuple(position_ids.shape)}")
    cols = kept_columns(image_mask, keep_idx)
    pos = gather_mrope(position_ids, cols)
    delta = position_ids.amax(dim=(0, 2)).unsqueeze(1) + 1 - cols.shape[1]
    return pos, cols, delta


def decode_position_ids(rope_delta: Tensor, cache_len: int) -> Tensor:
    """(B, 1) rope delta -> (3, B, 1) position ids of the token decoded at cache length `cache_len`."""
    return (rope_delta + cache_len).unsqueeze(0).expand(3, -1, -1)


# --------------------------------------------------------------------------- greedy generation


def _greedy(vision_fn, prefill_fn, decode_fn, position_ids: Tensor, image_mask: Tensor, input_ids: Tensor,
            steps: int, check_ids=None, logits_out: list | None = None) -> tuple[list[int], Tensor]:
    """The shared loop: prune -> pruned prompt + positions -> prefill -> `steps` greedy tokens (batch 1).
    `check_ids(ids)` vets the outer-pruned prompt before the prefill; `logits_out` receives every step's logits.
    The decode position is delta + the full-length cache length (FastV's shorter layers change no position)."""
    feats, keep_idx = vision_fn()
    pos, cols, delta = pruned_mrope_positions(position_ids, image_mask, keep_idx)
    ids = input_ids.gather(1, cols)
    if check_ids is not None:
        check_ids(ids)
    logits, past = prefill_fn(ids, feats, pos)
    first_logits = logits
    tokens, cache_len = [], ids.shape[1]
    for _ in range(steps):
        token = int(logits.argmax(-1)[0])
        tokens.append(token)
        if logits_out is not None:
            logits_out.append(logits)
        if len(tokens) == steps:
            break
        logits, past = decode_fn(torch.tensor([[token]]), decode_position_ids(delta, cache_len), past)
        cache_len += 1
    return tokens, first_logits


def greedy_eager(model: nn.Module, vision: Qwen2VLVisionPrune, pixel_values: Tensor, input_ids: Tensor,
                 steps: int = 8, inner: FastvSpec | None = None,
                 logits_out: list | None = None) -> tuple[list[int], Tensor]:
    """Eager reference: the torch vision_prune module + the torch LM parts -> (tokens, prefill's last logits);
    inner: the torch FastV parts (Qwen2VLFastvPrefill / Qwen2VLFastvDecode) instead of the plain ones; `logits_out`
    (a list) receives every step's logits."""
    layout = vision.layout
    _check_pixels(pixel_values, layout)
    if inner is None:
        prefill, decode = Qwen2VLPrefill(model, layout.is_video).eval(), Qwen2VLDecode(model).eval()
    else:
        prefill = Qwen2VLFastvPrefill(model, inner, layout.is_video).eval()
        decode = Qwen2VLFastvDecode(model, inner).eval()
    position_ids = prompt_mrope_positions(model, input_ids, layout)
    placeholder = placeholder_token_id(model.config, layout)
    check = None if inner is None else (lambda ids: check_fastv_prompt(ids, placeholder, inner.num_image_tokens))

    def prefill_fn(ids, feats, pos):
        logits, *past = prefill(ids, feats, pos)
        return logits, past if inner is None else past[:-2]  # FastV: + keep_idx, image_keep_idx

    def decode_fn(token, pos, past):
        logits, *past = decode(token, pos, *past)
        return logits, past

    with torch.no_grad():
        return _greedy(lambda: vision(pixel_values), prefill_fn, decode_fn, position_ids, input_ids == placeholder,
                       input_ids, steps, check, logits_out)


def greedy_fastv_reference(model: nn.Module, vision: Qwen2VLVisionPrune, pixel_values: Tensor, input_ids: Tensor,
                           spec: FastvSpec, steps: int = 8) -> FastvReference:
    """The independent eager FastV reference (qwen2_vl_fastv.reference_qwen2_fastv_generate) on the outer stage's
    output: vision_prune's features and keep_idx -> the outer-pruned prompt and its M-RoPE ids -> greedy decoding.
    tokens (1, steps), logits (steps, 1, V), image_keep_idx (1, R), keep_idx (1, T')."""
    layout = vision.layout
    _check_pixels(pixel_values, layout)
    placeholder = placeholder_token_id(model.config, layout)
    position_ids = prompt_mrope_positions(model, input_ids, layout)
    with torch.no_grad():
        feats, keep_idx = vision(pixel_values)
    pos, cols, delta = pruned_mrope_positions(position_ids, input_ids == placeholder, keep_idx)
    ids = input_ids.gather(1, cols)
    return reference_qwen2_fastv_generate(model, ids, feats, pos, int(delta[0, 0]) + ids.shape[1], spec, placeholder,
                                          steps)


def open_parts(paths: dict[str, Path], backend: str, threads: int | None) -> dict:
    """The runners of the three parts: ONNX Runtime on the files in `paths`, or (another backend) the engines the
    manifest `paths["manifest"]` lists; one-line errors for an unknown backend or a folder without engines."""
    from tokensieve.manifest import read_vlm_manifest
    from tokensieve.runtime.llava_pipeline import PARTS, part_runners
    from tokensieve.runtime.onnxruntime_runner import OrtRunner

    if backend == "onnxruntime":
        return {k: OrtRunner(paths[k], threads=threads) for k in PARTS}
    manifest = paths.get("manifest")
    if manifest is None:
        raise ConfigError(f"backend={backend!r} reads the engines from the export's manifest; pass the paths "
                          "export_vlm returned (they include 'manifest')")
    return part_runners(manifest.parent, read_vlm_manifest(manifest.parent, manifest.name), backend, threads=threads,
                        manifest_name=manifest.name)


def greedy_onnx(model: nn.Module, paths: dict[str, Path], layout: ImageLayout, pixel_values: Tensor,
                input_ids: Tensor, steps: int = 8, threads: int | None = None,
                backend: str = "onnxruntime", vision_out: dict | None = None,
                inner_out: dict | None = None) -> tuple[list[int], Tensor]:
    """The exported pipeline: vision_prune -> lm_prefill -> lm_decode on ONNX Runtime (the files in `paths`, external
    data next to them) or on TensorRT (backend="tensorrt": the engines the manifest `paths["manifest"]` lists);
    `model` only supplies get_rope_index. `vision_out` (a dict) receives vision_prune's "image_features" and
    "keep_idx", for verification. A FastV lm_prefill (outputs keep_idx and image_keep_idx) is detected by its outputs;
    `inner_out` (a dict) then receives them and "logits" (steps, 1, V), every step's logits."""
    from contextlib import ExitStack

    from tokensieve.runtime.llava_pipeline import PARTS

    _check_pixels(pixel_values, layout)
    position_ids = prompt_mrope_positions(model, input_ids, layout)
    runners = open_parts(paths, backend, threads)
    with ExitStack() as active:
        vis, pre, dec = (active.enter_context(runners[k]) for k in PARTS)
        past_names = [n for n, _, _ in dec.input_specs if n.startswith("past.")]
        fastv = "image_keep_idx" in pre.output_names
        placeholder = placeholder_token_id(model.config, layout)
        steps_logits = [] if inner_out is not None else None

        def vision_fn():
            out = vis.infer({"pixel_values": pixel_values.numpy().astype(np.float32)})
            if vision_out is not None:
                vision_out.update(image_features=out["image_features"], keep_idx=out["keep_idx"])
            return torch.from_numpy(out["image_features"]), torch.from_numpy(out["keep_idx"])

        def prefill_fn(ids, feats, pos):
            out = pre.infer({"input_ids": ids.numpy(), "image_features": feats.numpy(),
                             "position_ids": pos.contiguous().numpy()})
            if fastv and inner_out is not None:
                inner_out.update(keep_idx=out["keep_idx"], image_keep_idx=out["image_keep_idx"])
            return torch.from_numpy(out["logits"]), [v for k, v in out.items() if k.startswith("present.")]

        def decode_fn(token, pos, past):
            feeds = {"input_ids": token.numpy(), "position_ids": pos.contiguous().numpy()} | dict(zip(past_names, past))
            out = list(dec.infer(feeds).values())
            return torch.from_numpy(out[0]), out[1:]

        num_image = next(shape[0] for n, shape, _ in pre.input_specs if n == "image_features")  # K, static

        def check(ids):
            check_fastv_prompt(ids, placeholder, num_image)

        result = _greedy(vision_fn, prefill_fn, decode_fn, position_ids, input_ids == placeholder, input_ids, steps,
                         check if fastv else None, steps_logits)
    if inner_out is not None:
        inner_out["logits"] = torch.stack(steps_logits).numpy()
    return result


def _check_pixels(pixel_values: Tensor, layout: ImageLayout) -> None:
    want = (layout.num_patches, layout.patch_dim)
    if tuple(pixel_values.shape) != want:
        raise ConfigError(f"pixel_values has shape {tuple(pixel_values.shape)} but grid ({layout.t}, {layout.h}, "
                          f"{layout.w}) needs {want} (patches x C*T*P*P); export for this grid or resize the "
                          f"{layout.modality}")


# --------------------------------------------------------------------------- debias calibration


def calibrate_qwen2_fastv_bias(model: nn.Module, vision: Qwen2VLVisionPrune, pixel_values, input_ids,
                               layer: int) -> np.ndarray:
    """(K,) float64: the FastV score of each of the K image (video) tokens the outer stage `vision` keeps, at decoder
    layer `layer`, averaged over calibration samples per image-token ordinal: the `inner_bias` of
    `export_vlm(..., inner="fastv(debias=true)@layer:R")` with the same outer stage (same method, keep and grid).

    Each sample runs as vlm_qwen2's greedy path runs it: vision(pixels) -> the K kept features and keep_idx -> the
    outer-pruned prompt and its M-RoPE ids (get_rope_index on the unpruned prompt, kept columns gathered), then the
    reference score row (fastv.fastv_score_reference: HF's eager attention probabilities of the last prompt position,
    head mean; what the eager FastV reference selects by) at the K placeholders. Ordinal j is the j-th kept token in
    prompt order (with an outer keep of every token, e.g. uniform:1.0, the j-th image position).
    pixel_values: a list of (N, patch_dim) tensors or one (S, N, patch_dim) tensor (S samples); input_ids: the
    unpruned prompt(s) as vlm_qwen2.image_prompt / video_prompt build them: (1, T) for every sample, (S, T), or a list
    of S (1, T). One-line ConfigError for bad input."""
    if not isinstance(vision, Qwen2VLVisionPrune):
        raise ConfigError(f"vision must be the outer stage, a Qwen2VLVisionPrune (tokensieve.exporter.vlm.qwen2_vl), "
                          f"got {type(vision).__name__}")
    if getattr(getattr(model, "config", None), "model_type", None) != "qwen2_vl" \
            or vision.visual is not getattr(getattr(model, "model", None), "visual", None):
        raise ConfigError("calibrate_qwen2_fastv_bias needs the Qwen2VLForConditionalGeneration whose vision tower "
                          "`vision` was built from (Qwen2VLVisionPrune(model.model.visual, ...)); LLaVA: "
                          "fastv.calibrate_fastv_bias")
    num_layers = model.config.text_config.num_hidden_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= num_layers - 2:
        raise ConfigError(f"layer {layer!r} is out of range; the language model has {num_layers} layers, calibrate "
                          f"at the L of fastv(debias=true)@L:R, 0..{num_layers - 2}")
    samples = _calibration_pixels(pixel_values)
    prompts = _calibration_prompts(input_ids, len(samples))
    layout = vision.layout
    placeholder = placeholder_token_id(model.config, layout)
    want = (layout.num_patches, layout.patch_dim)
    rows = []
    with torch.no_grad():
        for i, (pixels, prompt) in enumerate(zip(samples, prompts)):
            try:
                if tuple(pixels.shape) != want:
                    raise ConfigError(f"pixel_values has shape {tuple(pixels.shape)} but grid ({layout.t}, "
                                      f"{layout.h}, {layout.w}) needs {want} (patches x C*T*P*P)")
                position_ids = prompt_mrope_positions(model, prompt, layout)
                feats, keep_idx = vision(pixels)
                pos, cols, _ = pruned_mrope_positions(position_ids, prompt == placeholder, keep_idx)
                ids = prompt.gather(1, cols)
                check_fastv_prompt(ids, placeholder, vision.keep)
            except ConfigError as e:
                raise ConfigError(f"calibration sample {i}: {e}") from e
            embeds = place_features(model, ids, feats, placeholder)
            rows.append(image_score_rows(model, embeds, torch.ones_like(ids), pos, ids == placeholder, layer)[0])
    return torch.stack(rows).mean(0).numpy()


def _calibration_pixels(pixel_values) -> list[Tensor]:
    """A list of (N, patch_dim) tensors or one (S, N, patch_dim) tensor -> S (N, patch_dim) tensors."""
    if isinstance(pixel_values, (Tensor, np.ndarray)):
        x = torch.as_tensor(pixel_values)
        if x.dim() != 3:
            raise ConfigError(f"pixel_values must be (S, N, patch_dim) (S calibration samples) or a list of "
                              f"(N, patch_dim), got a tensor of shape {tuple(x.shape)}")
        samples = list(x)
    elif isinstance(pixel_values, (list, tuple)):
        if not all(isinstance(x, (Tensor, np.ndarray)) for x in pixel_values):
            raise ConfigError("pixel_values must be a list of (N, patch_dim) tensors, one per calibration sample")
        samples = [torch.as_tensor(x) for x in pixel_values]
    else:
        raise ConfigError(f"pixel_values must be a list of (N, patch_dim) tensors or one (S, N, patch_dim) tensor, "
                          f"got {type(pixel_values).__name__}")
    if not samples:
        raise ConfigError("pixel_values holds no calibration sample; pass at least one image (video)")
    if any(not x.is_floating_point() for x in samples):
        raise ConfigError("pixel_values must be float tensors (the processor's normalized patches)")
    return samples


def _calibration_prompts(input_ids, count: int) -> list[Tensor]:
    """(1, T) for every sample, (S, T), or a list of S (1, T) / (T,) -> S (1, T) int64 prompts."""
    if isinstance(input_ids, (Tensor, np.ndarray)):
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] not in (1, count):
            raise ConfigError(f"input_ids must be (1, T) (one prompt for every sample) or ({count}, T) (one per "
                              f"calibration sample), got {tuple(ids.shape)}")
        rows = [ids[i:i + 1] for i in range(ids.shape[0])] * (count if ids.shape[0] == 1 else 1)
    elif isinstance(input_ids, (list, tuple)):
        if len(input_ids) != count or not all(isinstance(x, (Tensor, np.ndarray)) for x in input_ids):
            raise ConfigError(f"input_ids as a list must hold one (1, T) prompt tensor per calibration sample: "
                              f"{count}, got {len(input_ids)} items")
        rows = [torch.as_tensor(x) for x in input_ids]
        rows = [r[None] if r.dim() == 1 else r for r in rows]
        if any(r.dim() != 2 or r.shape[0] != 1 for r in rows):
            raise ConfigError("every prompt in input_ids must be (1, T) (the Qwen2-VL parts are batch 1)")
    else:
        raise ConfigError(f"input_ids must be a (1, T) / ({count}, T) tensor or a list of (1, T) prompts, got "
                          f"{type(input_ids).__name__}")
    if any(r.is_floating_point() or r.dtype == torch.bool for r in rows):
        raise ConfigError("input_ids must be integer token ids")
    return [r.long() for r in rows]
