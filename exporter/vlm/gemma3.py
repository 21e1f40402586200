"""Gemma 3 (Gemma3ForConditionalGeneration: a SigLIP tower, an average-pooling projector, the Gemma 3 decoder) in
exportable parts, one image per prompt row.

vision_prune: pixel_values (B, 3, S, S) -> SigLIP embeddings -> SigLIP layers -> post_layernorm -> projector (p x p
              patches average-pooled to s x s = mm_tokens_per_image tokens, RMSNorm, projection) -> score ->
              fixed-budget select (TopK -> sort) -> gather  =  image_features (B, K, H_lm), keep_idx (B, K) ascending
lm_prefill:   input_ids (B, T), image_features (B, K, H_lm), attention_mask (B, T), position_ids (B, T)
              -> logits (B, V) of the last position, present.N.key / present.N.value (B, kv_heads, T, D)
lm_decode:    lm_parts.LmDecode (LLaVA's): input_ids (B, 1), attention_mask (B, P + 1), position_ids (B, 1), past
              K/V -> logits (B, V), present K/V (B, kv_heads, P + 1, D)

Where the outer stage sits: after the projector's pooling, on the s x s pooled image tokens (K of the
mm_tokens_per_image tokens HF places in the prompt). Pruning the p x p patches before the pooling would break the
pooling (it averages fixed k x k windows of a full patch grid) and leave the prompt layout undefined; after it, the
kept tokens are the model's own image tokens, so a prompt carries exactly K placeholders (a static layout, as
LLaVA's) and keep = every token reproduces HF's get_image_features. SigLIP has no [CLS], so only CLS-free methods
apply (Qwen2-VL's list, exporter/vlm/qwen2_vl.cls_free_methods, without the video ones): attention scores (attn-mean,
feather(mean_attention=true)) and hidden-state scores (ttv) are read per patch from the last SigLIP layer and averaged
over each pooling window, the projector's own AvgPool2d; token scores (divprune, uniform, random) read the pooled,
projected tokens.

The language model: Gemma 3 scales the token embeddings by sqrt(hidden) inside its embedding module
(Gemma3TextScaledWordEmbedding) and then, as HF's forward does, puts the image features unscaled in place of the
image tokens' rows: the prefill embeds input_ids in the graph (image tokens read row 0, then replaced: HF replaces
them only when image_token_id is out of the vocabulary, but their rows are overwritten either way) and gives row b's
j-th image token image_features[b, j] (CumSum + Gather + Where, no scatter). Its image tokens attend to each other
bidirectionally (HF: token_type_ids -> block ids -> create_masks_for_vision_model): full-attention layers take
causal OR same-image-block, sliding layers AND that with the window (kv > q - sliding_window), both AND the padding
mask. The prefill builds both 4-D masks in the graph from the prompt it gets, which is the PRUNED one: its K image
tokens are one block (`image_block_masks`), not the N of the unpruned prompt. No token_type_ids input: the image
tokens are the placeholders, so the mask cannot disagree with the features' positions. Decoding has no image
tokens and is causal (HF drops token_type_ids after the first step), so lm_decode is LLaVA's part unchanged.

What differs from HF: the flat KV cache keeps every position in every layer; HF's DynamicCache crops a sliding layer
to its last sliding_window - 1 positions. The sliding mask hides the same positions, so the attention is the same
(verify_vlm checks logits to 1e-4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.export import Dim
from transformers.cache_utils import DynamicCache
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.export_part import PartSpec
from tokensieve.exporter.vlm.llava import _query_key
from tokensieve.exporter.vlm.lm_parts import EXAMPLE_BATCH, _flatten, kv_names
from tokensieve.exporter.vlm.qwen2_vl import cls_free_methods, resolve_method
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.graph_passes.methods.spec import PruneMethod, ScoreInput
from tokensieve.graph_passes.methods.stage import run_stage, score_call

FAMILY = "Gemma 3"
_BATCH = Dim("batch", min=1, max=4096)


@dataclass(frozen=True)
class Gemma3Layout:
    """The static facts of one Gemma 3 model that the parts and the pipeline need."""

    image_size: int
    patch_size: int
    patches_per_side: int       # p: the tower's p x p patch grid
    tokens_per_side: int        # s: the projector pools it to s x s image tokens
    num_image_tokens: int       # s * s = mm_tokens_per_image: what the outer stage keeps K of
    num_vision_layers: int
    image_token_id: int
    boi_token_id: int           # <start_of_image>, before the image tokens
    eoi_token_id: int           # <end_of_image>, after them
    sliding_window: int | None  # the sliding layers' window (None: every layer full attention)
    text_hidden_size: int
    vocab_size: int

    @property
    def kernel(self) -> int:
        """The pooling window side: k x k patches average into one image token."""
        return self.patches_per_side // self.tokens_per_side


def gemma3_layout(model: nn.Module) -> Gemma3Layout:
    """The layout of a Gemma3ForConditionalGeneration with a SigLIP tower; one-line ConfigError otherwise."""
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if getattr(cfg, "model_type", None) != "gemma3" or not hasattr(model, "lm_head") \
            or not hasattr(inner, "multi_modal_projector"):
        kind = getattr(cfg, "model_type", type(model).__name__)
        raise ConfigError(f"Gemma 3 export needs a transformers Gemma3ForConditionalGeneration, got {kind!r}; load "
                          "it with transformers' Gemma3ForConditionalGeneration")
    tower = inner.vision_tower
    if not all(hasattr(tower, a) for a in ("embeddings", "encoder", "post_layernorm")):
        raise ConfigError(f"Gemma 3 vision tower {type(tower).__name__} is not SigLIP-like (embeddings, encoder.layers, "
                          "post_layernorm); only SigLIP vision towers are supported")
    vcfg, tcfg = cfg.vision_config, cfg.text_config
    p, m = vcfg.image_size // vcfg.patch_size, int(cfg.mm_tokens_per_image)
    s = int(round(m ** 0.5))
    if s * s != m or p % s:
        raise ConfigError(f"mm_tokens_per_image={m} must be a square s*s with s dividing the {p} x {p} patch grid "
                          "(the projector pools k x k windows)")
    sliding = getattr(tcfg, "sliding_window", None)
    has_sliding = "sliding_attention" in (getattr(tcfg, "layer_types", None) or ())
    return Gemma3Layout(vcfg.image_size, vcfg.patch_size, p, s, m, len(tower.encoder.layers), int(cfg.image_token_id),
                        int(cfg.boi_token_id), int(cfg.eoi_token_id), int(sliding) if has_sliding else None,
                        tcfg.hidden_size, tcfg.vocab_size)


def gemma3_methods() -> list[str]:
    """The methods an outer stage on Gemma 3's pooled image tokens takes: CLS-free, gather, one image (no video)."""
    return [name for name in cls_free_methods() if not METHODS[name].video]


def resolve_gemma3_method(name: str, options: dict | None = None) -> tuple[PruneMethod, dict]:
    """The registry entry + checked options of a method usable on Gemma 3's image tokens; one-line ConfigError."""
    usable = ", ".join(gemma3_methods())
    spec, options = METHODS.get(name), dict(options or {})
    if spec is None:
        raise ConfigError(f"Unknown pruning method {name!r}; {FAMILY} takes one of: {usable}")
    if spec.video:
        raise ConfigError(f"{name} is a video method (frames x positions) and {FAMILY} takes one image; use one of: "
                          f"{usable}")
    if spec.needs_cls(spec.defaults() | options):
        hint = " (or mean_attention=true)" if any(p.name == "mean_attention" for p in spec.params) else ""
        raise ConfigError(f"{name} scores with the [CLS] token, which {FAMILY}'s SigLIP tower does not have; use a "
                          f"CLS-free method: {usable}{hint}")
    if any(options.get(k) for k in ("fuse", "pospad")):
        raise ConfigError(f"{name}: fuse/pospad add tokens that are no kept image token, but a {FAMILY} prompt "
                          "carries exactly K; turn them off")
    if name not in gemma3_methods():
        raise ConfigError(f"{name} does not apply to {FAMILY}'s pooled image tokens; use one of: {usable}")
    return resolve_method(name, options, None, FAMILY)  # the option checks (types, ranges, loop=false)


def check_gemma3_keep(layout: Gemma3Layout, keep: int) -> None:
    if not 1 <= keep <= layout.num_image_tokens:
        raise ConfigError(f"keep={keep} is outside [1, {layout.num_image_tokens}] image tokens "
                          f"(mm_tokens_per_image); lower keep or pass a ratio")


class Gemma3VisionPrune(nn.Module):
    """pixel_values (B, 3, S, S) -> (image features (B, K, H_lm), keep_idx (B, K) int64 ascending over the s x s
    pooled tokens). The same module is the eager reference and what is exported; keep = mm_tokens_per_image keeps
    every token in order, which is HF's get_image_features."""

    def __init__(self, model: nn.Module, layout: Gemma3Layout, method: str, keep: int, options: dict | None = None):
        super().__init__()
        self.spec, self.options = resolve_gemma3_method(method, options)
        check_gemma3_keep(layout, keep)
        tower = model.model.vision_tower
        self.embeddings, self.layers, self.post_layernorm = tower.embeddings, tower.encoder.layers, tower.post_layernorm
        self.projector = model.model.multi_modal_projector
        self.layout, self.method, self.keep = layout, method, keep

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        x = self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))
        for layer in self.layers[:-1]:
            x = layer(x, None)
        last, x_in = self.layers[-1], x
        q, k, scale = _query_key(last, x) if self.spec.score_input is ScoreInput.ATTENTION_QK else (None, None, None)
        x = last(x, None)
        features = self.projector(self.post_layernorm(x))                       # (B, s*s, H_lm): get_image_features
        scores = self._scores(q, k, scale, x_in, x, features)
        tokens, idx, _ = run_stage(self.spec, self.options, self.keep, 0, scores=scores, x_out=features)
        return tokens, idx

    def _scores(self, q, k, scale, x_in: Tensor, x_out: Tensor, features: Tensor) -> Tensor:
        """(B, s*s) scores of the pooled tokens: a token score on them, or the per-patch score averaged over each
        k x k pooling window (the projector's AvgPool2d on the row-major patch grid, as it pools the patches)."""
        if self.spec.score_input is ScoreInput.TOKENS:
            fn, args, kwargs = score_call(self.spec, self.options, self.keep, 0, x_out=features)
            return fn(*args, **kwargs)
        fn, args, kwargs = score_call(self.spec, self.options, self.keep, 0, q=q, k=k, scale=scale, x_in=x_in,
                                      x_out=x_out)
        p = self.layout.patches_per_side
        patch = fn(*args, **kwargs).reshape(-1, 1, p, p)                          # (B, N) -> (B, 1, p, p)
        return self.projector.avg_pool(patch).flatten(1)                         # (B, s*s)


def vision_spec(layout: Gemma3Layout) -> PartSpec:
    args = (torch.randn(EXAMPLE_BATCH, 3, layout.image_size, layout.image_size),)  # batch 2: see lm_parts
    return PartSpec(args, ({0: _BATCH},), ["pixel_values"], ["image_features", "keep_idx"],
                    {"pixel_values": {0: "batch"}})


# --------------------------------------------------------------------------- LM prefill


def place_image_features(embed_tokens: nn.Module, input_ids: Tensor, is_image: Tensor, features: Tensor) -> Tensor:
    """(B, T) ids, their (B, T) image-token mask, (B, K, H) features -> (B, T, H) embeddings: Gemma's scaled token
    embeddings, row b's j-th image token replaced by features[b, j] (HF's masked_scatter, row-major)."""
    embeds = embed_tokens(torch.where(is_image, torch.zeros_like(input_ids), input_ids))
    row = (torch.cumsum(is_image.to(torch.int64), dim=1) - 1).clamp_min(0)      # j-th image token -> feature j
    image = features.to(embeds.dtype).gather(1, row.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    return torch.where(is_image.unsqueeze(-1), image, embeds)


def image_block_masks(is_image: Tensor, attention_mask: Tensor, sliding_window: int | None) -> dict[str, Tensor]:
    """The prefill's 4-D boolean masks (B, 1, T, T), True = attend, for the prompt whose image tokens are `is_image`:
    full = (causal | same image block) & not padding; sliding = full & kv > q - sliding_window. HF's
    create_masks_for_vision_model on token_type_ids = is_image (blocks: get_block_sequence_ids_for_mask, one per
    run of image tokens), built with index arithmetic so it exports."""
    t = is_image.shape[1]
    pos = torch.arange(t, device=is_image.device)
    causal = pos[None, :] <= pos[:, None]                                          # (T, T): [q, kv]
    block = get_block_sequence_ids_for_mask(is_image.to(torch.int64))              # (B, T): -1 for text
    same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)     # (B, T, T)
    full = ((causal[None] | same) & attention_mask.bool()[:, None, :]).unsqueeze(1)
    masks = {"full_attention": full}
    if sliding_window is not None:
        masks["sliding_attention"] = full & (pos[None, :] > pos[:, None] - sliding_window)
    return masks


class Gemma3Prefill(nn.Module):
    """(input_ids (B, T), image_features (B, K, H), attention_mask (B, T), position_ids (B, T)) -> (last logits
    (B, V), k0, v0, k1, ...): the image tokens of input_ids take the features in order and attend to each other
    bidirectionally (image_block_masks on this prompt). bidirectional=False is the causal-only control (HF's forward
    without token_type_ids)."""

    def __init__(self, model: nn.Module, bidirectional: bool = True):
        super().__init__()
        self.language_model, self.lm_head = model.model.language_model, model.lm_head
        self.image_token_id = int(model.config.image_token_id)
        self.sliding_window = gemma3_layout(model).sliding_window
        self.bidirectional = bidirectional

    def forward(self, input_ids: Tensor, image_features: Tensor, attention_mask: Tensor,
                position_ids: Tensor) -> tuple[Tensor, ...]:
        torch._check(attention_mask.shape[1] == input_ids.shape[1])  # one `sequence` axis, not three symbols
        torch._check(position_ids.shape[1] == input_ids.shape[1])
        is_image = input_ids == self.image_token_id
        embeds = place_image_features(self.language_model.embed_tokens, input_ids, is_image, image_features)
        blocks = is_image if self.bidirectional else torch.zeros_like(is_image)
        masks = image_block_masks(blocks, attention_mask, self.sliding_window)
        out = self.language_model(inputs_embeds=embeds, attention_mask=masks,
                                  position_ids=position_ids, past_key_values=DynamicCache(), use_cache=True)
        return (self.lm_head(out.last_hidden_state[:, -1]), *_flatten(out.past_key_values))


def prefill_spec(layout: Gemma3Layout, keep: int, num_text_layers: int) -> PartSpec:
    """The prefill's trace: a batch-2 prompt of K image tokens between text; K is static (image_features' axis 1)."""
    b, t = EXAMPLE_BATCH, keep + 9
    ids = torch.full((b, t), layout.boi_token_id, dtype=torch.long)
    ids[:, 1:1 + keep] = layout.image_token_id
    args = (ids, torch.randn(b, keep, layout.text_hidden_size), torch.ones(b, t, dtype=torch.long),
            torch.arange(t).expand(b, -1).clone())
    seq = Dim.DYNAMIC
    names = ["input_ids", "image_features", "attention_mask", "position_ids"]
    return PartSpec(args, ({0: _BATCH, 1: seq}, {0: _BATCH}, {0: _BATCH, 1: seq}, {0: _BATCH, 1: seq}), names,
                    ["logits", *kv_names("present", num_text_layers)],
                    {"input_ids": {0: "batch", 1: "sequence"}, "image_features": {0: "batch"}})
