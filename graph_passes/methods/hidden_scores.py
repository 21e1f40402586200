"""Token scores from hidden-state dynamics across a block (no attention needed)."""
from __future__ import annotations

import torch
from torch import Tensor


def transition_scores(x_in: Tensor, x_out: Tensor, direction_weight: float = 1.0) -> Tensor:
    """TransPrune token transition variation: magnitude + direction change of each token -> (B, N).

    magnitude = ‖x_out − x_in‖ / mean over tokens of ‖x_out − x_in‖ (scale-free);
    direction = 1 − cos(x_in, x_out). Tokens that the block changes most are kept.
    """
    x_in, x_out = x_in.float(), x_out.float()
    delta = (x_out - x_in).norm(dim=-1)
    magnitude = delta / delta.mean(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1, eps=1e-8)
    return magnitude + direction_weight * (1.0 - cos)
