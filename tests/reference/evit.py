"""EViT (Liang et al., ICLR 2022): [CLS]-attention top-k with the inattentive tokens fused, as the released code does.

Source: github.com/youweiliang/evit @ 5ca95a7cf4a8637193284895c5bc0dd9dc365982
  evit.py    lines 208-222 `Attention.forward` (selection: left_tokens = ceil(keep_rate * (N - 1)), the head-mean of
             the [CLS] row of the block's softmax attention, torch.topk sorted=True)
             lines 250-266 `Block.forward` (x = x + attn(norm1(x)); gather the kept tokens from x[:, 1:]; the fused
             token = torch.sum(non_topk * non_topk_attn): the attention-weighted SUM of the dropped tokens of that
             post-attention tensor, not renormalized; cat([cls, kept, fused]); then the block's MLP on all of them)
             lines 658-666 `deit_small_patch16_shrink_base`: keep_rate 0.7 at drop_loc = (3, 6, 9) (0-based blocks)
  helpers.py lines 52-73 `complement_idx`
Adapted only to take the post-attention tokens and the block's attention probabilities as tensors. One choice where
the code leaves behaviour unspecified: torch.topk's order among exactly tied scores; here a stable descending sort
(ties to the lower index), which gives the same values in the same (descending) order otherwise.
"""
from __future__ import annotations

import math

import torch


def complement_idx(idx, dim):
    """helpers.py: set(range(dim)) - set(idx) along the last dimension, ascending."""
    a = torch.arange(dim, device=idx.device)
    ndim = idx.ndim
    dims = idx.shape
    n_idx = dims[-1]
    dims = dims[:-1] + (-1, )
    for i in range(1, ndim):
        a = a.unsqueeze(0)
    a = a.expand(*dims)
    masked = torch.scatter(a, -1, idx, 0)
    compl, _ = torch.sort(masked, dim=-1, descending=False)
    compl = compl.permute(-1, *tuple(range(ndim - 1)))
    compl = compl[n_idx:].permute(*(tuple(range(1, ndim)) + (0,)))
    return compl


def left_tokens_of(keep_rate: float, N: int) -> int:
    """Attention.forward: the kept non-[CLS] tokens of a block entering with N tokens ([CLS] + N - 1 others)."""
    return math.ceil(keep_rate * (N - 1))


def evit_block_prune(x, attn, left_tokens: int, fuse_token: bool):
    """x [B, N, C] after the block's attention residual, attn [B, H, N, N] its softmax -> (tokens, idx) where tokens
    = cat([cls, kept (descending attention), fused]) as Block.forward builds them and idx [B, left_tokens] are the
    kept non-[CLS] indices (0-based among x[:, 1:]) in that order."""
    B, N, C = x.shape
    cls_attn = attn[:, :, 0, 1:]  # [B, H, N-1]
    cls_attn = cls_attn.mean(dim=1)  # [B, N-1]
    idx = cls_attn.sort(dim=1, descending=True, stable=True).indices[:, :left_tokens]  # torch.topk(sorted=True)
    index = idx.unsqueeze(-1).expand(-1, -1, C)  # [B, left_tokens, C]

    non_cls = x[:, 1:]
    x_others = torch.gather(non_cls, dim=1, index=index)  # [B, left_tokens, C]

    if fuse_token:
        compl = complement_idx(idx, N - 1)  # [B, N-1-left_tokens]
        non_topk = torch.gather(non_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))  # [B, N-1-left_tokens, C]

        non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)  # [B, N-1-left_tokens]
        extra_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)  # [B, 1, C]
        x = torch.cat([x[:, 0:1], x_others, extra_token], dim=1)
    else:
        x = torch.cat([x[:, 0:1], x_others], dim=1)
    return x, idx


def evit_token_counts(num_patches: int, keep_rate: float, drop_loc, depth: int, fuse_token: bool) -> list[int]:
    """Tokens each block's MLP runs on ([CLS] included), following EViT.forward_features' keep_rate list."""
    N, out = num_patches + 1, []
    for i in range(depth):
        if i in drop_loc:
            N = 1 + left_tokens_of(keep_rate, N) + int(fuse_token)
        out.append(N)
    return out
