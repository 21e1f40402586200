"""HiPrune (Liu et al., 2025): anchors, their neighbours and registers, as the released LLaVA code selects them.

Source: github.com/Danielement321/HiPrune @ 6e83a1240874e99a25df34f54221a29bb24b7bc2
  LLaVA/llava/model/llava_arch.py lines 140-181 `encode_images`: "global attention" = attentions mean over heads and
  over queries, [:, 1:] (patch keys), at the deep layer (mm_vision_select_layer) and the object layer
  (HIPRUNE_OBJECT_LAYER - 1); round(K · HIPRUNE_ALPHA / 5) anchors by torch.topk of the object-layer attention; with
  them i - 1, i + 1, i - 24, i + 24 (LLaVA-1.5's 24 × 24 grid), clamped to [0, 575], unique; the deep attention of
  those is lowered by 1 and the top K - |them| of the deep attention are the registers; index mask of the union.
Adapted only to take the two attention score rows and the grid width / token count as values (24 and 575 are the
code's constants for 576 patches). One choice where the code leaves behaviour unspecified: torch.topk's order among
exact ties; here a stable descending sort (the lower index first).
"""
from __future__ import annotations

import torch


def _topk_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    return values.sort(dim=1, descending=True, stable=True).indices[:, :k]        # torch.topk(values, k)[1]


def hiprune_index_mask(shallow_attention: torch.Tensor, deep_attention: torch.Tensor, visual_token_num: int,
                       alpha: float, width: int) -> torch.Tensor:
    """(B, N) object-layer and deep-layer global attention over the patches -> (B, N) bool index mask."""
    B, N = shallow_attention.shape
    deep_attention = deep_attention.clone()
    shallow_token_num = round(visual_token_num * alpha / 5)
    index_masks = []
    for i in range(B):
        shallow_token_indices = _topk_indices(shallow_attention[i].unsqueeze(0), shallow_token_num)
        shallow_token_indices = torch.cat([shallow_token_indices,
                                           shallow_token_indices - 1,
                                           shallow_token_indices + 1,
                                           shallow_token_indices - width,
                                           shallow_token_indices + width], dim=1)  # (B, T * 5)
        shallow_token_indices = shallow_token_indices.clamp(0, N - 1)
        shallow_token_indices = torch.unique(shallow_token_indices, sorted=False).unsqueeze(0)
        deep_token_num = visual_token_num - shallow_token_indices.shape[1]

        available_index_mask = torch.zeros(1, N, dtype=torch.bool)
        available_index_mask.scatter_(1, shallow_token_indices, 1)

        deep_attention[i] -= available_index_mask.int().squeeze()

        deep_token_indices = _topk_indices(deep_attention[i].unsqueeze(0), deep_token_num)
        token_indices = torch.cat([shallow_token_indices, deep_token_indices], dim=1)
        token_indices = torch.sort(token_indices, dim=1)[0]

        index_mask = torch.zeros(1, N, dtype=torch.bool)
        index_mask.scatter_(1, token_indices, True)
        index_masks.append(index_mask)
    return torch.cat(index_masks, dim=0)
