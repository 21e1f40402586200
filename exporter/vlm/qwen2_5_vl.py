"""Qwen2.5-VL's vision part in exportable form, one image (grid (1, h, w)) or one video (grid (t, h, w), t > 1).

vision_prune: pixel_values (N, C·T·P·P) -> patch embed -> vision blocks (windowed: SDPA over batched windows; full
              attention: one SDPA) -> merger -> score -> fixed-budget TopK -> sort -> Gather
              =  features (K, H_lm), keep_idx (K,) ascending
The language model is Qwen2-VL's (same decoder, same M-RoPE get_rope_index for an image): its parts, prompts and
generation are Qwen2-VL's (exporter/vlm/qwen2_vl.py, qwen2_vl_adapter.py; the adapter is qwen2_5_vl_adapter.py).

What differs from Qwen2-VL is the tower: RMSNorm and a SwiGLU MLP in each block (the block code is the same calls),
and window attention. HF's forward permutes the patches into window order (get_vision_window_index: merge groups of
m x m patches stay contiguous, the windows are vit_merger_window_size = window_size / merge / patch merged tokens a
side, the last row / column of windows partial when the merged grid is not a multiple), runs the blocks not in
`fullatt_block_indexes` with one attention segment per window (cu_window_seqlens) and the others with one segment per
temporal step (cu_seqlens), merges, and undoes the permutation on the merged tokens. Attention is equivariant to
the token order, so the order itself changes nothing: here the patches stay in their natural (block-major) order, so
there is neither permutation nor reverse permutation, and a windowed block attends within the same groups HF's
window segments hold. For the static grid those groups are constants: `window_members` (W, L) are the natural patch
indices of each window (HF's window_index expanded to patches, cut at cu_window_seqlens), padded to the largest
window L with the window's first member; q, k, v are gathered into (W, heads, L, D), one SDPA runs with the
constant key mask (W, 1, 1, L) (None when every window is full), and each patch's output is gathered back from its
slot (`window_slot`). No N x N mask: W·L² attention entries instead of N².

Pruning is Qwen2-VL's (after the merger, CLS-free methods, run through methods.stage.run_stage with per-patch scores
pooled over each merge group). An attention score reads the last block's q, k as one full-attention row set, so it
needs that block in `fullatt_block_indexes` (Qwen2.5-VL's checkpoints: the last block is full attention); for a tower
whose last block is windowed those methods are refused in one line (hidden-state and token scores still apply).

Videos: HF's tower runs every temporal step on its own, in the windowed blocks too (get_vision_window_index tiles
each step into its windows; cu_seqlens of the full blocks is one segment per step), so the constant windows above
come from the video grid as they are (W = t x the windows of one step) and the full-attention blocks are Qwen2-VL's
per-step SDPA; the video methods (evs, holitom) read the merged tokens as t frames, as for Qwen2-VL. What a video adds
is its time spacing: VideoLayout carries the seconds one temporal patch spans (`second_per_grid`, the processor's
second_per_grid_ts = temporal_patch_size / fps), which HF's get_rope_index turns into the time positions
s + floor(i x tokens_per_second x second_per_grid) of temporal patch i (Qwen2-VL: s + i).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.vision_utils import get_vision_window_index

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.qwen2_vl import ImageLayout, Qwen2VLVisionPrune, cls_free_methods
from tokensieve.graph_passes.methods.spec import PruneMethod, ScoreInput


@dataclass(frozen=True)
class VideoLayout(ImageLayout):
    """A Qwen2.5-VL video: ImageLayout's grid (t > 1) and the seconds one temporal patch spans, fixed at export
    (HF's second_per_grid_ts: temporal_patch_size / the processor's fps); prompt_mrope_positions passes it to
    get_rope_index, whose time positions step by tokens_per_second x second_per_grid (floored) per temporal patch."""

    second_per_grid: float


def window_groups(vision_config, layout: ImageLayout) -> tuple[Tensor, Tensor, Tensor]:
    """The windowed blocks' attention groups of `layout` as constants, from HF's get_vision_window_index ->
    (members (W, L) int64: each window's natural patch indices, padded with its first one; valid (W, L) bool: the
    real members; slot (N,) int64: each patch's position in the flattened (W·L) windows)."""
    m2 = layout.merge ** 2
    window_index, cu = get_vision_window_index(layout.grid_thw, spatial_merge_size=layout.merge,
                                               window_size=vision_config.window_size,
                                               patch_size=vision_config.patch_size)
    order = (window_index[:, None] * m2 + torch.arange(m2)).reshape(-1)      # window order -> natural patch index
    bounds = [int(b) for b in cu]
    spans = list(zip(bounds, bounds[1:]))                                     # unique_consecutive: no empty window
    size = max(b - a for a, b in spans)
    members = torch.stack([torch.cat([order[a:b], order[a].repeat(size - (b - a))]) for a, b in spans])
    valid = torch.arange(size)[None] < torch.tensor([b - a for a, b in spans])[:, None]
    slot = torch.empty(layout.num_patches, dtype=torch.long)
    slot[members[valid]] = torch.arange(members.numel()).reshape(members.shape)[valid]
    return members, valid, slot


def check_score_block(visual: nn.Module, spec: PruneMethod) -> None:
    """One-line ConfigError if `spec` reads attention (the last block's q, k) but the tower's last block is windowed."""
    last = len(visual.blocks) - 1
    if spec.score_input is ScoreInput.ATTENTION_QK and last not in set(visual.fullatt_block_indexes):
        usable = [m for m in cls_free_methods() if m not in ("attn-mean", "feather")]
        raise ConfigError(f"{spec.name} reads the last vision block's attention, but block {last} of this Qwen2.5-VL "
                          f"tower is windowed (fullatt_block_indexes {list(visual.fullatt_block_indexes)}); use one "
                          f"of: {', '.join(usable)}")


class Qwen25VLVisionPrune(Qwen2VLVisionPrune):
    """pixel_values (N, patch_dim) -> (features (K, H_lm), keep_idx (K,) int64 ascending) for one static Qwen2.5-VL
    image or video: Qwen2VLVisionPrune with the windowed blocks' attention over the constant windows of the grid
    (module docstring). keep = layout.num_merged keeps every token (in order) and reproduces HF's
    `get_image_features` (a video: `get_video_features`)."""

    family = "Qwen2.5-VL"

    def __init__(self, visual: nn.Module, layout: ImageLayout, method: str, keep: int, options: dict | None = None):
        super().__init__(visual, layout, method, keep, options)
        check_score_block(visual, self.spec)
        self.full_blocks = frozenset(int(i) for i in visual.fullatt_block_indexes)
        members, valid, slot = window_groups(visual.config, layout)
        self.register_buffer("window_members", members, persistent=False)
        self.register_buffer("window_slot", slot, persistent=False)
        # the padded keys' mask (W, 1, 1, L); None when every window is full (no padding to hide)
        self.register_buffer("window_mask", None if bool(valid.all()) else valid[:, None, None, :], persistent=False)

    def _attend(self, index: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """A full-attention block as Qwen2-VL's; a windowed one: one SDPA over the (W, heads, L, D) windows."""
        if index in self.full_blocks:
            return super()._attend(index, q, k, v, scale)
        heads = q.shape[1]
        w, size = self.window_members.shape
        flat = self.window_members.reshape(-1)
        q, k, v = (s[flat].reshape(w, size, heads, -1).transpose(1, 2) for s in (q, k, v))  # (W, heads, L, D)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.window_mask, scale=scale)
        return o.transpose(1, 2).reshape(w * size, heads, -1)[self.window_slot], q, k  # back to (N, heads, D)
