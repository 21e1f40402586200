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

FastV inside the prefill (`inner="fastv@L:R"`, Gemma3FastvPrefill / Gemma3FastvDecode): fastv.py's selection and
merge on Gemma's layers; the score row is masked by layer L's own mask (a sliding layer's window); the masks of layers
L+1.. are rebuilt on the KEPT sequence (FastV rebuilds the mask for the shortened sequence and keeps the original
position ids): the kept image tokens stay one bidirectional block, the sliding window counts kept entries (as HF's
sliding cache, which keeps the last window - 1 entries); reference_gemma3_fastv_generate is the independent eager
reference (HF's masks and eager attention probabilities, FastV's algorithm). docs/vlm_gemma3.md.

What differs from HF: the flat KV cache keeps every position in every layer; HF's DynamicCache crops a sliding layer
to its last sliding_window - 1 positions. The sliding mask hides the same positions, so the attention is the same
(verify_vlm checks logits to 1e-4).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.export import Dim
from transformers.cache_utils import DynamicCache
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.export_part import PartSpec
from tokensieve.exporter.vlm.fastv import (FastvLayers, FastvReference, FastvSpec, fastv_scores, merge_into_kept,
                                           select_image_tokens)
from tokensieve.exporter.vlm.llava import _query_key
from tokensieve.exporter.vlm.lm_parts import EXAMPLE_BATCH, _cache_from, _flatten, kv_names
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


# --------------------------------------------------------------------------- FastV inside the prefill


def check_gemma3_fastv(model: nn.Module) -> None:
    """One-line ConfigError where the FastV score row would not be the attention Gemma 3 computes."""
    cap = getattr(model.config.text_config, "attn_logit_softcapping", None)
    if cap is not None:
        raise ConfigError(f"{FAMILY} FastV: attn_logit_softcapping={cap} is not in the recomputed score row (Gemma 3 "
                          "checkpoints have none); drop --inner or the softcapping")


def fastv_layer_masks(block: Tensor, index: Tensor, valid: Tensor, sliding_window: int | None) -> dict[str, Tensor]:
    """image_block_masks from block ids (B, S) (get_block_sequence_ids_for_mask: -1 for text) and each entry's
    sequence index (B, S), plus the diagonal so a padding row never has an empty softmax (its output is never read).
    After FastV the sequence is the KEPT one: `block` is the prompt's block ids gathered at keep_idx (the kept image
    tokens of an image stay one block) and `index` counts kept entries 0..T'-1, so the sliding window counts kept
    entries (kv > q - sliding_window)."""
    causal = index[:, :, None] >= index[:, None, :]                                # (B, S, S): [q, kv]
    same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    diagonal = index[:, :, None] == index[:, None, :]
    full = (((causal | same) & valid[:, None, :]) | diagonal).unsqueeze(1)
    masks = {"full_attention": full}
    if sliding_window is not None:
        window = index[:, None, :] > index[:, :, None] - sliding_window
        masks["sliding_attention"] = ((((causal | same) & valid[:, None, :]) & window) | diagonal).unsqueeze(1)
    return masks


class Gemma3FastvPrefill(FastvLayers):
    """(input_ids (B, T), image_features (B, K, H), attention_mask (B, T), position_ids (B, T)) -> (last logits (B, V),
    k0, v0, ... (layers 0..L: T, after: T'), keep_idx (B, T'), image_keep_idx (B, R)): Gemma3Prefill's inputs and
    masks with FastV after layer L (fastv.FastvLayers' selection / merge), the masks of layers L+1.. rebuilt on the
    kept sequence (fastv_layer_masks), original position ids. Each layer type takes its own rotary (Gemma 3's local
    and global RoPE bases). `rebuild_masks=False` / `recompute_positions=True` are the controls (the unpruned
    layout's masks gathered at the kept columns; positions 0..T'-1 after the drop)."""

    def __init__(self, model: nn.Module, spec: FastvSpec, rebuild_masks: bool = True,
                 recompute_positions: bool = False):
        super().__init__(model, spec)
        check_gemma3_fastv(model)
        self.embed_tokens = model.model.language_model.embed_tokens
        self.layer_types = list(model.config.text_config.layer_types)
        self.image_token_id = int(model.config.image_token_id)
        self.sliding_window = gemma3_layout(model).sliding_window
        self.rebuild_masks, self.recompute_positions = rebuild_masks, recompute_positions
        self.selection()

    def forward(self, input_ids: Tensor, image_features: Tensor, attention_mask: Tensor,
                position_ids: Tensor) -> tuple[Tensor, ...]:
        torch._check(attention_mask.shape[1] == input_ids.shape[1])
        torch._check(position_ids.shape[1] == input_ids.shape[1])
        spec, cache = self.spec, DynamicCache()
        is_image, valid, pos = input_ids == self.image_token_id, attention_mask.bool(), position_ids
        h = place_image_features(self.embed_tokens, input_ids, is_image, image_features)
        t = h.shape[1]
        ar = torch.arange(t, device=h.device)
        # the K image-token indices of each row, ascending: the K smallest keys (text columns pushed past T)
        image_positions = torch.topk(ar + (~is_image).to(torch.int64) * t, spec.num_image_tokens, dim=-1,
                                     largest=False).indices
        block = get_block_sequence_ids_for_mask(is_image.to(torch.int64))          # (B, T): -1 for text
        masks = fastv_layer_masks(block, ar.expand_as(input_ids), valid, self.sliding_window)
        pe = {kind: self.rotary_emb(h, pos, kind) for kind in sorted(set(self.layer_types))}
        for i, (layer, kind) in enumerate(zip(self.layers, self.layer_types)):
            h_in = h
            h = layer(h, attention_mask=masks[kind], position_embeddings=pe[kind], position_ids=pos,
                      past_key_values=cache, use_cache=True)
            if i != spec.layer:
                continue
            cos, sin = pe[kind]
            # the last query's row of layer L's own mask: padding and, on a sliding layer, the window
            scores = fastv_scores(layer.self_attn, layer.input_layernorm(h_in[:, -1:]), cache.layers[i].keys,
                                  cos[:, -1:], sin[:, -1:], masks[kind][:, 0, -1])
            keep_idx, image_keep = select_image_tokens(scores, image_positions, spec, self.bias, self.uniform_hit)
            if spec.merge:
                h = merge_into_kept(h, image_positions, image_keep)
            h = h.gather(1, keep_idx[..., None].expand(-1, -1, h.shape[-1]))
            kept_index = torch.ones_like(keep_idx).cumsum(1) - 1                       # (B, T') 0..T'-1
            if self.recompute_positions:  # control: positions 0..T'-1 of the shortened sequence
                pos = kept_index
            else:
                pos = pos.gather(1, keep_idx)                                          # original positions
            if self.rebuild_masks:
                masks = fastv_layer_masks(block.gather(1, keep_idx), kept_index, valid.gather(1, keep_idx),
                                          self.sliding_window)
            else:  # control: the unpruned layout's masks, rows and columns taken at the kept positions
                rows = keep_idx[:, None, :, None].expand(-1, 1, -1, t)
                cols = keep_idx[:, None, None, :].expand(-1, 1, keep_idx.shape[1], -1)
                masks = {k: m.gather(2, rows).gather(3, cols) for k, m in masks.items()}
            pe = {kind: self.rotary_emb(h, pos, kind) for kind in pe}
        return (self.lm_head(self.norm(h[:, -1])), *_flatten(cache), keep_idx, image_keep)


class Gemma3FastvDecode(FastvLayers):
    """(input_ids (B, 1), attention_mask (B, P + 1), attention_mask_pruned (B, P' + 1), position_ids (B, 1), past)
    -> (logits, present...): LLaVA's FastvDecode inputs; layers 0..L attend over the full cache, L+1.. over the
    pruned one, and a sliding layer only over the last sliding_window entries of its own cache (kv > q - window:
    the prefill's kept-index window, continued)."""

    def __init__(self, model: nn.Module, spec: FastvSpec):
        super().__init__(model, spec)
        self.embed_tokens = model.model.language_model.embed_tokens
        self.layer_types = list(model.config.text_config.layer_types)
        self.sliding_window = gemma3_layout(model).sliding_window

    def forward(self, input_ids: Tensor, attention_mask: Tensor, attention_mask_pruned: Tensor, position_ids: Tensor,
                *past: Tensor) -> tuple[Tensor, ...]:
        h, cache = self.embed_tokens(input_ids), _cache_from(past)
        pe = {kind: self.rotary_emb(h, position_ids, kind) for kind in sorted(set(self.layer_types))}
        keys = {}
        for name, valid in (("full", attention_mask.bool()), ("pruned", attention_mask_pruned.bool())):
            keys[name, "full_attention"] = valid[:, None, None, :]
            if self.sliding_window is not None:
                ar = torch.arange(valid.shape[1], device=valid.device)
                keys[name, "sliding_attention"] = (valid & (ar > valid.shape[1] - 1 - self.sliding_window))[:, None,
                                                                                                             None, :]
        for i, (layer, kind) in enumerate(zip(self.layers, self.layer_types)):
            mask = keys["full" if i <= self.spec.layer else "pruned", kind]
            h = layer(h, attention_mask=mask, position_embeddings=pe[kind], position_ids=position_ids,
                      past_key_values=cache, use_cache=True)
        return (self.lm_head(self.norm(h[:, -1])), *_flatten(cache))


def fastv_prefill_spec(layout: Gemma3Layout, spec: FastvSpec, num_text_layers: int) -> PartSpec:
    """prefill_spec's trace with FastV's two extra outputs (keep_idx (B, T'), image_keep_idx (B, R))."""
    part = prefill_spec(layout, spec.num_image_tokens, num_text_layers)
    return dataclasses.replace(part, output_names=[*part.output_names, "keep_idx", "image_keep_idx"])


# --------------------------------------------------------------------------- FastV's eager reference


def reference_gemma3_fastv_generate(model: nn.Module, input_ids: Tensor, image_features: Tensor, spec: FastvSpec,
                                    max_new_tokens: int = 8, attention_mask: Tensor | None = None,
                                    window_over_positions: bool = False) -> FastvReference:
    """FastV's released algorithm (pkunlp-icler/FastV, its LlamaModel inplace branch) on HF Gemma 3's own layers,
    independent of the parts: the features placed at the image tokens, 1-D positions cumsum(mask) - 1, and every
    mask HF's create_masks_for_vision_model (token_type_ids = the image tokens). Score = HF's eager attention
    probabilities of layer L (output_attentions), last row, head mean, at the image tokens; keep the top R
    (fastv.reference_image_keep; merge=true: fastv.reference_merge). Then every greedy step re-runs HF's decoder
    layers by hand over the whole sequence, no cache: layers 0..L over every token; layers L+1.. over the kept prompt
    tokens plus the generated ones, with their ORIGINAL position ids and masks built anew for the shortened sequence,
    as FastV does (`_prepare_decoder_attention_mask` of the new length): HF's masks of the kept sequence, so the kept
    image tokens are one block and a sliding layer's window counts kept entries (what HF's sliding cache keeps too).
    `window_over_positions=True` is the alternative (the window over original position ids), a control."""
    from tokensieve.exporter.vlm.fastv import (_eager_attention, check_prompt, place_features, reference_keep_rows,
                                               reference_merge)

    check_gemma3_fastv(model)
    lm, image_id = model.model.language_model, int(model.config.image_token_id)
    cfg, kinds = lm.config, list(lm.config.layer_types)
    ids = input_ids.long()
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
    check_prompt(ids, mask, image_id, spec.num_image_tokens)
    embeds = place_features(model, ids, image_features, image_id)
    positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    is_image = ids == image_id

    def hf_masks(h: Tensor, image: Tensor, valid: Tensor, pos: Tensor) -> dict:
        masks = create_masks_for_vision_model(config=cfg, inputs_embeds=h, attention_mask=valid, past_key_values=None,
                                              position_ids=None,
                                              block_sequence_ids=get_block_sequence_ids_for_mask(image.long()))
        if window_over_positions and cfg.sliding_window is not None:
            far = pos[:, None, :, None] - pos[:, None, None, :] >= cfg.sliding_window   # [b, 1, q, kv]
            full = masks["full_attention"]
            masks["sliding_attention"] = full.masked_fill(far, torch.finfo(full.dtype).min)
        return masks

    b, t = ids.shape
    with torch.no_grad(), _eager_attention(model):
        out = lm(inputs_embeds=embeds, attention_mask=hf_masks(embeds, is_image, mask, positions),
                 position_ids=positions, output_attentions=True, use_cache=False)
        scores = out.attentions[spec.layer][:, :, -1].float().mean(1)
        image_pos, image_keep, keep_idx = reference_keep_rows(scores, is_image, spec)
        tokens, logits = [], []
        seq, pos = embeds, positions
        for _ in range(max_new_tokens):
            cols = torch.cat([keep_idx, torch.arange(t, seq.shape[1]).expand(b, -1)], dim=1)
            image = torch.cat([is_image, torch.zeros(b, seq.shape[1] - t, dtype=torch.bool)], dim=1)
            h, p, v = seq, pos, mask
            masks = hf_masks(h, image, v, p)
            for i, (layer, kind) in enumerate(zip(lm.layers, kinds)):
                if i == spec.layer + 1:
                    if spec.merge:
                        h = reference_merge(h, image_pos, image_keep)
                    h = torch.stack([h[r, cols[r]] for r in range(b)])
                    p, v, image = p.gather(1, cols), v.gather(1, cols), image.gather(1, cols)
                    masks = hf_masks(h, image, v, p)
                h = layer(h, attention_mask=masks[kind], position_embeddings=lm.rotary_emb(h, p, kind),
                          position_ids=p)
            step_logits = model.lm_head(lm.norm(h[:, -1])).float()
            token = step_logits.argmax(-1, keepdim=True)
            tokens.append(token)
            logits.append(step_logits)
            seq = torch.cat([seq, lm.embed_tokens(token)], dim=1)
            pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return FastvReference(torch.cat(tokens, 1), torch.stack(logits), image_keep, keep_idx)
