"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching + size-weighted merge, as the released code computes it.

Source: github.com/facebookresearch/ToMe @ af95e4b1befa172dadccd8c81e223b10090f9579
  tome/merge.py  lines 18-97  `bipartite_soft_matching` (the `merge` closure; `unmerge` is not needed)
                 lines 210-224 `merge_wavg`
  tome/patch/timm.py lines 35-53 `ToMeBlock.forward`: metric = k.mean(1) of the block's attention, the merge runs
                 between the attention residual and the MLP, r tokens per block (`parse_r`), sizes carried through
                 every block (`_tome_info["size"]`), proportional attention adds size.log() to the logits.
Adapted only to return the merged tokens and sizes directly, plus each output token's source positions (the merge
groups) through `merge(..., mode="amax")` of a one-hot source matrix, as `merge_source` (lines 227-239) does.
One deliberate choice where the code leaves behaviour unspecified: `node_max.argsort(descending=True)` (line 60) is
not stable, so exact ties have no defined order; here `stable=True` (ties to the lower index).
"""
from __future__ import annotations

import math

import torch


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = False, distill_token: bool = False):
    """-> merge(x, mode) as in tome/merge.py (batch-first [B, T, C])."""
    protected = 0
    if class_token:
        protected += 1
    if distill_token:
        protected += 1

    # We can only reduce by a maximum of 50% tokens
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)

    if r <= 0:
        return lambda x, mode="mean": x

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)

        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf

        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]  # stable: see module docstring

        unm_idx = edge_idx[..., r:, :]  # Unmerged Tokens
        src_idx = edge_idx[..., :r, :]  # Merged Tokens
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

        if class_token:
            # Sort to ensure the class token is at the start
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: torch.Tensor, mode="mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)

        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        else:
            return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge, x: torch.Tensor, size: torch.Tensor | None = None):
    """tome/merge.py `merge_wavg`: size-weighted average; returns the merged tokens and the new sizes [B, T', 1]."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])

    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")

    x = x / size
    return x, size


def tome_step(x: torch.Tensor, metric: torch.Tensor, r: int, class_token: bool, distill_token: bool = False,
              size: torch.Tensor | None = None):
    """One ToMeBlock merge: (tokens [B, T', C], sizes [B, T'], groups [B, T', T] bool: which input tokens each output
    token holds (merge_source with mode="amax"))."""
    merge = bipartite_soft_matching(metric, r, class_token, distill_token)
    out, new_size = merge_wavg(merge, x, None if size is None else size[..., None])
    t = x.shape[1]
    source = torch.eye(t, dtype=x.dtype)[None].expand(x.shape[0], t, t)
    groups = merge(source, mode="amax") > 0
    return out, new_size[..., 0], groups
