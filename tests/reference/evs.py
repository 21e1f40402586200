"""EVS (Efficient Video Sampling, NVIDIA) as vLLM prunes video tokens: keep the tokens that changed most.

Source: github.com/vllm-project/vllm @ 094f117823287790739d3022162a3f30f13d758b
  vllm/multimodal/evs.py `compute_retained_tokens_count` (retained = max(tokens_per_frame, int(T·P·(1 - q))))
                         `compute_retention_mask` (1 - cosine to the same position in the previous frame, frame 0
                         scores 255, stable descending argsort, the first `retained` tokens kept; a mask in the
                         original order)
Adapted only to take the merged tokens as a (T·P, C) tensor with T and P instead of the (t, h, w) grid and the spatial
merge size (P = h·w / merge², the token order is the same "T H W -> (T H W)").
"""
from __future__ import annotations

import torch


def compute_retained_tokens_count(tokens_per_frame: int, num_frames: int, q: float) -> int:
    total_tokens = tokens_per_frame * num_frames
    evs_num_tokens = int(total_tokens * (1 - q))
    min_num_tokens = tokens_per_frame
    return max(min_num_tokens, evs_num_tokens)


def compute_retention_mask(video_embeds: torch.Tensor, num_frames: int, tokens_per_frame: int,
                           retain_num_tokens: int) -> torch.Tensor:
    """(T·P, C) -> (T·P,) bool retention mask; `retain_num_tokens` as compute_retained_tokens_count gives it."""
    T = num_frames
    video_embeds = video_embeds.reshape(T, tokens_per_frame, video_embeds.size(-1))
    # Core EVS
    similarity = torch.nn.functional.cosine_similarity(video_embeds[1:, ...], video_embeds[:-1, ...], dim=-1)
    dissimilarity = 1 - similarity

    # Always ensure we include all tokens from the first frame
    dissimilarity = torch.cat([255 * torch.ones_like(video_embeds[:1, :, 0]), dissimilarity], dim=0)

    dissimilarity_flat = dissimilarity.view(-1)
    order = torch.argsort(dissimilarity_flat, dim=-1, descending=True, stable=True)
    topk_indices = order[:retain_num_tokens]

    retention_mask = torch.zeros_like(dissimilarity_flat, dtype=torch.bool)
    retention_mask[topk_indices] = True
    retention_mask = retention_mask.reshape(dissimilarity.size())

    mask = retention_mask.view(-1)  # "T H W -> (T H W)"
    return mask
