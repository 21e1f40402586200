"""FastV (inner visual-token pruning inside the LLM prefill) for Qwen2-VL, images and videos, with M-RoPE, as
exportable prefill / decode parts, and its eager reference.

    result = export_vlm(model, "out/qwen", "uniform:1.0", grid=(1, 8, 8), inner="fastv@1:0.5")   # FastV only
    result = export_vlm(model, "out/qwen", "attn-mean:8", grid=(3, 4, 4), inner="fastv@1:4")     # ToDRE-style
    report = verify_vlm(result)   # ORT greedy ids == the eager reference below, kept image tokens, every step's logits

The spec and its checks are LLaVA's (exporter/vlm/fastv.py: `fastv[(debias=true,uniform=S,merge=true)]@L:R`,
parse_fastv);
N there is the K image (video) tokens the outer stage (vision_prune) keeps, so outer keeps K and FastV keeps R of
those K. Batch 1, as the other Qwen2-VL parts.

Prefill (`Qwen2VLFastvPrefill`, lm_prefill.onnx):
    input_ids (1, T) (the outer-pruned prompt, K placeholders), image_features (K, H), position_ids (3, 1, T) M-RoPE
    -> logits (1, V), present.i.key/value (1, kv, T, D) for layers 0..L and (1, kv, T', D) for layers L+1..,
       keep_idx (T',) int64 (prompt columns kept, ascending), image_keep_idx (R,) int64 (kept ordinals among the K
       image tokens, ascending), T' = T - (K - R).
    The placeholders (image_token_id; a video: video_token_id) take the features in order (as Qwen2VLPrefill); their
    sequence indices are the K smallest of `index + T * (not placeholder)` (one TopK with the static K). Layers 0..L
    run over all T tokens. Score: the head-mean softmax row of the LAST prompt position at layer L, recomputed from
    layer L's q (of its normed input) and its cached keys: both rotated by M-RoPE exactly as Qwen2VLAttention does
    (the rotary cos/sin of the (3, 1, T) ids, mrope_section recomposed; the key cache holds rotated keys), GQA keys
    repeated (fastv.fastv_scores). The R best image tokens are kept (fastv.select_image_tokens: TopK -> sort, with
    debias / uniform=S as for LLaVA), every text token is kept; merge=true (HoliTom) first merges each other image
    token into its most similar kept one (fastv.merge_into_kept, on layer L's output); the hidden states AND the
    (3, 1, T) position ids are gathered at keep_idx, so kept tokens keep their original M-RoPE positions (a merged
    token too: its kept token's), and layers L+1.. run on T' tokens. HoliTom on a Qwen2-VL video = outer `holitom` +
    inner `fastv(merge=true)@L:R`, HoliTom's layer k being our L = k - 1.
    Masks: causal (plus the diagonal) by hand; batch 1 has no padding.
Decode (`Qwen2VLFastvDecode`, lm_decode.onnx):
    input_ids (1, 1), position_ids (3, 1, 1), past.i.key/value (1, kv, P, D) for layers 0..L (`past_sequence`),
    (1, kv, P', D) for layers L+1.. (`pruned_past_sequence`, P' = P - (K - R)) -> logits (1, V), present.i.* one
    longer. Each layer attends over its whole own cache (one query: nothing to mask). The next token's position is
    the one vlm_qwen2 gives without FastV: max(M-RoPE position of the unpruned prompt) + 1 + generated so far
    (the inner pruning moves no position: vlm_qwen2's delta with the full-length cache length P).

The eager reference (`reference_qwen2_fastv_generate`) is independent of the parts: HF's own eager attention
probabilities (output_attentions, fastv.fastv_score_reference) give the score, the image positions come from
input_ids by nonzero, the selection is fastv.reference_image_keep, merge=true is HoliTom's literal sequential loop
(fastv.reference_merge) on layer L's output, and every greedy step re-runs HF's decoder layers
by hand over the whole sequence with no cache: layers 0..L over every token, layers L+1.. over the kept prompt
tokens plus the generated ones, each with its M-RoPE ids (generated token j at next_position + j on all 3 axes).

debias: `calibrate_qwen2_fastv_bias(model, vision, pixel_values, input_ids, layer)` gives the (K,) bias of
`export_vlm(..., inner="fastv(debias=true)@L:R", inner_bias=bias)` (or `np.save` it for `export-vlm --inner-bias`):
each calibration sample goes through the outer stage and vlm_qwen2's M-RoPE bookkeeping as the greedy path does, its
reference score row (fastv_score_reference) at the image ordinals is averaged over the samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.export import Dim
from transformers.cache_utils import DynamicCache

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.export_part import PartSpec, export_part
from tokensieve.exporter.vlm.fastv import (FastvReference, FastvSpec, _eager_attention, _hand_mask, _masks,
                                           fastv_score_reference, fastv_scores, merge_into_kept, reference_image_keep,
                                           reference_merge, select_image_tokens, selection_buffers)
from tokensieve.exporter.vlm.lm_parts import _cache_from, _flatten
from tokensieve.exporter.vlm.qwen2_vl import (Qwen2VLVisionPrune, cache_names, fill_placeholders,
                                              placeholder_token_id)

_SEQ = Dim.DYNAMIC  # a strict Dim fails on the KV cat's contiguity guard (as for the plain parts)


@dataclass(frozen=True)
class Qwen2LmLayout:
    """The language model's sizes, under the attribute names fastv.prefill_macs reads from a LlavaLayout."""

    text_hidden_size: int
    num_text_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


def lm_layout(model: nn.Module) -> Qwen2LmLayout:
    cfg = model.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Qwen2LmLayout(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, cfg.vocab_size)


def check_fastv_prompt(input_ids: Tensor, placeholder_id: int, num_image_tokens: int) -> None:
    """One-line ConfigError unless the (outer-pruned) (1, T) prompt holds K placeholders and ends with a text token."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ConfigError(f"input_ids must be (1, T): the Qwen2-VL parts are batch 1, got {tuple(input_ids.shape)}")
    count = int((input_ids == placeholder_id).sum())
    if count != num_image_tokens:
        raise ConfigError(f"the prompt holds {count} placeholder tokens (id {placeholder_id}) but FastV was exported "
                          f"for {num_image_tokens} (the outer stage's keep)")
    if int(input_ids[0, -1]) == placeholder_id:
        raise ConfigError("FastV scores the image tokens with the last prompt position: the prompt must end with a "
                          "text token (e.g. <vision_end> and the question), not a placeholder")


class Qwen2VLFastvPrefill(nn.Module):
    """(input_ids (1, T), image_features (K, H), position_ids (3, 1, T)) -> (logits (1, V), k0, v0, ..., keep_idx (T',),
    image_keep_idx (R,)); see the module docstring."""

    def __init__(self, model: nn.Module, spec: FastvSpec, video: bool = False):
        super().__init__()
        lm = model.model.language_model
        self.embed_tokens, self.layers, self.norm, self.rotary_emb = lm.embed_tokens, lm.layers, lm.norm, lm.rotary_emb
        self.lm_head, self.spec = model.lm_head, spec
        self.placeholder_id = int(model.config.video_token_id if video else model.config.image_token_id)
        bias, hit = selection_buffers(spec)
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("uniform_hit", hit, persistent=False)

    def forward(self, input_ids: Tensor, image_features: Tensor, position_ids: Tensor) -> tuple[Tensor, ...]:
        spec, cache = self.spec, DynamicCache()
        h, is_image = fill_placeholders(self.embed_tokens, input_ids, image_features, self.placeholder_id)
        t = h.shape[1]
        ar = torch.arange(t, device=h.device)
        # the K placeholder indices, ascending: the K smallest keys (text columns pushed past T)
        image_positions = torch.topk(ar + (~is_image).to(torch.int64) * t, spec.num_image_tokens, dim=-1,
                                     largest=False).indices                      # (1, K)
        valid = torch.ones_like(input_ids, dtype=torch.bool)
        pos, mask, pe = position_ids, _masks(valid), self.rotary_emb(h, position_ids)
        for i, layer in enumerate(self.layers):
            h_in = h
            h = layer(h, attention_mask=mask, position_embeddings=pe, past_key_values=cache, use_cache=True)
            if i != spec.layer:
                continue
            cos, sin = pe  # (1, T, D): M-RoPE's three sections already recomposed, as the keys were rotated
            scores = fastv_scores(layer.self_attn, layer.input_layernorm(h_in[:, -1:]), cache.layers[i].keys,
                                  cos[:, -1:], sin[:, -1:], valid)
            keep_idx, image_keep = select_image_tokens(scores, image_positions, spec, self.bias, self.uniform_hit)
            if spec.merge:  # HoliTom: the other image tokens merge into the kept ones first
                h = merge_into_kept(h, image_positions, image_keep)
            h = h.gather(1, keep_idx[..., None].expand(-1, -1, h.shape[-1]))
            pos = pos.gather(2, keep_idx.unsqueeze(0).expand(3, -1, -1))           # (3, 1, T') original positions
            mask, pe = _masks(valid.gather(1, keep_idx)), self.rotary_emb(h, pos)
        logits = self.lm_head(self.norm(h[:, -1]))
        return (logits, *_flatten(cache), keep_idx[0], image_keep[0])


class Qwen2VLFastvDecode(nn.Module):
    """(input_ids (1, 1), position_ids (3, 1, 1), k0, v0, ...) -> (logits (1, V), k0, v0, ...): one step over caches of
    two lengths (layers 0..L: P, layers L+1..: P - (K - R))."""

    def __init__(self, model: nn.Module, spec: FastvSpec):
        super().__init__()
        lm = model.model.language_model
        self.embed_tokens, self.layers, self.norm, self.rotary_emb = lm.embed_tokens, lm.layers, lm.norm, lm.rotary_emb
        self.lm_head, self.spec = model.lm_head, spec

    def forward(self, input_ids: Tensor, position_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        cache = _cache_from(past)
        h = self.embed_tokens(input_ids)
        pe = self.rotary_emb(h, position_ids)
        for layer in self.layers:  # one query over its layer's own cache: every key is visible, no mask
            h = layer(h, attention_mask=None, position_embeddings=pe, past_key_values=cache, use_cache=True)
        return (self.lm_head(self.norm(h[:, -1])), *_flatten(cache))


# --------------------------------------------------------------------------- ONNX


def export_fastv_prefill(model: nn.Module, spec: FastvSpec, prompt_len: int, video: bool = False):
    """The FastV lm_prefill as an onnx_ir.Model (batch 1, `sequence` dynamic; `prompt_len` >= K + 2 sizes the example,
    whose K placeholders sit at 1..K)."""
    lay, k = lm_layout(model), spec.num_image_tokens
    prefill = Qwen2VLFastvPrefill(model, spec, video).eval()
    ids = torch.full((1, prompt_len), 1, dtype=torch.long)
    ids[0, 1:1 + k] = prefill.placeholder_id
    pos = torch.arange(prompt_len).view(1, 1, -1).expand(3, 1, -1).contiguous()
    return export_part(prefill, PartSpec(
        (ids, torch.zeros(k, lay.text_hidden_size), pos), ({1: _SEQ}, None, {2: _SEQ}),
        ["input_ids", "image_features", "position_ids"],
        ["logits", *cache_names(lay.num_text_layers, "present"), "keep_idx", "image_keep_idx"],
        {"input_ids": {1: "sequence"}}), what="Qwen2-VL FastV lm_prefill")


def export_fastv_decode(model: nn.Module, spec: FastvSpec):
    """The FastV lm_decode as an onnx_ir.Model (batch 1): `past_sequence` for layers 0..L, `pruned_past_sequence` for
    the rest. The example lengths p and p - dropped are distinct and >= 2 however many are dropped (two symbols, no
    0/1 specialization)."""
    lay = lm_layout(model)
    p = 12 + max(spec.dropped, 1)
    q = p - max(spec.dropped, 1)
    shape = lambda length: (1, lay.num_kv_heads, length, lay.head_dim)  # noqa: E731
    past = tuple(torch.zeros(shape(p if i <= spec.layer else q)) for i in range(lay.num_text_layers) for _ in "kv")
    past_names = cache_names(lay.num_text_layers, "past")
    dims = {name: {2: "past_sequence" if int(name.split(".")[1]) <= spec.layer else "pruned_past_sequence"}
            for name in past_names}
    return export_part(Qwen2VLFastvDecode(model, spec).eval(), PartSpec(
        (torch.ones(1, 1, dtype=torch.long), torch.full((3, 1, 1), p), *past),
        (None, None, tuple({2: _SEQ} for _ in past)), ["input_ids", "position_ids", *past_names],
        ["logits", *cache_names(lay.num_text_layers, "present")], dims), what="Qwen2-VL FastV lm_decode")


# --------------------------------------------------------------------------- eager reference


def reference_qwen2_fastv_generate(model: nn.Module, input_ids: Tensor, image_features: Tensor, position_ids: Tensor,
                                   next_position: int, spec: FastvSpec, placeholder_id: int,
                                   max_new_tokens: int = 8) -> FastvReference:
    """Eager FastV with HF Qwen2-VL's language model on one (outer-pruned) prompt: input_ids (1, T) with K placeholders,
    image_features (K, H), its M-RoPE position_ids (3, 1, T), and `next_position` (the first generated token's
    position: max over the unpruned prompt + 1). Score from HF's eager attention probabilities, then greedy decoding
    re-running the decoder layers by hand with no cache."""
    ids = input_ids.long()
    check_fastv_prompt(ids, placeholder_id, spec.num_image_tokens)
    if tuple(position_ids.shape) != (3, 1, ids.shape[1]):
        raise ConfigError(f"position_ids must be (3, 1, {ids.shape[1]}) M-RoPE ids, got {tuple(position_ids.shape)}")
    lm = model.model.language_model
    is_image = ids == placeholder_id
    embeds = lm.embed_tokens(ids).detach().clone()
    embeds[is_image] = image_features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
    t = ids.shape[1]
    scores = fastv_score_reference(model, embeds, torch.ones_like(ids), position_ids, spec.layer)   # (1, T)
    image_pos = torch.nonzero(is_image[0]).flatten()                                               # (K,)
    image_keep = reference_image_keep(scores[:, image_pos], spec)                                   # (1, R)
    keep = ~is_image[0]
    keep[image_pos[image_keep[0]]] = True
    keep_idx = torch.nonzero(keep).flatten()[None]                                                  # (1, T')
    tokens, logits = [], []
    with torch.no_grad(), _eager_attention(model):
        seq, pos = embeds, position_ids
        for step in range(max_new_tokens):
            cols = torch.cat([keep_idx[0], torch.arange(t, seq.shape[1])])     # kept prompt + generated
            h, p = seq, pos
            for i, layer in enumerate(lm.layers):
                if i == spec.layer + 1:
                    if spec.merge:
                        h = reference_merge(h, image_pos[None], image_keep)
                    h, p = h[:, cols], p[:, :, cols]
                h = layer(h, attention_mask=_hand_mask(torch.ones(1, h.shape[1]), h.dtype),
                          position_embeddings=lm.rotary_emb(h, p))
            step_logits = model.lm_head(lm.norm(h[:, -1])).float()
            token = step_logits.argmax(-1, keepdim=True)
            tokens.append(token)
            logits.append(step_logits)
            seq = torch.cat([seq, lm.embed_tokens(token)], dim=1)
            pos = torch.cat([pos, torch.full((3, 1, 1), next_position + step, dtype=pos.dtype)], dim=2)
    return FastvReference(torch.cat(tokens, 1), torch.stack(logits), image_keep, keep_idx)


# --------------------------------------------------------------------------- debias calibration


def calibrate_qwen2_fastv_bias(model: nn.Module, vision: Qwen2VLVisionPrune, pixel_values, input_ids,
                               layer: int) -> np.ndarray:
    """(K,) float64: the FastV score of each of the K image (video) tokens the outer stage `vision` keeps, at decoder
    layer `layer`, averaged over calibration samples per image-token ordinal: the `inner_bias` of
    `export_vlm(..., inner="fastv(debias=true)@layer:R")` with the same outer stage (same method, keep and grid).

    Each sample runs as vlm_qwen2's greedy path runs it: vision(pixels) -> the K kept features and keep_idx -> the
    outer-pruned prompt and its M-RoPE ids (get_rope_index on the unpruned prompt, kept columns gathered), then the
    reference score row (fastv.fastv_score_reference: HF's eager attention probabilities of the last prompt position,
    head mean; what the eager FastV reference selects by) at the K placeholders. Ordinal j is the j-th kept token in
    prompt order (with an outer keep of every token, e.g. uniform:1.0, the j-th image position).
    pixel_values: a list of (N, patch_dim) tensors or one (S, N, patch_dim) tensor (S samples); input_ids: the
    unpruned prompt(s) as vlm_qwen2.image_prompt / video_prompt build them: (1, T) for every sample, (S, T), or a list
    of S (1, T). One-line ConfigError for bad input."""
    from tokensieve import vlm_qwen2  # here, not at the top: vlm_qwen2 imports this module

    if not isinstance(vision, Qwen2VLVisionPrune):
        raise ConfigError(f"vision must be the outer stage, a Qwen2VLVisionPrune (tokensieve.exporter.vlm.qwen2_vl), "
                          f"got {type(vision).__name__}")
    if getattr(getattr(model, "config", None), "model_type", None) != "qwen2_vl" \
            or vision.visual is not getattr(getattr(model, "model", None), "visual", None):
        raise ConfigError("calibrate_qwen2_fastv_bias needs the Qwen2VLForConditionalGeneration whose vision tower "
                          "`vision` was built from (Qwen2VLVisionPrune(model.model.visual, ...)); LLaVA: "
                          "fastv.calibrate_fastv_bias")
    num_layers = model.config.text_config.num_hidden_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= num_layers - 2:
        raise ConfigError(f"layer {layer!r} is out of range; the language model has {num_layers} layers, calibrate "
                          f"at the L of fastv(debias=true)@L:R, 0..{num_layers - 2}")
    samples = _calibration_pixels(pixel_values)
    prompts = _calibration_prompts(input_ids, len(samples))
    layout, lm = vision.layout, model.model.language_model
    placeholder = placeholder_token_id(model.config, layout)
    want = (layout.num_patches, layout.patch_dim)
    rows = []
    with torch.no_grad():
        for i, (pixels, prompt) in enumerate(zip(samples, prompts)):
            try:
                if tuple(pixels.shape) != want:
                    raise ConfigError(f"pixel_values has shape {tuple(pixels.shape)} but grid ({layout.t}, "
                                      f"{layout.h}, {layout.w}) needs {want} (patches x C*T*P*P)")
                position_ids = vlm_qwen2.prompt_mrope_positions(model, prompt, layout)
                feats, keep_idx = vision(pixels)
                pos, cols, _ = vlm_qwen2.pruned_mrope_positions(position_ids, prompt == placeholder, keep_idx)
                ids = prompt.gather(1, cols)
                check_fastv_prompt(ids, placeholder, vision.keep)
            except ConfigError as e:
                raise ConfigError(f"calibration sample {i}: {e}") from e
            is_image = ids == placeholder
            embeds = lm.embed_tokens(ids).detach().clone()
            embeds[is_image] = feats.to(embeds.dtype)
            scores = fastv_score_reference(model, embeds, torch.ones_like(ids), pos, layer)   # (1, T)
            rows.append(scores[0, is_image[0]].double())
    return torch.stack(rows).mean(0).numpy()


def _calibration_pixels(pixel_values) -> list[Tensor]:
    """A list of (N, patch_dim) tensors or one (S, N, patch_dim) tensor -> S (N, patch_dim) tensors."""
    if isinstance(pixel_values, (Tensor, np.ndarray)):
        x = torch.as_tensor(pixel_values)
        if x.dim() != 3:
            raise ConfigError(f"pixel_values must be (S, N, patch_dim) (S calibration samples) or a list of "
                              f"(N, patch_dim), got a tensor of shape {tuple(x.shape)}")
        samples = list(x)
    elif isinstance(pixel_values, (list, tuple)):
        if not all(isinstance(x, (Tensor, np.ndarray)) for x in pixel_values):
            raise ConfigError("pixel_values must be a list of (N, patch_dim) tensors, one per calibration sample")
        samples = [torch.as_tensor(x) for x in pixel_values]
    else:
        raise ConfigError(f"pixel_values must be a list of (N, patch_dim) tensors or one (S, N, patch_dim) tensor, "
                          f"got {type(pixel_values).__name__}")
    if not samples:
        raise ConfigError("pixel_values holds no calibration sample; pass at least one image (video)")
    if any(not x.is_floating_point() for x in samples):
        raise ConfigError("pixel_values must be float tensors (the processor's normalized patches)")
    return samples


def _calibration_prompts(input_ids, count: int) -> list[Tensor]:
    """(1, T) for every sample, (S, T), or a list of S (1, T) / (T,) -> S (1, T) int64 prompts."""
    if isinstance(input_ids, (Tensor, np.ndarray)):
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] not in (1, count):
            raise ConfigError(f"input_ids must be (1, T) (one prompt for every sample) or ({count}, T) (one per "
                              f"calibration sample), got {tuple(ids.shape)}")
        rows = [ids[i:i + 1] for i in range(ids.shape[0])] * (count if ids.shape[0] == 1 else 1)
    elif isinstance(input_ids, (list, tuple)):
        if len(input_ids) != count or not all(isinstance(x, (Tensor, np.ndarray)) for x in input_ids):
            raise ConfigError(f"input_ids as a list must hold one (1, T) prompt tensor per calibration sample: "
                              f"{count}, got {len(input_ids)} items")
        rows = [torch.as_tensor(x) for x in input_ids]
        rows = [r[None] if r.dim() == 1 else r for r in rows]
        if any(r.dim() != 2 or r.shape[0] != 1 for r in rows):
            raise ConfigError("every prompt in input_ids must be (1, T) (the Qwen2-VL parts are batch 1)")
    else:
        raise ConfigError(f"input_ids must be a (1, T) / ({count}, T) tensor or a list of (1, T) prompts, got "
                          f"{type(input_ids).__name__}")
    if any(r.is_floating_point() or r.dtype == torch.bool for r in rows):
        raise ConfigError("input_ids must be integer token ids")
    return [r.long() for r in rows]
