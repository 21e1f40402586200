"""Video methods: tokens laid out as frames × positions (EVS, HoliTom), for a static video grid.

Token n of a video is frame t = n // P at position p = n % P: P tokens per frame, the same spatial order in every
frame (Qwen2-VL's merged tokens, where a "frame" is one temporal patch of `temporal_patch_size` video frames). The
frame count T comes from the layout, not from the recipe: the score and reduce functions take `frames=T`, and a
method is a video method when its PruneMethod has `validate_video` (core/recipe.py refuses such methods for ViTs,
which have no frames). Both score with the same similarity, the cosine of each token to the token at the same
position in the previous frame (`previous_frame_similarity`; frame 0 gets NEVER, below any cosine):

    evs      keep the K tokens that changed most, 1 - cos (frame 0 scores 3: always kept, so K >= P). vLLM's
             Efficient Video Sampling: a count fixed by the shape, content picks which (TopK + Gather).
    holitom  HoliTom (Shao et al., NeurIPS 2025) in fixed-budget form, two merges to exactly K tokens:
             1. temporal: a token whose cosine to its predecessor exceeds `tau` merges into the latest earlier
                unmerged token at its position (a run of static frames becomes its mean, at the run's first
                frame), at most N - K merges (the most similar first: merge.top_mask, exact ties to the lowest
                position). HoliTom's windows come from a dynamic program over frames (one segmentation shared
                by all positions); here each position's runs are its own, and the count is capped by the budget.
             2. spatial: DPC-kNN clustering of what remains (HoliTom's `cluster_dpc_knn`): density = exp(-mean
                squared distance to the `knn` nearest), delta = distance to the nearest denser token, the K
                tokens with the largest delta · density are centres; every other token joins its nearest centre
                and each output is the plain mean of its cluster (HoliTom's NO_BETA=1; `beta` gives its BETA
                form: docs/fidelity.md). HoliTom clusters
                each frame and window separately with one ratio; here one clustering spans all frames.
             Output k sits at centre k's original position (its run's first frame): keep_idx = the centres,
             ascending. With frames=1 (an image) only the spatial step runs.

Every step is a comparison, TopK, ArgMin or MatMul on static shapes: no NonZero, no scatter, no Loop. Ties break
to the lowest position everywhere (top_mask ranks, "denser" by (density, -position), ArgMin's first minimum), so
eager and exported graphs pick the same tokens. Distances follow HoliTom: Euclidean / sqrt(C), in float32.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tokensieve.graph_passes.methods.merge import ascending_positions, top_mask, unit_vectors
from tokensieve.graph_passes.methods.spec import Param, PruneMethod, Reduce, ScoreInput

NEVER = -2.0          # the previous-frame similarity of frame 0: below any cosine, never merged
EVS_FIRST = 1 - NEVER  # EVS's score of frame 0 (3): above any 1 - cos, always kept


def frame_shape(num_tokens: int, frames: int) -> int:
    """Tokens per frame P, or ValueError if `num_tokens` is not frames × P."""
    if frames < 1 or num_tokens % frames:
        raise ValueError(f"{num_tokens} tokens do not split into {frames} frames of equal size")
    return num_tokens // frames


def previous_frame_similarity(x: Tensor, frames: int = 1) -> Tensor:
    """(B, N, C) -> (B, N) float32: cos(x[t, p], x[t - 1, p]); NEVER for frame 0."""
    b, n, c = x.shape
    per_frame = frame_shape(n, frames)
    u = unit_vectors(x).reshape(b, frames, per_frame, c)
    sim = (u[:, 1:] * u[:, :-1]).sum(dim=-1)                                         # (B, T - 1, P)
    first = torch.full((b, 1, per_frame), NEVER, dtype=sim.dtype, device=sim.device)
    return torch.cat([first, sim], dim=1).reshape(b, n)


def evs_scores(x: Tensor, frames: int = 1) -> Tensor:
    """(B, N, C) -> (B, N): EVS's change score 1 - cos to the previous frame; frame 0 scores EVS_FIRST."""
    return 1.0 - previous_frame_similarity(x, frames)


def evs_validate(num_tokens: int, frames: int, keep: int, options: dict) -> str | None:
    per_frame = num_tokens // frames
    if frames == 1:
        return ("needs a video (grid t > 1): an image is one frame, which EVS always keeps whole; use a video grid or "
                "an image method (attn-mean, divprune, ...)") if keep < num_tokens else None
    if keep < per_frame:
        return (f"keeps {keep} tokens but EVS always keeps the whole first frame ({per_frame} tokens of "
                f"{frames} frames x {per_frame}); raise keep to at least {per_frame}")
    return None


def holitom_validate(num_tokens: int, frames: int, keep: int, options: dict) -> str | None:
    return None  # any 1 <= keep <= N works: at most N - keep temporal merges, then K of >= K clusters


# --------------------------------------------------------------------------- HoliTom


def temporal_merge(x: Tensor, sim: Tensor, frames: int, max_merges: int, tau: float) -> tuple[Tensor, Tensor]:
    """(B, N, C) tokens, (B, N) previous-frame similarity -> (run means (B, N, C) float32, valid (B, N) bool).

    Token (t, p) merges iff it is among the `max_merges` most similar and its similarity exceeds tau; every token
    then belongs to the latest frame t' <= t whose token at p did not merge (its root: frame 0 never merges). A valid
    (root) token carries the mean of its run; merged tokens are zero and invalid.
    """
    b, n, c = x.shape
    per_frame = frame_shape(n, frames)
    merged = (sim > tau) & top_mask(sim, max_merges) if max_merges > 0 else torch.zeros_like(sim, dtype=torch.bool)
    valid = ~merged
    t = torch.arange(frames, device=x.device)
    order = (t + 1).to(torch.float32)
    earlier = (t.unsqueeze(1) >= t).to(torch.float32)                                # [t, t']: t' <= t
    cand = valid.reshape(b, 1, frames, per_frame).to(torch.float32) * earlier.reshape(1, frames, frames, 1)
    root = (cand * order.reshape(1, 1, frames, 1)).amax(dim=2)                       # (B, T, P): root frame + 1
    member = (root.unsqueeze(1) == order.reshape(1, frames, 1, 1)).to(torch.float32)  # (B, T', T, P): (t, p) in (t', p)
    member = member.permute(0, 3, 1, 2)                                              # (B, P, T', T)
    frames_x = x.float().reshape(b, frames, per_frame, c).permute(0, 2, 1, 3)        # (B, P, T, C)
    sums = torch.matmul(member, frames_x)                                            # (B, P, T', C)
    counts = member.sum(dim=-1, keepdim=True).clamp_min(1.0)
    means = (sums / counts).permute(0, 2, 1, 3).reshape(b, n, c)
    return means, valid


def pairwise_distances(y: Tensor) -> Tensor:
    """(B, n, C) float32 -> (B, n, n) Euclidean distances / sqrt(C) (HoliTom's scale), exactly symmetric, 0 diagonal."""
    c = y.shape[-1]
    sq = (y * y).sum(dim=-1)
    d2 = sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * torch.matmul(y, y.transpose(-2, -1))
    d2 = (d2 + d2.transpose(-2, -1)) * 0.5
    eye = torch.eye(y.shape[1], dtype=torch.bool, device=y.device)
    return torch.where(eye, 0.0, d2.clamp_min(0.0).sqrt() / math.sqrt(c))


def dpc_knn_centres(dist: Tensor, valid: Tensor, keep: int, knn: int) -> Tensor:
    """(B, n, n) distances, (B, n) valid -> (B, n) bool: the `keep` valid tokens with the largest delta · density.

    density_i = exp(-mean of the squared distances to its min(knn, keep) nearest valid tokens (itself included));
    delta_i = distance to the nearest valid token denser than i (density, then lower position), or the largest
    valid distance for the densest. Needs >= keep valid tokens per row.
    """
    n = dist.shape[-1]
    col_valid = valid.unsqueeze(-2)                                                  # [b, i, j]: j valid
    far = torch.where(col_valid & valid.unsqueeze(-1), dist, 0.0).amax(dim=(-2, -1), keepdim=True)
    nearest = torch.where(col_valid, dist, far + 1.0).topk(min(knn, keep), dim=-1, largest=False).values
    density = torch.exp(-(nearest * nearest).mean(dim=-1))                            # (B, n)
    di, dj = density.unsqueeze(-1), density.unsqueeze(-2)
    positions = torch.arange(n, device=dist.device)
    denser = ((dj > di) | ((dj == di) & (positions < positions.unsqueeze(-1)))) & col_valid
    delta = torch.where(denser, dist, far).amin(dim=-1)
    score = torch.where(valid, delta * density, -1.0)
    return top_mask(score, keep)


def cluster_means(y: Tensor, dist: Tensor, valid: Tensor, centre: Tensor, keep: int,
                  beta: float = -1.0) -> tuple[Tensor, Tensor]:
    """Each valid token joins its nearest centre (a centre joins itself) -> (cluster tokens (B, keep, C), centres (B, keep)
    ascending). One (B, n, keep) 0/1 assignment and one MatMul. A cluster token is the plain mean of its centre and
    members (beta < 0, HoliTom's NO_BETA=1), or beta · centre + (1 - beta) · mean(members) when it has members and the
    centre itself when it has none (HoliTom's `merge_tokens_by_clustering` with NO_BETA unset: BETA, default 0.6)."""
    idx = ascending_positions(centre, keep)                                          # (B, K)
    b, n, _ = dist.shape
    to_centre = dist.gather(2, idx.unsqueeze(1).expand(b, n, keep))                  # (B, n, K)
    slots = torch.arange(keep, device=dist.device)
    nearest = to_centre.argmin(dim=-1, keepdim=True) == slots                        # (B, n, K)
    own = idx.unsqueeze(1) == torch.arange(n, device=dist.device).unsqueeze(-1)      # [b, i, k]: i is centre k
    own_w = centre.unsqueeze(-1) & own
    member_w = ~centre.unsqueeze(-1) & nearest & valid.unsqueeze(-1)
    if beta < 0:
        w = (own_w | member_w).to(torch.float32)
        sums = torch.matmul(w.transpose(1, 2), y)                                    # (B, K, C)
        return sums / w.sum(dim=1).unsqueeze(-1).clamp_min(1.0), idx
    centre_y = torch.matmul(own_w.to(torch.float32).transpose(1, 2), y)              # (B, K, C)
    members = member_w.to(torch.float32)
    count = members.sum(dim=1).unsqueeze(-1)                                         # (B, K, 1)
    mean = torch.matmul(members.transpose(1, 2), y) / count.clamp_min(1.0)
    return torch.where(count > 0, beta * centre_y + (1.0 - beta) * mean, centre_y), idx


def holitom_reduce(x: Tensor, sim: Tensor, keep: int, num_prefix_tokens: int = 0, frames: int = 1,
                   tau: float = 0.8, knn: int = 7, beta: float = -1.0) -> tuple[Tensor, Tensor]:
    """(B, p + N, C) tokens, (B, p + N) previous-frame similarity -> ((B, p + keep, C), centres (B, keep) ascending)."""
    p = num_prefix_tokens
    patches = x[:, p:]
    n = patches.shape[1]
    y, valid = temporal_merge(patches, sim[:, p:], frames, n - keep, tau)
    dist = pairwise_distances(y)
    centre = dpc_knn_centres(dist, valid, keep, knn)
    out, idx = cluster_means(y, dist, valid, centre, keep, beta)
    out = out.to(x.dtype)
    return (out if p == 0 else torch.cat([x[:, :p], out], dim=1)), idx + p


METHODS = (
    PruneMethod(
        name="evs",
        summary="video: keep the tokens that changed most since the previous frame (1 - cosine at the same "
                "position); the first frame is always kept",
        paper="Efficient Video Sampling (EVS), as vLLM prunes video tokens (NVIDIA, 2025)",
        score_input=ScoreInput.TOKENS, score=evs_scores, validate_video=evs_validate,
    ),
    PruneMethod(
        name="holitom",
        summary="video: merge each position's runs of static frames (cosine > tau to the previous frame), then "
                "merge what remains to K tokens by DPC-kNN clustering (HoliTom, fixed budget)",
        paper="HoliTom: Holistic Token Merging for Fast Video LLMs (Shao et al., NeurIPS 2025)",
        score_input=ScoreInput.TOKENS, score=previous_frame_similarity, reduce=Reduce.MERGE,
        reduce_fn=holitom_reduce, validate_video=holitom_validate,
        params=(Param("tau", 0.8, "temporal threshold: a token merges into the previous frame's token at its "
                      "position when their cosine exceeds tau", float, -1.0, 1.0),
                Param("knn", 7, "neighbours of the DPC-kNN density (capped at keep)", int, 1, 64),
                Param("beta", -1.0, "HoliTom's BETA merge: a cluster becomes beta x its centre + (1 - beta) x the mean "
                      "of its members (its code with NO_BETA unset uses 0.6); -1: the plain mean of centre and members "
                      "(NO_BETA=1)", float, -1.0, 1.0)),
        reduce_params=("tau", "knn", "beta"),
    ),
)
