"""tokensieve.flops: MACs of matrix products, convolutions (1d/2d/3d: ViT and Qwen2-VL patch embeddings) and SDPA."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tokensieve.flops import count_macs


class _Parts(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv1 = nn.Conv1d(3, 8, 4, stride=4)
        self.conv2 = nn.Conv2d(3, 8, 4, stride=4)
        self.conv3 = nn.Conv3d(3, 8, (2, 4, 4), stride=(2, 4, 4))
        self.linear = nn.Linear(8, 5)

    def forward(self, x):
        if self.kind == "conv1d":
            return self.conv1(x)
        if self.kind == "conv2d":
            return self.conv2(x)
        if self.kind == "conv3d":
            return self.conv3(x)
        if self.kind == "linear":
            return self.linear(x)
        q = k = v = x
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("kind, shape, want", [
    ("conv1d", (1, 3, 32), 8 * 8 * 3 * 4),                     # out (8, 8) x C_in·k
    ("conv2d", (1, 3, 16, 16), 8 * 4 * 4 * 3 * 4 * 4),         # out (8, 4, 4) x C_in·kh·kw
    ("conv3d", (1, 3, 4, 16, 16), 8 * 2 * 4 * 4 * 3 * 2 * 4 * 4),  # out (8, 2, 4, 4) x C_in·kt·kh·kw
    ("linear", (1, 7, 8), 7 * 5 * 8),
    ("sdpa", (1, 2, 6, 4), 2 * 6 * 6 * (4 + 4)),               # heads x N x N x (d + dv)
])
def test_count_macs_by_hand(kind, shape, want):
    with torch.no_grad():
        ep = torch.export.export(_Parts(kind).eval(), (torch.randn(*shape),), strict=False)
    assert count_macs(ep.graph_module) == want
