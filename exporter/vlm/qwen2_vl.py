"""Qwen2-VL in exportable parts, for one image or one video with a static patch grid (t, h, w).

vision_prune: pixel_values (N, C·T·P·P) -> patch embed -> vision blocks (SDPA, the t temporal steps as its batch)
              -> merger -> score -> fixed-budget TopK -> sort -> Gather  =  features (K, H_lm), keep_idx (K,) ascending
lm_prefill:   input_ids (1, T), image_features (K, H_lm), position_ids (3, 1, T) -> last logits (1, V) + flat K/V
lm_decode:    input_ids (1, 1), position_ids (3, 1, 1), flat past K/V (1, kv_heads, P, D) -> logits (1, V) + K/V

Why the vision tower is not traced as HF writes it: its forward derives rotary positions and `cu_seqlens` from
`grid_thw` with `.tolist()` / `repeat_interleave`, which torch.export cannot trace even for a constant grid
(data-dependent guards). HF's cu_seqlens (vision_utils.get_vision_cu_seqlens, merge_temporal=False) put every
temporal step of the grid in its own attention segment of h·w patches: [0, N] for an image (t = 1), [0, hw, 2hw,
..., N] for a video (t > 1, each step = temporal_patch_size frames, already stacked in one pixel_values row). That
block-diagonal attention is exported statically as one SDPA over (t, heads, h·w, D), the steps as its batch axis:
no N x N mask, and exactly HF's per-segment attention. The rotary cos/sin are a function of the grid alone
(get_vision_position_ids: the block-major (h, w) ids, repeated for each temporal step; no temporal rotary in the
tower): buffers. The merger joins m x m patches of one step, so merged tokens are step-major, t·(h/m)·(w/m) of them.

Pruning is "outer" (after the merger, before the LLM). Qwen2-VL has no [CLS], so only CLS-free methods apply;
their math is the library's (graph_passes/methods): the score of a merged token is its method score on the
merged features (TOKENS methods: divprune, random, uniform) or the mean over its merge group of the patch scores
read from the last vision block (attn-mean: attention received; ttv: the block's hidden-state change).
Videos: the attention a patch receives is within its own temporal step (the only attention it gets), so the
ATTENTION_QK scores are computed per step (the steps as the batch of the score call, (t, h·w)) and flattened to the
(1, N) patch scores; a method that places a fixed share by the budget on that attention (feather) is refused for a
video. TOKENS and HIDDEN scores see the whole video at once (TopK picks K over all steps). The video methods
(graph_passes/methods/video.py: evs, holitom) read the merged tokens as frames (t) x positions ((h/m)·(w/m)) and
get frames=t; holitom merges, and each of its outputs sits at its cluster centre's position (keep_idx), so the
centre's M-RoPE position is the output's.

A video's placeholders in the prompt are `config.video_token_id` (an image's `image_token_id`): lm_prefill is
exported for the one its layout has (`placeholder_token_id`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_position_ids

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.export_part import PartSpec, export_part
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.graph_passes.methods.spec import PruneMethod, ScoreInput
from tokensieve.graph_passes.methods.stage import run_stage, score_call

# Options that add tokens (EViT's fused token, PosPad markers) have no M-RoPE position of their own.
_TOKEN_ADDING = ("fuse", "pospad")


@dataclass(frozen=True)
class ImageLayout:
    """A static image or video layout: grid (t, h, w) in patches as Qwen2-VL's processor gives `image_grid_thw`
    (t = 1) or `video_grid_thw` (t > 1: t temporal patches of temporal_patch_size frames each)."""

    t: int
    h: int
    w: int
    merge: int           # spatial_merge_size
    patch_dim: int       # C · temporal_patch_size · P · P, the width of one pixel_values row

    @property
    def is_video(self) -> bool:
        """t > 1 temporal steps: a video (per-step attention segments, video placeholder tokens)."""
        return self.t > 1

    @property
    def modality(self) -> str:
        return "video" if self.is_video else "image"

    @property
    def num_patches(self) -> int:
        return self.t * self.h * self.w

    @property
    def frame_patches(self) -> int:
        """Patches of one temporal step: the length of one attention segment."""
        return self.h * self.w

    @property
    def num_merged(self) -> int:
        """Image (video) tokens the LLM sees (before pruning)."""
        return self.num_patches // (self.merge * self.merge)

    @property
    def grid_thw(self) -> Tensor:
        return torch.tensor([[self.t, self.h, self.w]], dtype=torch.long)


def image_layout(vision_config, grid_thw) -> ImageLayout:
    """Check `grid_thw` (one image, t = 1, or one video, t > 1) against the vision config; a one-line ConfigError
    says what to change."""
    grid = [int(v) for v in torch.as_tensor(grid_thw).reshape(-1).tolist()]
    if len(grid) != 3:
        raise ConfigError(f"grid_thw must describe one image or video as (t, h, w), got {grid}; export one at a time")
    t, h, w = grid
    m = vision_config.spatial_merge_size
    if t < 1:
        raise ConfigError(f"grid_thw t={t} must be >= 1 temporal patches (1: an image, > 1: a video of "
                          f"{vision_config.temporal_patch_size} frames per temporal patch)")
    if h < m or w < m or h % m or w % m:
        raise ConfigError(f"grid_thw (h, w)=({h}, {w}) must be positive multiples of spatial_merge_size={m}")
    p = vision_config.patch_size
    patch_dim = vision_config.in_channels * vision_config.temporal_patch_size * p * p
    return ImageLayout(t, h, w, m, patch_dim)


def placeholder_token_id(config, layout: ImageLayout) -> int:
    """The prompt's placeholder token of the layout: `video_token_id` for a video, `image_token_id` for an image."""
    return int(config.video_token_id if layout.is_video else config.image_token_id)


def check_keep(layout: ImageLayout, keep: int, spec: PruneMethod | None = None, options: dict | None = None) -> None:
    """One-line ConfigError unless 1 <= keep <= the grid's merged image (video) tokens, and a video method `spec`
    accepts the budget on the layout's frames (t) x positions (evs keeps the whole first frame)."""
    if not 1 <= keep <= layout.num_merged:
        raise ConfigError(f"keep={keep} is outside [1, {layout.num_merged}] {layout.modality} tokens of grid "
                          f"({layout.t}, {layout.h}, {layout.w}); lower keep or use a larger grid")
    reason = spec.validate_video(layout.num_merged, layout.t, keep, options or {}) if spec and spec.video else None
    if reason:
        raise ConfigError(f"{spec.name} {reason} (grid ({layout.t}, {layout.h}, {layout.w}))")


def resolve_method(name: str, options: dict | None = None, layout: ImageLayout | None = None,
                   family: str = "Qwen2-VL") -> tuple[PruneMethod, dict]:
    """The registry entry + checked options of a CLS-free method usable after the merger (on `layout`'s tokens when
    given: a video refuses feather), or a one-line ConfigError naming `family` (Qwen2-VL, Qwen2.5-VL)."""
    video = layout is not None and layout.is_video
    usable = cls_free_methods(video)
    spec = METHODS.get(name)
    if spec is None:
        raise ConfigError(f"Unknown pruning method {name!r}; {family} takes one of: {', '.join(usable)}")
    opts = spec.defaults() | dict(options or {})
    unknown = set(opts) - {p.name for p in spec.params}
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {sorted(unknown)}; it takes {[p.name for p in spec.params]}")
    try:
        opts = {k: spec.param(k).check(v, name) for k, v in opts.items()}
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if spec.needs_cls(opts):
        raise ConfigError(f"{name} scores with the [CLS] token, which {family}'s vision tower does not have; "
                          f"use a CLS-free method: {', '.join(usable)}"
                          + (" (or mean_attention=true)" if any(p.name == "mean_attention" for p in spec.params) else ""))
    if video and _budget_share_on_attention(spec):
        raise ConfigError(f"{name} places a share of the budget by attention over the whole grid, but a video's "
                          f"attention is per temporal step; for grid ({layout.t}, {layout.h}, {layout.w}) use one of: "
                          f"{', '.join(usable)}")
    if name not in usable:
        raise ConfigError(f"{name} does not apply to {family}'s merged image tokens; use one of: {', '.join(usable)}")
    if any(opts.get(k) for k in _TOKEN_ADDING):
        raise ConfigError(f"{name}: fuse/pospad add tokens that have no M-RoPE position; turn them off for {family}")
    if opts.get("loop"):
        raise ConfigError(f"{name}: loop=true exports an ONNX Loop; vision_prune must stay loop-free (use loop=false)")
    return spec, opts


def cls_free_methods(video: bool = False) -> list[str]:
    """Registry methods that need no [CLS] and select with TopK or a gather-type custom reduce (no merging/state);
    video=True: without those whose attention score depends on the budget (see _budget_share_on_attention)."""
    out = []
    for name, spec in METHODS.items():
        cls_free_option = any(p.name == "mean_attention" for p in spec.params)  # e.g. feather(mean_attention=true)
        if (spec.requires_cls and not cls_free_option) or spec.carries_state is not None or spec.compacts:
            continue
        if spec.score_input not in (ScoreInput.ATTENTION_QK, ScoreInput.HIDDEN, ScoreInput.TOKENS):
            continue
        # divprune's reduce gathers; the other custom reduces merge, except the video methods' (holitom's outputs sit
        # at their cluster centres' positions, which keep_idx gives)
        if spec.reduce_fn is not None and name != "divprune" and not spec.video:
            continue
        if video and _budget_share_on_attention(spec):
            continue
        out.append(name)
    return out


def _budget_share_on_attention(spec: PruneMethod) -> bool:
    """An attention score that needs the budget (feather's uniform share): called once per temporal step it would
    place that share in every step, so it has no per-step form for a video."""
    return spec.score_input is ScoreInput.ATTENTION_QK and spec.needs_keep


class Qwen2VLVisionPrune(nn.Module):
    """pixel_values (N, patch_dim) -> (features (K, H_lm), keep_idx (K,) int64 ascending) for one static image or
    video (layout.t > 1; keep_idx then indexes the step-major video tokens).

    The same module is the eager reference and what is exported. keep = layout.num_merged keeps every token
    (in order), which reproduces HF's `get_image_features` (an image) / `get_video_features` (a video) exactly.
    """

    family = "Qwen2-VL"  # what the messages call the tower's model

    def __init__(self, visual: nn.Module, layout: ImageLayout, method: str, keep: int, options: dict | None = None):
        super().__init__()
        self.spec, self.options = resolve_method(method, options, layout, self.family)
        check_keep(layout, keep, self.spec, self.options)
        self.visual, self.layout, self.keep = visual, layout, keep
        with torch.no_grad():
            pos = get_vision_position_ids(layout.grid_thw, layout.merge)          # (N, 2) block-major (h, w) per step
            cos, sin = visual.rotary_pos_emb(torch.empty(0), pos)                # (N, head_dim) each
        self.register_buffer("rope_cos", cos.float(), persistent=False)
        self.register_buffer("rope_sin", sin.float(), persistent=False)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        x = self.visual.patch_embed(pixel_values)                                # (N, C)
        blocks = self.visual.blocks
        for index, blk in enumerate(blocks[:-1]):
            x, _ = self._block(index, blk, x)
        x_in = x
        x, (q, k, scale) = self._block(len(blocks) - 1, blocks[-1], x)
        merged = self.visual.merger(x).unsqueeze(0)                              # (1, N_m, H_lm)
        scores = self._scores(q, k, scale, x_in, x, merged)
        # the one stage dispatcher with the scores pooled here: TopK / the method's own select -> recycling
        tokens, idx, _ = run_stage(self.spec, self.options, self.keep, 0, scores=scores, x_out=merged,
                                   frames=self.layout.t)
        return tokens.squeeze(0), idx.squeeze(0)

    def _block(self, index: int, blk: nn.Module, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, float]]:
        """HF's vision block `index` (norm1, qkv, rotary, attention, proj, norm2, mlp: Qwen2-VL's and Qwen2.5-VL's
        alike) with its attention by `_attend`; returns the block output and the q, k the scores read."""
        attn = blk.attn
        n = x.shape[0]
        q, k, v = attn.qkv(blk.norm1(x)).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, self.rope_cos, self.rope_sin)
        o, q, k = self._attend(index, q, k, v, attn.scaling)
        x = x + attn.proj(o.reshape(n, -1))                                      # (N, heads, D) -> (N, C)
        x = x + blk.mlp(blk.norm2(x))
        return x, (q, k, attn.scaling)

    def _attend(self, index: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """(N, heads, D) q, k, v of block `index` -> (attention output (N, heads, D), q, k as the scores read them):
        one SDPA whose batch is the t temporal steps, HF's cu_seqlens segments [i·hw, (i+1)·hw) (an image: one segment
        [0, N]); q, k (t, heads, hw, D)."""
        n, heads, t = q.shape[0], q.shape[1], self.layout.t
        q, k, v = (s.reshape(t, n // t, heads, -1).transpose(1, 2) for s in (q, k, v))  # (t, heads, hw, D)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        return o.transpose(1, 2).reshape(n, heads, -1), q, k                    # (t, hw, heads, D) -> (N, heads, D)

    def _scores(self, q, k, scale, x_in, x_out, merged) -> Tensor:
        """(1, N_m) scores of the merged tokens (a (1, N_m, N_m) similarity for divprune).

        q, k are (t, heads, hw, D): an ATTENTION_QK score runs with the temporal steps as its batch (a patch's
        attention is within its step) and its (t, hw) rows, step-major like the patches, flatten to (1, N).
        HIDDEN scores take the whole grid as one row."""
        m2 = self.layout.merge ** 2
        if self.spec.score_input is ScoreInput.TOKENS:
            fn, args, kwargs = score_call(self.spec, self.options, self.keep, 0, x_out=merged, frames=self.layout.t)
            return fn(*args, **kwargs)
        fn, args, kwargs = score_call(self.spec, self.options, self.keep, 0, q=q, k=k, scale=scale,
                                      x_in=x_in.unsqueeze(0), x_out=x_out.unsqueeze(0))
        patch = fn(*args, **kwargs).reshape(1, -1)                               # (t, hw) or (1, N) -> (1, N)
        return patch.reshape(1, -1, m2).mean(dim=-1)                             # merge groups are contiguous


# --------------------------------------------------------------------------- LM parts


def fill_placeholders(embed_tokens: nn.Module, input_ids: Tensor, image_features: Tensor,
                      placeholder_id: int) -> tuple[Tensor, Tensor]:
    """(1, T) ids, (K, H) features -> ((1, T, H) embeddings with the j-th placeholder's row replaced by feature j,
    (1, T) placeholder mask): CumSum + Gather + Where, no scatter."""
    embeds = embed_tokens(input_ids)                                             # (1, T, H)
    is_image = input_ids == placeholder_id
    row = (torch.cumsum(is_image.to(torch.int64), dim=1) - 1).clamp_min(0)       # j-th placeholder -> row j
    image = image_features.to(embeds.dtype)[row]                                 # (1, T, H)
    return torch.where(is_image.unsqueeze(-1), image, embeds), is_image


class Qwen2VLPrefill(nn.Module):
    """(input_ids (1, T), image_features (K, H), position_ids (3, 1, T)) -> (last logits (1, V), k0, v0, k1, ...).

    The placeholders in input_ids (`config.image_token_id`; video=True: `config.video_token_id`) take the features
    in order: the j-th placeholder gets row j (CumSum + Gather + Where, no scatter). The cache is created inside and
    returned flat, so nothing cache-typed crosses the graph boundary.
    """

    def __init__(self, model: nn.Module, video: bool = False):
        super().__init__()
        self.lm, self.head = model.model.language_model, model.lm_head
        self.placeholder_id = int(model.config.video_token_id if video else model.config.image_token_id)

    def forward(self, input_ids: Tensor, image_features: Tensor, position_ids: Tensor) -> tuple[Tensor, ...]:
        embeds, _ = fill_placeholders(self.lm.embed_tokens, input_ids, image_features, self.placeholder_id)
        cache = DynamicCache(config=self.lm.config)
        out = self.lm(inputs_embeds=embeds, position_ids=position_ids, past_key_values=cache, use_cache=True)
        logits = self.head(out.last_hidden_state[:, -1])
        return (logits, *flatten_cache(out.past_key_values))


class Qwen2VLDecode(nn.Module):
    """(input_ids (1, 1), position_ids (3, 1, 1), k0, v0, k1, v1, ...) -> (logits (1, V), k0, v0, ...) one step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm, self.head = model.model.language_model, model.lm_head

    def forward(self, input_ids: Tensor, position_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        cache = DynamicCache(config=self.lm.config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.lm(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True)
        logits = self.head(out.last_hidden_state[:, -1])
        return (logits, *flatten_cache(out.past_key_values))


def flatten_cache(cache) -> list[Tensor]:
    """[k0, v0, k1, v1, ...] (each (B, kv_heads, T, D)) of a DynamicCache."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def cache_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


# --------------------------------------------------------------------------- ONNX
# Each export_* returns export_part's onnx_ir.Model (its initializers still the module's tensors; ir.to_proto gives
# a ModelProto, vlm_api.write_parts writes it).


def export_vision_prune(module: Qwen2VLVisionPrune):
    """vision_prune as an onnx_ir.Model: input `pixel_values` (N, patch_dim), outputs `image_features` (K, H_lm),
    `keep_idx` (K,); every shape static (the layout's grid, image or video)."""
    layout = module.layout
    spec = PartSpec((torch.zeros(layout.num_patches, layout.patch_dim),), (None,), ["pixel_values"],
                    ["image_features", "keep_idx"], {})
    return export_part(module, spec, what=f"{module.family} vision_prune")


def _lm_example(model: nn.Module, prompt_len: int):
    cfg = model.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pos = torch.arange(prompt_len).view(1, 1, -1).expand(3, 1, -1).contiguous()
    return cfg, head_dim, pos


def export_lm_prefill(model: nn.Module, keep: int, prompt_len: int, video: bool = False):
    """lm_prefill as an onnx_ir.Model for a pruned prompt holding `keep` image tokens (video=True: video tokens, the
    placeholder it fills is then `video_token_id`), batch 1.

    The prompt length (`sequence`) is dynamic; `prompt_len` only sizes the example. Dynamic axes are Dim.DYNAMIC:
    a strict Dim fails on the KV cat's guard min(16(P+1), 32(P+1)).
    """
    cfg, _, pos = _lm_example(model, prompt_len)
    prefill = Qwen2VLPrefill(model, video)
    ids = torch.full((1, prompt_len), 1, dtype=torch.long)
    ids[0, 1:1 + keep] = prefill.placeholder_id
    seq = torch.export.Dim.DYNAMIC
    return export_part(prefill, PartSpec(
        (ids, torch.zeros(keep, cfg.hidden_size), pos), ({1: seq}, None, {2: seq}),
        ["input_ids", "image_features", "position_ids"], ["logits", *cache_names(cfg.num_hidden_layers, "present")],
        {"input_ids": {1: "sequence"}}), what="Qwen2-VL lm_prefill")


def export_lm_decode(model: nn.Module, prompt_len: int):
    """lm_decode as an onnx_ir.Model (batch 1): one token on a past of dynamic length (`past_sequence`; the example
    has `prompt_len`); the same for images and videos (no placeholders after the prefill)."""
    cfg, head_dim, pos = _lm_example(model, prompt_len)
    n_layers = cfg.num_hidden_layers
    past = tuple(torch.zeros(1, cfg.num_key_value_heads, prompt_len, head_dim) for _ in range(2 * n_layers))
    past_names = cache_names(n_layers, "past")
    seq = torch.export.Dim.DYNAMIC
    return export_part(Qwen2VLDecode(model), PartSpec(
        (torch.ones(1, 1, dtype=torch.long), pos[:, :, :1].contiguous(), *past), (None, None, tuple({2: seq} for _ in past)),
        ["input_ids", "position_ids", *past_names], ["logits", *cache_names(n_layers, "present")],
        {n: {2: "past_sequence"} for n in past_names}), what="Qwen2-VL lm_decode")
