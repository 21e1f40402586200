"""PosPad (FocusUI): after a gather-based stage, each contiguous run of dropped patch tokens becomes one
marker token at the run's last position, so later blocks (and an LLM) still see where the gaps are.

Static shape. The number of dropped runs depends on the input, so a stage compiles a fixed budget of
M = min(K + 1, n - K) marker slots (n patch tokens in, K kept): the most runs K kept tokens can leave,
so no marker is ever lost. Output: (B, p + K + M, C) = the p prefix tokens, then kept tokens and markers
interleaved in original position order, then zero rows for the unused marker slots (always at the end).
`positions` (B, K + M) gives the original sequence position of each kept token / marker, -1 for unused
slots (a marker's position is its run's last position).

Marker value: the MEAN of its run's dropped tokens (not a zero vector): a zero marker would be
indistinguishable from the zero padding slots, while the mean keeps the gap's content at the same
activation scale as real tokens (like EViT's fused token, per run). No learned parameters.

Everything is comparisons, cumsums, a gather and one matmul: no NonZero / ScatterND / Loop.

Numerics: later blocks attend to the zero padding slots too (no attention mask is added), so the pruned
model differs from one fed the compacted sequence. Eager reference and exported ONNX run this same
function, so they agree; masking the padding is a later increment. Known limit: a LATER stage scores the
padding slots too; they are identical rows, so e.g. attn-mean gives them exactly tied scores that eager and
ONNX Runtime may break differently (kept indices then differ), and any later stage may keep a padding slot.
Until padding is masked / excluded from scoring, follow a PosPad stage only by cls-topk (tested) or none.
"""
from __future__ import annotations

import torch
from torch import Tensor


def pospad_slots(num_patches: int, keep: int) -> int:
    """M: the most dropped runs `keep` kept tokens out of `num_patches` can leave (0 if nothing is dropped)."""
    return max(0, min(keep + 1, num_patches - keep))


def pospad_tokens(x: Tensor, idx: Tensor, num_slots: int, num_prefix_tokens: int = 1) -> tuple[Tensor, Tensor]:
    """x (B, p + n, C), kept positions idx (B, K) ascending -> (tokens (B, p + K + M, C), positions (B, K + M)).

    M = `num_slots`; if a row has more dropped runs than M, the runs after the M-th get no marker
    (never the case with M = pospad_slots(n, K)).
    """
    p = num_prefix_tokens
    xp = x[:, p:]
    B, n, C = xp.shape
    S = idx.shape[1] + num_slots
    positions = torch.arange(n, device=x.device, dtype=idx.dtype)
    kept = ((idx - p).unsqueeze(-1) == positions).any(dim=1)                         # (B, n)
    dropped = ~kept
    false = torch.zeros_like(dropped[:, :1])
    prev_dropped = torch.cat([false, dropped[:, :-1]], dim=1)
    next_dropped = torch.cat([dropped[:, 1:], false], dim=1)
    run_start = dropped & ~prev_dropped
    run_end = dropped & ~next_dropped                                                  # marker positions
    run_id = torch.cumsum(run_start.long(), dim=1)                                     # 1-based on dropped tokens
    # Keep the first M runs' markers; emitted = kept tokens + markers, in position order.
    marker = run_end & (run_id <= num_slots)
    emitted = kept | marker
    rank = torch.cumsum(emitted.long(), dim=1)                                         # (B, n)
    slots = torch.arange(S, device=x.device, dtype=rank.dtype)
    # Position of the (s+1)-th emitted token = #{j : rank[j] <= s}; n for an unused slot.
    slot_pos = (rank.unsqueeze(1) <= slots.view(1, S, 1)).long().sum(dim=-1)           # (B, S)
    used = slot_pos < n
    safe = slot_pos.clamp(max=n - 1)
    slot_kept = kept.gather(1, safe) & used
    slot_marker = marker.gather(1, safe) & used
    slot_run = run_id.gather(1, safe)
    # Marker = mean of its run: weights over the patch tokens, zero rows for kept and unused slots.
    w = ((run_id.unsqueeze(1) == slot_run.unsqueeze(-1)) & dropped.unsqueeze(1) & slot_marker.unsqueeze(-1)).float()
    den = w.sum(dim=-1, keepdim=True).clamp_min(1.0)
    markers = (torch.matmul(w, xp.float()) / den).to(x.dtype)                         # (B, S, C)
    gathered = xp.gather(1, safe.unsqueeze(-1).expand(-1, -1, C))
    out = torch.where(slot_kept.unsqueeze(-1), gathered, markers)
    out_pos = torch.where(used, slot_pos + p, torch.full_like(slot_pos, -1))
    if p:
        out = torch.cat([x[:, :p], out], dim=1)
    return out, out_pos
