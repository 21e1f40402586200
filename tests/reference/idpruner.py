"""IDPruner (Tan et al., 2026): Maximal Marginal Relevance over the visual tokens, as the released code selects them.

Source: github.com/YF-T/IDPruner @ 6aeb9dc3cedee60e04853a42a8567b1aa4a50a1d
  pruning/strategies/idpruner.py `_default_similarity_compute` (cosine, norm + 1e-8), `_default_importance_compute`
  (min-max to [0, 1], eps 1e-6), `idpruner` (num_to_keep = int(round(N * (1 - ratio))); the first round scores the
  importance alone, then λ·imp − (1 − λ)·max similarity to the chosen set; chosen tokens masked -inf; parallel_k = 1
  by default).
Adapted only to take the tokens and the raw importance as tensors (the code's importance comes from its trained
Vision Selector; tokensieve's `mmr` feeds the [CLS] attention row instead) and the count instead of the ratio. One
choice where the code leaves behaviour unspecified: torch.topk(k=1) among exact ties; here argmax (the first).
"""
from __future__ import annotations

import torch


def _default_similarity_compute(features: torch.Tensor) -> torch.Tensor:
    features_norm = features / (features.norm(dim=-1, keepdim=True) + 1e-8)
    return torch.matmul(features_norm, features_norm.t())


def _default_importance_compute(scores: torch.Tensor) -> torch.Tensor:
    s_min = scores.min()
    s_max = scores.max()
    epsilon = 1e-6
    norm_scores = (scores - s_min) / (s_max - s_min + epsilon)
    return norm_scores


def idpruner_select(visual_features: torch.Tensor, raw_scores: torch.Tensor, num_to_keep: int,
                    mmr_lambda: float = 0.5) -> list[int]:
    """(N, D) tokens, (N,) raw importance -> the picks in selection order (the `idpruner` loop, parallel_k = 1)."""
    N = visual_features.shape[0]
    device = visual_features.device
    importance = _default_importance_compute(raw_scores).float()
    similarity = _default_similarity_compute(visual_features.float())

    selected_indices = []
    candidates_mask = torch.ones(N, dtype=torch.bool, device=device)
    max_sim_values = torch.full((N,), -2.0, device=device)

    while len(selected_indices) < num_to_keep:
        if len(selected_indices) == 0:
            mmr_score = importance.clone()
        else:
            mmr_score = (mmr_lambda * importance) - ((1 - mmr_lambda) * max_sim_values)
        mmr_score[~candidates_mask] = -float("inf")
        best = int(mmr_score.argmax())                                   # torch.topk(mmr_score, k=1)
        selected_indices.append(best)
        candidates_mask[best] = False
        batch_sims = similarity[:, [best]]
        batch_max_sim, _ = torch.max(batch_sims, dim=1)
        max_sim_values = torch.maximum(max_sim_values, batch_max_sim)
    return selected_indices
