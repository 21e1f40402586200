"""Qwen3-VL with visual-token pruning and DeepStack: M-RoPE bookkeeping and greedy generation (eager, ONNX Runtime or
TensorRT) of its parts, for one image or one video per prompt, batch 1.

    result = export_vlm(model, "out/qwen3", "attn-mean:0.5", grid=(1, 28, 28))   # a video: grid=(t, h, w), t > 1
    report = verify_vlm(result)

What is Qwen2-VL's (Qwen2VLAdapter, exporter/vlm/qwen2_vl_adapter.py) and inherited: the static grid layout, the
CLS-free outer methods after the merger, the prompt's placeholders, the kept-column M-RoPE bookkeeping
(prompt_mrope_positions on the unpruned prompt -> gather the kept columns -> decode position = cache length + max(pos)
+ 1 - T') and the greedy loop. HF's Qwen3-VL get_rope_index takes the same inputs; the interleaving of the t / h / w
sections happens inside the text rotary from the same (3, 1, T) ids.

What is Qwen3-VL's: the vision part also returns the DeepStack levels (D, K, H) gathered with the outer stage's
keep_idx, and lm_prefill takes them (exporter/vlm/qwen3_vl.py); merging methods (holitom) are refused.

Videos and timestamps: Qwen3-VL's processor writes a video as one block per temporal step, each after its timestamp
text ("<0.5 seconds>"): <t_0> <vision_start> video x (h·w/m²) <vision_end> <t_1> <vision_start> ... HF's get_rope_index
splits video_grid_thw (t, h, w) into t grids (1, h, w) and walks the prompt's runs of video tokens, one grid per run:
step i's tokens sit at (s_i, s_i + r, s_i + c), s_i the position after the text before it (its timestamp), so the time
axis is carried by the timestamp text, not by t. A prompt whose video tokens are not t runs of h·w/m² tokens (e.g.
Qwen2-VL's one contiguous block) has no such positions: refused in one line. video_prompt() builds the layout with
one timestamp token per step (the verify prompt); the real processor's timestamps are several text tokens, which
changes nothing here (text positions count up).

Inner pruning (FastV, `--inner fastv[(merge=true,...)]@L:R`): Qwen2-VL's FastV parts (exporter/vlm/qwen2_vl_fastv.py
over fastv.FastvLayers) with the DeepStack input (exporter/vlm/qwen3_vl.py: Qwen3VLFastvPrefill); FastV must prune
after the last layer DeepStack adds to (L >= D - 1: the levels are rows of the unpruned prompt), else one line.
The eager reference is Qwen2-VL's with the same additions (greedy_fastv_reference). Debias calibration
(calibrate_qwen2_fastv_bias) is Qwen2-VL's only: it reads a two-output vision part.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.qwen2_vl import ImageLayout, placeholder_token_id
from tokensieve.exporter.vlm.qwen2_vl_adapter import (PROMPT_LEN, Qwen2VLAdapter, _check_pixels, _greedy,
                                                      decode_position_ids, open_parts, prompt_mrope_positions,
                                                      pruned_mrope_positions)
from tokensieve.exporter.vlm.qwen2_vl_adapter import sample_prompt as image_sample_prompt
from tokensieve.exporter.vlm.qwen2_vl_fastv import check_fastv_prompt, reference_qwen2_fastv_generate
from tokensieve.exporter.vlm.qwen3_vl import (FAMILY, Qwen3VLDecode, Qwen3VLFastvDecode, Qwen3VLFastvPrefill,
                                              Qwen3VLPrefill, Qwen3VLVisionPrune, check_fastv_layer, check_gathering,
                                              deepstack_hooks, deepstack_rows, export_fastv_decode,
                                              export_fastv_prefill, export_lm_decode, export_lm_prefill,
                                              export_vision_prune)
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.recipe import Stage
from tokensieve.runtime.llava_pipeline import Generation

__all__ = ["Qwen3VLAdapter", "video_prompt", "qwen3_sample_prompt", "qwen3_positions", "greedy_eager", "greedy_onnx",
           "greedy_fastv_reference"]


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL, one image (grid t = 1) or one video (t > 1, timestamped steps) per prompt, batch 1."""

    model_type = "qwen3_vl"
    hf_class = "Qwen3VLForConditionalGeneration"
    label = "Qwen3-VL (Qwen3VLForConditionalGeneration)"
    vision_class = Qwen3VLVisionPrune

    def layout(self, grid) -> ImageLayout:
        layout = super().layout(grid)
        if not hasattr(self.model.model.visual, "deepstack_merger_list"):
            raise ConfigError(f"{type(self.model).__name__} has no DeepStack mergers; load a {self.hf_class}")
        return layout

    def check_outer(self, layout: ImageLayout, stage: Stage) -> tuple[int, int, int]:
        out = super().check_outer(layout, stage)  # the method is known and CLS-free by now
        check_gathering(METHODS[stage.method], layout)
        return out

    def sample_prompt(self, layout: ImageLayout, num_image_tokens: int, batch: int, seed: int) -> Tensor:
        return qwen3_sample_prompt(self.model.config, layout)

    def part_modules(self, plan) -> dict[str, nn.Module]:
        video = plan.layout.is_video
        if plan.inner is None:
            return {"prefill": Qwen3VLPrefill(self.model, video).eval(), "decode": Qwen3VLDecode(self.model).eval()}
        return {"prefill": Qwen3VLFastvPrefill(self.model, plan.inner, video).eval(),
                "decode": Qwen3VLFastvDecode(self.model, plan.inner).eval()}

    def part_exporters(self, plan, vision: nn.Module) -> dict:
        model, video, n = self.model, plan.layout.is_video, max(PROMPT_LEN, plan.keep + 2)
        if plan.inner is None:
            return {"vision": lambda: export_vision_prune(vision),
                    "prefill": lambda: export_lm_prefill(model, plan.keep, n, video),
                    "decode": lambda: export_lm_decode(model, n)}
        check_fastv_layer(model, plan.inner)  # before anything is exported
        return {"vision": lambda: export_vision_prune(vision),
                "prefill": lambda: export_fastv_prefill(model, plan.inner, n, video),
                "decode": lambda: export_fastv_decode(model, plan.inner)}

    def generate_parts(self, result, input_ids, pixel_values, steps, threads, backend) -> Generation:
        vision, logits, inner = {}, [], {}
        tokens, _ = greedy_onnx(self.model, result.paths, result.layout, pixel_values, input_ids, steps, threads,
                                backend=backend, vision_out=vision, logits_out=logits, inner_out=inner)
        return Generation(np.array([tokens]), torch.stack(logits).numpy(), vision["keep_idx"],
                          vision["image_features"], inner.get("image_keep_idx"), inner.get("keep_idx"))

    def generate_reference(self, result, input_ids, pixel_values, steps) -> Generation:
        with torch.no_grad():
            features, keep_idx, _ = result.vision(pixel_values)
        if result.inner is not None:
            ref = greedy_fastv_reference(self.model, result.vision, pixel_values, input_ids, result.inner, steps)
            return Generation(ref.tokens.numpy(), ref.logits.numpy(), keep_idx.numpy(), features.numpy(),
                              ref.image_keep_idx[0].numpy(), ref.keep_idx[0].numpy())
        logits = []
        tokens, _ = greedy_eager(self.model, result.vision, pixel_values, input_ids, steps, logits_out=logits)
        return Generation(np.array([tokens]), torch.stack(logits).numpy(), keep_idx.numpy(), features.numpy())

    def part_feeds(self, result, input_ids, pixel_values) -> dict[str, dict]:
        from tokensieve.runtime.onnxruntime_runner import OrtRunner

        pixels = pixel_values.numpy()
        with OrtRunner(result.paths["vision"]) as vision:
            out = vision.infer({"pixel_values": pixels})
        pos, cols, delta = qwen3_positions(self.model, input_ids, result.layout, torch.from_numpy(out["keep_idx"]))
        pruned = input_ids.gather(1, cols)
        prefill = {"input_ids": pruned.numpy(), "image_features": out["image_features"],
                   "deepstack_features": out["deepstack_features"], "position_ids": pos.contiguous().numpy()}
        with OrtRunner(result.paths["prefill"]) as runner:
            pre = runner.infer(prefill)
        decode = {"input_ids": pre["logits"].argmax(-1).astype(np.int64)[:, None],
                  "position_ids": decode_position_ids(delta, pruned.shape[1]).contiguous().numpy()}
        decode |= {name.replace("present.", "past."): v for name, v in pre.items() if name.startswith("present.")}
        return {"vision": {"pixel_values": pixels}, "prefill": prefill, "decode": decode}


# --------------------------------------------------------------------------- prompts and positions


def video_prompt(config, layout: ImageLayout, before: list[int], after: list[int], timestamps: list[int]) -> Tensor:
    """(1, T) input_ids of a video as Qwen3-VL's processor lays it out: before + for each temporal step i:
    timestamps[i] + <vision_start> + video_token x (h·w/m²) + <vision_end>, then after."""
    if not layout.is_video:
        raise ConfigError(f"grid ({layout.t}, {layout.h}, {layout.w}) is an image (t = 1); build its prompt with "
                          "qwen2_vl_adapter.image_prompt()")
    if len(timestamps) != layout.t:
        raise ConfigError(f"video_prompt needs one timestamp token per temporal step: {layout.t}, got "
                          f"{len(timestamps)}")
    step = [config.vision_start_token_id, *[config.video_token_id] * (layout.num_merged // layout.t),
            config.vision_end_token_id]
    ids = [*before, *(tok for ts in timestamps for tok in (ts, *step)), *after]
    return torch.tensor([ids], dtype=torch.long)


def qwen3_sample_prompt(config, layout: ImageLayout) -> Tensor:
    """The verify prompt: Qwen2-VL's image prompt (7 text tokens around the image); a video: 3 text tokens, one
    timestamp token per temporal step, 4 text tokens (ids from 3 that are no special token)."""
    if not layout.is_video:
        return image_sample_prompt(config, layout)
    special = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id,
               *(getattr(config.text_config, f"{k}_token_id", None) for k in ("bos", "eos", "pad"))}
    text = [i for i in range(3, config.text_config.vocab_size) if i not in special][:7 + layout.t]
    return video_prompt(config, layout, text[:3], text[3:7], text[7:])


def check_video_runs(input_ids: Tensor, layout: ImageLayout, placeholder: int) -> None:
    """One-line ConfigError unless each row's video tokens are t runs of h·w/m² (one per timestamped step)."""
    per_step = layout.num_merged // layout.t
    for row in input_ids:
        is_video = (row == placeholder).to(torch.int64)
        starts = int((is_video[1:] > is_video[:-1]).sum()) + int(is_video[0])
        if starts != layout.t:
            raise ConfigError(f"the prompt's video tokens form {starts} run(s) but {FAMILY} needs {layout.t}, one "
                              f"per temporal step of {per_step} tokens after its timestamp; build it with "
                              "qwen3_vl_adapter.video_prompt()")


def qwen3_positions(model: nn.Module, input_ids: Tensor, layout: ImageLayout,
                    keep_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """HF's M-RoPE ids of the unpruned prompt gathered at the kept columns -> (positions (3, 1, T'), kept columns
    (1, T'), rope delta (1, 1)); a video prompt must carry its t timestamped steps."""
    placeholder = placeholder_token_id(model.config, layout)
    if layout.is_video:
        check_video_runs(input_ids, layout, placeholder)
    position_ids = prompt_mrope_positions(model, input_ids, layout)
    return pruned_mrope_positions(position_ids, input_ids == placeholder, keep_idx)


# --------------------------------------------------------------------------- greedy generation


def _loop(model, layout, vision_fn, prefill_fn, decode_fn, input_ids, steps, logits_out, check_ids=None):
    """Qwen2-VL's greedy loop (qwen2_vl_adapter._greedy) with the video prompt checked first."""
    placeholder = placeholder_token_id(model.config, layout)
    if layout.is_video:
        check_video_runs(input_ids, layout, placeholder)
    position_ids = prompt_mrope_positions(model, input_ids, layout)
    return _greedy(vision_fn, prefill_fn, decode_fn, position_ids, input_ids == placeholder, input_ids, steps,
                   check_ids, logits_out)


def greedy_eager(model: nn.Module, vision: Qwen3VLVisionPrune, pixel_values: Tensor, input_ids: Tensor,
                 steps: int = 8, logits_out: list | None = None) -> tuple[list[int], Tensor]:
    """Eager reference: the torch vision_prune + Qwen3VLPrefill + Qwen3VLDecode -> (tokens, prefill's last logits);
    `logits_out` (a list) receives every step's logits."""
    layout = vision.layout
    _check_pixels(pixel_values, layout)
    prefill, decode = Qwen3VLPrefill(model, layout.is_video).eval(), Qwen3VLDecode(model).eval()

    def vision_fn():
        feats, keep_idx, deepstack = vision(pixel_values)
        return (feats, deepstack), keep_idx

    def prefill_fn(ids, feats, pos):
        logits, *past = prefill(ids, *feats, pos)
        return logits, past

    def decode_fn(token, pos, past):
        logits, *past = decode(token, pos, *past)
        return logits, past

    with torch.no_grad():
        return _loop(model, layout, vision_fn, prefill_fn, decode_fn, input_ids, steps, logits_out)


def greedy_onnx(model: nn.Module, paths: dict[str, Path], layout: ImageLayout, pixel_values: Tensor,
                input_ids: Tensor, steps: int = 8, threads: int | None = None, backend: str = "onnxruntime",
                vision_out: dict | None = None, logits_out: list | None = None,
                inner_out: dict | None = None) -> tuple[list[int], Tensor]:
    """The exported pipeline: vision_prune -> lm_prefill -> lm_decode on ONNX Runtime (the files in `paths`) or on
    TensorRT (backend="tensorrt": the engines the manifest `paths["manifest"]` lists); `model` only supplies
    get_rope_index. `vision_out` receives vision_prune's outputs, `logits_out` every step's logits; a FastV
    lm_prefill (outputs keep_idx and image_keep_idx) is detected by its outputs and `inner_out` receives them."""
    from contextlib import ExitStack

    from tokensieve.runtime.llava_pipeline import PARTS

    _check_pixels(pixel_values, layout)
    runners = open_parts(paths, backend, threads)
    with ExitStack() as active:
        vis, pre, dec = (active.enter_context(runners[k]) for k in PARTS)
        past_names = [n for n, _, _ in dec.input_specs if n.startswith("past.")]
        fastv = "image_keep_idx" in pre.output_names
        placeholder = placeholder_token_id(model.config, layout)
        num_image = next(shape[0] for n, shape, _ in pre.input_specs if n == "image_features")  # K, static

        def vision_fn():
            out = vis.infer({"pixel_values": pixel_values.numpy().astype(np.float32)})
            if vision_out is not None:
                vision_out.update(out)
            return (out["image_features"], out["deepstack_features"]), torch.from_numpy(out["keep_idx"])

        def prefill_fn(ids, feats, pos):
            out = pre.infer({"input_ids": ids.numpy(), "image_features": feats[0], "deepstack_features": feats[1],
                             "position_ids": pos.contiguous().numpy()})
            if fastv and inner_out is not None:
                inner_out.update(keep_idx=out["keep_idx"], image_keep_idx=out["image_keep_idx"])
            return torch.from_numpy(out["logits"]), [v for k, v in out.items() if k.startswith("present.")]

        def decode_fn(token, pos, past):
            feeds = {"input_ids": token.numpy(), "position_ids": pos.contiguous().numpy()} | dict(zip(past_names, past))
            out = list(dec.infer(feeds).values())
            return torch.from_numpy(out[0]), out[1:]

        check = (lambda ids: check_fastv_prompt(ids, placeholder, num_image)) if fastv else None
        return _loop(model, layout, vision_fn, prefill_fn, decode_fn, input_ids, steps, logits_out, check)


def greedy_fastv_reference(model: nn.Module, vision: Qwen3VLVisionPrune, pixel_values: Tensor, input_ids: Tensor,
                           spec, steps: int = 8):
    """The eager FastV reference on the outer stage's output: Qwen2-VL's (qwen2_vl_fastv.reference_qwen2_fastv_generate:
    HF's eager attention row for the score, HF's decoder layers re-run by hand with no cache) with the DeepStack
    levels added after layers 0..D-1 at the kept placeholders (generated positions add 0)."""
    layout = vision.layout
    _check_pixels(pixel_values, layout)
    check_fastv_layer(model, spec)
    placeholder = placeholder_token_id(model.config, layout)
    with torch.no_grad():
        feats, keep_idx, deepstack = vision(pixel_values)
    pos, cols, delta = qwen3_positions(model, input_ids, layout, keep_idx)
    ids = input_ids.gather(1, cols)
    lm = model.model.language_model
    with deepstack_hooks(lm.layers, deepstack_rows(ids, deepstack, placeholder), pad=True):
        return reference_qwen2_fastv_generate(model, ids, feats, pos, int(delta[0, 0]) + ids.shape[1], spec,
                                              placeholder, steps)
