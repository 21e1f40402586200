"""DiffRate (Chen et al., ICCV 2023): prune by [CLS] attention, then merge into the most important tokens, at inference.

Source: github.com/OpenGVLab/DiffRate @ 91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e
  DiffRate/patch/deit.py lines 38-56  `DiffRateBlock.forward`: x = x + attn(norm1(x)); importance = head-mean of the
                         [CLS] row of the block's attention; x (and sizes) sorted by it, [CLS] first
                         lines 95-112 (eval branch): prune = keep the first prune_kept_num tokens; merge with
                         `get_merge_func(x, merge_kept_num)`; sizes *= node_max before the merge; then the MLP
  DiffRate/merge.py      lines 11-31 `get_merge_func`: metric = the tokens x themselves (normalized); each
                         unimportant token's most similar important one (the [CLS] column -inf); scatter_reduce(mean)
  DiffRate/ddp.py        kept_token_number counts the [CLS] token (patch_number + 1 when nothing is dropped)
Adapted only to take the post-attention tokens, the block's attention probabilities and the two kept numbers
([CLS] included, as the code's tables) as plain values. One choice where the code leaves behaviour unspecified:
torch.sort's order among exactly tied importances; here stable (ties to the lower index).
"""
from __future__ import annotations

import math

import torch


def get_merge_func(metric: torch.Tensor, kept_number: int, class_token: bool = True):
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        unimportant_tokens_metric = metric[:, kept_number:]
        compress_number = unimportant_tokens_metric.shape[1]
        important_tokens_metric = metric[:, :kept_number]
        similarity = unimportant_tokens_metric @ important_tokens_metric.transpose(-1, -2)
        if class_token:
            similarity[..., :, 0] = -math.inf
        node_max, node_idx = similarity.max(dim=-1)
        dst_idx = node_idx[..., None]

    def merge(x: torch.Tensor, mode="mean", training=False) -> torch.Tensor:
        src = x[:, kept_number:]
        dst = x[:, :kept_number]
        n, t1, c = src.shape
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, compress_number, c), src, reduce=mode)
        if training:
            return torch.cat([dst, src], dim=1)
        else:
            return dst
    return merge, node_max


def diffrate_block_eval(x, attn, size, prune_kept_num: int, merge_kept_num: int):
    """x [B, N, C] after the attention residual, attn [B, H, N, N], size [B, N, 1] -> (x [B, M, C] in importance
    order, [CLS] first; size [B, M, 1]; the original index of each output token [B, M])."""
    B, N, C = x.shape
    # importance metric
    cls_attn = attn[:, :, 0, 1:]
    cls_attn = cls_attn.mean(dim=1)  # [B, N-1]
    _, idx = torch.sort(cls_attn, descending=True, stable=True)  # stable: see the module docstring
    cls_index = torch.zeros((B, 1), device=idx.device).long()
    idx = torch.cat((cls_index, idx + 1), dim=1)

    # sorting
    x = torch.gather(x, dim=1, index=idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    size = torch.gather(size, dim=1, index=idx.unsqueeze(-1))

    # pruning
    x = x[:, :prune_kept_num]
    size = size[:, :prune_kept_num]

    # merging
    if merge_kept_num < prune_kept_num:
        merge, node_max = get_merge_func(x.detach(), kept_number=merge_kept_num)
        x = merge(x, mode='mean')
        size = torch.cat((size[:, :merge_kept_num], size[:, merge_kept_num:] * node_max[..., None]), dim=1)
        size = merge(size, mode='sum')
    return x, size, idx[:, :x.shape[1]]
