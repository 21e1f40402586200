"""Qwen2-VL's prompts, M-RoPE bookkeeping and greedy generation of its parts (the public names; the code is the
Qwen2-VL adapter, tokensieve.exporter.vlm.qwen2_vl_adapter, where the module docstring explains M-RoPE and videos).

    ids = vlm_qwen2.image_prompt(model.config, layout, before, after)      # or video_prompt for a grid with t > 1
    tokens, logits = vlm_qwen2.greedy_onnx(model, result.paths, result.layout, pixel_values, ids)
"""
from tokensieve.exporter.vlm.qwen2_vl_adapter import (calibrate_qwen2_fastv_bias, decode_position_ids, greedy_eager,
                                                      greedy_fastv_reference, greedy_onnx, image_prompt, kept_columns,
                                                      prompt_mrope_positions, pruned_mrope_positions, sample_prompt,
                                                      video_prompt, vision_prompt)

__all__ = ["image_prompt", "video_prompt", "vision_prompt", "sample_prompt", "prompt_mrope_positions", "kept_columns",
           "pruned_mrope_positions", "decode_position_ids", "greedy_eager", "greedy_onnx", "greedy_fastv_reference",
           "calibrate_qwen2_fastv_bias"]
