"""DivPrune (Alvar et al., CVPR 2025): greedy max-min diversity selection, as the released code computes it.

Source: github.com/vbdi/divprune @ 799e2d950aa01ba7860907f5a6d86061f885dca6
  LLaVA/llava/model/llava_arch.py lines 147-172 `pairwise_cosine_similarity`, `DivPrune` (distance 1 - cosine; first
  pick: the largest second-smallest distance of a column, i.e. the token farthest from its nearest neighbour; then
  repeatedly the token whose smallest distance to the chosen set is largest; torch.argmax: first maximum)
  lines 366-384: called on the projected image features (LLM input embeddings `new_input_embeds`, after the
  multi-modal projector) with threshold_terms = int(round(SUBSET_RATIO * image tokens)); kept indices sorted.
Adapted only to take the (n, C) token matrix and a token count instead of a ratio.
"""
from __future__ import annotations

import torch


def pairwise_cosine_similarity(matrix):
    norm_matrix = matrix / matrix.norm(dim=1, keepdim=True)
    cosine_similarity = torch.mm(norm_matrix, norm_matrix.t())
    return cosine_similarity


def divprune(visual_feature_vectors, threshold_terms: int, cosine_matrix=None):
    """-> (s, the picks in selection order [threshold_terms], the distance matrix)."""
    if cosine_matrix is None:
        cosine_matrix = 1.0 - (pairwise_cosine_similarity(visual_feature_vectors))

    s = torch.empty(threshold_terms, dtype=torch.long, device=visual_feature_vectors.device)
    for i in range(threshold_terms):
        if i == 0:
            m2 = cosine_matrix
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i, device=cosine_matrix.device)))

        if i == 0:
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]  # for distance
        else:
            scores = torch.min(m2, dim=0).values  # for distance

        phrase_to_add_idx = torch.argmax(scores)
        s[i] = phrase_to_add_idx
    return s, cosine_matrix


def subset_size(ratio: float, num_tokens: int) -> int:
    """DivPrune's budget from SUBSET_RATIO: int(round(ratio * tokens)) (Python round: halves to even)."""
    return int(round(ratio * num_tokens))
