"""HoliTom (Shao et al., NeurIPS 2025): DPC-kNN clustering and cluster merging of the (static) video tokens.

Source: github.com/cokeshao/HoliTom @ e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0
  holitom/llava_arch.py lines 29-50   `cluster_dpc_knn` (distances cdist / sqrt(C); density = exp(-mean of the squared
                                      distances to the k nearest, itself included); delta = distance to the nearest
                                      denser token, the largest distance for the densest; centres = top-k of
                                      delta · density)
                        lines 100-150 `merge_tokens_by_clustering` (each other token to its nearest centre, argmin;
                                      NO_BETA unset -> Beta · centre + (1 - Beta) · mean(members); NO_BETA=1 -> the
                                      mean of the centre and its members; a centre without members stays)
                        lines 199-214 `merge_tokens_by_density` (cluster_num = round(n · retain_ratio), k =
                                      min(K, cluster_num), centres sorted ascending)
Adapted: the count is given instead of the ratio, NO_BETA is an argument instead of an environment variable, and
the density noise `torch.rand(...) * 1e-6` (added "to ensure no tokens have the same density": a random tie-break)
is replaced by the deterministic rule tokensieve uses in its place, a tie goes to the lower index (denser), and
top-k ties by a stable sort.
"""
from __future__ import annotations

import torch


def cluster_dpc_knn(x, cluster_num, k=7):
    with torch.no_grad():
        batch_size, seq_len, embed_dim = x.shape

        dist_matrix = torch.cdist(x.float(), x.float()) / (embed_dim ** 0.5)    # (batch_size, seq_len, seq_len)

        # get local density
        dist_nearest, index_nearest = torch.topk(dist_matrix, k, dim=-1, largest=False)  # (batch_size, seq_len, k)
        density = (-(dist_nearest ** 2).mean(dim=-1)).exp()  # (batch_size, seq_len)
        # adaptation: instead of `density + torch.rand(...) * 1e-6`, equal densities go to the lower index
        pos = torch.arange(seq_len)
        denser = (density[:, None, :] > density[:, :, None]) | (
            (density[:, None, :] == density[:, :, None]) & (pos[None, :] < pos[:, None]))

        # get distance indicator
        mask = denser.type(x.dtype)
        dist_max = dist_matrix.flatten(1).max(dim=-1).values[:, None, None]
        dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)

        # select the cluster center according to the score
        score = dist * density
        index_center = score.sort(dim=-1, descending=True, stable=True).indices[:, :cluster_num]  # score.topk

        return index_center, dist_matrix


def merge_tokens_by_clustering(feat, target_indices, dist_matrix, cluster_num, Beta, no_beta: bool):
    batch_size, seq_len, embed_dim = feat.shape
    all_indices = torch.arange(seq_len, device=feat.device)
    all_indices = all_indices.unsqueeze(0).expand(batch_size, -1)  # (batch_size, seq_len)
    non_target_indices = torch.zeros((batch_size, seq_len - cluster_num), dtype=torch.long, device=feat.device)
    for b in range(batch_size):
        non_target_mask = ~torch.isin(all_indices[b], target_indices[b])
        non_target_indices[b] = all_indices[b][non_target_mask]

    non_target_feat = torch.gather(feat, dim=1, index=non_target_indices.unsqueeze(-1).expand(-1, -1, feat.size(-1)))
    dist_matrix = torch.gather(dist_matrix, dim=1,
                               index=non_target_indices.unsqueeze(-1).expand(-1, -1, dist_matrix.size(-1)))
    dist_matrix = torch.gather(dist_matrix, dim=2, index=target_indices.unsqueeze(1).expand(-1, dist_matrix.size(1), -1))

    idx_cluster = torch.argmin(dist_matrix, dim=-1)  # (batch_size, seq_len-cluster_num)

    cluster_tokens = []
    for b in range(batch_size):
        batch_tokens = []
        for i in range(cluster_num):
            mask = (idx_cluster[b] == i)
            if mask.any():
                cluster_features = non_target_feat[b][mask]
                if not no_beta:
                    cluster_means = cluster_features.mean(dim=0)
                    batch_tokens.append(Beta * feat[b][target_indices[b][i]] + (1 - Beta) * cluster_means)
                else:
                    all_features = torch.cat([feat[b][target_indices[b][i]].unsqueeze(0), cluster_features], dim=0)
                    batch_tokens.append(all_features.mean(dim=0))
            else:
                batch_tokens.append(feat[b][target_indices[b][i]])
        cluster_tokens.append(torch.stack(batch_tokens))
    cluster_tokens = torch.stack(cluster_tokens)  # shape: (batch_size, cluster_num, embed_dim)

    return cluster_tokens


def merge_tokens_by_density(feat, cluster_num: int, Beta: float, K: int, no_beta: bool):
    """-> (cluster tokens [B, cluster_num, C], centre indices [B, cluster_num] ascending)."""
    target_indices, dist_matrix = cluster_dpc_knn(feat, cluster_num, k=min(K, cluster_num))
    target_indices = torch.sort(target_indices, dim=-1)[0]
    return merge_tokens_by_clustering(feat, target_indices, dist_matrix, cluster_num, Beta, no_beta), target_indices
