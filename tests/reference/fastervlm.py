"""FasterVLM (Zhang et al., 2024): keep the image tokens the vision encoder's [CLS] attends to most.

Source: github.com/Theia-4869/FasterVLM @ f5d5f12037e105a51865ecb4b28a73cd86eb4921
  llava/model/multimodal_encoder/clip_encoder.py `feature_select` (hidden_states[select_layer] and
      attentions[select_layer], select_feature 'patch': attentions[:, :, 0, 1:], the [CLS] row over the patches)
  llava/model/llava_arch.py `encode_images` (mean over heads, torch.topk of visual_token_num, an index mask in the
      original order; the projector runs on every token, the mask selects)
Adapted only to take the layer's attention probabilities [B, H, N, N] and the count as plain values.
"""
from __future__ import annotations

import torch


def fastervlm_index_mask(image_attentions_full: torch.Tensor, visual_token_num: int) -> torch.Tensor:
    """[B, H, N, N] softmax attention of `select_layer` -> [B, N - 1] bool index mask over the patch tokens."""
    image_attentions = image_attentions_full[:, :, 0, 1:]          # feature_select, select_feature == 'patch'
    B, N = image_attentions.shape[0], image_attentions.shape[-1]
    # prune visual tokens by attention scores
    image_attentions = image_attentions.mean(dim=1)  # (B, N)
    token_indices = torch.topk(image_attentions, k=visual_token_num, dim=1)[1]  # (B, T)

    # generate index mask
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=image_attentions.device)  # (B, N)
    index_masks.scatter_(1, token_indices, True)  # (B, N)
    return index_masks
